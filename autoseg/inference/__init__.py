"""Prediction: sliding-window inference, mirroring TTA, fold ensembles, results in the input's geometry.

From Python, :class:`Predictor` keeps a model loaded and segments a file, a ``SimpleITK.Image`` or
a numpy array; ``autoseg predict MODEL -i IN -o OUT`` is :func:`predict_folder`, which runs every
case through the same :class:`Predictor`. Per case:

1. **Preprocess** with the model's plan (:func:`autoseg.preprocessing.preprocess_case`: canonical
   orientation, non-zero crop, resampling, CT prior channels, normalization).
2. **Sliding window** (:func:`sliding_window_predict`, :mod:`autoseg.sliding_window`): tiles of the patch size, overlapping by
   ``1 - step`` of the patch, start positions spread evenly so the last tile ends at the edge
   (nnU-Net's rule), several tiles per forward pass. Each tile's softmax (or sigmoid) is weighted
   by a Gaussian importance map (sigma 1/8 of the patch, :func:`gaussian_importance_map`), since
   a network is least reliable at a tile's border; the weighted sum is divided by the summed
   weights. 2D configurations treat the Z axis as a stack of independent slices, batched.
3. **Test-time mirroring** along the axes the network was trained to be mirrored along (the
   schedule's ``mirror_axes`` unless the fold's augmentation switched mirroring off): every
   combination of flips, each prediction flipped back and averaged.
4. **Fold ensemble**: the probabilities of all requested folds are averaged.
5. **Cascade** (``3d_cascade_fullres``, whose ``previous_stage`` is ``3d_lowres``): the low-resolution
   stage (the same folds) is predicted first, its label map resampled to the full-resolution grid
   and appended as one-hot channels (:mod:`autoseg.cascade`), as in training.
6. **Post-processing** from ``models/<config>/postprocessing.json`` (:mod:`autoseg.postprocessing_steps`):
   the CRF step on the probabilities, the largest-component steps on the label map, both in
   preprocessed space, where cross-validation decided them.
7. **Export**: un-resample, un-crop and un-orient with the same torch resampling as preprocessing
   (:func:`autoseg.restore.restore_to_original`) and write ``CASE<ending>`` with
   :func:`autoseg.io.write_like`: identical shape, spacing, origin and direction to the input's
   first channel, and its file format.

Throughput and memory: a background thread pool preprocesses the next case and exports the previous
one while the network runs on the current one (at most one case waiting on each side). The
accumulators of a large volume on a GPU that cannot hold them in float32 fall back to float16,
and then to host memory. Cases with an existing output are skipped unless ``overwrite``.

Probabilities (``save_probabilities``) are written as ``CASE_probabilities.npz`` (one float32 array
``probabilities`` of shape ``(K, *input shape)``; no pickle) and ``CASE_probabilities.json``
(channel names, activation and geometry). The label map is resampled class by class from the
preprocessed-space label map (memory O(volume) whatever the number of classes), the probabilities
linearly, so a boundary voxel's label may differ from the argmax of the saved probabilities.

The networks run in PyTorch, or (``runtime="onnx"`` / ``"torchscript"``) from a folder written by
:func:`export_networks` (``autoseg export-model --format onnx|torchscript``): the sliding window
only calls the network, so everything around it is the same code (:mod:`.runtimes`).

Modules: :mod:`.model` (finding and loading trained folds), :mod:`.runtimes` (torch, TorchScript,
onnxruntime), :mod:`.pipeline` (the fold ensemble, and the threaded pipeline), :mod:`.predictor`
(:class:`Predictor`: one case), :mod:`.folder` (:func:`predict_folder`), :mod:`.export`
(:func:`export_networks`), :mod:`.validation` (validation probabilities for
:func:`autoseg.postprocessing.find_postprocessing`). Every public name is importable from
``autoseg.inference``.
"""

from __future__ import annotations

from autoseg.inference.export import EXPORT_FORMATS, export_networks
from autoseg.inference.folder import FAST_STEP, predict_folder
from autoseg.inference.model import (
    CHECKPOINT_FILES,
    FoldModel,
    PredictionError,
    TrainedModel,
    load_trained_model,
    trained_configurations,
    trained_folds,
)
from autoseg.inference.pipeline import predict_preprocessed
from autoseg.inference.predictor import Predictor
from autoseg.inference.runtimes import RUNTIMES, OnnxNetwork, RuntimeMissingError
from autoseg.inference.validation import predict_validation_probabilities
from autoseg.model_archive import export_model, import_model
from autoseg.sliding_window import gaussian_importance_map, sliding_window_predict, tile_starts
from autoseg.training.validation import trained_mirror_axes

__all__ = [
    "CHECKPOINT_FILES",
    "EXPORT_FORMATS",
    "FAST_STEP",
    "RUNTIMES",
    "FoldModel",
    "OnnxNetwork",
    "PredictionError",
    "Predictor",
    "RuntimeMissingError",
    "TrainedModel",
    "export_model",
    "export_networks",
    "gaussian_importance_map",
    "import_model",
    "load_trained_model",
    "predict_folder",
    "predict_preprocessed",
    "predict_validation_probabilities",
    "sliding_window_predict",
    "tile_starts",
    "trained_configurations",
    "trained_folds",
    "trained_mirror_axes",
]
