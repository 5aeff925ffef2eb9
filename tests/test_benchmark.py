"""Smoke tests of autoseg.benchmark's helpers: statistics, memory measurement, JSON and report shape.

The stages themselves (planning, training, ...) are tested by their own modules; here nothing heavier
than a couple of short Python child processes runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from autoseg.bench import run as benchmark
from autoseg.bench.measure import (
    machine_info,
    process_tree,
    ratio,
    run_measured,
    summarize,
    training_figures,
)
from autoseg.bench.run import format_report, inference_inputs


@pytest.mark.parametrize(("values", "median", "low", "high"), [
    ([3.0, 1.0, 2.0], 2.0, 1.0, 3.0),
    ([4.0, 1.0, 2.0, 3.0], 2.5, 1.0, 4.0),  # even count: mean of the middle two
    ([7.5], 7.5, 7.5, 7.5),
    ((x / 10 for x in (5, 1, 9)), 0.5, 0.1, 0.9),  # any iterable
])
def test_summarize_gives_median_min_max_and_every_run_in_order(values, median, low, high):
    values = list(values)
    stat = summarize(values)
    assert set(stat) == {"median", "min", "max", "runs"}
    assert stat["median"] == pytest.approx(median)
    assert (stat["min"], stat["max"]) == (pytest.approx(low), pytest.approx(high))
    assert stat["runs"] == pytest.approx(values)
    json.dumps(stat)  # plain JSON types only


@pytest.mark.parametrize("values", [[], [1.0, math.nan], [math.inf]])
def test_summarize_refuses_empty_or_non_finite(values):
    with pytest.raises(ValueError):
        summarize(values)


@pytest.mark.parametrize(("numerator", "denominator", "expected"), [
    (1.0, 4.0, 0.25), (None, 2.0, None), (2.0, None, None), (2.0, 0.0, None),
])
def test_ratio(numerator, denominator, expected):
    assert ratio(numerator, denominator) == expected


def test_training_figures_skip_the_warmup_epoch_and_split_data_from_network_time():
    log = [
        {"epoch": 0, "iterations": 5, "data_time": 50.0, "compute_time": 50.0},  # warm-up: ignored
        {"epoch": 1, "iterations": 4, "data_time": 0.4, "compute_time": 3.6},
        {"epoch": 2, "iterations": 4, "data_time": 0.8, "compute_time": 7.2},
        {"epoch": 3, "iterations": 4, "data_time": 1.2, "compute_time": 2.8},
    ]
    figures = training_figures(log)
    assert figures["iterations_per_second"]["runs"] == pytest.approx([1.0, 0.5, 1.0])
    assert figures["iterations_per_second"]["median"] == pytest.approx(1.0)
    assert figures["data_wait_fraction"]["runs"] == pytest.approx([0.1, 0.1, 0.3])
    assert figures["data_wait_seconds_per_iteration"]["runs"] == pytest.approx([0.1, 0.2, 0.3])
    assert figures["network_seconds_per_iteration"]["runs"] == pytest.approx([0.9, 1.8, 0.7])
    assert figures["iterations_per_run"] == 4


@pytest.mark.parametrize("log", [
    [{"iterations": 4, "data_time": 1.0, "compute_time": 1.0}],  # only the warm-up
    [{}, {"iterations": 4, "data_time": 1.0}],  # a field missing
    [{}, {"iterations": 0, "data_time": 0.0, "compute_time": 0.0}],  # nothing measured
])
def test_training_figures_reject_unusable_logs(log):
    with pytest.raises(ValueError):
        training_figures(log)


def test_machine_info_describes_this_machine_as_json():
    info = machine_info("cpu")
    import torch

    assert info["cpu_count"] == os.cpu_count()
    assert info["torch"] == torch.__version__
    assert info["device"] == "cpu"
    assert info["ram_gb"] is None or info["ram_gb"] > 0
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    json.dumps(info)


def test_process_tree_includes_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert child.pid in process_tree(os.getpid())
        assert process_tree(child.pid) == [child.pid]
    finally:
        child.kill()
        child.wait()


# A child holding ~150 MB starts a grandchild holding ~100 MB: the tree's peak is their sum, while
# the largest single process is the child alone.
_TREE_SCRIPT = """
import subprocess, sys
held = b"x" * 150_000_000
grandchild = "import time; held = b'y' * 100_000_000; time.sleep(1.5)"
sys.exit(subprocess.call([sys.executable, "-c", grandchild]))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="process-tree memory needs Linux /proc")
def test_run_measured_sums_the_memory_of_the_whole_process_tree():
    measured = run_measured([sys.executable, "-c", _TREE_SCRIPT])
    assert measured.returncode == 0
    assert measured.max_processes >= 2
    assert measured.peak_tree_rss_mb > 240  # 150 + 100 MB, plus two interpreters
    assert 140 < measured.peak_process_rss_mb < 230
    assert measured.peak_tree_pss_mb > 230
    assert measured.seconds >= 1.5
    assert 0 < measured.cpu_seconds < measured.seconds  # mostly asleep; the grandchild's time counts too


def test_the_memory_sampler_leaves_the_cpu_to_what_it_measures():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    measured = run_measured([sys.executable, "-c", "import time; time.sleep(2)"])
    after = resource.getrusage(resource.RUSAGE_SELF)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert measured.seconds >= 2
    assert used / measured.seconds < 0.05  # under 5 % of one core while sampling


def test_run_measured_counts_the_cpu_time_of_children():
    burn = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"
    measured = run_measured([sys.executable, "-c", parent])
    assert measured.cpu_seconds >= 0.6


def test_run_measured_reports_exit_code_and_output_tail(tmp_path):
    log = tmp_path / "logs" / "run.log"
    measured = run_measured([sys.executable, "-c", "print('a' * 50 + 'END'); raise SystemExit(3)"],
                            log_path=log, tail_chars=10)
    assert measured.returncode == 3
    assert measured.output_tail.strip().endswith("END") and len(measured.output_tail) == 10
    assert "a" * 50 + "END" in log.read_text()  # the whole output stays in the log


def test_run_measured_kills_a_command_past_its_timeout():
    started = time.perf_counter()
    measured = run_measured([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5)
    assert measured.returncode == -9
    assert time.perf_counter() - started < 10


def _fake_stat(value: float) -> dict:
    return summarize([value, value * 0.9, value * 1.1])


def _fake_results() -> dict:
    memory = {"peak_tree_rss_mb": 900.0, "peak_tree_pss_mb": 800.0, "peak_process_rss_mb": 700.0,
              "max_processes": 3}
    return {
        "schema": benchmark.SCHEMA,
        "machine": machine_info("cpu"),
        "settings": {"repeats": 3},
        "plan": {"seconds": _fake_stat(2.0), **memory, "configurations": {}},
        "preprocess": {"cases": 8, "seconds": _fake_stat(4.0), **memory,
                       "configurations": {"3d_fullres": {"cases": 8, "seconds": _fake_stat(4.0),
                                                         "cases_per_second": _fake_stat(2.0)}}},
        "train": {"3d_fullres": {**training_figures([{}, *[{"iterations": 3, "data_time": 0.3, "compute_time": 2.7}] * 2]),
                                 "estimated_memory_gb": 3.5, "peak_gpu_allocated_gb": 3.1, **memory}},
        "predict": {"cases": 2, "voxels_per_case": {"a": 1000, "b": 2000}, "configurations": {"3d_fullres": {
            "no_tta": {"seconds_per_case": _fake_stat(5.0), "voxels_per_second": _fake_stat(3e5), **memory},
            "tta": {"seconds_per_case": _fake_stat(20.0), "voxels_per_second": _fake_stat(7e4), **memory}}}},
        "errors": {"predict/2d/tta": "RuntimeError: out of memory\nmore detail"},
    }


def test_report_lists_every_stage_and_failure():
    results = _fake_results()
    report = format_report(json.loads(json.dumps(results)))  # what a written file reads back as
    for text in ("fingerprint + plan", "preprocess 3d_fullres", "train 3d_fullres", "data wait 10.0%",
                 "GPU 3.10 GB, planned 3.50", "predict 3d_fullres no-tta", "predict 3d_fullres tta",
                 "FAILED predict/2d/tta: RuntimeError: out of memory"):
        assert text in report, text
    assert "more detail" not in report  # one line per failure


def test_report_of_an_empty_run_still_names_the_machine():
    assert "autoseg benchmark on" in format_report({"machine": machine_info("cpu"), "errors": {}})


def test_run_benchmark_checks_its_arguments_before_doing_anything(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        benchmark.run_benchmark(dataset=tmp_path, example="ct", output=None)
    with pytest.raises(ValueError, match="repeats"):
        benchmark.run_benchmark(example="ct", repeats=0, output=None)
    with pytest.raises(ValueError, match="no dataset.json"):
        benchmark.run_benchmark(dataset=tmp_path, output=None)
    with pytest.raises(ValueError, match="stage"):
        benchmark.run_benchmark(example="ct", stages=["warp"], output=None)
    assert not list(tmp_path.iterdir())


def test_inference_inputs_link_one_folder_per_test_case(tmp_path):
    from autoseg.examples import make_example
    from autoseg.io import read_image

    dataset = make_example(tmp_path / "raw", kind="2d", num_cases=2, num_test_cases=2)
    inputs = inference_inputs(dataset, tmp_path / "inputs", count=5)
    test_images = sorted((dataset / "imagesTs").iterdir())
    assert [folder.name for folder, _ in inputs] == [p.name[: -len("_0000.png")] for p in test_images]
    for (folder, voxels), image in zip(inputs, test_images):
        assert [p.name for p in folder.iterdir()] == [image.name]
        assert voxels == read_image(image).array.size

    # Without a test folder the first training cases stand in.
    for path in (dataset / "imagesTs").iterdir():
        path.unlink()
    (dataset / "imagesTs").rmdir()
    inputs = inference_inputs(dataset, tmp_path / "inputs_tr", count=1)
    assert [folder.name for folder, _ in inputs] == ["cells_000"]
