"""Validation probabilities for post-processing decisions: each fold re-predicts its held-out cases."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from autoseg.inference.model import PredictionError, load_trained_model
from autoseg.inference.pipeline import predict_preprocessed
from autoseg.postprocessing_steps import PROBABILITIES_SUFFIX
from autoseg.training.previous_stage import PreviousStage
from autoseg.utils import atomic_write
from autoseg.workdir import VALIDATION_DIR, WorkDir


def predict_validation_probabilities(work_dir: str | os.PathLike, configuration: str, fold: int | str,
                                     checkpoint: str = "best", device: str | torch.device = "cpu",
                                     step: float = 0.5, tta: bool = True, overwrite: bool = False,
                                     progress: bool = True) -> list[Path]:
    """Write ``fold_k/validation/<case>_probabilities.npy`` (float16 ``(K, Z, Y, X)``, preprocessed space).

    The cases are the fold's validation predictions (``validation/<case>.npy``); images come from
    the configuration's preprocessed data (and, for a cascade, the previous-stage predictions it
    was validated with). Used by :func:`autoseg.postprocessing.find_postprocessing` to
    evaluate the CRF step. Existing files are kept unless ``overwrite``.
    """
    work = WorkDir(Path(work_dir))
    model = load_trained_model(work.root, configuration, [fold], checkpoint, device, cascade=False)
    folder = work.fold(configuration, str(fold)) / VALIDATION_DIR
    case_ids = sorted(p.stem for p in folder.glob("*.npy")
                      if not p.name.startswith(".") and not p.stem.endswith(PROBABILITIES_SUFFIX))
    if not case_ids:
        raise PredictionError(f"{folder}: no validation predictions (<case>.npy); train the fold to the end first")
    written = []
    for case_id in tqdm(case_ids, desc=f"validation probabilities fold {fold}", disable=not progress, leave=False):
        target = folder / f"{case_id}{PROBABILITIES_SUFFIX}.npy"
        written.append(target)
        if target.is_file() and not overwrite:
            continue
        source = work.preprocessed(model.configuration.data_name) / f"{case_id}.npy"
        try:
            image = np.load(source, mmap_mode="r", allow_pickle=False)
            if model.cascade_channels:  # the stored inputs the fold was validated with
                stage = PreviousStage.of(work, model.plan, configuration)
                source = stage.folder / f"{case_id}.npy"
                image = np.concatenate([image, stage.one_hot(stage.load(case_id))])
        except (OSError, ValueError) as error:
            raise PredictionError(f"{source}: cannot be read ({error})") from None
        probabilities = predict_preprocessed(model, image, step, tta).float().cpu().numpy().astype(np.float16)
        atomic_write(target, lambda tmp, array=probabilities: np.save(tmp, array))
    return written
