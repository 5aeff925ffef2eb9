"""Golden plans: the plain U-Net at 8 GB must reproduce what nnU-Net v2 plans for these fingerprints.

Fingerprints are synthetic (every case has the median spacing and shape), so these tests read no
image and run in well under a second. The pure planning rules are tested here too, with values
worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoseg.fingerprint import (
    AxisStats,
    CaseChannel,
    CaseFingerprint,
    ChannelFingerprint,
    ClassStats,
    Fingerprint,
    IntensityStats,
)
from autoseg.plan import Topology, load_plan, plan_to_dict, save_plan
from autoseg.planning import (
    deep_supervision_weights,
    fit_patch_and_batch,
    fullres_target_spacing,
    initial_patch_size,
    make_plan,
    pool_and_conv_props,
    unet_feature_map_proxy,
)

FOREGROUND = IntensityStats(count=1000, mean=100.0, std=20.0, median=100.0, min=0.0, max=300.0,
                            percentile_00_5=10.0, percentile_99_5=250.0)


def synthetic_fingerprint(spacings: list[tuple[float, float, float]], shapes: list[tuple[int, int, int]],
                          channels: tuple[str, ...] = ("MRI",), cropped_fraction: float = 1.0) -> Fingerprint:
    """A fingerprint with the given per-case spacings and cropped shapes (no images behind it)."""
    channel = CaseChannel(foreground=FOREGROUND, image_min=0.0, image_max=300.0, fraction_below_minus_500=0.0)
    cases = tuple(
        CaseFingerprint(case_id=f"case_{i:03d}", spacing=spacing, shape=shape, shape_after_crop=shape,
                        relative_size_after_crop=cropped_fraction, channels=(channel,) * len(channels),
                        class_voxels={0: 100, 1: 10})
        for i, (spacing, shape) in enumerate(zip(spacings, shapes)))

    def stats(values: list) -> AxisStats:
        array = np.asarray(values, dtype=float)
        return AxisStats(median=tuple(np.median(array, 0)), percentile_10=tuple(np.percentile(array, 10, 0)),
                         percentile_90=tuple(np.percentile(array, 90, 0)), min=tuple(array.min(0)),
                         max=tuple(array.max(0)))

    return Fingerprint(
        dataset_dir="/synthetic", dataset_hash="0" * 16, dataset_name="synthetic", channel_names=channels,
        is_2d=all(s[0] == 1 for s in shapes), cases=cases, spacing=stats(spacings),
        shape_after_crop=stats(shapes), median_relative_size_after_crop=cropped_fraction,
        channels=tuple(ChannelFingerprint(name=c, modality="mri", foreground=FOREGROUND, image_min=0.0,
                                          image_max=300.0, median_fraction_below_minus_500=0.0)
                       for c in channels),
        classes={0: ClassStats(voxels=100 * len(cases), cases=len(cases)),
                 1: ClassStats(voxels=10 * len(cases), cases=len(cases))},
        samples_per_case=1000)


def uniform_fingerprint(spacing, shape, num_cases, channels=("MRI",)) -> Fingerprint:
    return synthetic_fingerprint([spacing] * num_cases, [shape] * num_cases, channels)


def dataset_json(channels: tuple[str, ...], num_classes: int) -> dict:
    labels = {"background": 0, **{f"class_{i}": i for i in range(1, num_classes)}}
    return {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels,
            "numTraining": 1, "file_ending": ".nii.gz"}


# (spacing, median shape, cases, channels, classes) -> nnU-Net v2's plans (ExperimentPlanner, 8 GB)
GOLDEN = [
    pytest.param((1.0, 1.0, 1.0), (36, 50, 35), 260, ("MRI",), 3,
                 {"3d_fullres": dict(patch=(40, 56, 40), batch=9, stages=4),
                  "2d": dict(patch=(56, 40), batch=366)}, id="hippocampus-like"),
    pytest.param((1.0, 1.0, 1.0), (138, 169, 138), 484, ("FLAIR", "T1w", "t1gd", "T2w"), 4,
                 {"3d_fullres": dict(patch=(128, 128, 128), batch=2, stages=6,
                                     features=(32, 64, 128, 256, 320, 320)),
                  "2d": dict(patch=(192, 160), batch=105)}, id="brats-like"),
    pytest.param((1.37, 1.25, 1.25), (115, 320, 232), 20, ("CT",), 3,
                 {"3d_fullres": dict(patch=(80, 192, 160), batch=2, last_stride=(1, 2, 2))}, id="anisotropic-ct"),
    pytest.param((1.0, 0.833, 0.833), (300, 480, 480), 50, ("CT",), 2,
                 {"3d_fullres": dict(patch=(96, 160, 160), batch=2,
                                     strides=((1, 1, 1),) + ((2, 2, 2),) * 4 + ((1, 2, 2),))}, id="large-ct"),
]


@pytest.mark.parametrize(("spacing", "shape", "cases", "channels", "classes", "expected"), GOLDEN)
def test_plain_unet_reproduces_nnunet_plans(spacing, shape, cases, channels, classes, expected):
    plan = make_plan(uniform_fingerprint(spacing, shape, cases, channels), dataset_json(channels, classes))
    for name, want in expected.items():
        configuration = plan.configuration(name)
        assert configuration.patch_size == want["patch"], name
        assert configuration.batch_size == want["batch"], name
        topology = configuration.topology
        if "stages" in want:
            assert topology.num_stages == want["stages"]
        if "features" in want:
            assert topology.features_per_stage == want["features"]
        if "last_stride" in want:
            assert topology.strides[-1] == want["last_stride"]
        if "strides" in want:
            assert topology.strides == want["strides"]
        assert topology.arch == "unet"
        assert topology.n_conv_per_stage == (2,) * topology.num_stages
        assert topology.in_channels == len(channels)
        assert topology.num_classes == classes


@pytest.mark.parametrize(("spacing", "shape", "cases", "channels", "classes", "expected"), GOLDEN)
def test_golden_plans_round_trip_through_json(tmp_path, spacing, shape, cases, channels, classes, expected):
    plan = make_plan(uniform_fingerprint(spacing, shape, cases, channels), dataset_json(channels, classes))
    assert load_plan(save_plan(plan, tmp_path / "plan.json")) == plan
    assert plan_to_dict(load_plan(tmp_path / "plan.json")) == plan_to_dict(plan)


def test_golden_plan_records_every_decision_with_its_numbers():
    plan = make_plan(uniform_fingerprint((1.37, 1.25, 1.25), (115, 320, 232), 20, ("CT",)),
                     dataset_json(("CT",), 3))
    decisions = {(d.configuration, d.key): d for d in plan.decisions}
    assert decisions[("3d_fullres", "patch_size")].value == "80x192x160"
    assert decisions[("3d_fullres", "batch_size")].value == "2"
    assert "budget" in decisions[("3d_fullres", "patch_size")].reason
    assert decisions[("dataset", "normalization[CT]")].value == "ct"
    assert "[10, 250]" in decisions[("dataset", "normalization[CT]")].reason


# --- the rules one by one --------------------------------------------------------------------------------


@pytest.mark.parametrize(("spacings", "shapes", "expected"), [
    # isotropic: plain median
    ([(1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (3.0, 1.0, 1.0)], [(100, 100, 100)] * 3, (2.0, 1.0, 1.0)),
    # spacing anisotropic (5 > 3 x 1) but not in voxels (50 x 3 >= 100): median kept
    ([(5.0, 1.0, 1.0)] * 3, [(50, 100, 100)] * 3, (5.0, 1.0, 1.0)),
    # anisotropic in spacing and voxels: the 10th percentile of the slow axis
    ([(s, 0.8, 0.8) for s in (3.0, 4.0, 5.0, 5.0, 5.0, 6.0, 8.0, 8.0, 8.0, 10.0, 10.0)],
     [(20, 256, 256)] * 11, (4.0, 0.8, 0.8)),
])
def test_fullres_target_spacing(spacings, shapes, expected):
    target, reason = fullres_target_spacing(spacings, shapes)
    assert target == pytest.approx(expected)
    assert ("10th percentile" in reason) == (expected[0] != np.median([s[0] for s in spacings]))


def test_anisotropic_target_never_below_the_in_plane_spacing():
    # the 10th percentile (1.0) is finer than the in-plane 1.5: it becomes 1.5 + 1e-5
    spacings = [(1.0, 1.5, 1.5)] * 2 + [(6.0, 1.5, 1.5)] * 8
    target, _ = fullres_target_spacing(spacings, [(20, 256, 256)] * 10)
    assert target[0] == pytest.approx(1.5 + 1e-5)


@pytest.mark.parametrize(("spacing", "median", "dim", "expected"), [
    ((1.0, 1.0, 1.0), (300, 300, 300), 3, (256, 256, 256)),
    ((1.0, 1.0, 1.0), (36, 50, 35), 3, (36, 50, 35)),  # clipped to the median
    ((2.0, 1.0, 1.0), (999, 999, 999), 3, (161, 323, 323)),  # physical proportion: 256^3 volume
    ((1.0, 0.5, 0.5), (1, 4000, 4000), 2, (2048, 2048)),  # 2D uses the last two axes
])
def test_initial_patch_size(spacing, median, dim, expected):
    assert initial_patch_size(spacing, median, dim) == expected


def test_pool_and_conv_props_isotropic():
    props = pool_and_conv_props((1.0, 1.0, 1.0), (40, 56, 40))
    # 40 -> 20 -> 10 -> 5 stops at < 8; 56 -> 28 -> 14 -> 7 likewise: three poolings, four stages
    assert props.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert props.kernel_sizes == ((3, 3, 3),) * 4
    assert props.divisible_by == (8, 8, 8)
    assert props.patch_size == (40, 56, 40)


def test_pool_and_conv_props_anisotropic_kernels_and_padding():
    props = pool_and_conv_props((5.0, 1.0, 1.0), (20, 100, 100))
    # z (5 mm) joins the pooling once in-plane spacing reaches 4 mm (5 / 4 < 2), after two poolings
    assert props.strides[:4] == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    assert props.kernel_sizes[:3] == ((1, 3, 3), (1, 3, 3), (3, 3, 3))
    assert props.kernel_sizes[-1] == (3, 3, 3)
    for padded, original, divisor in zip(props.patch_size, (20, 100, 100), props.divisible_by):
        assert padded % divisor == 0 and 0 <= padded - original < divisor


def test_unet_feature_map_proxy_by_hand():
    topology = Topology(arch="unet", dim=3, in_channels=1, num_classes=2, features_per_stage=(32, 64),
                        kernel_sizes=((3, 3, 3), (3, 3, 3)), strides=((1, 1, 1), (2, 2, 2)),
                        n_conv_per_stage=(2, 2), n_conv_per_stage_decoder=(2,))
    encoder = 2 * 32 * 8**3 + 2 * 64 * 4**3
    decoder = (2 + 1) * 32 * 8**3 + 2 * 8**3  # two convolutions, the transposed conv, the head
    assert unet_feature_map_proxy(topology, (8, 8, 8)) == encoder + decoder


def test_fit_shrinks_until_a_batch_of_two_fits_and_caps_the_batch():
    spacing, median = (1.0, 1.0, 1.0), (200.0, 200.0, 200.0)

    def cost(props, batch):  # one "unit" per voxel per sample
        return math.prod(props.patch_size) * batch

    fit = fit_patch_and_batch(spacing, median, cost, budget=2 * 64**3, dataset_voxels=1e12)
    assert 2 * math.prod(fit.patch_size) <= 2 * 64**3
    assert fit.batch_size == round(2 * 64**3 / math.prod(fit.patch_size))
    capped = fit_patch_and_batch(spacing, median, cost, budget=1e9, dataset_voxels=200**3)
    assert capped.batch_cap == round(200**3 * 0.05 / math.prod(capped.patch_size))
    assert capped.batch_size == max(2, min(capped.batch_from_memory, capped.batch_cap))
    # a fixed cap (the cpu preset's) wins over memory and the dataset, but never goes below min_batch
    unlimited = fit_patch_and_batch(spacing, median, cost, budget=1e9, dataset_voxels=1e12)
    assert unlimited.batch_size > 12
    limited = fit_patch_and_batch(spacing, median, cost, budget=1e9, dataset_voxels=1e12, max_batch=12)
    assert limited.batch_size == 12 and limited.patch_size == unlimited.patch_size
    assert fit_patch_and_batch(spacing, median, cost, budget=1e9, dataset_voxels=1e12, max_batch=1).batch_size == 2


@pytest.mark.parametrize(("stages", "expected"), [
    (2, (1.0,)),
    (3, (1.0, 0.0)),
    (4, (4 / 6, 2 / 6, 0.0)),
])
def test_deep_supervision_weights(stages, expected):
    assert deep_supervision_weights(stages - 1) == pytest.approx(expected)  # one output per stage but the lowest
