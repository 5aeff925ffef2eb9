"""Prediction of a folder: ``autoseg predict MODEL -i IN -o OUT`` (:func:`predict_folder`)."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from autoseg.dataset import CHANNEL_SUFFIX, DatasetJson, index_cases, load_dataset_json
from autoseg.inference.model import PredictionError, load_trained_model, resolve_configuration, resolve_folds
from autoseg.inference.pipeline import CaseOutputs, CasePipeline, run_pipeline
from autoseg.io import SUPPORTED_ENDINGS, file_ending
from autoseg.plan import load_plan
from autoseg.postprocessing_steps import PROBABILITIES_SUFFIX
from autoseg.workdir import WorkDir

FAST_STEP = 0.75


def predict_folder(
    model_dir: str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    configuration: str | None = None,
    folds: Sequence[int | str] | None = None,
    device: str | torch.device = "cpu",
    tta: bool = True,
    step: float = 0.5,
    save_probabilities: bool = False,
    overwrite: bool = False,
    fast: bool = False,
    checkpoint: str = "best",
    num_workers: int = 2,
    progress: bool = True,
    precision: str = "auto",
) -> list[Path]:
    """Segment every case of a folder and write the results in the inputs' own geometry and format.

    Args:
        model_dir: a work folder or an imported model folder (``plan.json``, ``models/...``).
        input_dir: images named ``CASE_XXXX<ending>`` (as ``imagesTs``), any supported format.
        output_dir: receives ``CASE<ending>`` label maps (created if needed).
        configuration: None: ``3d_fullres`` if trained, else the only trained configuration.
        folds: folds to ensemble; None: every trained fold (``all`` counts as one).
        device: ``cpu`` or ``cuda`` (``cuda:1``, ...).
        tta: mirror test-time augmentation along the trained mirror axes.
        step: tile step as a fraction of the patch.
        save_probabilities: also write ``CASE_probabilities.npz`` and ``.json``.
        overwrite: redo cases whose outputs exist (default: skip them).
        fast: first available fold only, no TTA, step 0.75 (quick looks, CPU users).
        checkpoint: ``best`` or ``latest``.
        num_workers: background threads that preprocess the next case and export the previous one
            while the network runs; 0 does everything in turn in this thread.
        progress: progress bars (cases, and tiles of the current case).
        precision: ``auto`` (bfloat16 where the device computes it natively, else float32),
            ``fp32``, ``bf16`` or ``fp16`` (CUDA); see :mod:`autoseg.precision`.

    Returns:
        The label files of every case (written now or found from an earlier run).

    Raises:
        PredictionError: nothing to predict, a model that cannot be loaded, or failed cases (the
            message lists each with its file and problem; every other case is written).
    """
    model_dir, input_dir, output_dir = Path(model_dir), Path(input_dir), Path(output_dir)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictionError("device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if not input_dir.is_dir():
        raise PredictionError(f"{input_dir}: input folder does not exist")
    if fast:
        name = resolve_configuration(model_dir, load_plan(model_dir), configuration)
        available = resolve_folds(model_dir, name, folds)
        configuration, folds, tta, step = name, available[:1], False, FAST_STEP
    if not 0 < step <= 1:
        raise PredictionError(f"step must be in (0, 1], got {step}")
    model = load_trained_model(model_dir, configuration, folds, checkpoint, device, precision=precision)
    dataset_json_path = WorkDir(model_dir).dataset_json
    dataset = load_dataset_json(dataset_json_path) if dataset_json_path.is_file() else None
    ending = _input_ending(input_dir, dataset)
    index = index_cases(input_dir, ending, len(model.plan.channel_names))
    for problem in index.problems:
        warnings.warn(problem, stacklevel=2)
    if not index.cases:
        raise PredictionError(f"{input_dir}: no complete case (CASE_0000{ending} ... CASE_"
                              f"{len(model.plan.channel_names) - 1:04d}{ending})")
    outputs = {c.case_id: _outputs(output_dir, c.case_id, ending, save_probabilities) for c in index.cases}
    todo = [c for c in index.cases if overwrite or not _is_done(outputs[c.case_id])]
    output_dir.mkdir(parents=True, exist_ok=True)
    pipeline = CasePipeline(model, step, tta, progress, outputs)
    failures = run_pipeline(pipeline, todo, num_workers, progress)
    written = [outputs[c.case_id].label for c in index.cases if c.case_id not in failures]
    if failures:
        lines = "\n".join(f"- {message}" for message in failures.values())
        raise PredictionError(f"{len(failures)} of {len(index.cases)} case(s) could not be predicted (every other "
                              f"case is written to {output_dir}):\n{lines}", failures, written)
    return written


def _input_ending(input_dir: Path, dataset: DatasetJson | None) -> str:
    """The dataset's file ending when the folder has such files, else the most common supported one."""
    names = [p.name for p in input_dir.iterdir() if not p.name.startswith(".")]
    if dataset is not None and any(n.lower().endswith(dataset.file_ending.lower()) for n in names):
        return dataset.file_ending
    counts: Counter[str] = Counter()
    for name in names:
        ending = file_ending(name)
        if ending in SUPPORTED_ENDINGS and CHANNEL_SUFFIX.match(name[: -len(ending)]):
            counts[ending] += 1
    if not counts:
        raise PredictionError(f"{input_dir}: no image named CASE_0000<ending> with a supported ending "
                              f"({' '.join(SUPPORTED_ENDINGS)})")
    ending, _ = counts.most_common(1)[0]
    if len(counts) > 1:
        warnings.warn(f"{input_dir}: files of several formats ({', '.join(counts)}); predicting the {ending} ones",
                      stacklevel=3)
    return ending


def _outputs(output_dir: Path, case_id: str, ending: str, save_probabilities: bool) -> CaseOutputs:
    if not save_probabilities:
        return CaseOutputs(output_dir / f"{case_id}{ending}", None, None)
    return CaseOutputs(output_dir / f"{case_id}{ending}", output_dir / f"{case_id}{PROBABILITIES_SUFFIX}.npz",
                    output_dir / f"{case_id}{PROBABILITIES_SUFFIX}.json")


def _is_done(outputs: CaseOutputs) -> bool:
    return all(p is None or p.is_file() for p in (outputs.label, outputs.probabilities, outputs.sidecar))
