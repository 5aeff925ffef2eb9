"""Prediction of a folder: ``autoseg predict MODEL -i IN -o OUT`` (:func:`predict_folder`).

The cases go through a :class:`autoseg.inference.Predictor`, the object a script uses for images in
memory: this module adds finding the cases, reading their files, the threads and writing the results.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.cluster import connect
from autoseg.constants import DEFAULT_FILE_ENDING, OUTPUT_FORMAT_NAMES
from autoseg.dataset import (
    CHANNEL_SUFFIX,
    CaseFiles,
    CaseIndex,
    DatasetJson,
    index_cases,
    load_case,
    load_dataset_json,
)
from autoseg.devices import resolve_device
from autoseg.dicom import DICOM_SEG_ENDING, series_cases, write_dicom_seg
from autoseg.inference.distributed import CaseWriter, PredictorOptions, predict_on_cluster
from autoseg.inference.model import PredictionError, resolve_configuration, resolve_folds
from autoseg.inference.pipeline import PreparedCase, run_pipeline
from autoseg.inference.predictor import Predictor
from autoseg.inference.runtimes import Runtime
from autoseg.io import SUPPORTED_ENDINGS, file_ending, write_like
from autoseg.locks import folder_lock
from autoseg.model_archive import import_model
from autoseg.plan import load_plan
from autoseg.postprocessing_steps import PROBABILITIES_SUFFIX
from autoseg.trust import TrustRecorder
from autoseg.trust.recorder import UNCERTAINTY_SUFFIX, write_uncertainty
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
    output_format: str = "nifti",
    scheduler: str | None = None,
    devices: Sequence[str] | None = None,
    summary: bool = True,
    save_uncertainty: bool = False,
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
        output_format: ``nifti`` (label maps in the inputs' format; the dataset's file ending for
            DICOM series inputs, sub-folders of ``input_dir`` holding one series each), or
            ``dicom-seg``: a DICOM Segmentation ``CASE.dcm`` per series input (:mod:`autoseg.dicom`).
        scheduler: predict on a Dask cluster (``local:N`` or ``tcp://host:8786``): one case per
            task, one loaded model per worker (:mod:`autoseg.inference.distributed`); the model,
            inputs and outputs must be on storage every worker sees.
        devices: one local worker per device (``["cuda:0", "cuda:1"]``), instead of ``scheduler``.
        summary: write ``summary.json`` (:mod:`autoseg.trust`: confidence per class, "needs review"
            flags, timing); mirroring then runs one sliding window per mirrored copy, so the copies'
            agreement is measured (the same forward passes). Not on a cluster.
        save_uncertainty: also write ``CASE_uncertainty<ending>``, the voxel-wise normalised entropy.

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
    if output_format not in OUTPUT_FORMAT_NAMES:
        raise PredictionError(f"output format {output_format!r} is not one of {', '.join(OUTPUT_FORMAT_NAMES)}")
    if scheduler is not None and devices:
        raise PredictionError("--devices starts a worker per device on this machine; use it without --scheduler")
    original_model = model_dir
    # one run per output folder; what a crashed run left there is removed first (autoseg.locks)
    lock = folder_lock(output_dir, f"prediction folder {output_dir}", clean_stale=True)
    with lock, _model_folder(model_dir) as model_dir:
        if fast:
            name = resolve_configuration(model_dir, load_plan(model_dir), configuration, runtime)
            available = resolve_folds(model_dir, name, folds, runtime)
            configuration, folds, tta, step = name, available[:1], False, FAST_STEP
        predictor = Predictor.from_model(model_dir, configuration, folds, device, tta, checkpoint, precision, step,
                                         runtime, progress)
        on_cluster = None
        if scheduler is not None or devices:
            # the workers load the model themselves, from the path given (a zip too): absolute paths
            on_cluster = (PredictorOptions(str(Path(original_model).resolve()), predictor.model.configuration.name,
                                           tuple(f.fold for f in predictor.model.folds), predictor.tta, checkpoint,
                                           precision, predictor.step, runtime, str(device)),
                          scheduler if scheduler is not None else f"local:{len(devices or ())}", devices)
        return _predict_cases(predictor, model_dir, input_dir.resolve(), output_dir.resolve(), save_probabilities,
                              overwrite, num_workers, progress, output_format, on_cluster, summary, save_uncertainty)


def _predict_cases(predictor: Predictor, model_dir: Path, input_dir: Path, output_dir: Path,
                   save_probabilities: bool, overwrite: bool, num_workers: int, progress: bool,
                   output_format: str = "nifti",
                   on_cluster: tuple[PredictorOptions, str, Sequence[str] | None] | None = None,
                   summary: bool = False, save_uncertainty: bool = False) -> list[Path]:
    model = predictor.model
    dataset_json_path = WorkDir(model_dir).dataset_json
    dataset = load_dataset_json(dataset_json_path) if dataset_json_path.is_file() else None
    series = series_cases(input_dir, len(model.plan.channel_names))  # DICOM series sub-folders, one case each
    if output_format == "dicom-seg" and not series:
        raise PredictionError(f"{input_dir}: --output-format dicom-seg needs DICOM series inputs (one sub-folder "
                              "per case holding its series); found none")
    ending = (dataset.file_ending if dataset is not None else DEFAULT_FILE_ENDING) if series \
        else _input_ending(input_dir, dataset)
    index = CaseIndex(series, []) if series else index_cases(input_dir, ending, len(model.plan.channel_names))
    if output_format == "dicom-seg":
        ending = DICOM_SEG_ENDING
    for problem in index.problems:
        warnings.warn(problem, stacklevel=2)
    if not index.cases:
        raise PredictionError(f"{input_dir}: no complete case (CASE_0000{ending} ... CASE_"
                              f"{len(model.plan.channel_names) - 1:04d}{ending})")
    outputs = {c.case_id: _outputs(output_dir, c.case_id, ending, save_probabilities) for c in index.cases}
    if save_uncertainty:
        uncertainty_ending = DEFAULT_FILE_ENDING if ending == DICOM_SEG_ENDING else ending
        for case_id, output in outputs.items():
            output.uncertainty = output_dir / f"{case_id}{UNCERTAINTY_SUFFIX}{uncertainty_ending}"
    if output_format == "dicom-seg":
        for case in index.cases:
            outputs[case.case_id].dicom_series = case.images[0]
    todo = [c for c in index.cases if overwrite or not _is_done(outputs[c.case_id])]
    output_dir.mkdir(parents=True, exist_ok=True)
    if on_cluster is not None:
        options, scheduler, devices = on_cluster
        with connect(scheduler) as client:
            failures = predict_on_cluster(client, options, todo, outputs, overwrite, CaseWriter(_is_done, write_case),
                                          devices, progress)
    else:
        trust = TrustRecorder(WorkDir(model_dir).models(model.configuration.name), model.configuration.name,
                              model.label_info, model.plan.channel_names, [f.fold for f in model.folds],
                              predictor.tta) if summary else None
        failures = run_pipeline(CasePipeline(predictor, outputs, trust), todo, num_workers, progress)
        if trust is not None:
            redone = {c.case_id for c in todo}
            trust.write(output_dir, keep=[c.case_id for c in index.cases if c.case_id not in redone])
    written = [outputs[c.case_id].label for c in index.cases if c.case_id not in failures]
    if failures:
        lines = "\n".join(f"- {message}" for message in failures.values())
        raise PredictionError(f"{len(failures)} of {len(index.cases)} case(s) could not be predicted (every other "
                              f"case is written to {output_dir}):\n{lines}", failures, written)
    if index.problems:  # a case skipped for a missing or misnamed file: the command must not look done
        lines = "\n".join(f"- {problem}" for problem in index.problems)
        raise PredictionError(f"{input_dir}: {len(index.problems)} input file problem(s), not predicted (every "
                              f"complete case is written to {output_dir}):\n{lines}", {}, written)
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
    return all(p is None or p.is_file()
               for p in (outputs.label, outputs.probabilities, outputs.sidecar, outputs.uncertainty))


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
    dicom_series: Path | None = None  # --output-format dicom-seg: the source series the SEG references
    uncertainty: Path | None = None   # --save-uncertainty: the voxel-wise entropy map


class CasePipeline:
    """The folder's stages around one :class:`Predictor` (for :func:`run_pipeline`; internal)."""

    def __init__(self, predictor: Predictor, outputs: dict[str, CaseOutputs], trust: TrustRecorder | None = None
                 ) -> None:
        self.predictor = predictor
        self.outputs = outputs
        self.trust = trust
        self.uncertainty: dict[str, np.ndarray] = {}  # from infer to export, per case

    # runs in a worker thread
    def prepare(self, case: CaseFiles) -> PreparedCase:
        return self.predictor.prepare(load_case(case, load_label=False))

    # runs in the main thread: the network's turn
    def infer(self, prepared: PreparedCase) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.outputs[prepared.case_id]
        keep = outputs.probabilities is not None
        if self.trust is None:
            return self.predictor.infer(prepared, keep_probabilities=keep)
        started = time.perf_counter()
        members = self.trust.members()
        labels, probabilities = self.predictor.infer(prepared, keep_probabilities=True, members=members)
        assert probabilities is not None
        assessment = self.trust.assess(
            prepared.case_id, outputs.label.name, probabilities, labels,
            prepared.image[: self.predictor.model.base_channels], prepared.properties, members,
            time.perf_counter() - started, None if outputs.uncertainty is None else outputs.uncertainty.name)
        if outputs.uncertainty is not None:
            self.uncertainty[prepared.case_id] = assessment.uncertainty.numpy()
        return labels, probabilities if keep else None

    # runs in a worker thread
    def export(self, prepared: PreparedCase, labels: np.ndarray, probabilities: np.ndarray | None) -> Path:
        restored, full = self.predictor.restore(prepared, labels, probabilities)
        outputs = self.outputs[prepared.case_id]
        uncertainty = self.uncertainty.pop(prepared.case_id, None)
        if uncertainty is not None and outputs.uncertainty is not None:
            write_uncertainty(uncertainty, prepared.properties, prepared.reference, outputs.uncertainty)
        return write_case(self.predictor, prepared, outputs, restored, full)


def write_case(predictor: Predictor, prepared: PreparedCase, outputs: CaseOutputs, labels: np.ndarray,
               probabilities: np.ndarray | None) -> Path:
    """Write one case's label map (in its source's geometry and format) and, if asked, probabilities."""
    reference = prepared.reference
    if outputs.dicom_series is not None:
        write_dicom_seg(reference.with_array(labels), outputs.dicom_series, predictor.model.label_info, outputs.label)
    else:
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
