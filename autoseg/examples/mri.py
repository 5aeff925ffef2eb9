"""The ``mri`` example kind: BraTS-like multi-sequence brain MRI (see :mod:`autoseg.examples`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from autoseg.examples.shapes import ExampleCase, deformed_ellipsoid, index_axes, make_case, smooth_field

# Tissue codes for the MRI phantom, and their relative intensity per sequence (T1, T1ce, T2, FLAIR).
_OUTSIDE, _WM, _GM, _CSF, _EDEMA, _NECROSIS, _ENHANCING, _NON_ENHANCING = range(8)
_MRI_CONTRAST = np.array([
    [0.00, 0.00, 0.00, 0.00],  # outside the brain (skull-stripped: zero)
    [1.00, 1.00, 0.55, 0.70],  # white matter
    [0.72, 0.75, 0.80, 0.90],  # grey matter
    [0.30, 0.30, 1.60, 0.20],  # CSF: dark on T1, bright on T2, suppressed on FLAIR
    [0.65, 0.68, 1.25, 1.45],  # edema: bright on T2 and FLAIR
    [0.35, 0.38, 1.45, 0.80],  # necrosis: dark on T1/T1ce, bright on T2
    [0.72, 1.60, 0.95, 1.10],  # enhancing tumour: bright on T1ce
    [0.55, 0.60, 1.10, 1.25],  # non-enhancing solid core
], dtype=np.float32)

_MRI_STORAGE: tuple[tuple[tuple[int, ...], tuple[bool, ...]], ...] = (
    ((0, 1, 2), (False, False, False)),
    ((0, 1, 2), (False, True, True)),  # RAS-like
    ((2, 0, 1), (False, True, False)),  # sagittal slices first
)


def mri_case(rng: np.random.Generator, index: int) -> ExampleCase:
    small = index % 5 == 3
    low, high = (40, 49) if small else (48, 65)
    shape = tuple(int(rng.integers(low, high)) for _ in range(3))
    voxel = round(float(rng.uniform(0.9, 1.1)), 2)
    spacing = (voxel, voxel, voxel)
    half_extent = [(n - 1) * voxel / 2 for n in shape]
    # Brain semi-axes (z, y, x) in mm; coordinates are in units of their mean, so shapes stay round.
    semi = np.array([half_extent[0] * rng.uniform(0.75, 0.85), half_extent[1] * rng.uniform(0.82, 0.92),
                     half_extent[2] * rng.uniform(0.78, 0.88)])
    unit = float(semi.mean())
    radii = semi / unit
    axes = index_axes(shape, spacing, unit, (rng.uniform(-0.04, 0.04) for _ in range(3)))
    w, v, u = axes
    w3, v3, u3 = w[:, None, None], v[None, :, None], u[None, None, :]

    brain_radius = np.sqrt((w3 / radii[0]) ** 2 + (v3 / radii[1]) ** 2 + (u3 / radii[2]) ** 2)
    brain_radius = brain_radius + 0.04 * smooth_field(rng, axes, 0.5)
    brain = brain_radius < 1.0
    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[brain] = _WM
    cortex_depth = rng.uniform(0.12, 0.18)
    cortex = brain & (brain_radius >= 1.0 - cortex_depth)
    tissue[cortex] = _GM
    # Sulci: fine CSF clefts through the cortex, and the CSF around the brain surface.
    sulci = cortex & ((smooth_field(rng, axes, 0.12) > 1.0) | (brain_radius > 0.97))
    tissue[sulci] = _CSF
    fissure = brain & np.broadcast_to((np.abs(u3) < 0.02) & (w3 > -0.3 * radii[0]), shape)
    tissue[fissure & (brain_radius > 0.45)] = _CSF
    for side in (-1, 1):
        deep_grey = deformed_ellipsoid(rng, axes, (0.0, 0.02, 0.22 * side), (0.12, 0.18, 0.1), 0.08, 0.3)
        tissue[deep_grey & brain] = _GM
        ventricle = deformed_ellipsoid(rng, axes, (0.12, -0.05, 0.1 * side), (0.12, 0.32, 0.06), 0.15, 0.3)
        tissue[ventricle & brain] = _CSF

    label = _add_tumour(rng, axes, brain, brain_radius, tissue, index)

    contrast = _MRI_CONTRAST * rng.uniform(0.95, 1.05, size=_MRI_CONTRAST.shape).astype(np.float32)
    texture = 1.0 + 0.03 * smooth_field(rng, axes, 0.1)
    shared_bias = smooth_field(rng, axes, 1.5) * rng.uniform(0.05, 0.15)
    noise_level = rng.uniform(0.02, 0.05)
    channels = []
    for c in range(contrast.shape[1]):
        clean = ndimage.gaussian_filter(contrast[tissue, c], 0.6) * texture
        bias = np.exp(shared_bias + 0.03 * smooth_field(rng, axes, 1.0))
        gain = rng.uniform(200, 2000)  # MR intensities have no unit: every scan its own scale
        signal = clean * bias * gain
        sigma = noise_level * gain
        # Magnitude images carry Rician noise: the modulus of a complex signal with Gaussian noise.
        noisy = np.hypot(signal + sigma * rng.standard_normal(shape, dtype=np.float32),
                         sigma * rng.standard_normal(shape, dtype=np.float32))
        channels.append(np.where(brain, np.maximum(noisy, 1e-3 * gain), 0.0).astype(np.float32))

    if index == 0:
        origin = (0.0, 0.0, 0.0)
    else:
        origin = tuple(-e + rng.uniform(-15, 15) for e in reversed(half_extent))
    return make_case(channels, label, spacing, origin, _MRI_STORAGE[index % len(_MRI_STORAGE)])


def _add_tumour(rng: np.random.Generator, axes: list[np.ndarray], brain: np.ndarray,
                brain_radius: np.ndarray, tissue: np.ndarray, index: int) -> np.ndarray:
    """Nested tumour: edema around a core; the core is a ring of enhancement around necrosis.

    Every fourth case (index 1, 5, ...) is solid enhancing (no necrosis) and every fourth (3, 7, ...)
    is non-enhancing (no label 3), as lower-grade tumours are. Returns the BraTS 2021 label map.
    """
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    center = (0.0, 0.0, 0.0)
    for _ in range(20):  # a centre deep enough in the brain for the whole tumour to fit mostly
        center = (rng.uniform(-0.25, 0.35), rng.uniform(-0.4, 0.4), side * rng.uniform(0.2, 0.4))
        position = tuple(int(np.argmin(np.abs(a - c))) for a, c in zip(axes, center))
        if brain_radius[position] < 0.6:
            break
    whole_radius = rng.uniform(0.42, 0.6)
    whole = deformed_ellipsoid(rng, axes, center, (whole_radius,) * 3, 0.3, 0.3) & brain
    core_radius = whole_radius * rng.uniform(0.55, 0.72)
    core = deformed_ellipsoid(rng, axes, center, (core_radius,) * 3, 0.12, 0.3)
    # Edema always surrounds the core: keep the core two voxels inside the whole tumour.
    core &= ndimage.binary_erosion(whole, iterations=2)
    if not core.any():
        core[position] = whole[position] = True
    variant = index % 4
    if variant == 1:
        necrosis, enhancing = np.zeros_like(core), core
    elif variant == 3:
        necrosis, enhancing = core, np.zeros_like(core)
    else:
        necrosis = core & deformed_ellipsoid(rng, axes, center, (core_radius * rng.uniform(0.55, 0.8),) * 3,
                                             0.1, 0.2)
        necrosis &= ndimage.binary_erosion(core)  # a rim of enhancement all round
        enhancing = core & ~necrosis
    tissue[whole] = _EDEMA
    tissue[necrosis] = _NON_ENHANCING if variant == 3 else _NECROSIS
    tissue[enhancing] = _ENHANCING
    label = np.zeros(brain.shape, dtype=np.uint8)
    label[whole] = 2
    label[necrosis] = 1
    label[enhancing] = 3
    return label

