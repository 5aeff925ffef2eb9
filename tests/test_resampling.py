"""Resampling: torch-exact weights, chunk invariance, the slow-axis rule, and label guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoseg.resampling import (
    axis_weights,
    compute_new_shape,
    find_slow_axis,
    label_values,
    resample_image,
    resample_label,
    resample_probabilities,
)


def _torch(array: np.ndarray, size: tuple[int, ...], mode: str) -> np.ndarray:
    options = {} if mode.startswith("nearest") else {"align_corners": False}
    return F.interpolate(torch.from_numpy(array)[None], size=size, mode=mode, **options)[0].numpy()


@pytest.mark.parametrize("shape, spacing, target, expected", [
    ((10, 20, 30), (1, 1, 1), (1, 1, 1), (10, 20, 30)),
    ((300, 512, 512), (2.5, 0.7, 0.7), (1.5, 0.8, 0.8), (500, 448, 448)),
    ((10, 10, 10), (1, 1, 1), (3, 3, 3), (3, 3, 3)),
    ((1, 64, 64), (1, 0.5, 0.5), (1, 1, 1), (1, 32, 32)),
    ((3, 5, 5), (1, 1, 1), (100, 100, 100), (1, 1, 1)),  # never below one voxel
])
def test_compute_new_shape(shape, spacing, target, expected):
    assert compute_new_shape(shape, spacing, target) == expected


@pytest.mark.parametrize("current, target, expected", [
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), None),
    ((2.5, 0.7, 0.7), (1.5, 0.8, 0.8), 0),   # 3.6x: z apart
    ((2.0, 0.7, 0.7), (1.5, 0.8, 0.8), None),  # 2.9x: below the threshold
    ((0.7, 0.7, 5.0), (0.7, 0.7, 5.0), 2),   # slow axis need not be z
    ((3.0, 3.0, 0.5), (3.0, 3.0, 0.5), None),  # two coarse axes: nothing single to separate
    ((1.0, 1.0, 1.0), (4.0, 1.0, 1.0), 0),   # isotropic data, anisotropic target decides
])
def test_find_slow_axis(current, target, expected):
    assert find_slow_axis(current, target, 3.0) == expected


@pytest.mark.parametrize("order, mode", [(0, "nearest-exact"), (1, "linear"), (3, "bicubic")])
@pytest.mark.parametrize("n_in, n_out", [(10, 23), (23, 10), (7, 7), (5, 1), (1, 4)])
def test_axis_weights_match_torch(order, mode, n_in, n_out):
    rng = np.random.default_rng(n_in * 100 + n_out)
    signal = rng.random((3, n_in)).astype(np.float32)
    indices, weights = axis_weights(n_in, n_out, order)
    ours = (signal[:, indices] * weights).sum(-1)
    if mode == "bicubic":  # torch has no 1D cubic mode: a width-1 2D image is the same thing
        reference = _torch(signal[:, :, None], (n_out, 1), mode)[:, :, 0]
    else:
        reference = _torch(signal, (n_out,), mode)
    np.testing.assert_allclose(ours, reference, atol=2e-6)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)  # partition of unity


@pytest.mark.parametrize("order, mode", [(0, "nearest-exact"), (1, "trilinear")])
def test_resample_image_equals_torch_3d(order, mode):
    image = np.random.default_rng(0).random((2, 9, 20, 17)).astype(np.float32)
    out = resample_image(image, (1, 1, 1), new_shape=(14, 13, 31), order=order, chunk_slices=3)
    assert out.shape == (2, 14, 13, 31) and out.dtype == np.float32
    np.testing.assert_allclose(out, _torch(image, (14, 13, 31), mode), atol=2e-6)


def test_cubic_is_separable_bicubic_in_plane_then_cubic_along_z():
    image = np.random.default_rng(1).random((8, 12, 10)).astype(np.float32)
    in_plane = resample_image(image, (1, 1, 1), new_shape=(8, 19, 7), order=3)
    np.testing.assert_allclose(in_plane, _torch(image, (19, 7), "bicubic"), atol=2e-6)
    along_z = resample_image(image, (1, 1, 1), new_shape=(13, 12, 10), order=3)
    reference = _torch(image.reshape(1, 8, -1), (13, 120), "bicubic").reshape(13, 12, 10)
    np.testing.assert_allclose(along_z, reference, atol=2e-6)


@pytest.mark.parametrize("spacing", [(1, 1, 1), (4, 1, 1), (1, 1, 4)])
def test_chunking_does_not_change_the_result(spacing):
    image = np.random.default_rng(2).random((1, 11, 14, 13)).astype(np.float32)
    target = (1.3, 0.7, 0.9)
    whole = resample_image(image, spacing, target, order=3, chunk_slices=1000)
    for chunk in (1, 2, 5):
        np.testing.assert_allclose(resample_image(image, spacing, target, order=3, chunk_slices=chunk), whole,
                                   atol=1e-6)


@pytest.mark.parametrize("slow_axis", [0, 2])
def test_anisotropic_slow_axis_is_resampled_separately_with_nearest(slow_axis):
    """Thick slices must not be blended: each output slice is one input slice resampled in-plane."""
    rng = np.random.default_rng(3)
    volume = rng.random((6, 16, 16)).astype(np.float32) + np.arange(6, dtype=np.float32)[:, None, None] * 10
    volume = np.moveaxis(volume, 0, slow_axis).copy()
    spacing = [0.8, 0.8, 0.8]
    spacing[slow_axis] = 5.0
    target = [0.6, 0.6, 0.6]
    target[slow_axis] = 2.0
    out = resample_image(volume, spacing, target, order=1, chunk_slices=4)
    thick_in, thick_out = np.moveaxis(volume, slow_axis, 0), np.moveaxis(out, slow_axis, 0)
    assert thick_out.shape[0] == 15
    plane = thick_out.shape[1:]
    in_plane = _torch(np.ascontiguousarray(thick_in), plane, "bilinear")
    for k, output_slice in enumerate(thick_out):
        source = axis_weights(6, 15, 0)[0][k, 0]
        np.testing.assert_allclose(output_slice, in_plane[source], atol=1e-5)
    # Forced off, the same data is blended along the slow axis (slice means fall between integers x 10).
    blended = resample_image(volume, spacing, target, order=1, separate_slow_axis=False)
    means = np.moveaxis(blended, slow_axis, 0).mean(axis=(1, 2))
    assert np.any(np.abs(means / 10 - np.round(means / 10)) > 0.1)


def test_identity_and_3d_input():
    image = np.random.default_rng(4).random((7, 8, 9)).astype(np.float32)
    np.testing.assert_array_equal(resample_image(image, (1, 2, 3), (1, 2, 3), order=3), image)
    assert resample_image(image, (1, 1, 1), new_shape=(3, 4, 5)).shape == (3, 4, 5)


def test_out_argument_fills_a_slice_of_a_larger_array():
    image = np.random.default_rng(5).random((2, 6, 6, 6)).astype(np.float32)
    big = np.zeros((3, 4, 4, 4), dtype=np.float32)
    resample_image(image, (1, 1, 1), new_shape=(4, 4, 4), order=1, out=big[:2])
    np.testing.assert_allclose(big[:2], _torch(image, (4, 4, 4), "trilinear"), atol=1e-6)
    assert not big[2].any()


def test_resample_probabilities_keep_summing_to_one():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(4, 8, 10, 12)).astype(np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum(0)
    out = resample_probabilities(probabilities, (3.5, 1, 1), new_shape=(20, 7, 15))
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)
    assert out.min() >= 0 and out.max() <= 1


def _dense_label_reference(label: np.ndarray, new_shape: tuple[int, int, int]) -> np.ndarray:
    """Probabilities of every class by plain trilinear one-hot interpolation (the O(K) reference)."""
    values = np.unique(label)
    one_hot = np.stack([label == v for v in values]).astype(np.float32)
    return values, _torch(one_hot, new_shape, "trilinear")


@pytest.mark.parametrize("new_shape", [(7, 9, 11), (20, 25, 30), (12, 4, 30)])
def test_label_is_the_per_class_argmax(new_shape):
    label = np.random.default_rng(7).integers(0, 4, (10, 20, 24)).astype(np.int16)
    out = resample_label(label, (1, 1, 1), new_shape=new_shape, chunk_slices=2, keep_classes=False)
    assert out.shape == new_shape and out.dtype == np.int16
    values, probabilities = _dense_label_reference(label, new_shape)
    chosen = np.take_along_axis(probabilities, np.searchsorted(values, out)[None], 0)[0]
    # The chosen class has the highest probability everywhere (disagreements are exact ties only).
    np.testing.assert_allclose(chosen, probabilities.max(0), atol=1e-5)


def test_label_never_creates_values_and_keeps_thin_and_tiny_classes():
    label = np.zeros((30, 30, 30), dtype=np.int16)
    label[:, 10, :] = 7        # a one-voxel-thick sheet: at 1/3 resolution its probability is <= 1/3
    label[20, 20, 20] = 3      # a single voxel
    label[2:28, 22:29, 2:28] = 12
    out = resample_label(label, (1, 1, 1), (3, 3, 3))
    assert out.shape == (10, 10, 10)
    assert set(np.unique(out)) == {0, 3, 7, 12}
    without = resample_label(label, (1, 1, 1), (3, 3, 3), keep_classes=False)
    assert 3 not in np.unique(without)  # so the rescue above did something


def test_label_nearest_path_and_rescue():
    label = np.zeros((9, 9, 9), dtype=np.uint8)
    label[4, 4, 4] = 5
    label[0:3, 0:3, 0:3] = 2
    nearest = resample_label(label, (1, 1, 1), new_shape=(3, 3, 3), order=0, keep_classes=False)
    np.testing.assert_array_equal(nearest, _torch(label.astype(np.float32)[None], (3, 3, 3),
                                                  "nearest-exact")[0].astype(np.uint8))
    kept = resample_label(label, (1, 1, 1), new_shape=(3, 3, 3), order=0)
    assert kept.dtype == np.uint8 and set(np.unique(kept)) == {0, 2, 5}
    assert kept[1, 1, 1] == 5  # the output voxel holding the centre of the lone voxel


def test_label_anisotropic_uses_nearest_along_the_slow_axis():
    rng = np.random.default_rng(8)
    label = rng.integers(0, 3, (5, 12, 12)).astype(np.int16)
    out = resample_label(label, (5.0, 1.0, 1.0), (2.0, 1.0, 1.0), chunk_slices=3)
    picks = axis_weights(5, 12, 0)[0][:, 0]
    np.testing.assert_array_equal(out, label[picks])  # in-plane unchanged, slices copied whole


def test_label_with_negative_values_and_single_value():
    label = np.full((6, 6, 6), -1, dtype=np.int16)
    label[1:5, 1:5, 1:5] = 0
    label[2:4, 2:4, 2:4] = 1
    out = resample_label(label, (1, 1, 1), new_shape=(12, 12, 12))
    assert set(np.unique(out)) == {-1, 0, 1}
    assert out[0, 0, 0] == -1 and out[3, 6, 6] == 0 and np.all(out[5:7, 5:7, 5:7] == 1)
    assert np.all(resample_label(np.full((4, 4, 4), 3, np.int16), (1, 1, 1), new_shape=(2, 5, 7)) == 3)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64])
def test_label_dtypes_are_kept(dtype):
    label = np.zeros((6, 8, 8), dtype=dtype)
    label[1:5, 2:7, 2:7] = 200
    label[2:4, 3:5, 3:5] = 3
    out = resample_label(label, (1, 1, 1), new_shape=(9, 5, 11))
    assert out.dtype == dtype and set(np.unique(out)) == {0, 3, 200}


def test_label_values_counts():
    label = np.array([[[0, 0, 5], [5, 5, -1]]], dtype=np.int16)
    values, counts = label_values(label)
    assert values.tolist() == [-1, 0, 5] and counts.tolist() == [1, 2, 3]


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="target_spacing or new_shape"):
        resample_image(np.zeros((1, 2, 2, 2), np.float32), (1, 1, 1))
    with pytest.raises(ValueError, match="order"):
        resample_image(np.zeros((1, 2, 2, 2), np.float32), (1, 1, 1), new_shape=(3, 3, 3), order=5)
    with pytest.raises(ValueError, match="integers"):
        resample_label(np.zeros((2, 2, 2), np.float32), (1, 1, 1), new_shape=(3, 3, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(9)
    image = rng.random((1, 12, 40, 40)).astype(np.float32)
    label = rng.integers(0, 4, (12, 40, 40)).astype(np.int16)
    for order in (1, 3):
        np.testing.assert_allclose(resample_image(image, (3.5, 1, 1), (1, 0.7, 0.7), order=order, device="cuda"),
                                   resample_image(image, (3.5, 1, 1), (1, 0.7, 0.7), order=order), atol=1e-4)
    cpu = resample_label(label, (1, 1, 1), (0.6, 0.7, 0.7))
    gpu = resample_label(label, (1, 1, 1), (0.6, 0.7, 0.7), device="cuda")
    assert (cpu == gpu).mean() > 0.999  # float ties may break differently
