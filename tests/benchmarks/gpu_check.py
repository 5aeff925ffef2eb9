"""`make gpu-check`: what autoseg promises on a CUDA GPU, checked in under 10 minutes.

    .venv/bin/python tests/benchmarks/gpu_check.py [--output gpu_check.json] [--device cuda]

On generated example data (the CT example, ``3d_fullres``) it measures and checks:

* **memory**: the planner's training-memory estimate within 15% of the peak a real AMP training
  step allocates (``autoseg plan --verify``: :func:`autoseg.planning.probes.verify_memory`);
* **training**: iterations per second of AMP training through :func:`autoseg.training.train`
  (``precision auto``, ``compile auto``; reported) and the share of a step spent waiting for data
  (under 5%), from ``training_log.jsonl`` after a warm-up epoch;
* **inference**: the sliding-window prediction of a preprocessed case (no test-time augmentation)
  within 1.3x of the bare network's forward passes over the same tiles;
* **Dice**: the AMP model's mean test Dice within 0.01 of a float32 model trained for the same
  iterations with the same seed.

It prints a table, writes the figures and verdicts as JSON and exits 1 when a check fails. Without
CUDA it says so and exits 0, unless ``--device cpu``: then the same logic runs on a tiny 2D setup
(seconds), which ``tests/test_gpu_check.py`` exercises in ``make test``; the memory check needs
the CUDA allocator and is skipped there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.bench.measure import training_figures
from autoseg.evaluation import evaluate_folders
from autoseg.examples import make_example
from autoseg.inference import load_trained_model, predict_folder, predict_preprocessed
from autoseg.plan import Plan, deep_supervision_weights, save_plan
from autoseg.planning import plan_dataset
from autoseg.planning.probes import verify_memory
from autoseg.precision import autocast, resolve_compile, resolve_precision
from autoseg.preprocessing import preprocess_dataset
from autoseg.training import TrainOverrides, train
from autoseg.utils import atomic_write_json
from autoseg.workdir import WorkDir

MEMORY_TOLERANCE = 0.15  # |estimate - measured peak| / measured peak
DATA_WAIT_MAX = 0.05  # share of a training step spent waiting for the next batch
INFERENCE_MAX_RATIO = 1.3  # sliding-window prediction time / bare forward passes over its tiles
DICE_MAX_GAP = 0.01  # |mean Dice (AMP) - mean Dice (float32)| after equal iterations
WARMUP_EPOCHS = 1  # compilation, cuDNN autotuning and worker start land in the first epoch

PASS, FAIL, SKIP, INFO = "pass", "fail", "skip", "info"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much data and training one run of the check uses."""

    example: str  # autoseg.examples kind
    cases: int
    test_cases: int
    configuration: str
    epochs: int  # per training run, the first a warm-up
    iterations: int  # per epoch
    inference_repeats: int
    workers: int | None  # data-loading processes; None: the trainer's default (every core, at most 12)
    n_jobs: int | None  # planning and preprocessing processes; None: every core
    tiny_network: bool  # shrink the planned network to seconds on a CPU


# About 4 minutes of training on a recent GPU for both runs together, compilation included.
FULL = Sizes(example="ct", cases=10, test_cases=3, configuration="3d_fullres", epochs=5, iterations=50,
             inference_repeats=3, workers=None, n_jobs=None, tiny_network=False)
TINY = Sizes(example="2d", cases=3, test_cases=1, configuration="2d", epochs=2, iterations=2,
             inference_repeats=1, workers=0, n_jobs=1, tiny_network=True)


@dataclasses.dataclass(frozen=True)
class Check:
    """One verdict of the report."""

    name: str
    status: str  # pass | fail | skip | info
    value: float | None
    limit: str  # the threshold, in words
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- verdicts (pure: figures in, checks out) ------------------------------------------------------


def evaluate(measurements: Mapping[str, Any]) -> list[Check]:
    """The checks for a dict of measurements (as :func:`measure` returns, or read back from JSON).

    A missing or ``{"skipped": reason}`` section gives ``skip`` checks; nothing else can skip.
    """
    training = measurements.get("training")
    return [
        _verdict("memory estimate", f"within {MEMORY_TOLERANCE:.0%} of the measured peak",
                 measurements.get("memory"), _memory_figure),
        _verdict("training speed", "reported", training, _speed_figure),
        _verdict("data wait share", f"under {DATA_WAIT_MAX:.0%} of a step", training, _wait_figure),
        _verdict("inference overhead", f"at most {INFERENCE_MAX_RATIO}x the bare forward passes",
                 measurements.get("inference"), _inference_figure),
        _verdict("AMP vs fp32 Dice", f"within {DICE_MAX_GAP} of float32", measurements.get("dice"), _dice_figure),
    ]


# (value, passed or None for a figure that is only reported, detail)
Figure = tuple[float, bool | None, str]


def _verdict(name: str, limit: str, section: Mapping[str, Any] | None,
             figure: Callable[[Mapping[str, Any]], Figure]) -> Check:
    if section is None or "skipped" in section:
        return Check(name, SKIP, None, limit, section["skipped"] if section else "not measured")
    value, passed, detail = figure(section)
    return Check(name, INFO if passed is None else PASS if passed else FAIL, value, limit, detail)


def _memory_figure(section: Mapping[str, Any]) -> Figure:
    measured, estimated = float(section["measured_gb"]), float(section["estimated_gb"])
    error = abs(estimated - measured) / measured
    return error, error <= MEMORY_TOLERANCE, (f"estimated {estimated:.3f} GiB, measured peak {measured:.3f} GiB "
                                              f"({section['configuration']})")


def _speed_figure(section: Mapping[str, Any]) -> Figure:
    speed = float(section["iterations_per_second"])
    return speed, None, (f"{speed:.2f} iterations/s ({section['precision']}, compile "
                         f"{'on' if section['compiled'] else 'off'})")


def _wait_figure(section: Mapping[str, Any]) -> Figure:
    wait = float(section["data_wait_fraction"])
    return wait, wait < DATA_WAIT_MAX, f"{wait:.1%} of each step waiting for the next batch (median over epochs)"


def _inference_figure(section: Mapping[str, Any]) -> Figure:
    seconds, bare = float(section["seconds"]), float(section["bare_forward_seconds"])
    return seconds / bare, seconds / bare <= INFERENCE_MAX_RATIO, (
        f"{seconds:.3f} s against {bare:.3f} s of forward passes over {section['tiles']} tiles")


def _dice_figure(section: Mapping[str, Any]) -> Figure:
    amp, fp32 = float(section["amp"]), float(section["fp32"])
    gap = abs(amp - fp32)  # NaN when a model scored nothing: the comparison fails
    return gap, gap <= DICE_MAX_GAP, (f"mean test Dice {amp:.4f} ({section['amp_precision']}) vs {fp32:.4f} "
                                      f"(fp32) after {section['iterations']} iterations each")


def format_table(checks: Sequence[Check]) -> str:
    """The checks as an aligned text table."""
    rows = [("check", "status", "value", "limit", "detail")]
    rows += [(c.name, c.status.upper(), "-" if c.value is None else f"{c.value:.4g}", c.limit, c.detail)
             for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows)


# --- measurements ---------------------------------------------------------------------------------


def measure(device: torch.device, sizes: Sizes, folder: Path, log: Any = print) -> dict[str, Any]:
    """Generate the data, plan, preprocess, train twice, predict; return every figure (see :func:`evaluate`)."""
    started = time.perf_counter()

    def step(text: str) -> None:
        log(f"[gpu-check {time.perf_counter() - started:6.1f} s] {text}")

    raw, work = folder / "raw", folder / "work"
    step(f"example data: {sizes.cases} {sizes.example} cases + {sizes.test_cases} test cases")
    make_example(raw, kind=sizes.example, num_cases=sizes.cases, num_test_cases=sizes.test_cases)
    step("planning")
    plan = plan_dataset(raw, work, n_jobs=sizes.n_jobs, progress=False, configurations=[sizes.configuration])
    results: dict[str, Any] = {"memory": _measure_memory(plan, sizes.configuration, device)}
    if sizes.tiny_network:
        save_plan(_shrunk(plan, sizes.configuration), work / "plan.json")
    step("preprocessing")
    preprocess_dataset(work, configurations=[sizes.configuration], n_jobs=sizes.n_jobs, progress=False)
    step("training with precision auto, compile auto")
    amp = _train(work, sizes, device, "auto")
    results["training"] = amp["figures"]
    step("inference against the bare network")
    results["inference"] = _measure_inference(work, sizes, device)
    step("training in float32 for the Dice comparison")
    twin = _twin(work, folder / "work_fp32")
    fp32 = _train(twin, sizes, device, "fp32")
    step("predicting the test cases with both models")
    results["dice"] = {"amp_precision": amp["figures"]["precision"], "iterations": sizes.epochs * sizes.iterations,
                       "amp": _test_dice(work, raw, folder / "pred_amp", sizes, device, "auto"),
                       "fp32": _test_dice(twin, raw, folder / "pred_fp32", sizes, device, "fp32"),
                       "training_seconds": {"amp": amp["seconds"], "fp32": fp32["seconds"]}}
    step("done")
    return results


def _measure_memory(plan: Plan, configuration: str, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"skipped": "the measured peak comes from the CUDA allocator; run on a CUDA GPU"}
    check = verify_memory(plan, configuration, str(device))
    return {"configuration": configuration, "measured_gb": check.measured_gb, "estimated_gb": check.estimated_gb,
            "planned_gb": check.planned_gb}


def _shrunk(plan: Plan, name: str) -> Plan:
    """The plan with a three-stage, 4-feature network on 32-voxel patches (the CPU test's seconds)."""
    configuration = plan.configuration(name)
    topology = configuration.topology
    stages = 3
    small = dataclasses.replace(
        topology, features_per_stage=(4, 8, 16), kernel_sizes=topology.kernel_sizes[:stages],
        strides=((1,) * topology.dim,) + ((2,) * topology.dim,) * (stages - 1),
        n_conv_per_stage=(1,) * stages, n_conv_per_stage_decoder=(1,) * (stages - 1))
    schedule = dataclasses.replace(configuration.schedule,
                                   deep_supervision_weights=deep_supervision_weights(stages - 1))
    shrunk = dataclasses.replace(configuration, patch_size=(32,) * topology.dim, batch_size=2, topology=small,
                                 schedule=schedule)
    return dataclasses.replace(plan, configurations={**plan.configurations, name: shrunk})


def _twin(work: Path, twin: Path) -> Path:
    """A second work folder sharing the plan and preprocessed data, with models of its own."""
    twin.mkdir(parents=True, exist_ok=True)
    for entry in work.iterdir():
        if entry.name != "models":
            (twin / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return twin


def _train(work: Path, sizes: Sizes, device: torch.device, precision: str) -> dict[str, Any]:
    overrides = TrainOverrides(epochs=sizes.epochs, iterations_per_epoch=sizes.iterations, validation_iterations=1,
                               checkpoint_every=sizes.epochs, seed=12345)
    begin = time.perf_counter()
    fold_dir = train(work, sizes.configuration, "all", overrides=overrides, device=device, workers=sizes.workers,
                     progress=False, precision=precision, compile_network="auto")
    seconds = time.perf_counter() - begin
    entries = [json.loads(line) for line in (fold_dir / "training_log.jsonl").read_text().splitlines() if line.strip()]
    figures = training_figures(entries, warmup_epochs=min(WARMUP_EPOCHS, len(entries) - 1))
    return {"seconds": seconds, "figures": {
        "precision": resolve_precision(precision, device), "compiled": resolve_compile("auto", device),
        "iterations_per_second": figures["iterations_per_second"]["median"],
        "data_wait_fraction": figures["data_wait_fraction"]["median"],
        "network_seconds_per_iteration": figures["network_seconds_per_iteration"]["median"],
        "measured_epochs": len(entries) - min(WARMUP_EPOCHS, len(entries) - 1)}}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_inference(work: Path, sizes: Sizes, device: torch.device) -> dict[str, Any]:
    """Sliding-window prediction of one preprocessed case, then the same forward passes bare."""
    model = load_trained_model(work, sizes.configuration, folds=["all"], checkpoint="latest", device=device)
    folder = WorkDir(work).preprocessed(sizes.configuration)
    case = sorted(p for p in folder.glob("*.npy") if not p.name.endswith("_seg.npy"))[0]
    image = np.load(case)
    network = model.folds[0].network
    shapes: list[tuple[int, ...]] = []
    hook = network.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    try:
        predict_preprocessed(model, image, tta=False)  # warm-up: compilation, cuDNN autotuning
        shapes.clear()
        _synchronize(device)
        begin = time.perf_counter()
        for _ in range(sizes.inference_repeats):
            predict_preprocessed(model, image, tta=False)
        _synchronize(device)
        seconds = (time.perf_counter() - begin) / sizes.inference_repeats
    finally:
        hook.remove()
    per_run = shapes[:len(shapes) // sizes.inference_repeats]
    inputs = [torch.randn(shape, device=device) for shape in per_run]
    with torch.no_grad(), autocast(device, model.precision):
        network(inputs[0])  # warm-up
        _synchronize(device)
        begin = time.perf_counter()
        for _ in range(sizes.inference_repeats):
            for tensor in inputs:
                network(tensor)
        _synchronize(device)
    bare = (time.perf_counter() - begin) / sizes.inference_repeats
    return {"case": case.stem, "image_shape": list(image.shape), "tiles": sum(s[0] for s in per_run),
            "forward_passes": len(per_run), "precision": model.precision, "seconds": seconds,
            "bare_forward_seconds": bare}


def _test_dice(work: Path, raw: Path, output: Path, sizes: Sizes, device: torch.device, precision: str) -> float:
    """Mean over labels of the mean test-case Dice of the model in ``work``."""
    predict_folder(work, raw / "imagesTs", output, configuration=sizes.configuration, folds=["all"], device=device,
                   tta=False, checkpoint="latest", num_workers=0, progress=False, precision=precision,
                   overwrite=True)
    result = evaluate_folders(output, raw / "labelsTs", dataset_json=raw / "dataset.json")
    means = [metrics["dice"]["mean"] for metrics in result.summary.values() if metrics["dice"]["mean"] is not None]
    return float(np.mean(means)) if means else math.nan


# --- command line ---------------------------------------------------------------------------------


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu (a tiny run of "
                        "the same logic, for the test suite)")
    parser.add_argument("--output", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and models (default: a "
                        "temporary folder, removed afterwards)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per training run, the first a warm-up")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per epoch")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; 0 when every check passed or skipped (or CUDA is absent), 1 when one failed."""
    args = _arguments(argv)
    if args.device is None and not torch.cuda.is_available():
        print("gpu-check: skipped, no CUDA GPU here (torch sees none). Run it on a CUDA machine, or with "
              "--device cpu for a tiny run of the same logic.")
        return 0
    device = torch.device(args.device or "cuda")
    sizes = FULL if device.type == "cuda" else TINY
    sizes = dataclasses.replace(sizes, epochs=args.epochs or sizes.epochs, iterations=args.iterations or sizes.iterations)
    folder = args.work or Path(tempfile.mkdtemp(prefix="autoseg_gpu_check_"))
    try:
        measurements = measure(device, sizes, folder, log=lambda text: print(text, file=sys.stderr, flush=True))
    finally:
        if args.work is None:
            shutil.rmtree(folder, ignore_errors=True)
    checks = evaluate(measurements)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "sizes": dataclasses.asdict(sizes), "measurements": measurements,
              "checks": [c.as_dict() for c in checks], "passed": all(c.status != FAIL for c in checks)}
    atomic_write_json(args.output, report)
    print(format_table(checks))
    print(f"\n{'all checks passed' if report['passed'] else 'FAILED'}; report in {args.output}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
