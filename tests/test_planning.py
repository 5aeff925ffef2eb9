"""The planner on the example datasets, and its options: memory budget, presets, architectures,
configurations, CT priors, time budget, explanation, and the whole `plan` stage on disk."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_planning_golden import dataset_json, uniform_fingerprint

from autoseg.dataset import load_dataset_json
from autoseg.examples import make_example
from autoseg.fingerprint import compute_fingerprint
from autoseg.plan import PlanError, configuration_hash, load_plan, save_plan
from autoseg.planning import (
    CT_PRIOR_WINDOWS,
    GIB,
    epochs_for_time_budget,
    explain_plan,
    make_plan,
    memory_budget_bytes,
    normalization_for_channel,
    plan_dataset,
    verify_memory,
)
from autoseg.planning.heuristics import (
    CPU_MAX_BATCH,
    MAX_CLASS_WEIGHT,
    OVERSAMPLE_FOREGROUND,
    cross_entropy_class_weights,
)


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> dict:
    """The three example datasets (3 cases each) and their fingerprints, made once for this file."""
    root = tmp_path_factory.mktemp("examples")
    out = {}
    for kind in ("ct", "mri", "2d"):
        folder = make_example(root / kind, kind=kind, num_cases=3, seed=0)
        out[kind] = (folder, compute_fingerprint(folder, n_jobs=1, progress=False), load_dataset_json(folder))
    return out


def plan_for(examples, kind: str, **kwargs):
    _, fingerprint, dataset = examples[kind]
    return make_plan(fingerprint, dataset, **kwargs)


def test_anisotropic_ct(examples):
    _, fingerprint, _ = examples["ct"]
    plan = plan_for(examples, "ct")
    fullres = plan.configuration("3d_fullres")
    median = np.median(fingerprint.spacings, axis=0)
    assert median[0] > 3 * median[1]  # the example really is anisotropic
    # a lower target spacing only along the slow axis: its 10th percentile
    assert fullres.spacing[0] < median[0]
    assert fullres.spacing[0] == pytest.approx(np.percentile(fingerprint.spacings[:, 0], 10))
    assert fullres.spacing[1:] == pytest.approx(tuple(median[1:]))
    # kernel size 1 along the slow axis at the first stage, in-plane 3; 3 once the spacing caught up
    kernels, strides = fullres.topology.kernel_sizes, fullres.topology.strides
    assert kernels[0] == (1, 3, 3) and kernels[-1] == (3, 3, 3)
    assert strides[1] == (1, 2, 2)  # and no pooling along it at first either
    # CT normalization with the clip values and statistics of the fingerprint
    (norm,) = fullres.normalization
    foreground = fingerprint.channels[0].foreground
    assert norm.scheme == "ct"
    assert (norm.clip_low, norm.clip_high) == (foreground.percentile_00_5, foreground.percentile_99_5)
    assert (norm.mean, norm.std) == (foreground.mean, foreground.std)
    assert norm.clip_low < 0 < norm.clip_high  # Hounsfield units
    assert plan.configuration("2d").spacing[0] == pytest.approx(median[0])  # informational slice spacing
    assert plan.configuration("2d").normalization == fullres.normalization


def test_multichannel_mri_gets_per_image_zscore(examples):
    _, fingerprint, dataset = examples["mri"]
    plan = plan_for(examples, "mri")
    for configuration in plan.configurations.values():
        assert [n.channel for n in configuration.normalization] == ["T1", "T1ce", "T2", "FLAIR"]
        assert {n.scheme for n in configuration.normalization} == {"zscore"}
        expected_mask = fingerprint.median_relative_size_after_crop < 0.75
        assert all(n.use_nonzero_mask == expected_mask for n in configuration.normalization)
        assert configuration.topology.in_channels == 4
        assert configuration.topology.num_classes == 3  # three overlapping regions
    assert plan.regions_class_order == dataset.regions_class_order
    assert set(plan.configurations) >= {"2d", "3d_fullres"}


def test_two_dimensional_dataset_gets_only_2d(examples):
    plan = plan_for(examples, "2d")
    assert plan.is_2d and list(plan.configurations) == ["2d"]
    configuration = plan.configuration("2d")
    assert configuration.topology.dim == 2 and len(configuration.patch_size) == 2
    assert configuration.spacing[0] == 1.0
    with pytest.raises(PlanError, match="none of the requested configurations"):
        plan_for(examples, "2d", configurations=["3d_fullres"])


@pytest.mark.parametrize("kind", ["ct", "mri", "2d"])
@pytest.mark.parametrize("arch", ["unet", "resenc"])
def test_halving_the_memory_never_grows_the_plan_and_keeps_the_estimate_under_budget(examples, kind, arch):
    previous = None
    for gb in (8.0, 4.0, 2.0):
        plan = plan_for(examples, kind, gpu_memory_gb=gb, arch=arch)
        for name, configuration in plan.configurations.items():
            budget = memory_budget_bytes(configuration.dim, gb) / GIB
            assert 0 < configuration.estimated_memory_gb <= budget, (name, gb)
            if previous is not None and name in previous.configurations:
                before = previous.configuration(name)
                assert all(a <= b for a, b in zip(configuration.patch_size, before.patch_size)), (name, gb)
                assert configuration.batch_size <= before.batch_size, (name, gb)
        previous = plan


@pytest.mark.parametrize("golden", ["brats-like", "anisotropic-ct", "large-ct"])
def test_halving_the_memory_on_large_golden_fingerprints(golden):
    fingerprints = {
        "brats-like": ((1.0, 1.0, 1.0), (138, 169, 138), 484, ("FLAIR", "T1w", "t1gd", "T2w"), 4),
        "anisotropic-ct": ((1.37, 1.25, 1.25), (115, 320, 232), 20, ("CT",), 3),
        "large-ct": ((1.0, 0.833, 0.833), (300, 480, 480), 50, ("CT",), 2),
    }
    spacing, shape, cases, channels, classes = fingerprints[golden]
    fingerprint = uniform_fingerprint(spacing, shape, cases, channels)
    previous = None
    for gb in (8.0, 4.0, 2.0):
        plan = make_plan(fingerprint, dataset_json(channels, classes), gpu_memory_gb=gb)
        for name, configuration in plan.configurations.items():
            assert configuration.estimated_memory_gb <= memory_budget_bytes(configuration.dim, gb) / GIB
            if previous is not None and name in previous.configurations:
                before = previous.configuration(name)
                assert math.prod(configuration.patch_size) <= math.prod(before.patch_size)
                assert configuration.batch_size <= before.batch_size
        previous = plan


def test_batch_cap_and_minimum_batch():
    # 40 tiny cases: memory would allow a huge batch, 5 % of the dataset's voxels does not
    small = make_plan(uniform_fingerprint((1.0, 1.0, 1.0), (24, 24, 24), 40), dataset_json(("MRI",), 2))
    for configuration in small.configurations.values():
        dataset_voxels = 24**3 * 40
        cap = round(dataset_voxels * 0.05 / math.prod(configuration.patch_size))
        assert configuration.batch_size == max(cap, 2)
    # one case: the cap rounds to 0, the batch stays at the minimum of 2
    single = make_plan(uniform_fingerprint((1.0, 1.0, 1.0), (24, 24, 24), 1), dataset_json(("MRI",), 2))
    assert {c.batch_size for c in single.configurations.values()} == {2}


def test_lowres_cascade_and_configuration_choice(tmp_path):
    fingerprint = uniform_fingerprint((1.0, 0.833, 0.833), (300, 480, 480), 50, ("CT",))
    plan = make_plan(fingerprint, dataset_json(("CT",), 2))
    fullres, lowres = plan.configuration("3d_fullres"), plan.configuration("3d_lowres")
    assert all(lo > hi for lo, hi in zip(lowres.spacing, fullres.spacing))
    assert fullres.previous_stage is None and lowres.previous_stage is None
    # the cascade: 3d_fullres's data, patch and network plus one one-hot input per foreground class
    cascade = plan.configuration("3d_cascade_fullres")
    assert list(plan.configurations) == ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    assert cascade.previous_stage == "3d_lowres" and cascade.preprocessed_data == "3d_fullres"
    assert cascade.data_name == "3d_fullres" and fullres.data_name == "3d_fullres"
    assert cascade.topology.in_channels == fullres.topology.in_channels + 1
    assert cascade.topology == dataclasses.replace(fullres.topology, in_channels=2)
    assert (cascade.patch_size, cascade.batch_size, cascade.spacing) == (fullres.patch_size, fullres.batch_size,
                                                                         fullres.spacing)
    assert fullres.estimated_memory_gb < cascade.estimated_memory_gb < fullres.estimated_memory_gb * 1.05
    assert configuration_hash(plan, "3d_cascade_fullres") == configuration_hash(plan, "3d_fullres")
    assert load_plan(save_plan(plan, tmp_path / "plan.json")) == plan
    # asking for the cascade alone plans what it stands on
    only_cascade = make_plan(fingerprint, dataset_json(("CT",), 2), configurations=["3d_cascade_fullres"])
    assert set(only_cascade.configurations) == {"3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    # the low-resolution patch covers at least a quarter of its median image, full resolution less
    assert math.prod(lowres.patch_size) / math.prod(lowres.median_shape) >= 0.25 - 0.01
    assert math.prod(fullres.patch_size) / math.prod(fullres.median_shape) < 0.25
    only_fullres = make_plan(fingerprint, dataset_json(("CT",), 2), configurations=["3d_fullres"])
    assert list(only_fullres.configurations) == ["3d_fullres"]
    assert only_fullres.configuration("3d_fullres").previous_stage is None
    only_lowres = make_plan(fingerprint, dataset_json(("CT",), 2), configurations=["3d_lowres"])
    assert list(only_lowres.configurations) == ["3d_lowres"]
    assert only_lowres.configuration("3d_lowres") == lowres
    # small images need no low-resolution stage
    small = make_plan(uniform_fingerprint((1.0, 1.0, 1.0), (36, 50, 35), 10), dataset_json(("MRI",), 2))
    assert "3d_lowres" not in small.configurations and "3d_cascade_fullres" not in small.configurations
    assert any(d.key == "configuration" and "not needed" in d.reason for d in small.decisions)


def test_ct_priors(examples):
    plan = plan_for(examples, "ct", ct_priors=True)
    for configuration in plan.configurations.values():
        assert configuration.ct_priors == CT_PRIOR_WINDOWS
        assert configuration.topology.in_channels == 1 + 3
    assert [(w.name, w.low, w.high) for w in CT_PRIOR_WINDOWS] == [
        ("lung", -1000.0, -400.0), ("soft_tissue", -100.0, 100.0), ("bone", 400.0, None)]
    mri = plan_for(examples, "mri", ct_priors=True)
    assert all(c.ct_priors == () and c.topology.in_channels == 4 for c in mri.configurations.values())


@pytest.mark.parametrize(("preset", "gb"), [("resenc-m", 8.0), ("resenc-l", 24.0)])
def test_residual_encoder_presets(examples, preset, gb):
    plan = plan_for(examples, "ct", preset=preset)
    assert plan.gpu_memory_gb == gb
    topology = plan.configuration("3d_fullres").topology
    assert topology.arch == "resenc"
    assert topology.n_conv_per_stage[:4] == (1, 3, 4, 6)
    assert set(topology.n_conv_per_stage_decoder) == {1}
    for configuration in plan.configurations.values():
        assert configuration.estimated_memory_gb <= memory_budget_bytes(configuration.dim, gb) / GIB


def test_cpu_preset_plans_a_small_unet_within_its_budget(examples):
    default = plan_for(examples, "ct", configurations=["3d_fullres"]).configuration("3d_fullres")
    plan = plan_for(examples, "ct", preset="cpu", configurations=["3d_fullres"])
    configuration = plan.configuration("3d_fullres")
    assert plan.gpu_memory_gb == 2.0
    assert configuration.topology.arch == "unet"
    assert configuration.topology.features_per_stage[0] == 8
    assert max(configuration.topology.features_per_stage) <= 128
    assert configuration.estimated_memory_gb <= memory_budget_bytes(3, 2.0) / GIB
    # same pooling rules, so the same anisotropic topology as the GPU plan
    assert configuration.topology.kernel_sizes[0] == default.topology.kernel_sizes[0]


def test_cpu_preset_caps_the_batch_where_a_gpu_plan_would_grow_it(examples):
    """On a CPU a step's time grows with the batch: the cpu preset stops at CPU_MAX_BATCH."""
    _, fingerprint, dataset = examples["ct"]
    many = dataclasses.replace(fingerprint, cases=fingerprint.cases * 20)  # 60 cases: the 5 % cap is large
    plans = {preset: make_plan(many, dataset, preset=preset, configurations=["2d"], gpu_memory_gb=8.0)
             for preset in (None, "cpu")}
    assert plans[None].configuration("2d").batch_size > CPU_MAX_BATCH  # the same budget, no such cap
    assert plans["cpu"].configuration("2d").batch_size == CPU_MAX_BATCH
    decision = next(d for d in plans["cpu"].decisions if d.key == "batch_size")
    assert f"at most {CPU_MAX_BATCH}" in decision.reason
    few = make_plan(fingerprint, dataset, preset="cpu", configurations=["2d"]).configuration("2d")
    assert few.batch_size < CPU_MAX_BATCH  # 3 cases: the dataset fraction decides, as before


def test_every_registered_architecture_can_be_planned(examples):
    from autoseg.networks import available_networks

    for arch in available_networks():
        plan = plan_for(examples, "ct", arch=arch, configurations=["3d_fullres"])
        configuration = plan.configuration("3d_fullres")
        assert configuration.topology.arch == arch
        assert 0 < configuration.estimated_memory_gb <= memory_budget_bytes(3, 8.0) / GIB


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(preset="resenc-xxl"), "unknown preset"),
    (dict(arch="no-such-net"), "unknown network architecture"),
    (dict(configurations=["3d"]), "unknown configuration"),
    (dict(gpu_memory_gb=0.0), "must be > 0"),
    (dict(preset="resenc-m", arch="vnet"), "sets the architecture"),
    (dict(gpu_memory_gb=0.01, arch="vnet"), "raise --gpu-memory-gb"),
])
def test_bad_options_are_rejected(examples, kwargs, message):
    with pytest.raises(PlanError, match=message):
        plan_for(examples, "ct", **kwargs)


def test_fingerprint_of_another_dataset_is_rejected(examples):
    _, fingerprint, _ = examples["ct"]
    with pytest.raises(PlanError, match="differ from dataset.json"):
        make_plan(fingerprint, examples["mri"][2])


@pytest.mark.parametrize(("name", "scheme"), [
    ("CT", "ct"), ("ct_arterial", "ct"), ("T2", "zscore"), ("FLAIR", "zscore"), ("noNorm", "none"),
    ("rescale_to_0_1", "rescale01"), ("rgb_to_0_1", "rescale01"), ("zscore", "zscore"),
])
def test_normalization_from_the_channel_name(examples, name, scheme):
    _, fingerprint, _ = examples["ct"]
    normalization, reason = normalization_for_channel(name, fingerprint.channels[0], 0.9)
    assert normalization.scheme == scheme and name in reason
    assert not normalization.use_nonzero_mask
    if scheme == "zscore":
        assert normalization_for_channel(name, None, 0.5)[0].use_nonzero_mask


def test_explain_lists_every_decision_with_its_reason(examples):
    plan = plan_for(examples, "ct")
    text = explain_plan(plan)
    assert text.splitlines()[0].split() == ["configuration", "decision", "value", "reason"]
    patch = "x".join(map(str, plan.configuration("3d_fullres").patch_size))
    assert patch in text
    for decision in plan.decisions:
        assert decision.key in text
        assert decision.reason.split()[0] in text
    assert "10th percentile" in text  # why the slow axis is finer
    assert all(len(line) <= 115 for line in text.splitlines())


def test_plan_dataset_writes_the_work_folder_and_reuses_the_fingerprint(examples, tmp_path):
    folder, _, _ = examples["ct"]
    work = tmp_path / "work"
    start = time.perf_counter()
    plan = plan_dataset(folder, work, n_jobs=1, progress=False)
    first = time.perf_counter() - start
    assert load_plan(work) == plan
    assert json.loads((work / "dataset.json").read_text()) == json.loads((folder / "dataset.json").read_text())
    assert plan.decisions[0].key == "fingerprint" and plan.decisions[0].value == "computed"
    again = plan_dataset(folder, work, n_jobs=1, progress=False)
    assert again.decisions[0].value == "reused"
    assert again.configurations == plan.configurations
    assert first < 60  # "a few seconds" on a normal machine; generous for a shared test runner


def test_hand_broken_plan_is_rejected(examples, tmp_path):
    path = save_plan(plan_for(examples, "ct"), tmp_path / "plan.json")
    data = json.loads(path.read_text())
    data["configurations"]["3d_fullres"]["patch_size"][1] += 1
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="not a multiple of the network's total stride"):
        load_plan(path)


def test_hand_broken_cascade_is_rejected(tmp_path):
    fingerprint = uniform_fingerprint((1.0, 0.833, 0.833), (300, 480, 480), 50, ("CT",))
    path = save_plan(make_plan(fingerprint, dataset_json(("CT",), 3)), tmp_path / "plan.json")
    good = json.loads(path.read_text())
    assert good["configurations"]["3d_cascade_fullres"]["topology"]["in_channels"] == 1 + 2

    def broken(change) -> str:
        data = json.loads(json.dumps(good))
        change(data["configurations"])
        path.write_text(json.dumps(data))
        with pytest.raises(PlanError) as error:
            load_plan(path)
        return str(error.value)

    def channels(c):
        c["3d_cascade_fullres"]["topology"]["in_channels"] = 2
    assert "a cascade stage takes 3 (1 image/prior channel(s) + 2 one-hot channel(s)" in broken(channels)

    def no_previous(c):
        del c["3d_lowres"]
    assert "follows '3d_lowres', which the plan does not have" in broken(no_previous)

    def other_spacing(c):
        c["3d_cascade_fullres"]["spacing"][0] = 2.0
    assert "shares the preprocessed data of '3d_fullres' but its spacing differ" in broken(other_spacing)

    def plain_with_extra(c):
        c["3d_fullres"]["topology"]["in_channels"] = 3
    assert "topology.in_channels is 3 but there are 1 channel(s)" in broken(plain_with_extra)

    old = json.loads(json.dumps(good))
    old["schema_version"] = 1
    path.write_text(json.dumps(old))
    with pytest.raises(PlanError, match="re-run `autoseg plan`"):
        load_plan(path)


def test_time_budget_sets_the_epochs_from_a_probe():
    fingerprint = uniform_fingerprint((1.0, 0.5, 0.5), (1, 48, 40), 20)  # small 2D images: a quick probe
    start = time.perf_counter()
    plan = make_plan(fingerprint, dataset_json(("MRI",), 2), time_budget_hours=0.5, probe_max_seconds=3.0)
    assert time.perf_counter() - start < 30  # the probe is bounded on the CPU
    configuration = plan.configuration("2d")
    (decision,) = [d for d in plan.decisions if d.key == "epochs"]
    seconds = float(decision.reason.split("s/iteration")[0].split()[-1])  # printed to 4 digits
    assert configuration.schedule.epochs == pytest.approx(epochs_for_time_budget(0.5, 250, seconds), rel=0.01, abs=1)
    assert 1 <= configuration.schedule.epochs < 1000


@pytest.mark.parametrize(("hours", "seconds", "expected"), [
    (1.0, 1.0, math.floor(3600 / (250 * 1.15))),
    (0.001, 10.0, 1),  # never below one epoch
    (24.0, 0.1, math.floor(24 * 3600 / (250 * 0.1 * 1.15))),
])
def test_epochs_for_time_budget(hours, seconds, expected):
    assert epochs_for_time_budget(hours, 250, seconds) == expected


def test_time_budget_must_be_positive(examples):
    with pytest.raises(PlanError, match="time budget"):
        plan_for(examples, "2d", time_budget_hours=0.0)


def test_verify_memory_needs_cuda(examples):
    plan = plan_for(examples, "2d")
    if torch.cuda.is_available():
        pytest.skip("covered by test_verify_memory_on_cuda")
    with pytest.raises(PlanError, match="CUDA"):
        verify_memory(plan, "2d", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_verify_memory_on_cuda(examples):
    plan = plan_for(examples, "ct")
    for name in plan.configurations:
        check = verify_memory(plan, name, device="cuda")
        assert check.measured_gb > 0
        # the stated tolerance of the network-based estimate
        assert 0.5 < check.ratio < 1.5, str(check)


def test_plan_file_round_trips(examples, tmp_path: Path):
    plan = plan_for(examples, "mri")
    assert load_plan(save_plan(plan, tmp_path / "plan.json")) == plan


def test_rare_classes_get_cross_entropy_weight_and_foreground_oversampling(examples):
    _, fingerprint, _ = examples["ct"]
    plan = plan_for(examples, "ct")
    voxels = [fingerprint.classes[v].voxels for v in (0, 1, 2, 3)]  # background, liver, kidney, lesion
    expected = [round(min(MAX_CLASS_WEIGHT, (max(voxels) / v) ** 0.5), 3) for v in voxels]
    for configuration in plan.configurations.values():
        schedule = configuration.schedule
        assert schedule.loss_options == {"ce_class_weights": expected}
        assert schedule.oversample_foreground == OVERSAMPLE_FOREGROUND > 0.33
    assert expected[0] == 1.0 and expected[1] < expected[2] < expected[3]  # the rarer, the heavier
    mri = plan_for(examples, "mri")  # regions: each output has its own binary cross-entropy
    assert all("ce_class_weights" not in c.schedule.loss_options for c in mri.configurations.values())


def test_cross_entropy_class_weights_are_capped_and_skip_absent_classes():
    assert cross_entropy_class_weights([10 ** 8, 10 ** 8, 1, 0]) == (1.0, 1.0, MAX_CLASS_WEIGHT, 1.0)
    assert cross_entropy_class_weights([400, 100]) == (1.0, 2.0)


def test_recommended_configuration_follows_the_preset_and_the_voxels(examples):
    """3d_fullres by default; 2d for the cpu preset on thick slices; the only one when one is planned."""
    import doctest

    from autoseg.planning import heuristics

    assert doctest.testmod(heuristics).failed == 0  # the examples in recommended_configuration's docstring
    assert plan_for(examples, "ct").recommended_configuration == "3d_fullres"
    cpu = plan_for(examples, "ct", preset="cpu")
    assert cpu.recommended_configuration == "2d"  # the example CT's slices are > 3x thicker than its pixels
    decision = next(d for d in cpu.decisions if d.key == "recommended_configuration")
    assert decision.value == "2d" and "anisotropic" in decision.reason
    assert plan_for(examples, "mri", preset="cpu").recommended_configuration == "3d_fullres"  # isotropic
    assert plan_for(examples, "2d").recommended_configuration == "2d"
    assert plan_for(examples, "ct", preset="cpu", configurations=["3d_fullres"]).recommended() == "3d_fullres"


def test_recommended_configuration_is_checked_and_old_plans_still_load(examples, tmp_path):
    path = save_plan(plan_for(examples, "ct"), tmp_path / "plan.json")
    data = json.loads(path.read_text())
    data["recommended_configuration"] = "3d_huge"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="recommended_configuration '3d_huge' is not one of"):
        load_plan(path)
    del data["recommended_configuration"]  # a plan written before the field existed
    path.write_text(json.dumps(data))
    old = load_plan(path)
    with pytest.raises(PlanError, match="recommends no configuration.*choose one with -c: 2d, 3d_fullres"):
        old.recommended()


def test_ct_and_mr_channels_get_the_medical_augmentation(examples):
    """The preset follows the channels' normalization; the --augmentation flag of train still overrides it."""
    for kind in ("ct", "mri", "2d"):
        plan = plan_for(examples, kind)
        schemes = {n.scheme for n in next(iter(plan.configurations.values())).normalization}
        expected = "medical" if schemes & {"ct", "zscore"} else "default"
        assert {c.schedule.augmentation for c in plan.configurations.values()} == {expected}, kind
        decision = next(d for d in plan.decisions if d.key == "augmentation_preset")
        assert decision.value == expected and decision.reason, kind
    assert plan_for(examples, "ct").configurations["2d"].schedule.augmentation == "medical"
