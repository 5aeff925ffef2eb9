"""The ``xray`` example kind: posterior-anterior chest radiographs (see :mod:`autoseg.examples`).

A radiograph is a projection: each pixel shows the attenuation summed along one ray through the
patient, displayed so that dense structures are bright (bone, heart, the abdomen below the
diaphragm) and air is dark (the lungs, outside the body). The phantom builds that line integral
from smooth analytic shapes in a patient frame (units of the thorax half-width, ``u`` to the
image's right = the patient's left, ``v`` downwards), then places the patient in the detector with
a random size, shift and rotation, adds quantum noise on the detected signal (low dose: few
photons, noisy lungs), a collimation border where no X-ray reached the detector (unexposed: as
bright as dense bone), and a burned-in side marker and text.

Labels follow the JSRT/SCR convention: the lung fields are the anatomical lungs without the heart
silhouette, the clavicles are drawn over the lungs (they win where they overlap). The patient's
right lung appears on the image's left. Some cases have pathology that makes a lung look unlike a
lung while its label stays the anatomical field: a pleural effusion (the base turns as dense as
soft tissue, with a meniscus) or a consolidation (a dense patch inside the lung), so that
intensity alone misleads.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from autoseg.examples.shapes import ExampleCase, smooth_field
from autoseg.io import Image

# label values (also in EXAMPLE_KINDS["xray"])
RIGHT_LUNG, LEFT_LUNG, HEART, CLAVICLES = 1, 2, 3, 4
# 12-bit detector range, stored as 16-bit PNG (as many exported radiographs are)
_MAX_VALUE = 4095
# attenuation (relative line integrals) per unit of depth through each tissue
_SOFT, _BONE = 1.0, 2.6
# a 5x3 bitmap per marker letter: the "R"/"L" lead marker technologists put on the cassette
_LETTERS = {
    "R": ("111", "101", "110", "101", "101"),
    "L": ("100", "100", "100", "100", "111"),
}


def xray_case(rng: np.random.Generator, index: int) -> ExampleCase:
    """One chest radiograph with its label map (values :data:`RIGHT_LUNG` .. :data:`CLAVICLES`).

    Every fifth case (index 2, 7, ...) has a pleural effusion and every fifth (4, 9, ...) a
    consolidation, in the right or left lung at random; index 0 is always healthy.
    """
    shape = (int(rng.integers(224, 257)), int(rng.integers(224, 257)))
    pixel = round(float(rng.uniform(1.5, 1.8)), 3)  # mm, a 35-43 cm detector at ~250 pixels
    rows, cols = np.arange(shape[0], dtype=np.float64), np.arange(shape[1], dtype=np.float64)

    # Patient placement: the thorax half-width in pixels (patient size), centre and rotation.
    half_width = shape[1] * rng.uniform(0.33, 0.43)
    center = (shape[0] * rng.uniform(0.44, 0.54), shape[1] * rng.uniform(0.45, 0.55))
    angle = rng.uniform(-0.12, 0.12)
    dy, dx = (rows[:, None] - center[0]) / half_width, (cols[None, :] - center[1]) / half_width
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # patient frame: u to image right, v down
    frame_axes = [rows / half_width, cols / half_width]
    wobble = 0.03 * smooth_field(rng, frame_axes, 0.5)  # every outline a little irregular

    # Body: an elliptic cylinder seen from the front, thickest at the midline; shoulders and
    # arms add soft tissue at the top corners; below the diaphragm the abdomen is solid.
    body_half = rng.uniform(1.0, 1.12)
    body = np.clip(1.0 - (u / body_half) ** 2, 0.0, None)
    attenuation = _SOFT * 1.6 * np.sqrt(body)
    shoulders = np.exp(-((v + 0.95) / 0.25) ** 2) * np.clip(np.abs(u) - 0.55, 0.0, None) * 1.6
    attenuation += _SOFT * shoulders * (np.abs(u) < body_half + 0.35)

    lung_shapes, lung_depth = [], np.zeros(shape)
    dome = rng.uniform(0.55, 0.75)  # height of the diaphragm below the centre
    for side in (-1, 1):  # -1: image left = patient's right lung
        cu = side * rng.uniform(0.4, 0.48)
        half_w = rng.uniform(0.28, 0.34)
        top = -rng.uniform(0.85, 1.0)
        base = dome - (0.06 if side == -1 else 0.0) + rng.uniform(-0.04, 0.04)  # the right dome is higher
        # An egg: narrow apex, widest towards the base, the diaphragm dome below.
        t = np.clip((v - top) / (base - top), 0.0, 1.0)
        width = half_w * np.sqrt(np.clip(t, 0.0, None)) * (1.25 - 0.25 * t)
        radius = np.abs(u - cu) / np.maximum(width, 1e-6)
        lower = base - 0.12 * np.clip(1.0 - ((u - cu) / (half_w * 1.1)) ** 2, 0.0, None)
        lung = (v > top) & (v < lower) & (radius + wobble < 1.0)
        lung &= side * u > 0.08  # the mediastinum between the lungs
        lung_shapes.append(lung)
        lung_depth += np.where(lung, np.sqrt(np.clip(1.0 - radius ** 2, 0.0, None)), 0.0)

    heart_center = (rng.uniform(0.22, 0.36), rng.uniform(0.08, 0.16))  # (v, u): patient's left
    heart_radii = (rng.uniform(0.26, 0.32), rng.uniform(0.3, 0.38))
    tilt = rng.uniform(0.3, 0.6)
    hv, hu = v - heart_center[0], u - heart_center[1]
    hv, hu = np.cos(tilt) * hv - np.sin(tilt) * hu, np.sin(tilt) * hv + np.cos(tilt) * hu
    heart_radius = np.sqrt((hv / heart_radii[0]) ** 2 + (hu / heart_radii[1]) ** 2) + wobble
    heart = heart_radius < 1.0
    heart &= v < dome + 0.05  # sits on the diaphragm

    # Air in the lungs replaces soft tissue: the lungs are the dark fields of a radiograph.
    air = lung_depth * (~heart) * rng.uniform(0.9, 1.1)
    attenuation -= _SOFT * 1.1 * air
    attenuation += _SOFT * 0.12 * np.sqrt(np.clip(1.0 - heart_radius ** 2, 0.0, None))
    abdomen = np.clip((v - dome - 0.1 * (1 - u ** 2)) / 0.08, 0.0, 1.0) * (body > 0)
    attenuation += _SOFT * 0.3 * abdomen
    # Vessels fan out from the hila: fine texture in the lungs.
    attenuation += 0.08 * smooth_field(rng, frame_axes, 0.06) * (lung_depth > 0)

    bone = _spine_and_ribs(rng, u, v, body_half)
    clavicles = np.zeros(shape, dtype=bool)
    clavicle_v = -rng.uniform(0.72, 0.85)
    for side in (-1, 1):
        # From the sternal end near the midline outwards and slightly up, an S-curved bar.
        along = side * u
        path = clavicle_v + 0.12 * (along - 0.12) * (along - 0.7) - 0.05 * (along - 0.12)
        thickness = 0.045 + 0.01 * (along > 0.5)
        clavicles |= (np.abs(v - path) < thickness) & (along > 0.1) & (along < rng.uniform(0.66, 0.74))
    bone = bone + _BONE * 0.18 * clavicles
    attenuation += bone

    label = np.zeros(shape, dtype=np.uint8)
    label[lung_shapes[0]] = RIGHT_LUNG
    label[lung_shapes[1]] = LEFT_LUNG
    label[heart] = HEART
    label[clavicles] = CLAVICLES

    if index % 5 == 2:
        attenuation += _effusion(rng, u, v, lung_shapes[int(rng.integers(2))], dome)
    elif index % 5 == 4:
        attenuation += _consolidation(rng, frame_axes, lung_shapes[int(rng.integers(2))])

    image = _expose(rng, attenuation, label)
    return ExampleCase([Image(image, (pixel, pixel))], Image(label, (pixel, pixel)))


def _spine_and_ribs(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, body_half: float) -> np.ndarray:
    """Bone attenuation: the spine down the midline and posterior ribs arching over the lungs."""
    spine = _BONE * 0.35 * np.clip(1.0 - (u / 0.09) ** 2, 0.0, None) ** 0.5
    period = rng.uniform(0.19, 0.23)
    phase = rng.uniform(0.0, period)
    # A posterior rib rises from the spine and falls laterally: its height bends with |u|.
    bend = v - 0.35 * np.abs(u) ** 1.5 + 0.1 * np.abs(u)
    rib = np.abs(np.mod(bend + phase, period) - period / 2) < 0.035
    ribs = rib & (np.abs(u) > 0.08) & (np.abs(u) < body_half * 0.88) & (v > -1.05) & (v < 0.7)
    return spine + _BONE * 0.12 * ribs


def _effusion(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, lung: np.ndarray, dome: float) -> np.ndarray:
    """Fluid filling a lung's base up to a meniscus that rises towards the chest wall."""
    lateral = np.abs(u) - np.abs(u[lung]).min() if lung.any() else np.abs(u)
    level = dome - rng.uniform(0.35, 0.6) - 0.25 * np.clip(lateral, 0.0, None) ** 2
    fluid = lung & (v > level)
    return _SOFT * 1.4 * ndimage.gaussian_filter(fluid.astype(np.float64), 1.5)


def _consolidation(rng: np.random.Generator, axes: list[np.ndarray], lung: np.ndarray) -> np.ndarray:
    """A dense, blotchy patch inside a lung (pneumonia): the lung field keeps its label."""
    inside = np.argwhere(lung)
    if inside.size == 0:
        return np.zeros(lung.shape)
    y, x = inside[rng.integers(len(inside))]
    radius = rng.uniform(0.15, 0.3) * np.ptp(inside[:, 0])
    yy, xx = np.ogrid[:lung.shape[0], :lung.shape[1]]
    blob = np.sqrt((yy - y) ** 2 + (xx - x) ** 2) / radius + 0.3 * smooth_field(rng, axes, 0.1) < 1.0
    return _SOFT * 0.8 * ndimage.gaussian_filter((blob & lung).astype(np.float64), 2.0)


def _expose(rng: np.random.Generator, attenuation: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Detector signal with quantum noise, displayed dense-bright, with collimation and markers."""
    shape = attenuation.shape
    attenuation = ndimage.gaussian_filter(attenuation, 0.8)  # focal spot and detector blur
    # Few photons (low dose): Poisson noise on the detected signal, approximated as Gaussian.
    photons = rng.uniform(300, 1500)
    counts = photons * np.exp(-1.4 * attenuation)
    counts = np.maximum(counts + np.sqrt(counts) * rng.standard_normal(shape), 0.5)
    display = -np.log(counts / photons)
    # Exposure and processing vary: each image its own window.
    low, high = np.percentile(display, (1, 99.5))
    display = (display - low) / max(high - low, 1e-6) * rng.uniform(0.7, 0.85) + rng.uniform(0.02, 0.1)

    # Collimation: unexposed borders (no photon reached them) are as bright as the densest bone.
    border = [int(rng.integers(0, 12)) for _ in range(4)]
    collimated = np.zeros(shape, dtype=bool)
    collimated[:border[0]] = collimated[shape[0] - border[1]:] = True
    collimated[:, :border[2]] = collimated[:, shape[1] - border[3]:] = True
    display[collimated] = rng.uniform(0.92, 0.98) + 0.01 * rng.standard_normal(int(collimated.sum()))

    image = np.clip(np.rint(display * _MAX_VALUE), 0, _MAX_VALUE).astype(np.uint16)
    _burn_in(rng, image, label)
    return image


def _burn_in(rng: np.random.Generator, image: np.ndarray, label: np.ndarray) -> None:
    """A lead side marker ("R" or "L", at the patient's right edge) and a line of text, saturated."""
    cell = int(rng.integers(3, 5))  # pixels per bitmap dot
    letter = "R" if rng.uniform() < 0.8 else "L"
    bitmap = np.repeat(np.repeat(np.array([[c == "1" for c in row] for row in _LETTERS[letter]]), cell, 0), cell, 1)
    top = int(rng.integers(15, image.shape[0] // 3))
    left = int(rng.integers(14, 24)) if letter == "R" else image.shape[1] - bitmap.shape[1] - int(rng.integers(14, 24))
    region = image[top:top + bitmap.shape[0], left:left + bitmap.shape[1]]
    region[bitmap[:region.shape[0], :region.shape[1]]] = _MAX_VALUE
    # Text (patient ID, date) as a row of glyph-sized random blocks in a lower corner.
    row = image.shape[0] - int(rng.integers(14, 22))
    start = int(rng.integers(12, 40))
    for k in range(int(rng.integers(6, 14))):
        glyph = rng.uniform(size=(5, 3)) < 0.55
        x = start + 4 * k
        if x + 3 < image.shape[1]:
            image[row:row + 5, x:x + 3][glyph] = _MAX_VALUE
