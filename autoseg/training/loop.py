"""The trainer: ``train(work, configuration, fold)`` writes ``WORK/models/<configuration>/fold_<k>/``.

One function wires small parts together: splits (:mod:`.splits`), batches (:mod:`.data`), the
augmentation (:mod:`.augment`), the loss (:mod:`.losses`), checkpoints (:mod:`.checkpoint`),
monitoring (:mod:`.monitor`), several processes (:mod:`.distributed`) and the end-of-fold
validation (:mod:`.validation`). Nothing is subclassed: every knob is a schedule field that the
plan sets and :class:`TrainOverrides` may override, and the overrides are recorded in the fold folder.

A cascade configuration (``previous_stage`` set, ``3d_cascade_fullres``) trains on the data of
``preprocessed_data`` with the previous stage's cross-validation predictions as extra one-hot input
channels and the previous stage's folds (:mod:`.previous_stage`).

Optimization (nnU-Net's): SGD with Nesterov momentum, poly learning-rate decay
``lr = initial_lr * (1 - epoch / epochs) ** lr_decay_exponent`` set at the start of each epoch,
gradient-norm clipping. Precision and compilation follow :mod:`autoseg.precision`: bfloat16
autocast where the device computes it natively, float16 autocast with a gradient scaler on a CUDA
GPU without bf16, float32 elsewhere; ``torch.compile`` by default on CUDA. On the CPU torch uses
every core this process may run on (divided among the processes of a torchrun job).

Resuming (``resume=True``) continues from ``checkpoint_latest.pt`` exactly where it stopped: at an
epoch boundary, or mid-epoch after Ctrl-C (the interrupt writes a checkpoint of the last finished
iteration). Extending a finished run (``resume=True`` with a larger ``epochs`` override) continues
the poly schedule recomputed for the new total, so the learning rate jumps up at the extension
point (from the old schedule's end value to ``initial_lr * (1 - e / new_epochs) ** 0.9``).

Fine-tuning (``pretrained=MODEL_DIR``): :mod:`.pretrained`. A time budget (``time_budget=``)
refits epochs, iterations and the learning-rate decay to the wall time: :mod:`.budget`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn
from tqdm.auto import tqdm

from autoseg.networks import build_network
from autoseg.plan import (
    Configuration,
    Plan,
    Schedule,
    Topology,
    configuration_hash,
    load_plan,
    plan_hash,
    save_plan,
)
from autoseg.precision import (
    Precision,
    PrecisionError,
    autocast,
    default_threads,
    maybe_compile,
    needs_grad_scaler,
    resolve_compile,
    resolve_precision,
)
from autoseg.training import monitor
from autoseg.training.augment import build_augmentation
from autoseg.training.augment.on_device import apply_deferred
from autoseg.training.budget import TimeBudget, approximate_tiles, format_duration, sliding_window_seconds
from autoseg.training.checkpoint import (
    CHECKPOINT_BEST,
    CHECKPOINT_LATEST,
    Checkpoint,
    capture_rng_state,
    fold_lock,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from autoseg.training.data import (
    TRAIN_STREAM,
    VALIDATION_STREAM,
    BatchStream,
    PatchLoader,
    PreprocessedDataset,
    default_workers,
)
from autoseg.training.distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    setup_distributed,
    wrap_model,
)
from autoseg.training.errors import TrainingError
from autoseg.training.labels import LabelInfo
from autoseg.training.losses import build_loss, prior_loss_term
from autoseg.training.pretrained import adopt_topology, load_matching_weights, load_pretrained
from autoseg.training.previous_stage import PreviousStage, prepare_previous_stage, previous_stage_splits
from autoseg.training.splits import fold_cases, load_or_create_splits
from autoseg.training.validation import predict_and_score, summarize_validation
from autoseg.utils import atomic_write_json, read_json
from autoseg.workdir import VALIDATION_DIR, WorkDir

LOG_FILE = "training_log.jsonl"
PROGRESS_FILE = "progress.png"
OVERRIDES_FILE = "overrides.json"
SCHEDULE_FILE = "schedule.json"
PLAN_FILE = "plan.json"

_SCHEDULE = TypeAdapter(Schedule)
_TOPOLOGY = TypeAdapter(Topology)


@dataclass(frozen=True)
class TrainOverrides:
    """Schedule fields to override for one run (None: keep the plan's value).

    They are applied with ``dataclasses.replace`` (so validated like the plan) and recorded in
    ``overrides.json``; a resumed run adds its own on top of the recorded ones.
    """

    epochs: int | None = None
    iterations_per_epoch: int | None = None
    validation_iterations: int | None = None
    initial_lr: float | None = None
    loss: str | None = None
    loss_options: dict[str, Any] | None = None
    augmentation: str | None = None
    augmentation_options: dict[str, Any] | None = None
    checkpoint_every: int | None = None
    seed: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields that are set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def apply_overrides(schedule: Schedule, overrides: Mapping[str, Any]) -> Schedule:
    """``schedule`` with ``overrides`` applied; invalid values raise :class:`TrainingError`."""
    try:
        return dataclasses.replace(schedule, **overrides)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        raise TrainingError(f"invalid training override(s): {problems}") from None
    except TypeError as error:
        raise TrainingError(f"invalid training override(s): {error}") from None


def poly_lr(initial_lr: float, epoch: int, epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's polynomial decay: ``initial_lr * (1 - epoch / epochs) ** exponent``."""
    return initial_lr * (1 - epoch / epochs) ** exponent


@dataclass
class Progress:
    """Where training stands; everything here goes into the checkpoint."""

    epoch: int = 0  # the epoch being (or next to be) trained
    iteration: int = 0  # finished iterations of that epoch
    train_batches: int = 0  # batches drawn from the training stream so far
    val_batches: int = 0
    ema: float | None = None
    best_ema: float | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    # running sums of a half-finished epoch, so an interrupted epoch resumes with its statistics
    epoch_losses: list[float] = field(default_factory=list)
    epoch_data_time: float = 0.0
    epoch_compute_time: float = 0.0
    epoch_elapsed: float = 0.0

    def to_state(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Progress:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in names})


@dataclass
class _Run:
    """The assembled parts of one training run (internal)."""

    context: DistributedContext
    plan: Plan
    configuration: Configuration
    fold_dir: Path
    label_info: LabelInfo
    dataset: PreprocessedDataset
    train_cases: list[str]
    val_cases: list[str]
    network: nn.Module
    model: nn.Module  # the network, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss: nn.Module
    progress: Progress
    fold: int | str
    precision: Precision
    previous_stage: PreviousStage | None = None
    in_optimizer_step: bool = False
    budget: TimeBudget | None = None

    @property
    def schedule(self) -> Schedule:
        return self.configuration.schedule

    @property
    def device(self) -> torch.device:
        return self.context.device


def train(
    work_dir: str | os.PathLike,
    configuration: str,
    fold: int | str,
    overrides: TrainOverrides | None = None,
    device: str | torch.device = "cpu",
    workers: int | None = None,
    resume: bool = False,
    pretrained: str | os.PathLike | None = None,
    progress: bool = True,
    num_threads: int | None = None,
    precision: str = "auto",
    compile_network: str = "auto",
    time_budget: float | None = None,
) -> Path:
    """Train one fold of a configuration and return its folder.

    Args:
        work_dir: the work folder (``plan.json`` and ``preprocessed/<configuration>/``).
        configuration: ``2d``, ``3d_fullres``, ``3d_lowres`` or ``3d_cascade_fullres`` (after every
            fold of ``3d_lowres``).
        fold: a fold number of ``splits.json`` (created on first use: 5 folds, or one per case
            with fewer cases), or ``"all"`` to train on every case (no held-out validation).
        overrides: schedule fields to change for this run.
        device: ``auto`` (CUDA, MPS, else CPU), ``cpu``, ``cuda``; torchrun: ``cuda:<LOCAL_RANK>`` each.
        workers: data loading processes per training process; 0 loads in the main process
            (errors show their real traceback); None: every core, at most 12.
        resume: continue (or extend) the run in the fold folder from ``checkpoint_latest.pt``; a
            fold folder without a checkpoint starts from scratch.
        pretrained: fold folder (or checkpoint file) of a model to fine-tune from.
        progress: show progress bars.
        num_threads: torch CPU threads; None: every core this process may run on (divided among
            torchrun processes).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (:func:`autoseg.precision.resolve_precision`).
        compile_network: ``auto``, ``on`` or ``off`` (:func:`autoseg.precision.resolve_compile`).
        time_budget: seconds this call may take, end-of-fold validation included; the epochs,
            iterations per epoch and learning-rate decay are fitted to it (:mod:`.budget`), never
            beyond the plan's schedule and the overrides.

    Raises:
        TrainingError: the fold folder already has a checkpoint and ``resume`` is False, or the
            request does not fit the plan or the data.
    """
    started = time.monotonic()
    if time_budget is not None and not time_budget > 0:
        raise TrainingError(f"the time budget must be longer than 0 seconds, got {time_budget}")
    context = setup_distributed(device)
    try:
        if context.device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError("device cuda was asked for but torch sees no CUDA device; use --device cpu")
        torch.set_num_threads(num_threads or default_threads(context.world_size))
        with fold_lock(work_dir, configuration, fold, enabled=context.is_main):  # one run per fold
            run = _assemble(context, Path(work_dir), configuration, fold, overrides, resume, pretrained,
                            progress and context.is_main, precision, compile_network)
            if time_budget is not None:
                run.budget = _start_budget(run, started + time_budget, overrides)
            workers = default_workers(context.world_size) if workers is None else workers
            trained = _fit(run, workers, progress and context.is_main)
            if trained or not (run.fold_dir / VALIDATION_DIR / "summary.json").exists():
                _validate_fold(run, progress and context.is_main)
            return run.fold_dir
    finally:
        cleanup_distributed(context)


# --- assembling the parts -------------------------------------------------------------------------


def _assemble(context: DistributedContext, work_dir: Path, name: str, fold: int | str,
              overrides: TrainOverrides | None, resume: bool, pretrained: str | os.PathLike | None,
              show_progress: bool = False, precision: str = "auto", compile_network: str = "auto") -> _Run:
    work = WorkDir(work_dir)
    plan = load_plan(work.plan)
    configuration = plan.configuration(name)
    if str(fold) != "all":
        try:
            fold = int(fold)
        except ValueError:
            raise TrainingError(f"fold must be a fold number or 'all', got {fold!r}") from None
    fold_dir = work.fold(name, fold)
    latest = fold_dir / CHECKPOINT_LATEST

    checkpoint = None
    if resume and latest.exists():
        checkpoint = read_checkpoint(latest)
        checkpoint.check_resumable(latest)
    elif resume and context.is_main:
        print(f"{fold_dir}: no checkpoint to resume from; starting from scratch")
    elif latest.exists():
        raise TrainingError(f"{fold_dir}: this fold is already trained (or started): {CHECKPOINT_LATEST} "
                            "exists. Pass --resume to continue or extend it, or delete the folder to start over")

    new_overrides = overrides.as_dict() if overrides else {}
    recorded = dict(read_json(fold_dir / OVERRIDES_FILE)) if checkpoint and (fold_dir / OVERRIDES_FILE).exists() \
        else {}  # type: ignore[arg-type]
    base = _SCHEDULE.validate_python(checkpoint.schedule) if checkpoint else configuration.schedule
    schedule = apply_overrides(base, new_overrides)

    if checkpoint is not None:
        topology = _TOPOLOGY.validate_python(checkpoint.topology)
    elif pretrained is not None:
        pretrained_state = load_pretrained(Path(pretrained))
        topology = adopt_topology(pretrained_state, configuration, Path(pretrained))
    else:
        topology = configuration.topology
    try:
        configuration = dataclasses.replace(configuration, topology=topology, schedule=schedule)
    except ValidationError as error:
        raise TrainingError(f"the network topology does not fit configuration {name!r}: {error}") from None

    label_info = LabelInfo.from_labels(plan.labels)
    label_info.check_network(topology.num_classes, "the network's num_classes")
    dataset = PreprocessedDataset(work.preprocessed(configuration.data_name))
    _check_manifest(dataset, plan, name)
    _check_channels(dataset, configuration)
    train_cases, val_cases = _fold_cases(context, work, configuration, fold, dataset)
    previous_stage = _previous_stage(context, work, plan, configuration, dataset, show_progress)

    torch.manual_seed(schedule.seed)  # the same seed builds the same initial weights
    network = build_network(topology).to(context.device)
    if checkpoint is not None:
        network.load_state_dict(checkpoint.network)
    elif pretrained is not None:
        load_matching_weights(network, pretrained_state.network, Path(pretrained))
    try:
        resolved = resolve_precision(precision, context.device)
        compiled = resolve_compile(compile_network, context.device)
    except PrecisionError as error:
        raise TrainingError(str(error)) from None
    model = maybe_compile(wrap_model(network, context), compiled)
    # foreach: one fused kernel per step over all parameters instead of one per tensor
    optimizer = torch.optim.SGD(network.parameters(), lr=schedule.initial_lr, momentum=schedule.momentum,
                                nesterov=True, weight_decay=schedule.weight_decay, foreach=True)
    scaler = torch.amp.GradScaler(context.device.type, enabled=needs_grad_scaler(resolved))
    progress = Progress()
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint.optimizer)
        if checkpoint.grad_scaler:
            scaler.load_state_dict(checkpoint.grad_scaler)
        progress = Progress.from_state(checkpoint.progress)
        restore_rng_state(checkpoint.rng)
    loss = build_loss(schedule, topology, label_info).to(context.device)

    if context.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(fold_dir / OVERRIDES_FILE, {**recorded, **new_overrides})
        atomic_write_json(fold_dir / SCHEDULE_FILE, _SCHEDULE.dump_python(schedule, mode="json"))
        effective = dataclasses.replace(plan, configurations={**plan.configurations, name: configuration})
        save_plan(effective, fold_dir / PLAN_FILE)
    if show_progress:
        print(f"training on {context.device} in {resolved}{' with torch.compile' if compiled else ''}, "
              f"{torch.get_num_threads()} thread(s) per process")
    return _Run(context, plan, configuration, fold_dir, label_info, dataset, train_cases, val_cases, network,
                model, optimizer, scaler, loss, progress, fold, resolved, previous_stage)


def _check_manifest(dataset: PreprocessedDataset, plan: Plan, name: str) -> None:
    recorded = dataset.manifest.get("configuration_hash")
    if recorded is not None and recorded != configuration_hash(plan, name):
        raise TrainingError(f"{dataset.folder}: preprocessed with different settings than plan.json's "
                            f"configuration {name!r} (configuration_hash differs); re-run `autoseg preprocess`")


def _check_channels(dataset: PreprocessedDataset, configuration: Configuration) -> None:
    image, _ = dataset.load(dataset.case_ids[0])
    if image.shape[0] != configuration.base_channels:
        raise TrainingError(f"{dataset.folder / dataset.case_ids[0]}.npy has {image.shape[0]} channel(s), "
                            f"configuration {configuration.name!r} expects {configuration.base_channels} (image and "
                            "CT prior channels); re-run `autoseg preprocess`")


def _fold_cases(context: DistributedContext, work: WorkDir, configuration: Configuration, fold: int | str,
                dataset: PreprocessedDataset) -> tuple[list[str], list[str]]:
    if fold == "all":
        return fold_cases([], "all", dataset.case_ids)
    # a cascade stage's fold k holds out the cases its previous stage's fold k held out
    path = (previous_stage_splits(work, configuration) if configuration.previous_stage
            else work.splits(configuration.name))
    if context.is_main:  # one writer; the other ranks read the file it wrote
        load_or_create_splits(path, dataset.case_ids, dataset.class_presence())
    barrier(context)
    splits = load_or_create_splits(path, dataset.case_ids)
    return fold_cases(splits, fold, dataset.case_ids, str(path))


def _previous_stage(context: DistributedContext, work: WorkDir, plan: Plan, configuration: Configuration,
                    dataset: PreprocessedDataset, show_progress: bool) -> PreviousStage | None:
    """A cascade stage's previous-stage predictions on its grid (prepared by the main process)."""
    if not configuration.previous_stage:
        return None
    if context.is_main:
        prepare_previous_stage(work, plan, configuration, dataset, device=str(context.device),
                               progress=show_progress)
    barrier(context)  # the other ranks read what the main one wrote
    return PreviousStage.of(work, plan, configuration.name)


# --- the training loop ----------------------------------------------------------------------------


def _fit(run: _Run, workers: int, show_progress: bool) -> bool:
    """Train until ``schedule.epochs``; False if there was nothing left to train."""
    schedule, context, progress = run.schedule, run.context, run.progress
    if progress.epoch >= schedule.epochs:
        return False
    train_stream, val_stream = _streams(run, workers)
    try:
        with train_stream, val_stream:
            # run.schedule, not schedule: a time budget refits it as the run goes
            while progress.epoch < run.schedule.epochs:
                started = time.monotonic()
                _train_epoch(run, train_stream, show_progress)
                val_iterations = math.ceil(run.schedule.validation_iterations / context.world_size)
                entry = _validate_epoch(run, val_stream, val_iterations)
                if run.budget is not None:
                    _refit_budget(run, time.monotonic() - started)
                _finish_epoch(run, entry, show_progress)
    except KeyboardInterrupt:
        # Only the optimizer step changes the weights: outside it they match the iteration count.
        if context.is_main and not run.in_optimizer_step:
            _save(run, run.fold_dir / CHECKPOINT_LATEST)
            print(f"\ninterrupted: {run.fold_dir / CHECKPOINT_LATEST} holds epoch {progress.epoch}, iteration "
                  f"{progress.iteration}; --resume continues from there")
        raise
    return True


# --- time budget (see .budget) ---------------------------------------------------------------------


def _start_budget(run: _Run, deadline: float, overrides: TrainOverrides | None) -> TimeBudget:
    # the plan's schedule with this run's overrides bounds the fit, not an earlier fit's result
    limit = apply_overrides(run.plan.configuration(run.configuration.name).schedule,
                            overrides.as_dict() if overrides else {})
    return TimeBudget(deadline, limit.epochs, limit.iterations_per_epoch, limit.validation_iterations)


def _mean_over_ranks(run: _Run, value: float) -> float:
    # every rank must take the same decision, so they decide from the same numbers
    total = all_reduce_sum(torch.tensor([value], dtype=torch.float64, device=run.device), run.context)
    return float(total[0]) / run.context.world_size


def _budget_step(run: _Run, seconds: float) -> bool:
    """Feed one iteration's seconds to the budget; True: stop now, this epoch is the last."""
    budget, progress, world = run.budget, run.progress, run.context.world_size
    assert budget is not None
    seconds_per_iteration = budget.observe(seconds)
    if seconds_per_iteration is not None:
        per_rank = _mean_over_ranks(run, seconds_per_iteration)
        budget.final_validation = _final_validation_seconds(run, per_rank)
        fit = budget.fit(per_rank / world, progress.epoch, progress.iteration * world)
        _set_schedule(run, epochs=fit.epochs, iterations_per_epoch=fit.iterations_per_epoch,
                      validation_iterations=fit.validation_iterations)
        if run.context.is_main:
            tqdm.write(f"time budget: {per_rank:.2f} s per iteration, {format_duration(budget.left())} left -> "
                       f"{fit.epochs} epochs x {fit.iterations_per_epoch} iterations, end-of-fold validation "
                       f"~{format_duration(budget.final_validation)}")
        return False
    if _mean_over_ranks(run, float(budget.overdue())) > 0:
        _set_schedule(run, epochs=progress.epoch + 1)
        if run.context.is_main:
            tqdm.write(f"time budget: {format_duration(budget.left())} left, ending with epoch {progress.epoch + 1}")
        return True
    return False


def _refit_budget(run: _Run, epoch_seconds: float) -> None:
    budget = run.budget
    assert budget is not None
    if budget.fitted and run.progress.epoch + 1 < run.schedule.epochs:
        epochs = budget.refit(_mean_over_ranks(run, epoch_seconds), run.progress.epoch + 1)
        if epochs != run.schedule.epochs:
            _set_schedule(run, epochs=epochs)


def _final_validation_seconds(run: _Run, seconds_per_iteration: float) -> float:
    """The end-of-fold validation's cost: its tiles, mirrored, forward only, split over the ranks."""
    if run.fold == "all":
        return 0.0
    patch = run.configuration.patch_size
    tiles = [approximate_tiles(run.dataset.load(case)[1].shape, patch) for case in run.val_cases]
    mirrorings = 2 ** len(run.schedule.mirror_axes)
    return sliding_window_seconds(tiles, mirrorings, seconds_per_iteration,
                                  run.configuration.batch_size) / run.context.world_size


def _set_schedule(run: _Run, **fields: int) -> None:
    schedule = dataclasses.replace(run.schedule, **fields)
    run.configuration = dataclasses.replace(run.configuration, schedule=schedule)
    if run.context.is_main:
        atomic_write_json(run.fold_dir / SCHEDULE_FILE, _SCHEDULE.dump_python(schedule, mode="json"))


def _streams(run: _Run, workers: int) -> tuple[BatchStream, BatchStream]:
    configuration, schedule, context = run.configuration, run.schedule, run.context
    augmentation = _augmentation(configuration)
    common = dict(patch_size=configuration.patch_size, batch_size=configuration.batch_size,
                  label_info=run.label_info, oversample_foreground=schedule.oversample_foreground,
                  previous_stage=run.previous_stage, seed=schedule.seed, rank=context.rank)
    train_loader = PatchLoader(run.dataset, run.train_cases, augmentation=augmentation, stream=TRAIN_STREAM,
                               start_batch=run.progress.train_batches,
                               spatial_on_device=spatial_augmentation_on_device(context.device),
                               **common)  # type: ignore[arg-type]
    val_loader = PatchLoader(run.dataset, run.val_cases, augmentation=None, stream=VALIDATION_STREAM,
                             start_batch=run.progress.val_batches, **common)  # type: ignore[arg-type]
    pin = context.device.type == "cuda"
    val_workers = max(1, workers // 2) if workers else 0
    return BatchStream(train_loader, workers, pin), BatchStream(val_loader, val_workers, pin)


def spatial_augmentation_on_device(device: torch.device) -> bool:
    """Whether the training device resamples the augmented batches (:mod:`.augment.on_device`).

    On a GPU: resampling every sample on a few CPU cores is what leaves a fast GPU waiting for
    data. On the CPU the workers already run beside the network, so they keep the work.
    """
    return device.type == "cuda"


def _augmentation(configuration: Configuration) -> Any:
    try:
        return build_augmentation(configuration)
    except ValueError as error:
        raise TrainingError(f"augmentation of configuration {configuration.name!r}: {error}") from None


def _iterations_per_rank(run: _Run) -> int:
    return math.ceil(run.schedule.iterations_per_epoch / run.context.world_size)


def _train_epoch(run: _Run, stream: BatchStream, show_progress: bool) -> None:
    schedule, progress = run.schedule, run.progress
    iterations = _iterations_per_rank(run)
    lr = poly_lr(schedule.initial_lr, progress.epoch, schedule.epochs, schedule.lr_decay_exponent)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.model.train()
    bar = tqdm(total=iterations, initial=progress.iteration, desc=f"epoch {progress.epoch + 1}/{schedule.epochs}",
               disable=not show_progress, leave=False, dynamic_ncols=True)
    started = time.perf_counter() - progress.epoch_elapsed
    try:
        while progress.iteration < _iterations_per_rank(run):
            tick = time.perf_counter()
            batch = next(stream)
            loaded = time.perf_counter()
            loss = _train_step(run, batch)
            done = time.perf_counter()
            progress.train_batches += 1
            progress.iteration += 1
            progress.epoch_losses.append(loss)
            progress.epoch_data_time += loaded - tick
            progress.epoch_compute_time += done - loaded
            progress.epoch_elapsed = done - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if run.budget is not None and _budget_step(run, done - loaded):
                break
            if bar.total != _iterations_per_rank(run):  # the budget's first fit changed the epoch
                bar.total = _iterations_per_rank(run)
                bar.set_description(f"epoch {progress.epoch + 1}/{run.schedule.epochs}")
    finally:
        bar.close()


def _to_device(batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # a finished batch is only moved; a deferred one gets its spatial augmentation there
    return apply_deferred(batch, device)


def _train_step(run: _Run, batch: Mapping[str, Any]) -> float:
    data, target = _to_device(batch, run.device)
    optimizer, scaler = run.optimizer, run.scaler
    optimizer.zero_grad(set_to_none=True)
    with autocast(run.device, run.precision):
        output = run.model(data)
    loss = run.loss(output, target) + prior_loss_term(run.network, target, run.label_info)  # in float32
    scaler.scale(loss).backward()  # a disabled scaler (no float16) passes the loss through
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(run.network.parameters(), run.schedule.grad_clip)
    run.in_optimizer_step = True
    scaler.step(optimizer)
    scaler.update()
    run.in_optimizer_step = False
    return float(loss.detach())


@torch.no_grad()
def _validate_epoch(run: _Run, stream: BatchStream, iterations: int) -> dict[str, Any]:
    """Validation loss and pseudo-Dice on ``iterations`` validation batches (summed over ranks)."""
    started = time.perf_counter()
    run.model.eval()
    counts = torch.zeros((3, len(run.label_info.scored_channels)), dtype=torch.float64, device=run.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=run.device)  # (sum of losses, batches)
    for _ in range(iterations):
        data, target = _to_device(next(stream), run.device)
        with autocast(run.device, run.precision):
            output = run.model(data)
        if isinstance(output, (list, tuple)):
            output = output[0]
        loss_sum += torch.tensor([float(run.loss(output, target)), 1.0], dtype=torch.float64, device=run.device)
        counts += monitor.confusion_counts(output, target, run.label_info)
    # Counted only now: an epoch interrupted during validation redraws the same validation batches.
    run.progress.val_batches += iterations
    all_reduce_sum(counts, run.context)
    all_reduce_sum(loss_sum, run.context)
    dice = monitor.pseudo_dice(counts.cpu(), run.label_info) if iterations else {}
    return {"val_loss": float(loss_sum[0] / loss_sum[1]) if loss_sum[1] else None, "pseudo_dice": dice,
            "validation_time": time.perf_counter() - started}


def _finish_epoch(run: _Run, validation: dict[str, Any], show_progress: bool) -> None:
    progress, schedule, context = run.progress, run.schedule, run.context
    train_loss = torch.tensor([sum(progress.epoch_losses), len(progress.epoch_losses)], dtype=torch.float64,
                              device=run.device)
    all_reduce_sum(train_loss, context)
    mean_dice = monitor.mean_defined(validation["pseudo_dice"])
    progress.ema = monitor.update_ema(progress.ema, mean_dice)
    entry = {
        "epoch": progress.epoch,
        "train_loss": monitor.finite_or_none(float(train_loss[0] / train_loss[1])),
        "val_loss": monitor.finite_or_none(validation["val_loss"]),
        "pseudo_dice": {k: monitor.finite_or_none(v) for k, v in validation["pseudo_dice"].items()},
        "mean_pseudo_dice": mean_dice,
        "ema_pseudo_dice": progress.ema,
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch_time": progress.epoch_elapsed + validation["validation_time"],
        "data_time": progress.epoch_data_time,
        "compute_time": progress.epoch_compute_time,
        "validation_time": validation["validation_time"],
        "iterations": progress.iteration * context.world_size,  # batches over all ranks
    }
    progress.log.append(entry)
    improved = progress.ema is not None and (progress.best_ema is None or progress.ema > progress.best_ema)
    if improved:
        progress.best_ema = progress.ema
    progress.epoch += 1
    progress.iteration = 0
    progress.epoch_losses, progress.epoch_data_time, progress.epoch_compute_time = [], 0.0, 0.0
    progress.epoch_elapsed = 0.0
    if not context.is_main:
        return
    if show_progress:
        tqdm.write(monitor.epoch_line(entry, schedule.epochs))
    monitor.write_log(run.fold_dir / LOG_FILE, progress.log)
    monitor.plot_progress(run.fold_dir / PROGRESS_FILE, progress.log)
    if improved:
        _save(run, run.fold_dir / CHECKPOINT_BEST)
    if progress.epoch % schedule.checkpoint_every == 0 or progress.epoch == schedule.epochs:
        _save(run, run.fold_dir / CHECKPOINT_LATEST)


def _save(run: _Run, path: Path) -> None:
    save_checkpoint(path, Checkpoint(
        network=run.network.state_dict(),
        optimizer=run.optimizer.state_dict(),
        grad_scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None,
        progress=run.progress.to_state(),
        rng=capture_rng_state(),
        schedule=_SCHEDULE.dump_python(run.schedule, mode="json"),
        topology=_TOPOLOGY.dump_python(run.configuration.topology, mode="json"),
        configuration=run.configuration.name,
        fold=str(run.fold),
        plan_hash=plan_hash(run.plan),
        world_size=run.context.world_size,
        precision=run.precision,
    ).to_state())


# --- end of fold ----------------------------------------------------------------------------------


def _validate_fold(run: _Run, show_progress: bool) -> None:
    """Predict and score the held-out cases (not for fold 'all', which has none)."""
    if run.fold == "all":
        return
    output = run.fold_dir / VALIDATION_DIR
    context = run.context
    mine = run.val_cases[context.rank::context.world_size]
    predict_and_score(run.network, run.configuration, run.dataset, mine, run.label_info, output, run.device,
                      run.plan.regions_class_order, progress=show_progress, previous_stage=run.previous_stage)
    barrier(context)
    if context.is_main:
        summarize_validation(run.dataset, run.val_cases, dict(run.plan.labels), run.configuration.spacing,
                             output, run.label_info.ignore_value)
