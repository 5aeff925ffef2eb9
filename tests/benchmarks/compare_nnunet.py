#!/usr/bin/env python
"""autoseg next to nnU-Net v2 on the same data, the same machine, in one run.

Not part of ``make test``: it installs nnU-Net into its own virtual environment and trains two
networks. Run it from the repository root with autoseg's environment::

    .venv/bin/python tests/benchmarks/compare_nnunet.py                 # example CT, CPU
    .venv/bin/python tests/benchmarks/compare_nnunet.py --device cuda --epochs 6 --iterations 50
    .venv/bin/python tests/benchmarks/compare_nnunet.py --dataset data/Dataset004_Hippocampus

What it does, each phase on both frameworks one after the other (the order alternates between
repeats so that a change of machine load does not favour one side):

1. **environment**: nnU-Net v2 lives in ``--venv`` (default ``../.nnunet_venv``, next to the repository);
   when missing it is created with the same torch version as autoseg's (the CPU build on a machine
   without CUDA) and ``pip install nnunetv2`` with torch pinned, so pip never swaps in another torch.
2. **data**: the example CT dataset (``autoseg.examples``) or ``--dataset``; nnU-Net sees it through
   links under ``nnUNet_raw/Dataset<ID>_<name>``. The ``nnUNet_*`` variables are set for nnU-Net's
   processes only; autoseg reads none.
3. **plan + preprocess** of ``3d_fullres``: ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` against
   ``autoseg plan --configurations 3d_fullres`` + ``autoseg preprocess``, both with as many worker
   processes as cores; wall time and peak memory of the whole process tree.
4. **same network**: autoseg's plan gets nnU-Net's patch size, batch size and U-Net topology
   (stages, features, kernels, strides, convolutions per stage), so training and inference compare
   like with like; the parameter counts of both networks are printed as a check.
5. **training**: the same number of epochs and iterations, poly learning rate over those epochs,
   on every training case (fold ``all``), no validation iterations, the same number of data-loading
   processes. nnU-Net's trainer is driven step by step by a small script (its own epoch hooks, its
   ``train_step`` and data loader) so the time waiting for a batch and the network step are timed
   apart exactly as autoseg's trainer logs them. The first epoch is the warm-up.
6. **prediction**: ``nnUNetv2_predict`` against ``autoseg predict`` on the test cases, with and
   without mirroring TTA; seconds per case are the command's wall time over the number of cases
   (start-up and model loading included, as a user sees it).
7. **Dice**: both frameworks' predictions are scored by ``autoseg.evaluation`` against the same
   references (mean over foreground labels and cases).
8. **time to Dice** (``--phases time_to_dice``; not in the default run, it trains each side for the
   whole budget): how good a model each framework gives after the same wall-clock training budget
   (``--time-budget-minutes``, default 20), each with its own default plan and schedule, in its own
   folder (``time_to_dice/``). autoseg plans with ``--preset cpu`` on the CPU (its plan for machines
   without a GPU; no preset on CUDA), preprocesses every configuration and trains the plan's
   recommended one (no ``-c``; 2d for the example CT on the CPU, 3d_fullres on CUDA) with
   ``autoseg train --time-budget``.
   nnU-Net plans ``3d_fullres`` with its defaults and trains with its default schedule (250
   iterations per epoch, poly LR) driven step by step; nnU-Net has no time budget, so the clock is
   read before every iteration and the run stops at the budget, and its ``num_epochs`` (for which
   the poly LR is computed) is fixed after the first epoch from that epoch's median seconds per
   iteration, rounded up: epoch 0 runs at the initial LR whatever ``num_epochs`` is, so this is as
   if it had been known from the start, nnU-Net trains for the whole budget, and its last LR step
   begins within it (rounding down would leave up to an epoch of the budget unused). Its
   validation iterations are skipped (with fold ``all`` they score training cases for its log only
   and never change the weights), which gives it more of the budget. Both train fold ``all`` on the
   training cases, with the same torch threads (every usable core) and data-loading processes,
   predict the held-out test cases (``imagesTs``) from their last checkpoint with their default
   mirroring TTA, and are scored by ``autoseg.evaluation``: mean test Dice over the foreground
   classes and per class. Target: autoseg at least nnU-Net + 0.10, every class at least 0.5.
   Hold out enough cases for a class figure to mean something (``--test-cases 8``: two cases with
   bright lesions, two without lesions, four with dark ones); with the default 2 the split decides it.

Every phase is guarded: a failure is recorded with its error and the remaining phases still run
where they can. The table of autoseg/nnU-Net ratios is printed and everything is written as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from autoseg.bench.measure import (  # noqa: E402
    Measured,
    machine_info,
    ratio,
    run_measured,
    summarize,
    training_figures,
)
from autoseg.bench.stages import run_stage  # noqa: E402
from autoseg.evaluation import evaluate_folders  # noqa: E402
from autoseg.plan import load_plan  # noqa: E402
from autoseg.precision import usable_cores  # noqa: E402
from autoseg.training.loop import LOG_FILE  # noqa: E402
from autoseg.training.monitor import read_log  # noqa: E402
from autoseg.utils import atomic_write_json, read_json  # noqa: E402
from autoseg.workdir import WorkDir  # noqa: E402

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID:03d}_AutosegBench"
CONFIGURATION = "3d_fullres"
NNUNET_TRAINER = "nnUNetTrainer"
NNUNET_PLANS = "nnUNetPlans"

# nnU-Net's trainer, driven one step at a time so that data wait and network time are measured
# apart. Executed by the nnU-Net environment's Python with a JSON file of parameters: a fixed number
# of epochs and iterations (the training phase), or its own schedule within ``budget_seconds`` of
# wall time (the time-to-Dice phase; see phase_time_to_dice).
NNUNET_TRAIN_SCRIPT = r'''
import json, math, os, statistics, sys, time
import numpy as np
import torch
from nnunetv2.run.run_training import get_trainer_from_args

params = json.load(open(sys.argv[1]))
started = time.perf_counter()  # a time budget counts from here, set-up included (as autoseg's does)
budget = params.get("budget_seconds")
device = torch.device(params["device"])
# What nnUNetv2_train does: every core on the CPU (or the cores given), one thread per GPU process.
torch.set_num_threads((params.get("threads") or os.cpu_count()) if device.type == "cpu" else 1)
trainer = get_trainer_from_args(str(params["dataset_id"]), params["configuration"], params["fold"],
                                params["trainer"], params["plans"], device=device)
if params.get("epochs"):  # before initialize(): the poly schedule uses it
    trainer.num_epochs = params["epochs"]
if params.get("iterations"):
    trainer.num_iterations_per_epoch = params["iterations"]
trainer.num_val_iterations_per_epoch = 0  # pseudo-Dice for its log only: the weights never see it
trainer.save_every = 10 ** 9
trainer.on_train_start()
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
log, fitted, out_of_time = [], None, False
while trainer.current_epoch < trainer.num_epochs and not out_of_time:
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    outputs, steps, data_time, compute_time = [], [], 0.0, 0.0
    for _ in range(trainer.num_iterations_per_epoch):
        if budget is not None and time.perf_counter() - started >= budget:
            out_of_time = True  # the clock is read every iteration: at most one step past the budget
            break
        tick = time.perf_counter()
        batch = next(trainer.dataloader_train)
        loaded = time.perf_counter()
        outputs.append(trainer.train_step(batch))  # returns the loss on the host: synchronized
        done = time.perf_counter()
        data_time += loaded - tick
        compute_time += done - loaded
        steps.append(done - tick)
    if not outputs:
        break
    trainer.on_train_epoch_end(outputs)
    log.append({"epoch": trainer.current_epoch, "iterations": len(outputs), "data_time": data_time,
                "compute_time": compute_time, "lr": trainer.optimizer.param_groups[0]["lr"],
                "train_loss": float(np.mean([o["loss"] for o in outputs]))})
    print(f"epoch {trainer.current_epoch}: {log[-1]}", flush=True)
    if budget is not None and fitted is None and not out_of_time:
        # The poly LR is initial_lr * (1 - epoch / num_epochs) ** 0.9, stepped per epoch, so epoch 0
        # ran at initial_lr whatever num_epochs is: fixing it now is as if it had been known from the
        # start. Rounded up: the whole budget is trained and the schedule's last step starts within it.
        per_iteration = statistics.median(steps[1:] or steps)  # the first step carries the warm-up
        left = budget - (time.perf_counter() - started)
        trainer.num_epochs = 1 + max(1, math.ceil(left / (per_iteration * trainer.num_iterations_per_epoch)))
        trainer.lr_scheduler.max_steps = trainer.num_epochs  # set by initialize() from the old num_epochs
        fitted = {"seconds_per_iteration": per_iteration, "num_epochs": trainer.num_epochs}
        print(f"budget: {per_iteration:.2f} s per iteration, {left:.0f} s left -> num_epochs {trainer.num_epochs}",
              flush=True)
    trainer.current_epoch += 1
trainer.on_train_end()  # writes checkpoint_final.pth and stops the data loader processes
result = {"log": log, "parameters": int(sum(p.numel() for p in trainer.network.parameters())),
          "output_folder": trainer.output_folder, "num_epochs": trainer.num_epochs,
          "iterations_per_epoch": trainer.num_iterations_per_epoch, "budget_fit": fitted,
          "stopped_by_budget": out_of_time, "seconds": time.perf_counter() - started}
if device.type == "cuda":
    result["peak_gpu_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1024 ** 3, 3)
with open(params["result"], "w") as handle:
    json.dump(result, handle)
'''


# --- the nnU-Net environment --------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def nnunet_installed(venv: Path) -> bool:
    python = venv_python(venv)
    return python.is_file() and subprocess.run([str(python), "-c", "import nnunetv2, torch"],
                                               capture_output=True).returncode == 0


def ensure_nnunet(venv: Path, device: str) -> dict[str, Any]:
    """Create ``venv`` with nnU-Net v2 and autoseg's torch version when it is not there yet."""
    import torch

    if not nnunet_installed(venv):
        torch_version = torch.__version__.split("+")[0]
        major, minor = (int(x) for x in torch_version.split(".")[:2])
        print(f"installing nnU-Net v2 into {venv} (torch {torch_version}); this takes a few minutes", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv_python(venv)), "-m", "pip", "install"]
        # torchvision (pulled in by nnU-Net's network package) pins an exact torch; without a
        # matching pin pip would replace the CPU torch with a multi-GB CUDA build.
        constraints = venv / "constraints.txt"
        constraints.write_text(f"torch=={torch_version}\ntorchvision==0.{minor + 15}.*\n" if major == 2
                               else f"torch=={torch_version}\n")
        if device == "cpu" and not torch.cuda.is_available():
            # The CPU build (as the Makefile installs it); PyPI's Linux torch is the multi-GB CUDA
            # build. Its exact version (2.13.0+cpu) is on no index but PyTorch's CPU one, so pip
            # cannot swap in the CUDA build: first from where pip is set up to find it (a local
            # wheel in find-links, its dependencies from the usual indexes; --no-index would cut
            # those off), else from PyTorch's CPU index.
            exact = pip + ["-c", str(constraints), f"torch=={torch.__version__}"]
            if subprocess.run(exact).returncode != 0:
                subprocess.run(exact + ["--index-url", "https://download.pytorch.org/whl/cpu"], check=True)
        else:
            subprocess.run(pip + ["-c", str(constraints), f"torch=={torch_version}"], check=True)
        subprocess.run(pip + ["-c", str(constraints), "nnunetv2"], check=True)
    info = subprocess.run([str(venv_python(venv)), "-c",
                           "import importlib.metadata as m, torch; "
                           "print(m.version('nnunetv2'), torch.__version__, torch.cuda.is_available())"],
                          capture_output=True, text=True, check=True).stdout.split()
    return {"venv": str(venv), "nnunetv2": info[0], "torch": info[1], "cuda_available": info[2] == "True"}


def nnunet_env(root: Path, venv: Path, data_workers: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_n_proc_DA": str(data_workers),  # the same number of loader processes as autoseg's
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
    })
    env.pop("PYTHONPATH", None)
    return env


def autoseg_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in [k for k in env if k.startswith("nnUNet_")]:
        env.pop(name)
    return env


# --- data ---------------------------------------------------------------------------------------------


def prepare_dataset(args: argparse.Namespace, root: Path) -> tuple[Path, Path, Path | None]:
    """The raw dataset, its test images and their references (None: none to score against)."""
    if args.dataset is not None:
        dataset = Path(args.dataset).resolve()
    else:
        from autoseg.examples import make_example

        dataset = root / "raw_example_ct"
        if not (dataset / "dataset.json").is_file():
            shutil.rmtree(dataset, ignore_errors=True)
            make_example(dataset, kind="ct", num_cases=args.num_cases, seed=args.seed,
                         num_test_cases=args.test_cases, progress=True)
    test_images = dataset / "imagesTs"
    references = dataset / "labelsTs"
    if not test_images.is_dir() or not any(test_images.iterdir()):
        # No held-out cases: predict the first training cases (Dice is then on seen data).
        from autoseg.dataset import training_cases

        test_images = root / "test_images"
        references = root / "test_labels"
        shutil.rmtree(test_images, ignore_errors=True)
        shutil.rmtree(references, ignore_errors=True)
        test_images.mkdir(parents=True)
        references.mkdir(parents=True)
        for case in training_cases(dataset)[: args.test_cases]:
            for image in case.images:
                (test_images / image.name).symlink_to(image.resolve())
            if case.label is not None:
                (references / case.label.name).symlink_to(case.label.resolve())
        print("warning: the dataset has no imagesTs; predicting (and scoring) training cases", flush=True)
    return dataset, test_images, references if references.is_dir() and any(references.iterdir()) else None


def link_for_nnunet(dataset: Path, root: Path) -> Path:
    """``nnUNet_raw/Dataset<ID>_<name>`` made of links to the dataset's files (nothing copied)."""
    target = root / "nnUNet_raw" / DATASET_NAME
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in ("dataset.json", "imagesTr", "labelsTr"):
        (target / name).symlink_to((dataset / name).resolve())
    return target


def count_cases(folder: Path, file_ending: str) -> int:
    return len({p.name[: -len(file_ending) - 5] for p in folder.iterdir() if p.name.endswith(file_ending)})


# --- phases ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything the phases share."""

    args: argparse.Namespace
    root: Path
    venv: Path
    dataset: Path
    test_images: Path
    references: Path | None
    file_ending: str
    workers: int
    results: dict[str, Any]
    errors: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def work(self) -> Path:
        return self.root / "autoseg_work"

    @property
    def nnunet_preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed" / DATASET_NAME

    def env(self) -> dict[str, str]:
        return nnunet_env(self.root, self.venv, self.workers)

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"


def check(measured: Measured, what: str, log: Path) -> Measured:
    if measured.returncode != 0:
        raise RuntimeError(f"{what} failed with exit code {measured.returncode} (log: {log}):\n"
                           f"{measured.output_tail[-1500:]}")
    return measured


def ordered(repeat: int) -> tuple[str, str]:
    """Alternate which framework goes first, so a drift in machine load hits both alike."""
    return ("nnunet", "autoseg") if repeat % 2 == 0 else ("autoseg", "nnunet")


def plan_side(run: Run, side: str, log: Path, nnunet_options: Sequence[str] = (),
              autoseg_options: Sequence[str] = (), autoseg_configurations: bool = False) -> Measured:
    """Plan and preprocess ``3d_fullres`` from scratch on one side, into ``run``'s folders.

    ``autoseg_configurations``: autoseg plans and preprocesses every configuration of its defaults.
    """
    jobs = str(run.args.jobs)
    if side == "nnunet":
        shutil.rmtree(run.nnunet_preprocessed, ignore_errors=True)
        command = [str(run.venv / "bin" / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", CONFIGURATION,
                   "-npfp", jobs, "-np", jobs, *nnunet_options]
        return check(run_measured(command, env=run.env(), log_path=log), "nnUNetv2_plan_and_preprocess", log)
    shutil.rmtree(run.work, ignore_errors=True)
    cli = f"{sys.executable} -m autoseg.cli"
    only = "" if autoseg_configurations else f"--configurations {CONFIGURATION} "
    script = (f"{cli} plan {run.dataset} --work {run.work} {only}"
              f"{' '.join(autoseg_options)} -j {jobs} && {cli} preprocess {run.work} -j {jobs}")
    return check(run_measured(["bash", "-c", script], env=autoseg_env(), log_path=log),
                 "autoseg plan + preprocess", log)


def phase_plan(run: Run) -> None:
    memory = str(run.args.gpu_memory_gb) if run.args.gpu_memory_gb else None
    figures: dict[str, dict[str, list[float]]] = {"nnunet": {}, "autoseg": {}}
    for repeat in range(run.args.repeats):
        for side in ordered(repeat):
            measured = plan_side(run, side, run.log(f"{side}_plan_{repeat}"),
                                 ["-gpu_memory_target", memory] if memory else [],
                                 ["--gpu-memory-gb", memory] if memory else [])
            _add(figures[side], "seconds", measured.seconds)
            _add(figures[side], "peak_tree_rss_mb", measured.peak_tree_rss_mb)
            _add(figures[side], "peak_tree_pss_mb", measured.peak_tree_pss_mb)
            _add(figures[side], "cpu_seconds", measured.cpu_seconds)
            print(f"[plan+preprocess] {side}: {measured.seconds:.1f} s, peak {measured.peak_tree_rss_mb:.0f} MiB "
                  f"(PSS {measured.peak_tree_pss_mb:.0f})", flush=True)
    run.results["plan_preprocess"] = {side: {k: summarize(v) for k, v in f.items()} for side, f in figures.items()}


def _add(figures: dict[str, list[float]], key: str, value: float) -> None:
    figures.setdefault(key, []).append(value)


def nnunet_plans(run: Run) -> dict[str, Any]:
    path = run.nnunet_preprocessed / f"{NNUNET_PLANS}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nnU-Net's plan is missing (the plan phase failed or did not run)")
    plans = read_json(path)
    assert isinstance(plans, dict)
    return plans["configurations"][CONFIGURATION]


def phase_match_network(run: Run) -> None:
    """Give autoseg's plan nnU-Net's patch, batch and U-Net, so training and inference compare alike."""
    from autoseg.networks import build_network
    from autoseg.plan import save_plan

    theirs = nnunet_plans(run)
    arch = theirs["architecture"]
    kwargs = arch["arch_kwargs"]
    if not arch["network_class_name"].endswith("PlainConvUNet"):
        raise RuntimeError(f"nnU-Net planned {arch['network_class_name']}; only its PlainConvUNet is matched")
    plan = load_plan(run.work)
    ours = plan.configuration(CONFIGURATION)
    topology = dataclasses.replace(
        ours.topology,
        features_per_stage=tuple(kwargs["features_per_stage"]),
        kernel_sizes=tuple(tuple(k) for k in kwargs["kernel_sizes"]),
        strides=tuple(tuple(s) for s in kwargs["strides"]),
        n_conv_per_stage=tuple(kwargs["n_conv_per_stage"]),
        n_conv_per_stage_decoder=tuple(kwargs["n_conv_per_stage_decoder"]),
    )
    matched = dataclasses.replace(ours, patch_size=tuple(theirs["patch_size"]), batch_size=theirs["batch_size"],
                                  topology=topology)
    save_plan(dataclasses.replace(plan, configurations={**plan.configurations, CONFIGURATION: matched}), run.work / "plan.json")
    network = build_network(topology)
    run.results["network"] = {
        "autoseg_planned": {"patch_size": list(ours.patch_size), "batch_size": ours.batch_size,
                            "features_per_stage": list(ours.topology.features_per_stage),
                            "spacing": list(ours.spacing)},
        "nnunet_planned": {"patch_size": theirs["patch_size"], "batch_size": theirs["batch_size"],
                           "features_per_stage": kwargs["features_per_stage"], "spacing": theirs["spacing"]},
        "used": {"patch_size": list(matched.patch_size), "batch_size": matched.batch_size,
                 "features_per_stage": list(topology.features_per_stage),
                 "strides": [list(s) for s in topology.strides]},
        "autoseg_parameters": int(sum(p.numel() for p in network.parameters())),
    }
    print(f"[network] both train patch {list(matched.patch_size)}, batch {matched.batch_size}, features "
          f"{list(topology.features_per_stage)} (autoseg had planned patch {list(ours.patch_size)}, batch "
          f"{ours.batch_size})", flush=True)


def train_nnunet(run: Run, log: Path, env: dict[str, str] | None = None, **params: Any) -> tuple[dict[str, Any], Measured]:
    """Train nnU-Net from scratch, fold ``all``, with NNUNET_TRAIN_SCRIPT and ``params`` (epochs,
    iterations or budget_seconds, threads); its result (per-epoch log, schedule) and measurement."""
    shutil.rmtree(run.root / "nnUNet_results", ignore_errors=True)
    params_path, result_path = run.root / "nnunet_train.params.json", run.root / "nnunet_train.result.json"
    script = run.root / "nnunet_train.py"
    script.write_text(NNUNET_TRAIN_SCRIPT)
    atomic_write_json(params_path, {"dataset_id": DATASET_ID, "configuration": CONFIGURATION, "fold": "all",
                                    "trainer": NNUNET_TRAINER, "plans": NNUNET_PLANS, "device": run.args.device,
                                    "result": str(result_path), **params})
    result_path.unlink(missing_ok=True)
    measured = check(run_measured([str(venv_python(run.venv)), str(script), str(params_path)],
                                  env=env or run.env(), log_path=log), "nnU-Net training", log)
    result = read_json(result_path)
    assert isinstance(result, dict)
    return result, measured


def _train_once(run: Run, side: str, repeat: int) -> tuple[dict[str, Any], Measured]:
    """Train one side from scratch (the last repeat's model is the one predicted with)."""
    epochs, iterations = run.args.epochs, run.args.iterations
    if side == "nnunet":
        return train_nnunet(run, run.log(f"nnunet_train_{repeat}"), epochs=epochs, iterations=iterations)
    shutil.rmtree(run.work / "models", ignore_errors=True)
    folder = run.root / "logs" / f"autoseg_train_{repeat}"
    folder.mkdir(parents=True, exist_ok=True)
    result, measured = run_stage("train", {"work": str(run.work), "configuration": CONFIGURATION,
                                           "device": run.args.device, "repeats": epochs - 1,
                                           "iterations": iterations, "workers": run.workers}, folder)
    assert isinstance(result, dict)
    return result, measured


def phase_train(run: Run) -> None:
    """Train both sides ``--repeats`` times, alternating which goes first; every epoch after each
    run's warm-up epoch is one measurement (a shared machine's load changes between runs)."""
    if run.args.epochs < 2:
        raise ValueError("--epochs must be at least 2 (the first epoch is the warm-up)")
    logs: dict[str, list[dict[str, Any]]] = {"nnunet": [], "autoseg": []}
    runs: dict[str, list[tuple[dict[str, Any], Measured]]] = {"nnunet": [], "autoseg": []}
    for repeat in range(run.args.repeats):
        for side in ordered(repeat):
            result, measured = _train_once(run, side, repeat)
            figures = training_figures(result["log"])
            logs[side] += result["log"][1:]
            runs[side].append((result, measured))
            print(f"[train] {side}: {figures['iterations_per_second']['median']:.3f} it/s, data wait "
                  f"{figures['data_wait_fraction']['median']:.1%}, peak {measured.peak_tree_rss_mb:.0f} MiB",
                  flush=True)
    out: dict[str, Any] = {}
    for side, side_runs in runs.items():
        measurements = [m for _, m in side_runs]
        out[side] = {**training_figures(logs[side], warmup_epochs=0),
                     "peak_tree_rss_mb": max(m.peak_tree_rss_mb for m in measurements),
                     "peak_tree_pss_mb": max(m.peak_tree_pss_mb for m in measurements),
                     "peak_process_rss_mb": max(m.peak_process_rss_mb for m in measurements),
                     "max_processes": max(m.max_processes for m in measurements),
                     "cpu_seconds": summarize(m.cpu_seconds for m in measurements)["median"],
                     "wall_seconds": [round(m.seconds, 2) for m in measurements],
                     "logs": [r["log"] for r, _ in side_runs]}
        for key in ("parameters", "peak_gpu_allocated_gb"):
            values = [r[key] for r, _ in side_runs if key in r]
            if values:
                out[side][key] = max(values)
    if "network" in run.results:
        out["autoseg"]["parameters"] = run.results["network"]["autoseg_parameters"]
    run.results["train"] = out


def predict_side(run: Run, side: str, target: Path, tta: bool, log: Path,
                 autoseg_configuration: str = CONFIGURATION) -> Measured:
    """Predict the test images into ``target`` with one side's model of fold ``all`` (its last checkpoint)."""
    shutil.rmtree(target, ignore_errors=True)
    if side == "nnunet":
        command = [str(run.venv / "bin" / "nnUNetv2_predict"), "-i", str(run.test_images), "-o", str(target),
                   "-d", str(DATASET_ID), "-c", CONFIGURATION, "-f", "all", "-tr", NNUNET_TRAINER,
                   "-p", NNUNET_PLANS, "-chk", "checkpoint_final.pth", "-device", run.args.device,
                   "--disable_progress_bar", *([] if tta else ["--disable_tta"])]
        measured = check(run_measured(command, env=run.env(), log_path=log), "nnUNetv2_predict", log)
    else:
        command = [sys.executable, "-m", "autoseg.cli", "predict", str(run.work), "-i", str(run.test_images),
                   "-o", str(target), "-c", autoseg_configuration, "-f", "all", "--device", run.args.device,
                   "--checkpoint", "latest", "--overwrite", *([] if tta else ["--no-tta"])]
        measured = check(run_measured(command, env=autoseg_env(), log_path=log), "autoseg predict", log)
    cases, written = count_cases(run.test_images, run.file_ending), count_cases_labels(target, run.file_ending)
    if written != cases:
        raise RuntimeError(f"{side} predicted {written} of {cases} cases into {target} (log: {log})")
    return measured


def phase_predict(run: Run) -> None:
    cases = count_cases(run.test_images, run.file_ending)
    if cases == 0:
        raise RuntimeError(f"{run.test_images}: no test images")
    out: dict[str, Any] = {"cases": cases}
    for repeat in range(run.args.repeats):
        for tta in (False, True):
            label = "tta" if tta else "no_tta"
            for side in ordered(repeat):
                measured = predict_side(run, side, run.root / "predictions" / f"{side}_{label}", tta,
                                        run.log(f"{side}_predict_{label}_{repeat}"))
                entry = out.setdefault(side, {}).setdefault(label, {})
                _add(entry, "seconds_per_case", measured.seconds / cases)
                _add(entry, "peak_tree_rss_mb", measured.peak_tree_rss_mb)
                _add(entry, "peak_tree_pss_mb", measured.peak_tree_pss_mb)
                _add(entry, "cpu_seconds_per_case", measured.cpu_seconds / cases)
                print(f"[predict] {side} {label}: {measured.seconds / cases:.1f} s/case, peak "
                      f"{measured.peak_tree_rss_mb:.0f} MiB", flush=True)
    for side in ("nnunet", "autoseg"):
        out[side] = {label: {k: summarize(v) for k, v in figures.items()} for label, figures in out[side].items()}
    run.results["predict"] = out


def count_cases_labels(folder: Path, file_ending: str) -> int:
    return len([p for p in folder.iterdir() if p.name.endswith(file_ending)]) if folder.is_dir() else 0


def score(run: Run, folder: Path) -> dict[str, Any]:
    """Mean Dice over the foreground labels (and per label) of ``folder``'s predictions, by autoseg.evaluation."""
    if run.references is None:
        raise RuntimeError("no reference labels for the test images: nothing to score")
    result = evaluate_folders(folder, run.references, dataset_json=run.dataset / "dataset.json")
    per_label = {name: metrics["dice"]["mean"] for name, metrics in result.summary.items()}
    defined = [v for v in per_label.values() if v is not None]
    return {"mean_dice": sum(defined) / len(defined) if defined else None, "per_label": per_label}


def phase_dice(run: Run) -> None:
    out: dict[str, Any] = {}
    for side in ("nnunet", "autoseg"):
        for label in ("tta", "no_tta"):
            folder = run.root / "predictions" / f"{side}_{label}"
            if not folder.is_dir():
                continue
            out.setdefault(side, {})[label] = score(run, folder)
            print(f"[dice] {side} {label}: {out[side][label]['mean_dice']}", flush=True)
    run.results["dice"] = out


def phase_time_to_dice(run: Run) -> None:
    """Each side trains on its own default plan within the same wall-clock budget; Dice on held-out cases.

    Everything lives under ``time_to_dice/`` (its own plans, preprocessed data, models), so the
    other phases' matched network and short schedule are untouched. Both get the same torch threads
    (every usable core) and data-loading processes. autoseg: ``autoseg train --time-budget``, its
    own fit of epochs, iterations and learning-rate decay. nnU-Net: its default schedule (250
    iterations per epoch, poly LR over ``num_epochs``) but ``num_epochs`` fixed after the first
    epoch from its measured speed, and the run stopped at the budget (see NNUNET_TRAIN_SCRIPT).
    Both then predict with their defaults (mirroring TTA) from their last checkpoint.
    """
    if run.test_images != run.dataset / "imagesTs" or run.references is None:
        raise RuntimeError("time to Dice needs held-out test cases with references (imagesTs and labelsTs)")
    budget = run.args.time_budget_minutes * 60
    sub = dataclasses.replace(run, root=run.root / "time_to_dice")
    (sub.root / "logs").mkdir(parents=True, exist_ok=True)
    link_for_nnunet(run.dataset, sub.root)
    cores = usable_cores()
    threads = {"OMP_NUM_THREADS": str(cores)}  # read by autoseg's trainer; the same for nnU-Net's
    preset = ["--preset", "cpu"] if run.args.device == "cpu" else []
    out: dict[str, Any] = {"budget_minutes": run.args.time_budget_minutes, "threads": cores,
                           "data_workers": run.workers, "test_cases": count_cases(run.test_images, run.file_ending)}
    run.results["time_to_dice"] = out  # filled as it goes: what was measured survives a later failure
    sides = ordered(0)
    for side in sides:
        measured = plan_side(sub, side, sub.log(f"{side}_plan"), autoseg_options=preset, autoseg_configurations=True)
        out[side] = {"plan_preprocess_seconds": round(measured.seconds, 1)}
    plan = load_plan(sub.work)
    ours_name = plan.recommended()
    theirs, ours = nnunet_plans(sub), plan.configuration(ours_name)
    out["nnunet"]["plan"] = {"command": f"nnUNetv2_plan_and_preprocess -c {CONFIGURATION} ({NNUNET_PLANS}, its "
                                        "defaults)", "patch_size": theirs["patch_size"],
                             "batch_size": theirs["batch_size"],
                             "features_per_stage": theirs["architecture"]["arch_kwargs"]["features_per_stage"]}
    out["autoseg"]["plan"] = {"command": " ".join(["autoseg plan", *preset]), "configuration": ours_name,
                              "patch_size": list(ours.patch_size), "batch_size": ours.batch_size,
                              "features_per_stage": list(ours.topology.features_per_stage)}
    for side in sides:
        log = sub.log(f"{side}_train")
        if side == "nnunet":
            result, measured = train_nnunet(sub, log, {**sub.env(), **threads}, budget_seconds=budget,
                                            threads=cores)
            epochs = result["log"]
            out[side]["schedule"] = {"num_epochs": result["num_epochs"], "budget_fit": result["budget_fit"],
                                     "iterations_per_epoch": result["iterations_per_epoch"],
                                     "stopped_by_budget": result["stopped_by_budget"]}
        else:
            fold = WorkDir(sub.work).fold(ours_name, "all")
            shutil.rmtree(fold, ignore_errors=True)
            command = [sys.executable, "-m", "autoseg.cli", "train", str(sub.work), "-f", "all",  # recommended
                       "--device", run.args.device, "--workers", str(run.workers), "--time-budget", f"{budget:g}s"]
            measured = check(run_measured(command, env={**autoseg_env(), **threads}, log_path=log),
                             "autoseg train --time-budget", log)
            epochs = read_log(fold / LOG_FILE)
        out[side].update({"train_wall_seconds": round(measured.seconds, 1), "epochs": len(epochs),
                          "iterations": sum(e["iterations"] for e in epochs),
                          "final_lr": epochs[-1]["lr"] if epochs else None})
        print(f"[time to Dice] {side} trained {out[side]['iterations']} iterations in {len(epochs)} epochs, "
              f"{measured.seconds:.0f} s (budget {budget:.0f} s)", flush=True)
    for side in sides:
        folder = sub.root / "predictions" / side
        measured = predict_side(sub, side, folder, True, sub.log(f"{side}_predict"), autoseg_configuration=ours_name)
        out[side].update(score(sub, folder), predict_seconds=round(measured.seconds, 1))
        print(f"[time to Dice] {side}: mean test Dice {out[side]['mean_dice']}, {out[side]['per_label']}", flush=True)


# --- the table ------------------------------------------------------------------------------------------

# (row name, path to the figure, target on autoseg/nnU-Net, True: the ratio must be <= target)
# Memory rows: RSS summed over the process tree, and PSS (pages shared between processes counted
# once), which is the fairer figure when one side forks helper processes that share libraries.
ROWS: list[tuple[str, tuple[str, ...], float | None, bool]] = [
    ("plan+preprocess wall s", ("plan_preprocess", "{side}", "seconds", "median"), 0.5, True),
    ("plan+preprocess CPU s", ("plan_preprocess", "{side}", "cpu_seconds", "median"), None, True),
    ("plan+preprocess peak RSS MiB", ("plan_preprocess", "{side}", "peak_tree_rss_mb", "median"), 1.0, True),
    ("plan+preprocess peak PSS MiB", ("plan_preprocess", "{side}", "peak_tree_pss_mb", "median"), 1.0, True),
    ("train it/s", ("train", "{side}", "iterations_per_second", "median"), 1.2, False),
    ("train data wait share", ("train", "{side}", "data_wait_fraction", "median"), None, True),
    ("train network s/it", ("train", "{side}", "network_seconds_per_iteration", "median"), None, True),
    ("train CPU s (one run)", ("train", "{side}", "cpu_seconds"), None, True),
    ("train peak RSS MiB", ("train", "{side}", "peak_tree_rss_mb"), 1.0, True),
    ("train peak PSS MiB", ("train", "{side}", "peak_tree_pss_mb"), 1.0, True),
    ("train peak GPU GB", ("train", "{side}", "peak_gpu_allocated_gb"), 1.0, True),
    ("network parameters", ("train", "{side}", "parameters"), None, True),
    ("predict s/case, no TTA", ("predict", "{side}", "no_tta", "seconds_per_case", "median"), 0.5, True),
    ("predict s/case, TTA", ("predict", "{side}", "tta", "seconds_per_case", "median"), 0.5, True),
    ("predict CPU s/case, TTA", ("predict", "{side}", "tta", "cpu_seconds_per_case", "median"), None, True),
    ("predict peak RSS MiB, TTA", ("predict", "{side}", "tta", "peak_tree_rss_mb", "median"), 1.0, True),
    ("predict peak PSS MiB, TTA", ("predict", "{side}", "tta", "peak_tree_pss_mb", "median"), 1.0, True),
    ("Dice, TTA", ("dice", "{side}", "tta", "mean_dice"), 1.0, False),
    ("Dice, no TTA", ("dice", "{side}", "no_tta", "mean_dice"), 1.0, False),
]
SHARE_ROW = "train data wait share"
TIME_TO_DICE_GAIN = 0.10  # autoseg's mean test Dice at least nnU-Net's + this, after the same budget
TIME_TO_DICE_CLASS_FLOOR = 0.5  # and every foreground class at least this


def _lookup(results: dict[str, Any], path: Sequence[str], side: str) -> float | None:
    value: Any = results
    for key in path:
        key = key.format(side=side)
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, (int, float)) else None


def comparison_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: both values, the autoseg/nnU-Net ratio, the target and whether it is met."""
    rows = []
    for name, path, target, at_most in ROWS:
        ours, theirs = _lookup(results, path, "autoseg"), _lookup(results, path, "nnunet")
        if ours is None and theirs is None:
            continue
        if name == SHARE_ROW:  # the target is on autoseg's own share, not a ratio
            rows.append({"figure": name, "autoseg": ours, "nnunet": theirs, "ratio": None,
                         "target": "< 10% (autoseg)", "met": None if ours is None else ours < 0.10})
            continue
        value = ratio(ours, theirs)
        met = None if value is None or target is None else (value <= target if at_most else value >= target)
        rows.append({"figure": name, "autoseg": ours, "nnunet": theirs, "ratio": value,
                     "target": (f"<= {target}" if at_most else f">= {target}") if target is not None else "",
                     "met": met})
    return rows + time_to_dice_rows(results)


def time_to_dice_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean test Dice after the budget, then each class: targets on the difference and on autoseg's class Dice."""
    found = results.get("time_to_dice")
    if not found or "mean_dice" not in found.get("autoseg", {}) or "mean_dice" not in found.get("nnunet", {}):
        return []
    ours, theirs = found["autoseg"], found["nnunet"]
    after = f"after {found['budget_minutes']:g} min of training"

    def row(figure: str, a: float | None, b: float | None, target: str, met: bool | None) -> dict[str, Any]:
        return {"figure": figure, "autoseg": a, "nnunet": b, "ratio": ratio(a, b),
                "difference": None if a is None or b is None else a - b, "target": target, "met": met}

    difference = None if ours["mean_dice"] is None or theirs["mean_dice"] is None else \
        ours["mean_dice"] - theirs["mean_dice"]
    rows = [row(f"time to Dice: mean test Dice {after}", ours["mean_dice"], theirs["mean_dice"],
                f"autoseg - nnU-Net >= +{TIME_TO_DICE_GAIN:.2f}",
                None if difference is None else difference >= TIME_TO_DICE_GAIN)]
    for name, dice in ours["per_label"].items():
        rows.append(row(f"time to Dice: {name} {after}", dice, theirs["per_label"].get(name),
                        f">= {TIME_TO_DICE_CLASS_FLOOR} (autoseg)",
                        None if dice is None else dice >= TIME_TO_DICE_CLASS_FLOOR))
    return rows


def _fmt(value: float | None, share: bool = False) -> str:
    if value is None:
        return "-"
    if share:
        return f"{value:.2%}"
    if abs(value) >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (what the README's Performance section shows)."""
    header = ["figure", "autoseg", "nnU-Net", "autoseg/nnU-Net", "target", "met"]
    body = [[r["figure"], _fmt(r["autoseg"], r["figure"] == SHARE_ROW), _fmt(r["nnunet"], r["figure"] == SHARE_ROW),
             _fmt(r["ratio"]) + (f" ({r['difference']:+.3f})" if r.get("difference") is not None else ""),
             r["target"], {True: "yes", False: "NO", None: ""}[r["met"]]] for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in body]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=None, help="raw dataset (nnU-Net v2 layout); "
                                                                   "default: generate the example CT dataset")
    parser.add_argument("--num-cases", type=int, default=8, help="training cases of the example dataset")
    parser.add_argument("--test-cases", type=int, default=2, help="test cases of the example dataset (or training "
                                                                   "cases predicted when a dataset has no imagesTs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--venv", type=Path, default=REPO.parent / ".nnunet_venv",
                        help="nnU-Net's virtual environment, created when missing (default: .nnunet_venv next to "
                             "the repository, outside it)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of both (the first is the warm-up)")
    parser.add_argument("--iterations", type=int, default=8, help="training iterations per epoch")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of plan+preprocess, of training (from scratch) and of each prediction; the "
                             "order of the two frameworks alternates between runs")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="planning memory target of both (default: each one's own default, 8 GB)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes for fingerprint and preprocessing, both frameworks")
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loading processes in training, both (default: autoseg's default)")
    parser.add_argument("--work", type=Path, default=None, help="folder for everything (default: a new temporary "
                                                                 "folder, kept)")
    parser.add_argument("--phases", nargs="+", default=["plan", "train", "predict", "dice"],
                        choices=["plan", "train", "predict", "dice", "time_to_dice"],
                        help="phases to run (default: all but time_to_dice, which trains each side for "
                             "--time-budget-minutes; it needs no other phase)")
    parser.add_argument("--time-budget-minutes", type=float, default=20.0,
                        help="time_to_dice: wall-clock training budget of each side (default 20)")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_results_nnunet.json"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import tempfile

    from autoseg.training.data import default_workers

    root = (args.work or Path(tempfile.mkdtemp(prefix="autoseg_vs_nnunet_"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    print(f"working in {root}", flush=True)
    results: dict[str, Any] = {"schema": "autoseg-vs-nnunet/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "machine": machine_info(args.device), "settings": {
                                   k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    errors: dict[str, str] = {}
    started = time.perf_counter()
    try:
        results["nnunet_env"] = ensure_nnunet(args.venv.resolve(), args.device)
        dataset, test_images, references = prepare_dataset(args, root)
        link_for_nnunet(dataset, root)
    except Exception as error:
        traceback.print_exc()
        errors["setup"] = f"{type(error).__name__}: {error}"
        results["errors"] = errors
        atomic_write_json(args.output, results)
        print(f"setup failed: {errors['setup']}")
        return 1

    from autoseg.dataset import load_dataset_json

    workers = args.workers if args.workers is not None else default_workers()
    results["settings"]["workers"] = workers
    run = Run(args, root, args.venv.resolve(), dataset, test_images, references,
              load_dataset_json(dataset).file_ending, workers, results, errors)
    phases: list[tuple[str, Callable[[Run], None], tuple[str, ...]]] = [
        ("plan", phase_plan, ()),
        ("match_network", phase_match_network, ("plan",)),
        ("train", phase_train, ("plan", "match_network")),
        ("predict", phase_predict, ("train",)),
        ("dice", phase_dice, ("predict",)),
        ("time_to_dice", phase_time_to_dice, ()),
    ]
    wanted = set(args.phases) | ({"match_network"} if {"train", "predict"} & set(args.phases) else set())
    for name, phase, needs in phases:
        if name not in wanted:
            continue
        missing = [n for n in needs if n in errors]
        if missing:
            errors[name] = f"skipped: needs {', '.join(missing)}, which failed"
            continue
        phase_started = time.perf_counter()
        try:
            phase(run)
        except Exception as error:  # one failed phase still lets the others report
            traceback.print_exc()
            errors[name] = f"{type(error).__name__}: {error}"
        results.setdefault("phase_seconds", {})[name] = round(time.perf_counter() - phase_started, 1)
        atomic_write_json(args.output, {**results, "errors": errors})  # partial results survive a crash

    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["rows"] = comparison_rows(results)
    results["errors"] = errors
    atomic_write_json(args.output, results)
    machine = results["machine"]
    print(f"\nautoseg vs nnU-Net {results['nnunet_env']['nnunetv2']} on {machine['cpu_model']} "
          f"({machine['cpu_count']} cores, {machine['ram_gb']} GB), device {args.device}"
          + (f" ({machine['gpu']})" if machine.get("gpu") else "") + f", torch {machine['torch']}")
    print(format_table(results["rows"]))
    for side, name in (("autoseg", "autoseg"), ("nnunet", "nnU-Net")):
        plan = results.get("time_to_dice", {}).get(side, {}).get("plan")
        if plan:
            print(f"time to Dice, {name}'s plan: {plan['command']}: patch {plan['patch_size']}, batch "
                  f"{plan['batch_size']}, features {plan['features_per_stage']}")
    for name, message in errors.items():
        print(f"FAILED {name}: {message.splitlines()[0]}")
    print(f"wrote {args.output} ({results['total_seconds']:.0f} s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
