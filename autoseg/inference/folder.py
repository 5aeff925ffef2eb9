"""Prediction of a folder: ``autoseg predict MODEL -i IN -o OUT`` (:func:`predict_folder`).

The cases go through a :class:`autoseg.inference.Predictor`, the object a script uses for images in
memory: this module adds finding the cases, reading their files, the threads and writing the results.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.dataset import CHANNEL_SUFFIX, CaseFiles, DatasetJson, index_cases, load_case, load_dataset_json
from autoseg.devices import resolve_device
from autoseg.inference.model import PredictionError, resolve_configuration, resolve_folds
from autoseg.inference.pipeline import PreparedCase, run_pipeline
from autoseg.inference.predictor import Predictor
from autoseg.inference.runtimes import Runtime
from autoseg.io import SUPPORTED_ENDINGS, file_ending, write_like
from autoseg.model_archive import import_model
from autoseg.plan import load_plan
from autoseg.postprocessing_steps import PROBABILITIES_SUFFIX
from autoseg.utils import atomic_write, atomic_write_json
from autoseg.workdir import WorkDir

FAST_STEP = 0.75


def predict_folder(
    model_dir: str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    configuration: str | None = None,
    folds: Sequence[int | str] | None = None,
    device: str | torch.device = "auto",
    tta: bool = True,
    step: float = 0.5,
    save_probabilities: bool = False,
    overwrite: bool = False,
    fast: bool = False,
    checkpoint: str = "best",
    num_workers: int = 2,
    progress: bool = True,
    precision: str = "auto",
    runtime: Runtime = "torch",
) -> list[Path]:
    """Segment every case of a folder and write the results in the inputs' own geometry and format.

    Args:
        model_dir: a work folder, an imported or exported model folder (``plan.json``, ``models/...``),
            or a model zip.
        input_dir: images named ``CASE_XXXX<ending>`` (as ``imagesTs``), any supported format.
        output_dir: receives ``CASE<ending>`` label maps (created if needed).
        configuration: None: ``3d_fullres`` if trained, else the only trained configuration.
        folds: folds to ensemble; None: every trained fold (``all`` counts as one).
        device: ``auto`` (CUDA, then Apple MPS, then CPU), ``cpu``, ``cuda`` (``cuda:1``, ...) or ``mps``.
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
        runtime: ``torch``, or ``onnx`` / ``torchscript`` for a folder from ``autoseg export-model
            --format onnx|torchscript`` (the same preprocessing, tiling, TTA and export around it).

    Returns:
        The label files of every case (written now or found from an earlier run).

    Raises:
        PredictionError: nothing to predict, a model that cannot be loaded, or failed cases (the
            message lists each with its file and problem; every other case is written).
    """
    model_dir, input_dir, output_dir = Path(model_dir), Path(input_dir), Path(output_dir)
    device = resolve_device(device)
    if not input_dir.is_dir():
        raise PredictionError(f"{input_dir}: input folder does not exist")
    if not 0 < step <= 1:
        raise PredictionError(f"step must be in (0, 1], got {step}")
    with _model_folder(model_dir) as model_dir:
        if fast:
            name = resolve_configuration(model_dir, load_plan(model_dir), configuration, runtime)
            available = resolve_folds(model_dir, name, folds, runtime)
            configuration, folds, tta, step = name, available[:1], False, FAST_STEP
        predictor = Predictor.from_model(model_dir, configuration, folds, device, tta, checkpoint, precision, step,
                                         runtime, progress)
        return _predict_cases(predictor, model_dir, input_dir, output_dir, save_probabilities, overwrite,
                              num_workers, progress)


def _predict_cases(predictor: Predictor, model_dir: Path, input_dir: Path, output_dir: Path,
                   save_probabilities: bool, overwrite: bool, num_workers: int, progress: bool) -> list[Path]:
    model = predictor.model
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
    pipeline = CasePipeline(predictor, outputs)
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


@contextlib.contextmanager
def _model_folder(model_dir: Path) -> Iterator[Path]:
    """The model folder itself, or a model zip unpacked into a temporary folder for the run."""
    if not model_dir.is_file():
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="autoseg_model_") as tmp:
        yield import_model(model_dir, Path(tmp) / "model")


@dataclass
class CaseOutputs:
    """The files one case's results go to (probabilities and their sidecar when asked for)."""

    label: Path
    probabilities: Path | None
    sidecar: Path | None


class CasePipeline:
    """The folder's stages around one :class:`Predictor` (for :func:`run_pipeline`; internal)."""

    def __init__(self, predictor: Predictor, outputs: dict[str, CaseOutputs]) -> None:
        self.predictor = predictor
        self.outputs = outputs

    # runs in a worker thread
    def prepare(self, case: CaseFiles) -> PreparedCase:
        return self.predictor.prepare(load_case(case, load_label=False))

    # runs in the main thread: the network's turn
    def infer(self, prepared: PreparedCase) -> tuple[np.ndarray, np.ndarray | None]:
        keep = self.outputs[prepared.case_id].probabilities is not None
        return self.predictor.infer(prepared, keep_probabilities=keep)

    # runs in a worker thread
    def export(self, prepared: PreparedCase, labels: np.ndarray, probabilities: np.ndarray | None) -> Path:
        restored, full = self.predictor.restore(prepared, labels, probabilities)
        return write_case(self.predictor, prepared, self.outputs[prepared.case_id], restored, full)


def write_case(predictor: Predictor, prepared: PreparedCase, outputs: CaseOutputs, labels: np.ndarray,
               probabilities: np.ndarray | None) -> Path:
    """Write one case's label map (in its source's geometry and format) and, if asked, probabilities."""
    reference = prepared.reference
    write_like(labels, reference, outputs.label)
    if probabilities is not None and outputs.probabilities is not None and outputs.sidecar is not None:
        model = predictor.model

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, probabilities=probabilities)

        atomic_write(outputs.probabilities, write)
        atomic_write_json(outputs.sidecar, {
            "case_id": prepared.case_id,
            "array": "probabilities",
            "axes": "(channel, z, y, x)" if reference.ndim == 3 else "(channel, y, x)",
            "shape": list(probabilities.shape),
            "channels": list(model.label_names),
            "activation": model.activation,
            "configuration": model.configuration.name,
            "folds": [f.fold for f in model.folds],
            "spacing": list(reference.spacing),
            "origin": list(reference.origin),
            "direction": list(reference.direction),
            "label_file": outputs.label.name,
        })
    return outputs.label
