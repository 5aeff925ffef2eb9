"""Shared test fixtures: tiny synthetic raw datasets in the nnU-Net v2 layout.

Keep fixtures here small and general; a fixture used by one test file belongs in that file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from autoseg.io import NATURAL_2D_ENDINGS, Image, write_image

DEFAULT_LABELS: dict[str, int | list[int]] = {"background": 0, "liver": 1, "tumour": 2}


def tiny_volume(shape: tuple[int, ...], rng: np.random.Generator, integer: bool) -> np.ndarray:
    """A noisy image with a brighter block, so it is neither constant nor trivially uniform."""
    array = rng.normal(100.0, 10.0, size=shape)
    array[tuple(slice(s // 4, s - s // 4) for s in shape)] += 50.0
    return np.clip(array, 0, 255).astype(np.uint8) if integer else array.astype(np.float32)


def tiny_label(shape: tuple[int, ...]) -> np.ndarray:
    """Background, a block of 1 and a smaller block of 2 inside it (values 0, 1, 2 all present)."""
    label = np.zeros(shape, dtype=np.uint8)
    label[tuple(slice(s // 4, s - s // 4) for s in shape)] = 1
    label[tuple(slice(s // 2 - 1, s // 2 + 1) for s in shape)] = 2
    return label


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """A factory writing a small valid raw dataset and returning its folder.

    Cases are named ``case_000``, ``case_001``, ...; 3D files get a non-zero origin and the given
    spacing, natural 2D formats (.png/.bmp) get neither, as they cannot store them.
    """

    def make(
        name: str = "Dataset001_Tiny",
        num_cases: int = 3,
        num_channels: int = 2,
        shape: tuple[int, ...] = (4, 8, 8),
        ending: str = ".nii.gz",
        labels: dict | None = None,
        spacing: tuple[float, ...] | None = None,
        num_test_cases: int = 0,
        seed: int = 0,
        **extra_json: object,
    ) -> Path:
        root = tmp_path / name
        rng = np.random.default_rng(seed)
        natural = ending in NATURAL_2D_ENDINGS
        spacing = spacing or (2.0, 0.75, 0.75)[-len(shape):]
        geometry = {} if natural else {"spacing": spacing, "origin": (-10.0, 5.0, 2.5)[: len(shape)]}
        if natural:
            geometry["spacing"] = (1.0,) * len(shape)

        def write_case(folder: str, case_id: str, with_label: bool) -> None:
            for channel in range(num_channels):
                array = tiny_volume(shape, rng, integer=natural)
                write_image(Image(array, **geometry), root / folder / f"{case_id}_{channel:04d}{ending}")
            if with_label:
                write_image(Image(tiny_label(shape), **geometry), root / "labelsTr" / f"{case_id}{ending}")

        for i in range(num_cases):
            write_case("imagesTr", f"case_{i:03d}", with_label=True)
        for i in range(num_test_cases):
            write_case("imagesTs", f"test_{i:03d}", with_label=False)
        dataset_json = {
            "channel_names": {str(c): f"MR{c}" for c in range(num_channels)},
            "labels": labels if labels is not None else dict(DEFAULT_LABELS),
            "numTraining": num_cases,
            "file_ending": ending,
            **extra_json,
        }
        (root / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
        return root

    return make
