"""The logic of `make gpu-check` (tests/benchmarks/gpu_check.py): a tiny end-to-end run on the CPU,
and each threshold's verdict on made-up figures, both sides of every limit."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).parent / "benchmarks" / "gpu_check.py"
_SPEC = importlib.util.spec_from_file_location("gpu_check", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
gpu_check = importlib.util.module_from_spec(_SPEC)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up by name
_SPEC.loader.exec_module(gpu_check)

CHECK_NAMES = ["memory estimate", "training speed", "data wait share", "inference overhead", "AMP vs fp32 Dice"]
PASSING = {
    "memory": {"configuration": "3d_fullres", "measured_gb": 10.0, "estimated_gb": 11.0, "planned_gb": 11.5},
    "training": {"precision": "bf16", "compiled": True, "iterations_per_second": 8.0, "data_wait_fraction": 0.01},
    "inference": {"seconds": 1.2, "bare_forward_seconds": 1.0, "tiles": 27},
    "dice": {"amp_precision": "bf16", "iterations": 250, "amp": 0.801, "fp32": 0.795},
}


def statuses(measurements: dict) -> dict[str, str]:
    return {check.name: check.status for check in gpu_check.evaluate(measurements)}


def with_figure(section: str, **figures: float) -> dict:
    return {**PASSING, section: {**PASSING[section], **figures}}


@pytest.mark.slow
def test_a_tiny_cpu_run_reports_every_check(tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    code = gpu_check.main(["--device", "cpu", "--work", str(tmp_path / "work"), "--output", str(output)])
    report = json.loads(output.read_text())
    assert set(report) == {"device", "torch", "sizes", "measurements", "checks", "passed"}
    assert report["device"] == "cpu" and report["sizes"]["configuration"] == "2d"
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == CHECK_NAMES
    assert checks["memory estimate"]["status"] == "skip" and "CUDA" in checks["memory estimate"]["detail"]
    assert checks["training speed"]["status"] == "info" and checks["training speed"]["value"] > 0
    for name in CHECK_NAMES[2:]:
        assert checks[name]["status"] in ("pass", "fail") and math.isfinite(checks[name]["value"])
    measured = report["measurements"]
    assert 0 <= measured["training"]["data_wait_fraction"] < 1
    assert measured["inference"]["tiles"] >= 1 and measured["inference"]["bare_forward_seconds"] > 0
    assert 0 <= measured["dice"]["amp"] <= 1 and 0 <= measured["dice"]["fp32"] <= 1
    # the verdicts follow from the figures alone, also read back from the JSON
    assert [c.as_dict() for c in gpu_check.evaluate(measured)] == report["checks"]
    assert report["passed"] == (code == 0) == all(c["status"] != "fail" for c in report["checks"])


def test_figures_inside_every_limit_pass() -> None:
    assert statuses(PASSING) == {"memory estimate": "pass", "training speed": "info", "data wait share": "pass",
                                 "inference overhead": "pass", "AMP vs fp32 Dice": "pass"}


@pytest.mark.parametrize(("section", "check", "inside", "outside"), [
    # the estimate may be off by 15% of the measured peak, either way
    ("memory", "memory estimate", {"estimated_gb": 11.49}, {"estimated_gb": 11.51}),
    ("memory", "memory estimate", {"estimated_gb": 8.51}, {"estimated_gb": 8.49}),
    # data wait strictly under 5% of a step
    ("training", "data wait share", {"data_wait_fraction": 0.0499}, {"data_wait_fraction": 0.05}),
    # prediction at most 1.3x its forward passes
    ("inference", "inference overhead", {"seconds": 1.3}, {"seconds": 1.31}),
    # AMP within 0.01 Dice of float32, either way; a Dice that could not be computed fails
    ("dice", "AMP vs fp32 Dice", {"amp": 0.804}, {"amp": 0.806}),
    ("dice", "AMP vs fp32 Dice", {"amp": 0.786}, {"amp": 0.784}),
    ("dice", "AMP vs fp32 Dice", {"fp32": 0.8}, {"fp32": math.nan}),
])
def test_each_limit_separates_pass_from_fail(section: str, check: str, inside: dict, outside: dict) -> None:
    assert statuses(with_figure(section, **inside))[check] == "pass"
    failing = statuses(with_figure(section, **outside))
    assert failing[check] == "fail"
    assert [name for name, status in failing.items() if status == "fail"] == [check]


def test_missing_or_skipped_figures_skip_their_checks() -> None:
    assert set(statuses({}).values()) == {"skip"}
    skipped = statuses({**PASSING, "memory": {"skipped": "no CUDA"}})
    assert skipped["memory estimate"] == "skip" and skipped["inference overhead"] == "pass"


def test_the_table_names_every_check_and_verdict() -> None:
    table = gpu_check.format_table(gpu_check.evaluate(with_figure("dice", amp=0.5)))
    lines = table.splitlines()
    assert len(lines) == 1 + len(CHECK_NAMES)
    assert "FAIL" in lines[-1] and "AMP vs fp32 Dice" in lines[-1]
    assert all(name in table for name in CHECK_NAMES)


def test_without_cuda_it_skips_with_exit_status_0(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--output", str(tmp_path / "report.json")]) == 0
    assert "skipped, no CUDA GPU" in capsys.readouterr().out
    assert not (tmp_path / "report.json").exists()
