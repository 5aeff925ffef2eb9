"""Helpers for the training tests: tiny plans and preprocessed folders that follow the storage contract.

(No tests here: the module only builds inputs. It follows docs/architecture.md's preprocessed
storage exactly, so the trainer is tested against the contract, not against another module.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from autoseg.case_properties import CaseProperties, SidecarResampling, save_case_properties
from autoseg.plan import (
    ChannelNormalization,
    Configuration,
    Plan,
    Schedule,
    Topology,
    configuration_hash,
    plan_hash,
    save_plan,
)

LABELS = {"background": 0, "cube": 1}


def tiny_topology(dim: int = 3, in_channels: int = 1, num_classes: int = 2,
                  features: Sequence[int] = (4, 8, 16), deep_supervision: bool = True) -> Topology:
    n = len(features)
    return Topology(
        arch="unet", dim=dim, in_channels=in_channels, num_classes=num_classes,
        features_per_stage=tuple(features),
        kernel_sizes=((3,) * dim,) * n,
        strides=((1,) * dim,) + ((2,) * dim,) * (n - 1),
        n_conv_per_stage=(1,) * n,
        n_conv_per_stage_decoder=(1,) * (n - 1),
        deep_supervision=deep_supervision,
    )


def tiny_plan(name: str = "3d_fullres", dim: int = 3, patch: Sequence[int] = (16, 16, 16), batch_size: int = 2,
              labels: Mapping[str, int | tuple[int, ...]] = LABELS, num_channels: int = 1,
              regions_class_order: Sequence[int] | None = None, features: Sequence[int] = (4, 8, 16),
              **schedule: object) -> Plan:
    """A one-configuration plan with a tiny U-Net; ``schedule`` overrides Schedule fields."""
    num_classes = (len([k for k in labels if k not in ("background", "ignore")]) if regions_class_order
                   else len([k for k in labels if k != "ignore"]))
    defaults: dict[str, object] = {"epochs": 2, "iterations_per_epoch": 2, "validation_iterations": 1,
                                   "augmentation": "none", "seed": 1}
    configuration = Configuration(
        name=name, spacing=(1.0, 1.0, 1.0), patch_size=tuple(patch), batch_size=batch_size,
        median_shape=(24, 24, 24) if dim == 3 else (1, 24, 24),
        normalization=tuple(ChannelNormalization(channel=f"MR{c}", scheme="zscore") for c in range(num_channels)),
        topology=tiny_topology(dim, num_channels, num_classes, features),
        schedule=Schedule(**{**defaults, **schedule}),
    )
    return Plan(dataset_name="Dataset999_Tiny", channel_names=tuple(f"MR{c}" for c in range(num_channels)),
                labels=dict(labels), configurations={name: configuration},
                regions_class_order=tuple(regions_class_order) if regions_class_order else None)


def cube_case(rng: np.random.Generator, shape: Sequence[int] = (24, 24, 24), size: int = 8,
              num_channels: int = 1, values: Sequence[int] = (1,), contrast: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Noise with bright cubes at random places: cube ``i`` carries label ``values[i]``."""
    image = rng.normal(0.0, 1.0, size=(num_channels, *shape)).astype(np.float32)
    seg = np.zeros(shape, dtype=np.int16)
    for value in values:
        corner = [int(rng.integers(0, max(1, s - size + 1))) for s in shape]
        box = tuple(slice(c, c + min(size, s)) for c, s in zip(corner, shape))
        seg[box] = value
        image[(slice(None),) + box] += contrast
    return image, seg


def write_case(folder: Path, case_id: str, image: np.ndarray, seg: np.ndarray,
               spacing: Sequence[float] = (1.0, 1.0, 1.0), max_locations: int = 1000,
               seed: int = 0) -> None:
    """``<case>.npy``, ``<case>_seg.npy`` and the ``<case>.json`` sidecar (last), as preprocessing writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{case_id}.npy", image.astype(np.float32))
    np.save(folder / f"{case_id}_seg.npy", seg.astype(np.int16))
    rng = np.random.default_rng(seed)
    locations = {}
    for value in np.unique(seg):
        if value <= 0:
            continue
        coordinates = np.argwhere(seg == value)
        if len(coordinates) > max_locations:
            coordinates = coordinates[rng.choice(len(coordinates), max_locations, replace=False)]
        locations[str(int(value))] = coordinates.tolist()
    shape = list(seg.shape)
    sidecar = CaseProperties(
        case_id=case_id,
        source_files={"images": [f"imagesTr/{case_id}_0000.nii.gz"], "label": None},
        configuration="3d_fullres",
        configuration_hash="",
        plan_hash="",
        is_2d=False,
        shape=shape,
        spacing=list(spacing),
        origin=[0.0, 0.0, 0.0],
        direction=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        orientation={"axes": [0, 1, 2], "flips": [False, False, False]},
        shape_canonical=shape,
        spacing_canonical=list(spacing),
        crop_bbox=[[0, s] for s in shape],
        shape_after_crop=shape,
        shape_after_resampling=shape,
        spacing_after_resampling=list(spacing),
        resampling=SidecarResampling(image_order=3, label_order=1, slow_axis_order=0, slow_axis=None,
                                     anisotropy_threshold=3.0),
        channels=[f"channel_{c}" for c in range(image.shape[0])],
        ct_priors=[],
        class_locations=locations,
    )
    save_case_properties(sidecar, folder / f"{case_id}.json")


def make_work(root: Path, plan: Plan, cases: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A work folder with ``plan.json`` and every configuration's preprocessed folder holding ``cases``."""
    root.mkdir(parents=True, exist_ok=True)
    save_plan(plan, root / "plan.json")
    for name in plan.configurations:
        folder = root / "preprocessed" / name
        for case_id, (image, seg) in cases.items():
            write_case(folder, case_id, image, seg)
        manifest = {"plan_hash": plan_hash(plan), "configuration_hash": configuration_hash(plan, name),
                    "cases": sorted(cases)}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return root


def cube_cases(num_cases: int, seed: int = 0, **options: object) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {f"case_{i:03d}": cube_case(rng, **options) for i in range(num_cases)}  # type: ignore[arg-type]
