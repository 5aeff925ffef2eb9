"""The whole benchmark (:func:`run_benchmark`, what ``autoseg benchmark`` runs) and its report."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.bench.measure import WARMUP_RUNS, machine_info, summarize, training_figures
from autoseg.bench.stages import BenchmarkError, run_stage
from autoseg.dataset import IMAGES_TS, index_cases, load_dataset_json, training_cases
from autoseg.devices import resolve_device
from autoseg.examples import make_example
from autoseg.inference import export_networks
from autoseg.io import read_image
from autoseg.plan import load_plan
from autoseg.utils import atomic_write_json
from autoseg.workdir import CHECKPOINT_LATEST, WorkDir

SCHEMA = "autoseg-benchmark/1"
# Iterations per training epoch (one measured run): enough to average out batch-to-batch noise,
# few enough that `make bench` takes minutes on a laptop CPU.
DEFAULT_ITERATIONS = {"cpu": 2, "cuda": 25}
DEFAULT_EXAMPLE_CASES = {"ct": 8, "mri": 6, "2d": 12}
# Cases predicted per run: a full-size 3D case with mirroring takes minutes on a laptop CPU.
DEFAULT_INFERENCE_CASES = {"cpu": 1, "cuda": 3}
STAGES = ("plan", "preprocess", "train", "predict")


# --- the whole benchmark -----------------------------------------------------------------------------


@dataclass
class _Context:
    dataset: Path
    work: Path
    folder: Path
    device: str
    repeats: int
    iterations: int
    n_jobs: int | None
    inference_cases: int
    results: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)
    show: bool = True

    def say(self, text: str) -> None:
        if self.show:
            print(text, flush=True)


def run_benchmark(dataset: str | os.PathLike | None = None, example: str | None = None, device: str = "cpu",
                  output: str | os.PathLike | None = "bench_results.json", repeats: int = 3, *,
                  configurations: Sequence[str] | None = None, iterations: int | None = None,
                  num_cases: int | None = None, inference_cases: int | None = None,
                  n_jobs: int | None = None, work_dir: str | os.PathLike | None = None,
                  stages: Sequence[str] = STAGES, verbose: bool = True) -> dict[str, Any]:
    """Measure planning, preprocessing, training and inference on this machine; write JSON.

    Args:
        dataset: a raw dataset folder (nnU-Net v2 layout); or
        example: ``"ct"``, ``"mri"`` or ``"2d"``: generate that example dataset (``ct`` when neither
            is given) with ``num_cases`` training cases and ``inference_cases`` test cases.
        device: ``cpu`` or ``cuda`` (``cuda:N``), or ``auto`` (CUDA when there is one).
        output: JSON file to write (None: write nothing).
        repeats: measured runs per figure, after one warm-up run.
        configurations: configurations to plan and measure (default: the planner's choice).
        iterations: training iterations per measured run (default 2 on CPU, 25 on CUDA).
        num_cases: training cases of a generated example.
        inference_cases: cases predicted per run (test cases, or the first training cases of a
            dataset without ``imagesTs``; default 1 on CPU, 3 on CUDA).
        n_jobs: processes for fingerprint and preprocessing (default: every core).
        work_dir: keep every artifact here (default: a temporary folder, deleted at the end).
        stages: the stages to run, in order (later stages need the earlier ones' outputs).
        verbose: print each figure as it is measured, and the summary table.

    On the CPU, with the onnx extra installed, inference is also measured with the network in
    onnxruntime (``onnx_no_tta``: exported from the same checkpoint, the same pipeline around it).

    Returns:
        The results (also written to ``output``): ``schema``, ``machine``, ``settings``, one entry
        per stage, and ``errors`` (stage -> message) for stages that failed; a failed stage does
        not stop the others.

    Raises:
        ValueError: both or bad sources, ``repeats`` < 1, or an unknown stage.
        BenchmarkError: CUDA asked for but not available.
    """
    if dataset is not None and example is not None:
        raise ValueError("give either a dataset folder or an example kind, not both")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    device = str(resolve_device(device)) if str(device) == "auto" else str(device)
    _check_device(device)
    if dataset is None:
        example = example or "ct"
        if example not in DEFAULT_EXAMPLE_CASES:
            raise ValueError(f"unknown example kind {example!r}; choose ct, mri or 2d")
    elif not (Path(dataset) / "dataset.json").is_file():
        raise ValueError(f"{dataset}: not a dataset folder (no dataset.json)")
    kind = "cuda" if device.startswith("cuda") else "cpu"
    iterations = iterations or DEFAULT_ITERATIONS[kind]
    inference_cases = inference_cases or DEFAULT_INFERENCE_CASES[kind]

    root = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="autoseg_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        if dataset is None:
            dataset_dir = root / f"example_{example}"
            if not (dataset_dir / "dataset.json").is_file():
                shutil.rmtree(dataset_dir, ignore_errors=True)
                make_example(dataset_dir, kind=example, num_cases=num_cases or DEFAULT_EXAMPLE_CASES[example],
                             seed=0, num_test_cases=inference_cases, progress=verbose)
        else:
            dataset_dir = Path(dataset)
        results: dict[str, Any] = {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(device),
            "settings": {"dataset": str(dataset_dir), "example": example, "device": device, "repeats": repeats,
                         "warmup_runs": WARMUP_RUNS, "training_iterations_per_run": iterations,
                         "inference_cases": inference_cases, "n_jobs": n_jobs,
                         "configurations": list(configurations) if configurations else None},
        }
        ctx = _Context(dataset_dir, root / "work", root / "stages", device, repeats, iterations, n_jobs,
                       inference_cases, results, show=verbose)
        ctx.folder.mkdir(parents=True, exist_ok=True)
        steps = {"plan": lambda: _bench_plan(ctx, configurations), "preprocess": lambda: _bench_preprocess(ctx),
                 "train": lambda: _bench_train(ctx), "predict": lambda: _bench_predict(ctx)}
        for stage in stages:
            try:
                steps[stage]()
            except Exception as error:  # one failed stage still leaves the others' figures
                ctx.errors[stage] = f"{type(error).__name__}: {error}"
                ctx.say(f"[{stage}] failed: {ctx.errors[stage]}")
        results["errors"] = ctx.errors
        if output is not None:
            atomic_write_json(output, results)
        if verbose:
            print(format_report(results))
            if output is not None:
                print(f"wrote {output}")
        return results
    finally:
        if work_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ValueError(f"device must be cpu or cuda[:N], got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise BenchmarkError("device cuda was asked for but torch sees no CUDA device; use --device cpu")


def _bench_plan(ctx: _Context, configurations: Sequence[str] | None) -> None:
    options: dict[str, Any] = {"configurations": list(configurations)} if configurations else {}
    params = {"dataset": str(ctx.dataset), "work": str(ctx.work), "repeats": ctx.repeats, "n_jobs": ctx.n_jobs,
              "plan_options": options}
    result, measured = run_stage("plan", params, ctx.folder)
    plan = load_plan(ctx.work)
    ctx.results["plan"] = {"seconds": summarize(result["seconds"]), **measured.memory(),
                           "configurations": {name: _configuration_summary(c) for name, c in
                                              plan.configurations.items()}}
    ctx.say(f"[plan] fingerprint+plan {_fmt_stat(ctx.results['plan']['seconds'], 's')}, "
            f"peak {measured.peak_tree_rss_mb:.0f} MiB")


def _configuration_summary(configuration: Any) -> dict[str, Any]:
    return {"patch_size": list(configuration.patch_size), "batch_size": configuration.batch_size,
            "spacing": [round(s, 4) for s in configuration.spacing],
            "features_per_stage": list(configuration.topology.features_per_stage),
            "estimated_memory_gb": configuration.estimated_memory_gb}


def _planned(ctx: _Context) -> list[str]:
    """The configurations with data of their own (the cascade shares 3d_fullres's)."""
    return [n for n, c in load_plan(ctx.work).configurations.items() if c.preprocessed_data is None]


def _skip_cascade(ctx: _Context, stage: str, configuration: Any) -> bool:
    """The cascade needs every fold of its previous stage: not measured (its network is 3d_fullres's
    with a few more input channels, so 3d_fullres's figures stand for it)."""
    if not configuration.previous_stage:
        return False
    ctx.say(f"[{stage}] {configuration.name}: not measured (needs every {configuration.previous_stage} fold; "
            f"its network is {configuration.preprocessed_data or 'full resolution'}'s with "
            f"{configuration.topology.in_channels - configuration.base_channels} more input channel(s))")
    return True


def _bench_preprocess(ctx: _Context) -> None:
    names = _planned(ctx)
    params = {"work": str(ctx.work), "configurations": names, "repeats": ctx.repeats, "n_jobs": ctx.n_jobs,
              "device": ctx.device}
    result, measured = run_stage("preprocess", params, ctx.folder)
    runs = result["runs"]
    cases = runs[0]["configurations"][names[0]]["cases"]
    per_configuration = {}
    for name in names:
        seconds = [r["configurations"][name]["seconds"] for r in runs]
        count = runs[0]["configurations"][name]["cases"]
        per_configuration[name] = {"cases": count, "seconds": summarize(seconds),
                                   "cases_per_second": summarize(count / s for s in seconds)}
    ctx.results["preprocess"] = {"cases": cases, "seconds": summarize(r["seconds"] for r in runs),
                                 "configurations": per_configuration, **measured.memory()}
    for name, figures in per_configuration.items():
        ctx.say(f"[preprocess] {name}: {_fmt_stat(figures['cases_per_second'], 'cases/s')}")
    ctx.say(f"[preprocess] peak {measured.peak_tree_rss_mb:.0f} MiB over {measured.max_processes} processes")


def _bench_train(ctx: _Context) -> None:
    plan = load_plan(ctx.work)
    ctx.results["train"] = {}
    for name in plan.configurations:
        if _skip_cascade(ctx, "train", plan.configuration(name)):
            continue
        try:
            params = {"work": str(ctx.work), "configuration": name, "device": ctx.device, "repeats": ctx.repeats,
                      "iterations": ctx.iterations}
            result, measured = run_stage("train", params, ctx.folder)
            figures = training_figures(result["log"])
            configuration = plan.configuration(name)
            entry = {**figures, **_configuration_summary(configuration), **measured.memory(),
                     "total_seconds": round(result["total_seconds"], 3)}
            for key in ("peak_gpu_allocated_gb", "peak_gpu_reserved_gb"):
                if key in result:
                    entry[key] = result[key]
            ctx.results["train"][name] = entry
            ctx.say(f"[train] {name}: {_fmt_stat(figures['iterations_per_second'], 'it/s')}, data wait "
                    f"{figures['data_wait_fraction']['median']:.1%}, peak {measured.peak_tree_rss_mb:.0f} MiB")
        except Exception as error:
            ctx.errors[f"train/{name}"] = f"{type(error).__name__}: {error}"
            ctx.say(f"[train] {name} failed: {ctx.errors[f'train/{name}']}")


def inference_inputs(dataset_dir: str | os.PathLike, destination: str | os.PathLike,
                     count: int) -> list[tuple[Path, int]]:
    """One folder per case under ``destination`` (links to the images) for timing case by case.

    Test cases (``imagesTs``) are used when there are any, else the first training cases.
    Returns ``(folder, number of voxels)`` per case (voxels of one channel: the spatial size).
    """
    dataset_dir, destination = Path(dataset_dir), Path(destination)
    dataset = load_dataset_json(dataset_dir)
    cases = index_cases(dataset_dir / IMAGES_TS, dataset.file_ending, dataset.num_channels).cases \
        if (dataset_dir / IMAGES_TS).is_dir() else []
    cases = (cases or training_cases(dataset_dir, dataset))[:count]
    inputs = []
    for case in cases:
        folder = destination / case.case_id
        folder.mkdir(parents=True, exist_ok=True)
        for image in case.images:
            link = folder / image.name
            if not link.exists():
                try:
                    link.symlink_to(image.resolve())
                except OSError:
                    shutil.copy2(image, link)
        inputs.append((folder, int(read_image(case.images[0]).array.size)))
    return inputs


def _bench_predict(ctx: _Context) -> None:
    plan = load_plan(ctx.work)
    inputs = inference_inputs(ctx.dataset, ctx.folder / "inference_input", ctx.inference_cases)
    ctx.results["predict"] = {"cases": len(inputs), "voxels_per_case": {f.name: n for f, n in inputs},
                              "configurations": {}}
    for name in plan.configurations:
        if _skip_cascade(ctx, "predict", plan.configuration(name)):
            continue
        if not (WorkDir(ctx.work).fold(name, "all") / CHECKPOINT_LATEST).is_file():
            ctx.errors[f"predict/{name}"] = "no trained model (the train stage failed or did not run)"
            continue
        entry: dict[str, Any] = {}
        for tta in (False, True):
            _measure_predict(ctx, name, "tta" if tta else "no_tta", inputs, entry, tta=tta)
        if onnx_comparable(ctx.device):
            # The same prediction with the network in onnxruntime (exported from the same checkpoint):
            # what deploying without torch costs or gains on this CPU.
            _measure_predict(ctx, name, "onnx_no_tta", inputs, entry, tta=False, runtime="onnx")
        ctx.results["predict"]["configurations"][name] = entry


def onnx_comparable(device: str) -> bool:
    """Whether the benchmark also measures onnxruntime: on the CPU, with the onnx extra installed."""
    return device == "cpu" and all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def _measure_predict(ctx: _Context, name: str, label: str, inputs: list[tuple[Path, int]], entry: dict[str, Any],
                     tta: bool, runtime: str = "torch") -> None:
    voxels = {folder.name: n for folder, n in inputs}
    try:
        model = ctx.work
        if runtime != "torch":
            model = ctx.folder / f"{runtime}_{name}"
            shutil.rmtree(model, ignore_errors=True)  # an earlier run's export, with --work kept
            export_networks(ctx.work, model, runtime, configurations=[name], checkpoint="latest")
        params = {"work": str(model), "configuration": name, "device": ctx.device, "repeats": ctx.repeats,
                  "tta": tta, "runtime": runtime, "case_dirs": [str(f) for f, _ in inputs],
                  "output": str(ctx.folder / f"predictions_{name}_{label}")}
        result, measured = run_stage("predict", params, ctx.folder)
        speeds = [voxels[case] / s for case, runs in result["per_case"].items() for s in runs]
        entry[label] = {"seconds_per_case": summarize(result["seconds"]),
                        "voxels_per_second": summarize(speeds), **measured.memory()}
        for key in ("peak_gpu_allocated_gb", "peak_gpu_reserved_gb"):
            if key in result:
                entry[label][key] = result[key]
        ctx.say(f"[predict] {name} {label}: {_fmt_stat(entry[label]['seconds_per_case'], 's/case')}, "
                f"peak {measured.peak_tree_rss_mb:.0f} MiB")
    except Exception as error:
        ctx.errors[f"predict/{name}/{label}"] = f"{type(error).__name__}: {error}"
        ctx.say(f"[predict] {name} {label} failed: {ctx.errors[f'predict/{name}/{label}']}")


# --- report -------------------------------------------------------------------------------------------


def _fmt_stat(stat: Mapping[str, Any] | None, unit: str = "", digits: int = 3) -> str:
    if not stat:
        return "-"
    return (f"{stat['median']:.{digits}g} {unit} (min {stat['min']:.{digits}g}, max {stat['max']:.{digits}g}, "
            f"n={len(stat['runs'])})").replace("  ", " ")


def format_report(results: Mapping[str, Any]) -> str:
    """A plain-text table of a benchmark's results (what ``autoseg benchmark`` prints)."""
    machine = results.get("machine", {})
    lines = [f"autoseg benchmark on {machine.get('cpu_model', '?')} ({machine.get('cpu_count', '?')} cores, "
             f"{machine.get('ram_gb', '?')} GB RAM), device {machine.get('device', '?')}"
             + (f" ({machine['gpu']})" if machine.get("gpu") else "") + f", torch {machine.get('torch', '?')}"]
    rows: list[tuple[str, str, str]] = []
    if "plan" in results:
        plan = results["plan"]
        rows.append(("fingerprint + plan", _fmt_stat(plan["seconds"], "s"), f"{plan['peak_tree_rss_mb']:.0f}"))
    if "preprocess" in results:
        pre = results["preprocess"]
        for name, figures in pre["configurations"].items():
            rows.append((f"preprocess {name}", _fmt_stat(figures["cases_per_second"], "cases/s"),
                         f"{pre['peak_tree_rss_mb']:.0f}"))
    for name, figures in results.get("train", {}).items():
        memory = f"{figures['peak_tree_rss_mb']:.0f}"
        if "peak_gpu_allocated_gb" in figures:
            memory += f" (GPU {figures['peak_gpu_allocated_gb']:.2f} GB, planned {figures['estimated_memory_gb']:.2f})"
        rows.append((f"train {name}", _fmt_stat(figures["iterations_per_second"], "it/s")
                     + f", data wait {figures['data_wait_fraction']['median']:.1%}", memory))
    for name, entry in results.get("predict", {}).get("configurations", {}).items():
        for label, figures in entry.items():
            rows.append((f"predict {name} {label.replace('_', '-')}",
                         _fmt_stat(figures["seconds_per_case"], "s/case")
                         + f", {figures['voxels_per_second']['median'] / 1e6:.3g} Mvox/s",
                         f"{figures['peak_tree_rss_mb']:.0f}"))
    if rows:
        widths = [max(len(r[i]) for r in rows + [("stage", "median (min, max, runs)", "peak MiB")]) for i in range(3)]
        header = ("stage", "median (min, max, runs)", "peak MiB")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    for stage, message in results.get("errors", {}).items():
        lines.append(f"FAILED {stage}: {message.splitlines()[0] if message else ''}")
    return "\n".join(lines)
