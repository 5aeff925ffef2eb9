"""``autoseg.Predictor``: a trained model kept loaded, predicting images in memory or on disk.

``autoseg predict`` (:func:`autoseg.inference.predict_folder`) drives the same object, so a case
goes through one code path whichever way it comes in: :meth:`Predictor.prepare` (preprocessing,
the cascade's earlier grids), :meth:`Predictor.infer` (sliding window, mirroring, fold ensemble,
cascade stages, the CRF step), :meth:`Predictor.restore` (largest-component steps, back to the
input's grid). The folder pipeline only adds reading files, threads and writing files.

Example (``model_dir``: a work folder of a one-channel 3D model):
    >>> import numpy as np
    >>> from autoseg import Predictor
    >>> predictor = Predictor.from_model(model_dir, device="cpu")
    >>> volume = np.zeros((12, 32, 32), np.float32)
    >>> volume[2:10, 8:24, 8:24] = 200.0
    >>> labels = predictor.predict(volume, spacing=(3.0, 1.0, 1.0))
    >>> labels.GetSize(), labels.GetSpacing()
    ((32, 32, 12), (1.0, 1.0, 3.0))
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from autoseg.dataset import CaseData, to_3d
from autoseg.inference.model import PredictionError, TrainedModel, load_trained_model
from autoseg.inference.pipeline import Members, PreparedCase, cascade_channels, predict_preprocessed
from autoseg.inference.runtimes import Runtime
from autoseg.io import Image, ImageReadError, from_sitk, read_image, to_sitk
from autoseg.model_archive import import_model
from autoseg.postprocessing_steps import apply_postprocessing, crf_refine
from autoseg.preprocessing import preprocess_case
from autoseg.restore import restore_to_original

if TYPE_CHECKING:
    import SimpleITK as sitk

IN_MEMORY_CASE = "image"


class Predictor:
    """A loaded model (one configuration's folds) that segments images and keeps its networks loaded.

    Make one with :meth:`from_model`. :meth:`predict` is serialised by a lock: two threads may call
    it at once, the second waits for the first (the networks and the device are shared).

    Example (``model_dir``: a work folder, ``scan``: an image file):
        >>> predictor = Predictor.from_model(model_dir)          # device auto: CUDA, MPS or CPU
        >>> labels = predictor.predict(scan)                     # a SimpleITK.Image on the scan's grid
        >>> labels, probabilities = predictor.predict(scan, return_probabilities=True)
        >>> probabilities.shape[1:] == labels.GetSize()[::-1]   # (K, z, y, x) against ITK's (x, y, z)
        True
    """

    def __init__(self, model: TrainedModel, step: float = 0.5, tta: bool = True, progress: bool = False,
                 owned_dir: tempfile.TemporaryDirectory | None = None) -> None:
        if not 0 < step <= 1:
            raise PredictionError(f"step must be in (0, 1], got {step}")
        self.model = model
        self.step = step
        self.tta = tta
        self.progress = progress
        decision = model.postprocessing
        self.crf_params = decision.crf.params if decision is not None and decision.crf.enabled else None
        self._owned_dir = owned_dir  # an unpacked zip: removed with the predictor
        self._lock = threading.RLock()

    @classmethod
    def from_model(cls, path: str | os.PathLike, configuration: str | None = None,
                   folds: Sequence[int | str] | None = None, device: str | torch.device = "auto", tta: bool = True,
                   checkpoint: str = "best", precision: str = "auto", step: float = 0.5,
                   runtime: Runtime = "torch", progress: bool = False) -> Predictor:
        """Load a model from a work folder, an imported model folder or an exported model zip.

        Args:
            path: work folder, model folder (``autoseg import-model``, ``autoseg export-model
                --format onnx|torchscript``) or model zip (unpacked into a temporary folder that
                lives as long as the predictor).
            configuration: None: ``3d_fullres`` if trained, else the only trained configuration.
            folds: folds to ensemble; None: every trained fold.
            device: ``auto`` (CUDA, then Apple MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
            tta: mirror test-time augmentation along the trained mirror axes.
            checkpoint: ``best`` or ``latest``.
            precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see :mod:`autoseg.precision`).
            step: tile step as a fraction of the patch.
            runtime: ``torch``, or ``onnx`` / ``torchscript`` for an exported model folder.
            progress: progress bars over the tiles.

        Raises:
            PredictionError: nothing trained, an unknown fold, networks that do not fit the plan.
            ModelArchiveError: a zip that is not a valid model archive.
        """
        path = Path(path)
        owned = None
        if path.is_file():
            owned = tempfile.TemporaryDirectory(prefix="autoseg_model_")
            try:
                path = import_model(path, Path(owned.name) / "model")
            except BaseException:
                owned.cleanup()
                raise
        elif not path.is_dir():
            raise PredictionError(f"{path}: no such model folder or model zip")
        model = load_trained_model(path, configuration, folds, checkpoint, device, precision=precision,
                                   runtime=runtime)
        return cls(model, step=step, tta=tta, progress=progress, owned_dir=owned)

    # --- the one code path -------------------------------------------------------------------------

    def prepare(self, data: CaseData) -> PreparedCase:
        """Preprocess a loaded case with the plan (and for each earlier stage of a cascade)."""
        device = self.model.device
        result = preprocess_case(data, self.model.plan, self.model.configuration.name, device=device)
        previous = []
        stage = self.model.previous
        while stage is not None:  # the cascade's earlier stages, nearest first
            earlier = preprocess_case(data, stage.plan, stage.configuration.name, device=device)
            previous.append((earlier.image, earlier.properties))
            stage = stage.previous
        return PreparedCase(data.case_id, result.image, result.properties, data.reference, previous)

    def infer(self, prepared: PreparedCase, keep_probabilities: bool = False, members: Members | None = None
              ) -> tuple[np.ndarray, np.ndarray | None]:
        """The label map in preprocessed space (and the probabilities when ``keep_probabilities``).

        ``members`` receives the folds' and mirrored copies' probabilities (:class:`autoseg.trust.CaseMembers`).
        """
        with self._lock:
            image = self._with_previous_stages(prepared)
            probabilities = predict_preprocessed(self.model, image, self.step, self.tta, progress=self.progress,
                                                 members=members)
            if self.crf_params is not None:
                probabilities = crf_refine(probabilities, image[: self.model.base_channels], self.model.activation,
                                           self.crf_params, prepared.properties.spacing_after_resampling,
                                           in_plane_only=self.model.configuration.dim == 2)
            labels = self.model.label_info.decode(probabilities)
            saved = probabilities.float().cpu().numpy() if keep_probabilities else None
        return labels, saved

    def restore(self, prepared: PreparedCase, labels: np.ndarray, probabilities: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Post-process and map back to the input's grid: the label map (the label file's dtype) and
        the probabilities ``(K, *input shape)`` when given."""
        device = self.model.device
        labels = apply_postprocessing(labels, self.model.postprocessing)
        restored = restore_to_original(labels, prepared.properties, "label", device=device)
        restored = restored.astype(self.model.label_info.file_dtype, copy=False)
        full = None
        if probabilities is not None:
            fill = 0.0 if self.model.is_regions else None
            full = restore_to_original(probabilities, prepared.properties, "probabilities", fill=fill, device=device)
            full = full.astype(np.float32, copy=False)
        return restored, full

    def _with_previous_stages(self, prepared: PreparedCase) -> np.ndarray:
        stages: list[TrainedModel] = []
        stage = self.model.previous
        while stage is not None:
            stages.append(stage)
            stage = stage.previous
        if not stages:
            return prepared.image
        # Earliest stage first; each stage's labels feed the next one's input.
        grids = [(prepared.image, prepared.properties)] + prepared.previous
        models = [self.model] + stages
        labels: np.ndarray | None = None
        for index in range(len(models) - 1, 0, -1):
            stage_model, (stage_image, stage_properties) = models[index], grids[index]
            if labels is not None:
                stage_image = np.concatenate([stage_image, cascade_channels(
                    stage_model, labels, grids[index + 1][1], stage_properties)])
            probabilities = predict_preprocessed(stage_model, stage_image, self.step, self.tta, progress=self.progress)
            labels = stage_model.label_info.decode(probabilities)
            del probabilities
        assert labels is not None
        extra = cascade_channels(self.model, labels, grids[1][1], prepared.properties)
        return np.concatenate([prepared.image, extra])

    # --- in memory ---------------------------------------------------------------------------------

    def predict(self, image: Any, spacing: Sequence[float] | None = None, origin: Sequence[float] | None = None,
                direction: Sequence[float] | None = None, return_probabilities: bool = False
                ) -> sitk.Image | tuple[sitk.Image, np.ndarray]:
        """Segment one image; the label map comes back in the input's exact geometry.

        Args:
            image: a file path (or DICOM series folder), a ``SimpleITK.Image``, a list of either
                (one per channel, in the plan's channel order), or a numpy array ``(Z, Y, X)`` /
                ``(Y, X)``, with a leading channel axis when the model takes several channels.
            spacing: voxel size in mm in the array's axis order; required for a numpy array.
            origin, direction: ITK ``(x, y, z)`` order, for a numpy array (default 0 and identity).
            return_probabilities: also return the probabilities, float32 ``(K, *image shape)``
                (one channel per output of the model: labels, or regions).

        Returns:
            A ``SimpleITK.Image`` label map (the label values of ``dataset.json``), or
            ``(label map, probabilities)``.

        Raises:
            PredictionError: an input that does not fit the model (channels, dimensions, geometry).
            ImageReadError: a file that cannot be read.
        """
        data = self.case_data(image, spacing, origin, direction)
        with self._lock:
            prepared = self.prepare(data)
            labels, probabilities = self.infer(prepared, keep_probabilities=return_probabilities)
            del prepared.image
            restored, full = self.restore(prepared, labels, probabilities)
        result = to_sitk(prepared.reference.with_array(restored))
        return (result, full) if return_probabilities else result

    def case_data(self, image: Any, spacing: Sequence[float] | None = None, origin: Sequence[float] | None = None,
                  direction: Sequence[float] | None = None) -> CaseData:
        """The input of :meth:`predict` as a loaded case (what :func:`autoseg.dataset.load_case` gives)."""
        channels = len(self.model.plan.channel_names)
        if isinstance(image, np.ndarray):
            images = _numpy_channels(image, spacing, origin, direction, channels)
        else:
            if spacing is not None or origin is not None or direction is not None:
                raise PredictionError("spacing, origin and direction go with a numpy array; a file or a SimpleITK "
                                      "image carries its own geometry")
            items = list(image) if isinstance(image, (list, tuple)) else [image]
            images = [_as_image(item) for item in items]
        if len(images) != channels:
            raise PredictionError(f"the model takes {channels} channel(s) ({', '.join(self.model.plan.channel_names)});"
                                  f" got {len(images)} image(s)")
        first = images[0]
        for index, other in enumerate(images[1:], start=1):
            if other.array.shape != first.array.shape:
                raise PredictionError(f"channel {index} has shape {other.array.shape}, channel 0 "
                                      f"{first.array.shape}; the channels must share one grid")
        if self.model.configuration.dim == 3 and first.ndim == 2:
            raise PredictionError(f"a 2D image of shape {first.array.shape} for the 3D configuration "
                                  f"{self.model.configuration.name!r}")
        # Exactly as load_case stacks a case's files, so memory and disk inputs preprocess alike.
        stacked = np.stack([to_3d(i.array.astype(np.float32, copy=False), first.spacing)[0] for i in images])
        _, spacing3 = to_3d(first.array, first.spacing)
        return CaseData(IN_MEMORY_CASE, stacked, None, spacing3, first.ndim == 2, first)

    # --- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the temporary folder of an unpacked model zip (the networks stay usable)."""
        if self._owned_dir is not None:
            self._owned_dir.cleanup()
            self._owned_dir = None

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        model = self.model
        return (f"Predictor({model.model_dir}, configuration={model.configuration.name!r}, "
                f"folds={[f.fold for f in model.folds]}, device={str(model.device)!r}, runtime={model.runtime!r}, "
                f"tta={self.tta}, step={self.step})")


def _as_image(item: Any) -> Image:
    if isinstance(item, (str, os.PathLike)):
        return read_image(item)
    if isinstance(item, Image):
        return item
    if hasattr(item, "GetSpacing") and hasattr(item, "GetDirection"):
        try:
            return from_sitk(item)
        except ImageReadError as error:
            raise PredictionError(f"{error}; give one 2D or 3D scalar image per channel") from None
    raise PredictionError(f"cannot predict a {type(item).__name__}: give a file path, a SimpleITK.Image, a list of "
                          "them (one per channel), or a numpy array with spacing")


def _numpy_channels(array: np.ndarray, spacing: Sequence[float] | None, origin: Sequence[float] | None,
                    direction: Sequence[float] | None, channels: int) -> list[Image]:
    if spacing is None:
        raise PredictionError(f"a numpy array of shape {array.shape} needs its spacing (mm per voxel, in the "
                              "array's axis order): predict(array, spacing=(...))")
    spatial = len(spacing)
    if spatial not in (2, 3):
        raise PredictionError(f"spacing {tuple(spacing)}: give 2 (y, x) or 3 (z, y, x) values")
    if array.ndim == spatial:
        arrays = [array]
    elif array.ndim == spatial + 1:
        arrays = list(array)
    else:
        raise PredictionError(f"an array of shape {array.shape} with {spatial} spacing values: expected "
                              f"{spatial} spatial axes, with a leading channel axis for several channels")
    if len(arrays) != channels:
        raise PredictionError(f"the model takes {channels} channel(s); the array of shape {array.shape} has "
                              f"{len(arrays)} (put channels on the first axis)")
    try:
        return [Image(a, tuple(spacing), tuple(origin or ()), tuple(direction or ())) for a in arrays]
    except ValueError as error:
        raise PredictionError(str(error)) from None
