"""Tests of autoseg.training.augment and autoseg.training.preview on tiny synthetic volumes."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import skimage.morphology

from autoseg.plan import (
    ChannelNormalization,
    Configuration,
    IntensityWindow,
    Plan,
    Schedule,
    Topology,
    save_plan,
)
from autoseg.training.augment import (
    PRESETS,
    Augmentation,
    bias_field,
    binary_morphology,
    build_augmentation,
    input_coordinates,
    params_to_json,
    piecewise_linear,
    replay,
    rotation_matrix,
    summarize_params,
)
from autoseg.training.augment.spatial import _max_rotated_extent, _rotation_matrices
from autoseg.training.preview import augment_preview

CT = ChannelNormalization("CT", "ct", clip_low=-1000.0, clip_high=1500.0, mean=50.0, std=300.0)
MRI = ChannelNormalization("T2", "zscore", use_nonzero_mask=True)

# every transform forced on: exercises every sampler and applier
ALL_ON = {name: 1.0 for name in PRESETS["none"] if name.startswith("p_")} | {"rot90": True}
SPATIAL_OFF = {"p_rotation": 0.0, "p_scaling": 0.0, "p_elastic": 0.0}


def make_configuration(patch: tuple[int, ...], spacing=(1.0, 1.0, 1.0), channels=(CT, MRI),
                       preset: str = "default", options: dict | None = None, mirror_axes=None,
                       name: str | None = None) -> Configuration:
    dim = len(patch)
    topology = Topology("unet", dim, len(channels), 3, (8,), ((3,) * dim,), ((1,) * dim,), (2,), ())
    schedule = Schedule(augmentation=preset, augmentation_options=options or {},
                        mirror_axes=tuple(range(dim)) if mirror_axes is None else mirror_axes)
    return Configuration(name or ("2d" if dim == 2 else "3d_fullres"), spacing, patch, 2, patch,
                         tuple(channels), topology, schedule=schedule)


CONFIGS = {
    "2d": make_configuration((32, 32), spacing=(1.0, 0.8, 0.8)),
    "3d": make_configuration((16, 24, 24), spacing=(1.5, 1.0, 1.0)),
    "3d_aniso": make_configuration((4, 32, 32), spacing=(5.0, 0.8, 0.8)),
}


def random_batch(augmentation: Augmentation, batch: int, rng: np.random.Generator, labels=(-1, 0, 1, 3)):
    shape = augmentation.input_patch_size()
    channels = len(augmentation.normalization)
    data = rng.standard_normal((batch, channels, *shape)).astype(np.float32)
    # blocky labels so resampling has edges to get wrong
    coarse = rng.choice(labels, size=(batch, 1, *[max(1, s // 4) for s in shape]))
    seg = coarse
    for axis in range(2, seg.ndim):
        seg = np.repeat(seg, 4, axis=axis)
    seg = seg[(slice(None), slice(None)) + tuple(slice(0, s) for s in shape)]
    pad = [(0, 0), (0, 0)] + [(0, s - n) for s, n in zip(shape, seg.shape[2:])]
    return data, np.pad(seg, pad, mode="edge").astype(np.int16)


@pytest.mark.parametrize("preset", list(PRESETS) + ["all_on"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_every_preset_returns_patch_shape_and_only_input_labels(preset, config_name):
    configuration = CONFIGS[config_name]
    augmentation = (build_augmentation(configuration, "medical", ALL_ON) if preset == "all_on"
                    else build_augmentation(configuration, preset))
    rng = np.random.default_rng(1)
    data, seg = random_batch(augmentation, 3, rng)
    out, out_seg, params = augmentation(data, seg, rng)
    assert out.shape == (3, 2, *configuration.patch_size) and out.dtype == np.float32
    assert out_seg.shape == (3, 1, *configuration.patch_size) and out_seg.dtype == np.int16
    assert np.isfinite(out).all()
    for b in range(3):
        assert set(np.unique(out_seg[b])) <= set(np.unique(seg[b]))
    assert len(params) == 3
    assert json.loads(json.dumps(params)) == params
    if preset == "all_on":
        names = {op["op"] for p in params for op in p["ops"]}
        expected = {"spatial", "gaussian_noise", "poisson_noise", "gaussian_blur", "brightness", "contrast",
                    "low_resolution", "gamma", "ct_tissue_remap", "bias_field", "metal_streaks", "mirror"}
        assert expected <= names


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_replay_identity(config_name):
    configuration = CONFIGS[config_name]
    augmentation = build_augmentation(configuration, "medical", ALL_ON)
    data, seg = random_batch(augmentation, 2, np.random.default_rng(0))
    data_before, seg_before = data.copy(), seg.copy()

    out, out_seg, params = augmentation(data, seg, np.random.default_rng(7))
    sampled = augmentation.sample(np.random.default_rng(7), data.shape[2:], 2)
    assert sampled == params
    again, again_seg = augmentation.apply(data, seg, sampled)
    from_json, from_json_seg = replay(data, seg, json.loads(json.dumps(params)))
    for other, other_seg in ((again, again_seg), (from_json, from_json_seg)):
        np.testing.assert_array_equal(other, out)
        np.testing.assert_array_equal(other_seg, out_seg)
    # the inputs are never written to
    np.testing.assert_array_equal(data, data_before)
    np.testing.assert_array_equal(seg, seg_before)
    # another seed gives other parameters
    assert augmentation.sample(np.random.default_rng(8), data.shape[2:], 2) != params


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_preset_none_is_an_exact_center_crop(config_name):
    configuration = CONFIGS[config_name]
    augmentation = build_augmentation(configuration, "none", {"p_rotation": 1.0})  # options cannot switch on
    assert augmentation.input_patch_size() == configuration.patch_size
    rng = np.random.default_rng(3)
    bigger = tuple(p + extra for p, extra in zip(configuration.patch_size, (5, 2, 7)))
    data = rng.standard_normal((2, 2, *bigger)).astype(np.float32)
    seg = rng.integers(0, 3, size=(2, 1, *bigger)).astype(np.int16)
    out, out_seg, params = augmentation(data, seg, rng)
    box = tuple(slice((b - p) // 2, (b - p) // 2 + p) for b, p in zip(bigger, configuration.patch_size))
    np.testing.assert_array_equal(out, data[(slice(None), slice(None), *box)])
    np.testing.assert_array_equal(out_seg, seg[(slice(None), slice(None), *box)])
    assert all(p["ops"] == [{"op": "crop"}] for p in params)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_mirroring_flips_image_and_label_together(config_name):
    configuration = CONFIGS[config_name]
    augmentation = build_augmentation(configuration, "light",
                                      {"p_mirror": 1.0, "p_brightness": 0.0, "p_contrast": 0.0,
                                       "p_gaussian_noise": 0.0, "p_gamma": 0.0})
    rng = np.random.default_rng(4)
    shape = augmentation.input_patch_size()
    data = rng.standard_normal((2, 2, *shape)).astype(np.float32)
    seg = (data[:, :1] > 0.3).astype(np.int16) + (data[:, :1] > 1.0)  # label is a function of the image
    out, out_seg, params = augmentation(data, seg, rng)
    axes = tuple(2 + a for a in range(configuration.dim))
    np.testing.assert_array_equal(out, np.flip(data, axes))
    np.testing.assert_array_equal(out_seg, np.flip(seg, axes))
    np.testing.assert_array_equal(out_seg, (out[:, :1] > 0.3).astype(np.int16) + (out[:, :1] > 1.0))
    assert all(p["ops"][-1] == {"op": "mirror", "axes": list(range(configuration.dim))} for p in params)


def test_mirroring_follows_the_schedule_axes():
    configuration = make_configuration((16, 16, 16), mirror_axes=(1,))
    augmentation = build_augmentation(configuration, "none", None)
    assert augmentation.mirror_axes == (1,)
    augmentation = build_augmentation(configuration, "default", {**SPATIAL_OFF, "p_mirror": 1.0})
    params = augmentation.sample(np.random.default_rng(0), (16, 16, 16), 4)
    assert all(p["ops"][-1] == {"op": "mirror", "axes": [1]} for p in params)
    with pytest.raises(ValueError, match="mirror axes"):
        build_augmentation(configuration, "default", {"mirror_axes": (0, 3)})


def ellipsoid(shape, centre, radii):
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def test_rotation_keeps_the_volume_of_a_centred_sphere():
    configuration = make_configuration((32, 32, 32), channels=(MRI,))
    augmentation = build_augmentation(configuration, "default",
                                      {"p_rotation": 1.0, "p_scaling": 0.0, "p_mirror": 0.0})
    shape = augmentation.input_patch_size()
    sphere = ellipsoid(shape, [(n - 1) / 2 for n in shape], [9.0] * 3)
    data = sphere[None, None].astype(np.float32)
    seg = sphere[None, None].astype(np.int16)
    volume = sphere.sum()
    rng = np.random.default_rng(5)
    for _ in range(4):
        _, out_seg, params = augmentation(data, seg, rng)
        angles = params[0]["ops"][0]["rotation_deg"]
        assert max(abs(a) for a in angles) > 1.0
        assert abs(out_seg.sum() / volume - 1.0) < 0.03


@pytest.mark.parametrize("config_name", ["2d", "3d"])
def test_rotation_and_scale_move_voxels_where_the_recorded_parameters_say(config_name):
    """An off-centre ellipsoid lands where the recorded affine maps it (checked analytically)."""
    patch = (40, 40) if config_name == "2d" else (24, 32, 32)
    configuration = make_configuration(patch, channels=(MRI,))
    augmentation = build_augmentation(configuration, "default",
                                      {"p_rotation": 1.0, "p_scaling": 1.0, "p_mirror": 0.0,
                                       "p_gaussian_noise": 0, "p_blur": 0, "p_brightness": 0,
                                       "p_contrast": 0, "p_lowres": 0, "p_gamma": 0, "p_gamma_inverted": 0})
    shape = augmentation.input_patch_size()
    centre_in = np.array([(n - p) // 2 + (p - 1) / 2 for n, p in zip(shape, patch)])
    radii = np.array([9.0, 11.0, 6.0][-len(patch):])
    blob_centre = centre_in + np.array([2.0, -3.0, 4.0][-len(patch):])
    inside = ellipsoid(shape, blob_centre, radii)
    rng = np.random.default_rng(11)
    for _ in range(4):
        data = inside[None, None].astype(np.float32)
        _, out_seg, params = augmentation(data, inside[None, None].astype(np.int16), rng)
        op = params[0]["ops"][0]
        affine = rotation_matrix(op["rotation_deg"]) @ np.diag(op["scale"])
        grids = np.stack(np.meshgrid(*[np.arange(p) - (p - 1) / 2 for p in patch], indexing="ij"))
        mapped = np.einsum("kj,j...->k...", affine, grids) + centre_in.reshape(-1, *(1,) * len(patch))
        expected = sum(((m - c) / r) ** 2 for m, c, r in zip(mapped, blob_centre, radii)) <= 1.0
        got = out_seg[0, 0] == 1
        dice = 2 * (expected & got).sum() / (expected.sum() + got.sum())
        assert dice > 0.93, (dice, op)
        if max(abs(a) for a in op["rotation_deg"]) < 10:
            continue
        # a transposed rotation (the wrong convention) would not match
        wrong = np.einsum("kj,j...->k...", affine.T, grids) + centre_in.reshape(-1, *(1,) * len(patch))
        wrong_mask = sum(((m - c) / r) ** 2 for m, c, r in zip(wrong, blob_centre, radii)) <= 1.0
        assert 2 * (wrong_mask & got).sum() / (wrong_mask.sum() + got.sum()) < dice - 0.03


def test_input_patch_size_is_patch_size_without_spatial_transforms():
    for config_name, configuration in CONFIGS.items():
        for preset in ("none", "light"):
            assert build_augmentation(configuration, preset).input_patch_size() == configuration.patch_size
        no_spatial = build_augmentation(configuration, "default", SPATIAL_OFF)
        assert no_spatial.input_patch_size() == configuration.patch_size, config_name
        default = build_augmentation(configuration, "default")
        assert all(i > p for i, p in zip(default.input_patch_size(), configuration.patch_size)
                   if not (default.dummy_2d and i == configuration.patch_size[0]))


def test_input_patch_size_2d_full_turn_is_the_scaled_diagonal():
    configuration = make_configuration((32, 32), channels=(MRI,))
    augmentation = build_augmentation(configuration, "default", {"scaling": (0.7, 1.4)})
    assert augmentation.rotation_limit_deg == 180.0
    half = 15.5
    margin = math.ceil(half * 1.4 * math.sqrt(2) - half)
    assert augmentation.input_patch_size() == (32 + 2 * margin,) * 2
    # elongated 2D patches rotate by at most 15 degrees (nnU-Net)
    assert build_augmentation(make_configuration((16, 48), channels=(MRI,)), "default").rotation_limit_deg == 15.0


def test_input_patch_size_covers_every_sampled_coordinate():
    """Brute force over many random rotations at the largest scale: no coordinate leaves the input."""
    configuration = make_configuration((16, 40, 24), channels=(MRI,))
    augmentation = build_augmentation(configuration, "medical", {"p_rotation": 1.0, "p_scaling": 1.0,
                                                                 "p_elastic": 1.0, "scaling": (1.4, 1.4)})
    shape = augmentation.input_patch_size()
    rng = np.random.default_rng(2)
    lowest, highest = np.full(3, np.inf), np.full(3, -np.inf)
    for params in augmentation.sample(rng, shape, 60):
        coordinates = input_coordinates(params["ops"][0], shape, configuration.patch_size).numpy()
        lowest = np.minimum(lowest, coordinates.reshape(3, -1).min(1))
        highest = np.maximum(highest, coordinates.reshape(3, -1).max(1))
    assert (lowest >= -1e-3).all() and (highest <= np.array(shape) - 1 + 1e-3).all()
    # and the box is tight: the random draws come within a few voxels of its faces
    assert (lowest < 4).all() and (highest > np.array(shape) - 5).all()


def test_max_rotated_extent_matches_brute_force():
    half = (7.5, 19.5, 11.5)
    limit = math.radians(30.0)
    computed = _max_rotated_extent(half, (0, 1, 2), limit)
    angles = np.random.default_rng(0).uniform(-limit, limit, size=(40000, 3))
    corners = np.abs(_rotation_matrices(angles, 3, (0, 1, 2))) @ np.asarray(half)
    brute = corners.max(axis=0)
    assert (computed >= brute - 1e-9).all()
    assert (computed - brute < 0.15).all()
    # one angle: closed form. a cos t + b sin t peaks at atan(b / a) = 21.8 deg, beyond a 15 deg limit
    a, b, t = 10.0, 4.0, math.radians(15)
    np.testing.assert_allclose(_max_rotated_extent((a, b), (0,), t),
                               [a * math.cos(t) + b * math.sin(t), a * math.sin(t) + b * math.cos(t)], atol=1e-6)
    np.testing.assert_allclose(_max_rotated_extent((a, b), (0,), math.radians(40)),
                               [math.hypot(a, b), a * math.sin(math.radians(40)) + b * math.cos(math.radians(40))],
                               atol=1e-6)
    np.testing.assert_allclose(_max_rotated_extent((a, b), (0,), math.pi), [math.hypot(a, b)] * 2, atol=1e-6)


@pytest.mark.parametrize("how", ["anisotropic patch", "option"])
def test_dummy_2d_rotates_and_scales_only_in_plane(how):
    if how == "option":
        configuration = make_configuration((16, 24, 24), channels=(MRI,), options={"dummy_2d": True})
    else:
        configuration = make_configuration((4, 32, 32), spacing=(5.0, 0.8, 0.8), channels=(MRI,))
    augmentation = build_augmentation(configuration, "medical",
                                      {"p_rotation": 1.0, "p_scaling": 1.0, "p_elastic": 1.0, "p_mirror": 0.0})
    assert augmentation.dummy_2d and augmentation.rotation_limit_deg == 180.0
    shape = augmentation.input_patch_size()
    patch = configuration.patch_size
    assert shape[0] == patch[0] and shape[1] > patch[1]
    # an input that varies along z only keeps its z profile exactly
    profile = np.arange(shape[0], dtype=np.float32) * 3.0 - 5.0
    data = np.broadcast_to(profile[:, None, None], shape)[None, None].copy()
    seg = np.broadcast_to((np.arange(shape[0]) % 3)[:, None, None], shape)[None, None].astype(np.int16)
    only_spatial = build_augmentation(configuration, "medical",
                                      {**{k: 0.0 for k in ALL_ON if k.startswith("p_")},
                                       "p_rotation": 1.0, "p_scaling": 1.0, "p_elastic": 1.0})
    rng = np.random.default_rng(6)
    for _ in range(3):
        out, out_seg, params = only_spatial(data, seg, rng)
        op = params[0]["ops"][0]
        assert op["rotation_deg"][1:] == [0.0, 0.0] and op["rotation_deg"][0] != 0.0
        assert op["scale"][0] == 1.0 and op["scale"][1] == op["scale"][2] != 1.0
        np.testing.assert_allclose(out[0, 0], np.broadcast_to(profile[:, None, None], out.shape[2:]), atol=1e-4)
        np.testing.assert_array_equal(out_seg[0, 0], seg[0, 0, :, : patch[1], : patch[2]])
    # low-resolution simulation leaves z alone as well
    lowres = augmentation.sample(np.random.default_rng(0), shape, 8)
    assert all(op["axes"] == [1, 2] for p in lowres for op in p["ops"] if op["op"] == "low_resolution")


def test_ct_tissue_remap_is_monotonic_and_not_identity():
    configuration = make_configuration((16, 16, 16), channels=(CT,))
    augmentation = build_augmentation(configuration, "medical", {"p_ct_tissue": 1.0})
    hu = np.linspace(-1500.0, 3500.0, 20001)
    values = ((hu - CT.mean) / CT.std).astype(np.float32)
    rng = np.random.default_rng(9)
    changed = 0
    for params in augmentation.sample(rng, augmentation.input_patch_size(), 20):
        (op,) = [op for op in params["ops"] if op["op"] == "ct_tissue_remap"]
        assert np.all(np.diff(op["knots_in"]) > 0) and np.all(np.diff(op["knots_out"]) > 0)
        mapped = piecewise_linear(values, op["knots_in"], op["knots_out"])
        assert np.all(np.diff(mapped) > 0)
        # the remap moves intensities by a bounded, tissue-scale amount (at most a few hundred HU)
        shift_hu = np.abs(mapped - values)[(hu > -1000) & (hu < 1500)] * CT.std
        changed += shift_hu.max() > 5
        assert shift_hu.max() < 600
        # knots are the tissue boundaries inside the clip range, in normalized units
        assert op["knots_in"][0] == pytest.approx((CT.clip_low - CT.mean) / CT.std, abs=1e-4)
        assert op["knots_in"][-1] == pytest.approx((CT.clip_high - CT.mean) / CT.std, abs=1e-4)
    assert changed == 20


def test_ct_transforms_only_touch_ct_channels_and_bias_only_mri():
    configuration = make_configuration((8, 16, 16), channels=(CT, MRI))
    augmentation = build_augmentation(configuration, "medical", {"p_ct_tissue": 1.0, "p_metal": 1.0,
                                                                 "p_bias_field": 1.0})
    params = augmentation.sample(np.random.default_rng(0), augmentation.input_patch_size(), 5)
    for p in params:
        channels = {op["op"]: op["channel"] for op in p["ops"] if "channel" in op}
        assert channels["ct_tissue_remap"] == 0 and channels["metal_streaks"] == 0
        assert channels["bias_field"] == 1


def test_bias_field_is_smooth_positive_and_not_constant():
    rng = np.random.default_rng(10)
    configuration = make_configuration((16, 32, 32), channels=(MRI,))
    augmentation = build_augmentation(configuration, "medical", {"p_bias_field": 1.0})
    for params in augmentation.sample(rng, augmentation.input_patch_size(), 5):
        (op,) = [op for op in params["ops"] if op["op"] == "bias_field"]
        field = bias_field((16, 32, 32), op["order"], op["coefficients"])
        assert field.shape == (16, 32, 32) and (field > 0).all()
        assert field.max() / field.min() > 1.05
        for axis in range(3):
            # neighbouring voxels differ by a few percent at most: no edges or noise
            assert np.abs(np.diff(np.log(field), axis=axis)).max() < 0.15
            assert np.abs(np.diff(np.log(field), n=2, axis=axis)).max() < 0.02
    # applied to an image: a multiplicative change above the darkest value
    image = np.full((1, 1, 16, 32, 32), 2.0, dtype=np.float32)
    image[..., :4, :] = -1.0
    seg = np.zeros((1, 1, 16, 32, 32), dtype=np.int16)
    params = [{"input_shape": [16, 32, 32], "output_shape": [16, 32, 32],
               "ops": [{"op": "crop"}, op]}]
    out, _ = replay(image, seg, params)
    ratio = (out[0, 0, :, 4:] + 1.0) / 3.0
    np.testing.assert_allclose(ratio, bias_field((16, 32, 32), op["order"], op["coefficients"])[:, 4:], rtol=1e-5)
    np.testing.assert_array_equal(out[0, 0, :, :4], -1.0)


def test_metal_streaks_stay_in_the_ct_range_and_few_slices():
    configuration = make_configuration((8, 32, 32), channels=(CT,))
    augmentation = build_augmentation(configuration, "medical", {**SPATIAL_OFF, "p_metal": 1.0,
                                                                 **{k: 0.0 for k in ("p_gaussian_noise", "p_blur",
                                                                    "p_brightness", "p_contrast", "p_lowres", "p_gamma",
                                                                    "p_gamma_inverted", "p_ct_tissue", "p_poisson_noise",
                                                                    "p_mirror")}})
    data = np.full((1, 1, 8, 32, 32), (40.0 - CT.mean) / CT.std, dtype=np.float32)
    seg = np.zeros((1, 1, 8, 32, 32), dtype=np.int16)
    out, _, params = augmentation(data, seg, np.random.default_rng(12))
    op = params[0]["ops"][1]
    assert op["op"] == "metal_streaks"
    start, stop = op["slices"]
    changed_slices = np.flatnonzero(np.abs(out - data).reshape(8, -1).max(axis=1) > 1e-6)
    assert list(changed_slices) == list(range(start, stop))
    low, high = (np.array([CT.clip_low, CT.clip_high]) - CT.mean) / CT.std
    assert out.min() >= low - 1e-5 and out.max() <= high + 1e-5
    # the metal itself saturates, and streaks go both brighter and darker
    assert np.isclose(out, high, atol=1e-4).any()
    slab = out[0, 0, start] - data[0, 0, start]
    assert slab.max() > 0.2 and slab.min() < -0.2


def test_rot90_only_in_2d_square_plane_and_exact():
    configuration = make_configuration((16, 16), channels=(MRI,), options={"rot90": True})
    augmentation = build_augmentation(configuration, "light",
                                      {"p_mirror": 0.0, "p_brightness": 0.0, "p_contrast": 0.0,
                                       "p_gaussian_noise": 0.0, "p_gamma": 0.0})
    rng = np.random.default_rng(13)
    data = rng.standard_normal((6, 1, 16, 16)).astype(np.float32)
    seg = rng.integers(0, 3, size=(6, 1, 16, 16)).astype(np.int16)
    out, out_seg, params = augmentation(data, seg, rng)
    ks = []
    for b, p in enumerate(params):
        k = next((op["k"] for op in p["ops"] if op["op"] == "rot90"), 0)
        ks.append(k)
        np.testing.assert_array_equal(out[b], np.rot90(data[b], k, axes=(-2, -1)))
        np.testing.assert_array_equal(out_seg[b], np.rot90(seg[b], k, axes=(-2, -1)))
    assert len(set(ks)) > 1
    oblong = build_augmentation(make_configuration((16, 24), channels=(MRI,), options={"rot90": True}), "light")
    ks = [op["k"] for p in oblong.sample(rng, (16, 24), 30) for op in p["ops"] if op["op"] == "rot90"]
    assert ks and set(ks) == {2}


def test_intensity_transforms_are_sane():
    """Table of single ops on a known image: what each must keep or change."""
    rng = np.random.default_rng(14)
    image = (rng.standard_normal((1, 1, 12, 16, 16)) * 2.0 + 1.0).astype(np.float32)
    seg = np.zeros((1, 1, 12, 16, 16), dtype=np.int16)
    x = image[0, 0]

    def run(op):
        params = [{"input_shape": [12, 16, 16], "output_shape": [12, 16, 16], "ops": [{"op": "crop"}, op]}]
        return replay(image, seg, params)[0][0, 0]

    np.testing.assert_allclose(run({"op": "brightness", "channel": 0, "factor": 1.2}), x * 1.2, rtol=1e-6)
    contrast = run({"op": "contrast", "channel": 0, "factor": 1.5})
    assert contrast.min() >= x.min() and contrast.max() <= x.max() and contrast.std() > x.std()
    gamma = run({"op": "gamma", "channel": 0, "gamma": 1.4, "invert": False})
    assert gamma.mean() == pytest.approx(x.mean(), abs=1e-4) and gamma.std() == pytest.approx(x.std(), rel=1e-4)
    assert np.corrcoef(gamma.ravel(), x.ravel())[0, 1] > 0.9 and not np.allclose(gamma, x)
    inverted = run({"op": "gamma", "channel": 0, "gamma": 1.4, "invert": True})
    assert not np.allclose(inverted, gamma)
    blur = run({"op": "gaussian_blur", "channel": 0, "sigma": [1.0, 1.0, 1.0]})
    assert blur.std() < 0.7 * x.std() and blur.mean() == pytest.approx(x.mean(), abs=0.1)
    noise = run({"op": "gaussian_noise", "channels": [0], "std": 0.5, "seed": 3})
    assert (noise - x).std() == pytest.approx(0.5, rel=0.1)
    lowres = run({"op": "low_resolution", "channel": 0, "zoom": 0.5, "axes": [0, 1, 2]})
    assert not np.allclose(lowres, x) and lowres.std() < x.std()
    poisson = run({"op": "poisson_noise", "channel": 0, "counts": 50.0, "seed": 4})
    residual = poisson - x
    # signal-dependent: brighter voxels get more noise
    bright = x > np.percentile(x, 75)
    dark = x < np.percentile(x, 25)
    assert residual[bright].std() > residual[dark].std()
    assert abs(residual.mean()) < 0.05


def test_options_are_validated():
    configuration = CONFIGS["3d"]
    with pytest.raises(ValueError, match="unknown augmentation preset 'heavy'"):
        build_augmentation(configuration, "heavy")
    with pytest.raises(ValueError, match="p_rotaton"):
        build_augmentation(configuration, "default", {"p_rotaton": 0.5})
    with pytest.raises(ValueError, match="p_rotation"):
        build_augmentation(configuration, "default", {"p_rotation": 2.0})
    with pytest.raises(ValueError, match="scaling"):
        build_augmentation(configuration, "default", {"scaling": (1.4, 0.7)})
    # the schedule's preset and options are the defaults; call options win
    scheduled = make_configuration((16, 16, 16), preset="medical", options={"p_elastic": 0.5})
    assert build_augmentation(scheduled).settings.p_elastic == 0.5
    assert build_augmentation(scheduled).settings.p_bias_field == PRESETS["medical"]["p_bias_field"]
    assert build_augmentation(scheduled, options={"p_elastic": 0.1}).settings.p_elastic == 0.1
    assert build_augmentation(scheduled, "default").settings.p_bias_field == 0.0


def test_bad_inputs_name_the_problem():
    augmentation = build_augmentation(CONFIGS["3d"], "default")
    rng = np.random.default_rng(0)
    shape = augmentation.input_patch_size()
    with pytest.raises(ValueError, match="data must be"):
        augmentation(np.zeros((1, 2, *shape[1:]), np.float32), np.zeros((1, 1, *shape[1:]), np.int16), rng)
    with pytest.raises(ValueError, match="seg must have shape"):
        augmentation(np.zeros((1, 2, *shape), np.float32), np.zeros((1, 2, *shape), np.int16), rng)
    with pytest.raises(ValueError, match="data has 1 channel"):
        augmentation(np.zeros((1, 1, *shape), np.float32), np.zeros((1, 1, *shape), np.int16), rng)
    with pytest.raises(ValueError, match="at least the patch size"):
        augmentation(np.zeros((1, 2, 4, 4, 4), np.float32), np.zeros((1, 1, 4, 4, 4), np.int16), rng)
    params = augmentation.sample(rng, shape, 1)
    with pytest.raises(ValueError, match="sampled for input shape"):
        augmentation.apply(np.zeros((1, 2, *CONFIGS["3d"].patch_size), np.float32),
                           np.zeros((1, 1, *CONFIGS["3d"].patch_size), np.int16), params)


def test_summarize_params_is_short_and_names_the_ops():
    augmentation = build_augmentation(CONFIGS["3d"], "medical", ALL_ON)
    (params,) = augmentation.sample(np.random.default_rng(0), augmentation.input_patch_size(), 1)
    text = summarize_params(params)
    for word in ("rot(", "scale", "elastic", "noise", "blur", "gamma", "bias", "mirror"):
        assert word in text
    assert summarize_params({"ops": [{"op": "crop"}]}) == "no augmentation"


def _finite_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > 100
    assert image[..., :3].std() > 0.05
    return image


def test_preview_from_a_configuration_writes_a_png(tmp_path):
    out = augment_preview(CONFIGS["3d_aniso"], tmp_path / "grid.png", num_samples=2, seed=1, preset="medical")
    assert out == tmp_path / "grid.png"
    _finite_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary files left


@pytest.mark.parametrize("config_name", ["2d", "3d"])
def test_preview_from_preprocessed_cases(tmp_path, config_name):
    configuration = make_configuration(CONFIGS[config_name].patch_size, channels=(CT,), name=config_name)
    plan = Plan("Synthetic", ("CT",), {"background": 0, "organ": 1}, {config_name: configuration})
    work = tmp_path / "work"
    save_plan(plan, work / "plan.json")
    folder = work / "preprocessed" / config_name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shape = (6, 40, 44) if config_name == "2d" else (30, 40, 44)
    label = ellipsoid(shape, [s / 2 for s in shape], [s / 4 for s in shape]).astype(np.int16)
    np.save(folder / "case_0.npy", (rng.standard_normal((1, *shape)) + label).astype(np.float32))
    np.save(folder / "case_0_seg.npy", label)
    sidecar = json.loads((Path(__file__).parent / "data" / "sidecar_before_typing.json").read_text())
    (folder / "case_0.json").write_text(json.dumps({**sidecar, "case_id": "case_0", "class_locations": {"1": [[3, 20, 22]]}}))
    out = augment_preview(work, tmp_path / "preview.png", num_samples=3, seed=2, case="case_0")
    _finite_png(out)
    with pytest.raises(FileNotFoundError, match="case_9"):
        augment_preview(work, tmp_path / "other.png", num_samples=1, case="case_9")


def only_flips(sample: np.ndarray, params: dict) -> np.ndarray:
    """``sample`` ``(C, *spatial)`` with just the recorded mirror and rot90 ops applied (exact)."""
    for op in params["ops"]:
        if op["op"] == "mirror":
            sample = np.flip(sample, [1 + a for a in op["axes"]])
        elif op["op"] == "rot90":
            sample = np.rot90(sample, op["k"], axes=(-2, -1))
    return sample


def test_prior_channels_move_with_the_image_but_keep_their_values():
    """CT prior channels (beyond the normalized ones) get the geometric ops only."""
    topology = Topology("unet", 3, 2, 3, (8,), ((3, 3, 3),), ((1, 1, 1),), (2,), ())
    configuration = Configuration("3d_fullres", (1.0, 1.0, 1.0), (8, 16, 16), 2, (8, 16, 16), (CT,), topology,
                                  schedule=Schedule(mirror_axes=(0, 1, 2)),
                                  ct_priors=(IntensityWindow("bone", 300.0),))
    augmentation = build_augmentation(configuration, "medical", {**ALL_ON, **SPATIAL_OFF})
    rng = np.random.default_rng(15)
    data = rng.standard_normal((3, 2, 8, 16, 16)).astype(np.float32)
    seg = np.zeros((3, 1, 8, 16, 16), dtype=np.int16)
    out, _, params = augmentation(data, seg, rng)
    for b, p in enumerate(params):
        expected = only_flips(data[b], p)
        np.testing.assert_array_equal(out[b, 1], expected[1])
        assert not np.allclose(out[b, 0], expected[0])


# --- cascade stages: the previous stage's one-hot prediction as extra input channels -------------

CASCADE_OPS = {"binary_operator", "remove_component"}


def make_cascade_configuration(patch: tuple[int, ...], classes: int = 2, channels=(CT, MRI),
                               options: dict | None = None) -> Configuration:
    base = make_configuration(patch, channels=channels, options=options)
    topology = dataclasses.replace(base.topology, in_channels=base.base_channels + classes)
    return dataclasses.replace(base, name="3d_cascade_fullres" if len(patch) == 3 else "2d_cascade",
                               previous_stage="3d_lowres", topology=topology)


CASCADE_CONFIGS = {"2d": make_cascade_configuration((16, 16)), "3d": make_cascade_configuration((8, 16, 16))}


def cascade_batch(augmentation: Augmentation, batch: int, rng: np.random.Generator):
    """Image channels and labels as random_batch, then one one-hot channel per previous-stage class."""
    data, seg = random_batch(augmentation, batch, rng)
    classes = len(augmentation.cascade_channels)
    _, previous = random_batch(augmentation, batch, rng, labels=range(classes + 1))
    one_hot = np.concatenate([previous == k for k in range(1, classes + 1)], axis=1)
    return np.concatenate([data, one_hot.astype(np.float32)], axis=1), seg


def assert_one_hot(channels: np.ndarray) -> None:
    assert set(np.unique(channels)) <= {0.0, 1.0}
    assert channels.sum(axis=1).max() <= 1.0


def test_cascade_channels_come_from_the_previous_stage():
    augmentation = build_augmentation(CASCADE_CONFIGS["3d"], "default")
    assert augmentation.cascade_channels == (2, 3)
    for configuration in CONFIGS.values():
        plain = build_augmentation(configuration, "medical", ALL_ON)
        assert plain.cascade_channels == ()
        params = plain.sample(np.random.default_rng(0), plain.input_patch_size(), 4)
        assert not {op["op"] for p in params for op in p["ops"]} & CASCADE_OPS
        assert all("nearest_channels" not in op for p in params for op in p["ops"])


@pytest.mark.parametrize("config_name", list(CASCADE_CONFIGS))
def test_cascade_replay_is_exact_and_keeps_the_channels_one_hot(config_name):
    configuration = CASCADE_CONFIGS[config_name]
    # small radii: on a tiny patch, radius 8 empties or floods the channels
    augmentation = build_augmentation(configuration, "medical", {**ALL_ON, "scaling": (0.8, 1.3),
                                                                 "cascade_operator_radius": (1, 2)})
    data, seg = cascade_batch(augmentation, 4, np.random.default_rng(0))
    data_before = data.copy()
    out, out_seg, params = augmentation(data, seg, np.random.default_rng(7))
    assert out.shape == (4, 4, *configuration.patch_size)
    for p in params:
        names = [op["op"] for op in p["ops"]]
        assert names[-len(CASCADE_OPS) - 1:] == ["binary_operator", "remove_component", "remove_component"]
        assert p["ops"][0]["op"] == "spatial" and p["ops"][0]["nearest_channels"] == [2, 3]
    # rotation, scaling, mirroring and both cascade ops leave them 0/1 and exclusive
    assert_one_hot(out[:, 2:])
    assert out[:, 2:].any()
    for replayed in (replay(data, seg, params), replay(data, seg, json.loads(params_to_json(params)))):
        np.testing.assert_array_equal(replayed[0], out)
        np.testing.assert_array_equal(replayed[1], out_seg)
    np.testing.assert_array_equal(data, data_before)


def test_cascade_channels_are_resampled_nearest_and_old_params_still_bilinear():
    configuration = CASCADE_CONFIGS["2d"]
    augmentation = build_augmentation(configuration, "default", {"p_rotation": 1.0, "p_scaling": 1.0})
    data, seg = cascade_batch(augmentation, 1, np.random.default_rng(1))
    (params,) = augmentation.sample(np.random.default_rng(2), data.shape[2:], 1)
    spatial = params["ops"][0]
    only_spatial = {**params, "ops": [spatial]}
    old = {**params, "ops": [{k: v for k, v in spatial.items() if k != "nearest_channels"}]}
    out, out_seg = replay(data, seg, [only_spatial])
    out_old, out_seg_old = replay(data, seg, [old])
    # the image channels and the labels do not depend on the key; without it (old logs) every
    # channel is interpolated, so the one-hot channels get fractional values
    np.testing.assert_array_equal(out[:, :2], out_old[:, :2])
    np.testing.assert_array_equal(out_seg, out_seg_old)
    assert_one_hot(out[:, 2:])
    assert not set(np.unique(out_old[:, 2:])) <= {0.0, 1.0}


def test_intensity_ops_never_touch_cascade_channels_and_cascade_ops_never_the_image():
    configuration = CASCADE_CONFIGS["3d"]
    augmentation = build_augmentation(configuration, "medical", {**ALL_ON, **SPATIAL_OFF})
    data, seg = cascade_batch(augmentation, 3, np.random.default_rng(3))
    params = augmentation.sample(np.random.default_rng(4), data.shape[2:], 3)
    for p in params:
        for op in p["ops"]:
            if op["op"] not in CASCADE_OPS:
                assert all(c < 2 for c in op.get("channels", [op.get("channel", 0)]))
    without_cascade = [{**p, "ops": [op for op in p["ops"] if op["op"] not in CASCADE_OPS]} for p in params]
    only_cascade = [{**p, "ops": [op for op in p["ops"] if op["op"] == "crop" or op["op"] in CASCADE_OPS]}
                    for p in params]
    out, _ = replay(data, seg, without_cascade)
    cascade_out, _ = replay(data, seg, only_cascade)
    for b, p in enumerate(without_cascade):
        expected = only_flips(data[b], p)
        np.testing.assert_array_equal(out[b, 2:], expected[2:])
        assert not np.allclose(out[b, :2], expected[:2])
    np.testing.assert_array_equal(cascade_out[:, :2], data[:, :2])
    assert not np.array_equal(cascade_out[:, 2:], data[:, 2:])


@pytest.mark.parametrize("operation", ["dilation", "erosion", "opening", "closing"])
def test_binary_morphology_equals_skimage_ball_and_disk(operation):
    rng = np.random.default_rng(5)
    for trial in range(24):
        dim = 2 + trial % 2
        shape = tuple(int(n) for n in rng.integers(5, 12, size=dim))
        mask = rng.random(shape) < rng.uniform(0.05, 0.9)
        if trial in (4, 5):
            mask[:] = trial == 4  # a full and an empty mask
        radius = int(rng.integers(1, 4))
        footprint = skimage.morphology.disk(radius) if dim == 2 else skimage.morphology.ball(radius)
        # mode="ignore": what lies beyond the border neither dilates into the mask nor erodes it
        expected = getattr(skimage.morphology, operation)(mask, footprint, mode="ignore")
        np.testing.assert_array_equal(binary_morphology(mask, operation, radius), expected,
                                      err_msg=f"{operation} r={radius} shape {shape}")


def test_binary_operator_takes_the_grown_voxels_from_the_other_channels():
    image = np.zeros((3, 9, 9), dtype=np.float32)
    image[0] = np.arange(81).reshape(9, 9)  # an image channel
    image[1, 2:5, 2:5] = 1.0
    image[2, 5:9, 2:5] = 1.0  # touches channel 1's block and the border
    seg = np.zeros((1, 1, 9, 9), dtype=np.int16)
    op = {"op": "binary_operator", "channels": [1, 2], "operations": ["dilation", "erosion"], "radius": 1}
    params = [{"input_shape": [9, 9], "output_shape": [9, 9], "ops": [{"op": "crop"}, op]}]
    (out,), _ = replay(image[None], seg, params)
    grown = binary_morphology(image[1] > 0, "dilation", 1)
    np.testing.assert_array_equal(out[1], grown)
    # channel 2 lost its first row to channel 1, then was eroded (not from the border) to its centre column
    expected = np.zeros((9, 9), dtype=bool)
    expected[7:9, 3] = True
    np.testing.assert_array_equal(out[2], expected)
    np.testing.assert_array_equal(out[0], image[0])
    assert_one_hot(out[None, 1:])


def test_remove_component_takes_one_small_component_and_never_a_large_one():
    mask = np.zeros((6, 20, 20), dtype=np.float32)
    mask[1:5, 1:12, 1:12] = 1.0  # large: 484 voxels, 20% of the patch
    mask[1, 15, 15] = mask[2, 16, 16] = 1.0  # small, one component through a corner (full connectivity)
    mask[3:5, 15:17, 2:4] = 1.0  # small
    mask[5, 18:20, 18:20] = 1.0  # small
    image = np.stack([np.ones_like(mask), mask])
    seg = np.zeros((1, 1, *mask.shape), dtype=np.int16)
    small = [{(1, 15, 15), (2, 16, 16)}, {(z, y, x) for z in (3, 4) for y in (15, 16) for x in (2, 3)},
             {(5, y, x) for y in (18, 19) for x in (18, 19)}]
    removed_seen = set()
    for seed in range(12):
        op = {"op": "remove_component", "channel": 1, "seed": seed, "max_fraction": 0.15}
        params = [{"input_shape": list(mask.shape), "output_shape": list(mask.shape), "ops": [{"op": "crop"}, op]}]
        (out,), _ = replay(image[None], seg, params)
        removed = {tuple(int(v) for v in i) for i in np.argwhere((mask == 1) & (out[1] == 0))}
        assert removed in small, seed
        removed_seen.add(small.index(removed))
        np.testing.assert_array_equal(out[0], image[0])
    assert removed_seen == {0, 1, 2}
    # every component above the limit: nothing happens
    op = {"op": "remove_component", "channel": 1, "seed": 0, "max_fraction": 0.0005}
    params = [{"input_shape": list(mask.shape), "output_shape": list(mask.shape), "ops": [{"op": "crop"}, op]}]
    np.testing.assert_array_equal(replay(image[None], seg, params)[0][0], image)


def test_cascade_settings_presets_and_validation():
    configuration = CASCADE_CONFIGS["3d"]
    for preset in ("default", "medical", "light"):
        settings = build_augmentation(configuration, preset).settings
        assert (settings.p_cascade_binary_operator, settings.p_cascade_remove_component) == (0.4, 0.2)
        assert settings.cascade_operator_radius == (1, 8) and settings.cascade_remove_max_fraction == 0.15
    none = build_augmentation(configuration, "none", {"p_cascade_binary_operator": 1.0})
    assert none.settings.p_cascade_binary_operator == 0.0 and none.settings.p_cascade_remove_component == 0.0
    data, seg = cascade_batch(none, 2, np.random.default_rng(6))
    out, _, params = none(data, seg, np.random.default_rng(6))
    assert all(p["ops"] == [{"op": "crop"}] for p in params)
    for bad in ({"cascade_operator_radius": (4, 2)}, {"cascade_operator_radius": (0, 2)},
                {"cascade_operator_radius": (1.5, 2)}, {"cascade_remove_max_fraction": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            build_augmentation(configuration, "default", bad)
    radius = build_augmentation(configuration, "default", {"p_cascade_binary_operator": 1.0,
                                                           "cascade_operator_radius": (2, 3)})
    radii = {op["radius"] for p in radius.sample(np.random.default_rng(0), (8, 16, 16), 20) for op in p["ops"]
             if op["op"] == "binary_operator"}
    assert radii == {2, 3}
    with pytest.raises(ValueError, match="cascade stage takes 4"):
        build_augmentation(configuration, "default")(data[:, :2], seg, np.random.default_rng(0))


def test_summarize_params_names_the_cascade_ops():
    augmentation = build_augmentation(CASCADE_CONFIGS["3d"], "default", ALL_ON)
    (params,) = augmentation.sample(np.random.default_rng(0), augmentation.input_patch_size(), 1)
    text = summarize_params(params)
    (op,) = [op for op in params["ops"] if op["op"] == "binary_operator"]
    assert f"cascade {'/'.join(dict.fromkeys(op['operations']))} r{op['radius']}" in text
    assert text.count("cascade remove-cc") == 1
