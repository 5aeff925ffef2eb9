"""autoseg: self-configuring medical image segmentation, from a raw dataset to predictions.

Each stage is a function here and a command of ``autoseg`` (the command line is a thin layer over
them): :func:`plan_dataset` (``autoseg plan``), :func:`preprocess` (``autoseg preprocess``),
:func:`train` (``autoseg train``), :class:`Predictor` (``autoseg predict``, for images in memory
too) and :func:`evaluate` (``autoseg evaluate``). Every error a user can act on is an
:class:`AutosegError`. The names load on first use, so ``import autoseg`` does not import torch.

Example (the whole chain on a small synthetic MRI dataset, four channels; one training iteration,
so the model is not good, only complete):
    >>> import autoseg
    >>> from autoseg.examples import make_example
    >>> dataset = make_example(tmp / "mri", kind="mri", num_cases=2, num_test_cases=1)
    >>> plan = autoseg.plan_dataset(dataset, tmp / "work", preset="cpu", configurations=["3d_fullres"],
    ...                             n_jobs=1, progress=False)
    >>> summaries = autoseg.preprocess(tmp / "work", configurations=["3d_fullres"], n_jobs=1)
    >>> short = autoseg.TrainOverrides(epochs=1, iterations_per_epoch=1, validation_iterations=1)
    >>> fold_dir = autoseg.train(tmp / "work", "3d_fullres", 0, overrides=short, workers=0, progress=False)
    >>> predictor = autoseg.Predictor.from_model(tmp / "work", device="cpu", tta=False)
    >>> channels = sorted((dataset / "imagesTs").iterdir())   # one test case: CASE_0000 ... CASE_0003
    >>> labels = predictor.predict([str(path) for path in channels])   # a SimpleITK.Image
    >>> import SimpleITK as sitk
    >>> labels.GetSize() == sitk.ReadImage(str(channels[0])).GetSize()
    True
    >>> case = channels[0].name[: -len("_0000.nii.gz")]
    >>> (tmp / "predictions").mkdir()
    >>> sitk.WriteImage(labels, str(tmp / "predictions" / f"{case}.nii.gz"))
    >>> result = autoseg.evaluate(tmp / "predictions", dataset / "labelsTs", dataset_json=dataset / "dataset.json")
    >>> {row["case"] for row in result.rows} == {case}
    True
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from autoseg.errors import AutosegError

if TYPE_CHECKING:
    from autoseg.evaluation import evaluate_folders as evaluate
    from autoseg.inference import Predictor
    from autoseg.planning import plan_dataset
    from autoseg.preprocessing import preprocess_dataset as preprocess
    from autoseg.training import TrainOverrides, train

try:
    __version__ = version("autoseg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# name here -> (module, name there); imported on first use, since each pulls in torch
_LAZY = {
    "plan_dataset": ("autoseg.planning", "plan_dataset"),
    "preprocess": ("autoseg.preprocessing", "preprocess_dataset"),
    "train": ("autoseg.training", "train"),
    "TrainOverrides": ("autoseg.training", "TrainOverrides"),
    "Predictor": ("autoseg.inference", "Predictor"),
    "evaluate": ("autoseg.evaluation", "evaluate_folders"),
}

__all__ = ["AutosegError", "Predictor", "TrainOverrides", "__version__", "evaluate", "plan_dataset", "preprocess",
           "train"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'autoseg' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
