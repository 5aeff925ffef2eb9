"""The ``2d`` example kind: grey microscopy-like images of cells and nuclei (see :mod:`autoseg.examples`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from autoseg.examples.shapes import ExampleCase, deformed_ellipsoid, smooth_field
from autoseg.io import Image


def cells_case(rng: np.random.Generator, index: int) -> ExampleCase:
    small = index % 5 == 3
    low, high = (80, 97) if small else (128, 193)
    shape = (int(rng.integers(low, high)), int(rng.integers(low, high)))
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    yy, xx = axes[0][:, None], axes[1][None, :]

    # Uneven illumination: a linear ramp in a random direction plus slow blotches.
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (yy * np.cos(direction) + xx * np.sin(direction)) / max(shape)
    image = rng.uniform(25, 50) + rng.uniform(15, 40) * ramp + 5.0 * smooth_field(rng, axes, 40.0)
    image = image.astype(np.float32)

    mean_radius = rng.uniform(8.0, 13.0)
    wanted = int(shape[0] * shape[1] * rng.uniform(0.25, 0.45) / (np.pi * mean_radius ** 2))
    centers: list[np.ndarray] = []
    sizes: list[float] = []
    for candidate in rng.uniform((0, 0), shape, size=(4 * wanted + 4, 2)):
        size = mean_radius * rng.uniform(0.7, 1.3)
        if len(centers) >= wanted:
            break
        if centers and np.min(np.linalg.norm(np.array(centers) - candidate, axis=1)
                              - 0.85 * (np.array(sizes) + size)) < 0:
            continue  # cells may touch but not pile up
        centers.append(candidate)
        sizes.append(size)

    # Every fifth case (4, 9, ...) shows cells without stained nuclei: a class absent.
    with_nuclei = index % 5 != 4
    label = np.zeros(shape, dtype=np.uint8)
    cell_texture = 6.0 * smooth_field(rng, axes, 4.0)
    for center, size in zip(centers, sizes):
        elongation = rng.uniform(0.65, 1.0)
        angle = rng.uniform(0, np.pi)
        cell = deformed_ellipsoid(rng, axes, center, (size, size * elongation), 0.12, size * 0.6, angle)
        image[cell] = rng.uniform(100, 150) + cell_texture[cell]
        label[cell] = 1
        if with_nuclei:
            offset = rng.uniform(-0.25, 0.25, size=2) * size
            nucleus = deformed_ellipsoid(rng, axes, center + offset, (size * rng.uniform(0.35, 0.5),) * 2,
                                         0.08, size * 0.4)
            nucleus &= ndimage.binary_erosion(cell, iterations=2)
            image[nucleus] += rng.uniform(40, 70)
            label[nucleus] = 2

    image = ndimage.gaussian_filter(image, rng.uniform(0.8, 1.3))
    image += rng.standard_normal(shape).astype(np.float32) * rng.uniform(4, 10)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return ExampleCase([Image(image, (1.0, 1.0))], Image(label, (1.0, 1.0)))

