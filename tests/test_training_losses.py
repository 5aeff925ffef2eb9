"""Targets from raw labels, and the losses: values that could be wrong, gradients, regions, ignore."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_training_support import tiny_topology

from autoseg.plan import Schedule
from autoseg.training.labels import IGNORE_INDEX, LabelError, LabelInfo
from autoseg.training.losses import (
    DeepSupervisionLoss,
    FocalLoss,
    LossConfigError,
    SoftDiceLoss,
    build_loss,
    deep_supervision_weights,
    downsample_target,
    signed_distance,
)

PLAIN = LabelInfo.from_labels({"background": 0, "liver": 1, "tumour": 2})
REGIONS = LabelInfo.from_labels({"background": 0, "whole": (1, 2, 3), "core": (2, 3), "enhancing": 3})


# --- labels ----------------------------------------------------------------------------------------


def test_plain_labels_map_to_sorted_channel_indices() -> None:
    info = LabelInfo.from_labels({"background": 0, "b": 7, "a": 3, "ignore": 9})
    assert info.names == ("background", "a", "b") and info.scored_channels == (1, 2)
    seg = np.array([-1, 0, 3, 7, 9], dtype=np.int16).reshape(1, 1, 5)
    assert info.encode(seg).ravel().tolist() == [0, 0, 1, 2, IGNORE_INDEX]


def test_regions_become_one_binary_map_each() -> None:
    seg = np.array([0, 1, 2, 3, -1], dtype=np.int16).reshape(1, 1, 5)
    target = REGIONS.encode(seg)
    assert target.shape == (1, 3, 5)
    assert target[0].tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0]]
    assert REGIONS.scored_channels == (0, 1, 2)


def test_undeclared_label_values_are_named() -> None:
    with pytest.raises(LabelError, match=r"\[5, 40\] are not declared"):
        PLAIN.encode(np.array([0, 5, 40, 1], dtype=np.int16).reshape(1, 1, 4))


def test_network_size_mismatch_is_explained() -> None:
    with pytest.raises(LabelError, match="is 2 but the dataset has 3 label values"):
        PLAIN.check_network(2)


# --- losses ----------------------------------------------------------------------------------------


def _logits_from(target: torch.Tensor, num_classes: int, scale: float = 30.0) -> torch.Tensor:
    """Logits whose softmax is (almost) the one-hot target."""
    return F.one_hot(target[:, 0].long().clamp_min(0), num_classes).movedim(-1, 1).float() * scale


def _random_target(shape: tuple[int, ...], classes: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, shape, generator=generator).to(torch.int16)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_dice_of_a_perfect_prediction_is_zero_and_of_the_opposite_is_one(batch_dice: bool) -> None:
    target = _random_target((2, 1, 6, 6, 6), 3)
    dice = SoftDiceLoss(regions=False, batch_dice=batch_dice)
    assert dice(_logits_from(target, 3), target).item() == pytest.approx(0.0, abs=1e-4)
    wrong = _logits_from((target + 1) % 3, 3)
    assert dice(wrong, target).item() == pytest.approx(1.0, abs=1e-4)


def test_dice_matches_a_hand_computed_value() -> None:
    # one sample, two classes, 4 voxels: probabilities of class 1 are 0.9, 0.6, 0.2, 0.1
    p1 = torch.tensor([0.9, 0.6, 0.2, 0.1])
    logits = torch.stack([torch.zeros(4), torch.log(p1 / (1 - p1))]).view(1, 2, 4)
    target = torch.tensor([1, 1, 0, 1], dtype=torch.int16).view(1, 1, 4)
    tp = 0.9 + 0.6 + 0.1
    expected = 1 - (2 * tp + 1e-5) / (p1.sum().item() + 3 + 1e-5)
    assert SoftDiceLoss(regions=False)(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 5, 5, generator=generator)
    target = _random_target((2, 1, 5, 5), 3, seed=2)
    weights = [0.5, 1.0, 3.0]
    expected = F.cross_entropy(logits, target[:, 0].long(), weight=torch.tensor(weights))
    assert FocalLoss(False, gamma=0, class_weights=weights)(logits, target).item() == pytest.approx(expected.item())
    assert FocalLoss(False, gamma=2)(logits, target) < FocalLoss(False, gamma=0)(logits, target)


def test_ignored_voxels_do_not_count() -> None:
    target = _random_target((1, 1, 8, 8), 3)
    target[..., :4] = IGNORE_INDEX
    logits = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    changed = logits.clone()
    changed[..., :4] = torch.randn(1, 3, 8, 4) * 10  # only where the target is ignored
    loss = build_loss(Schedule(loss="dice_ce"), tiny_topology(2, num_classes=3), PLAIN)
    assert loss(changed, target).item() == pytest.approx(loss(logits, target).item(), rel=1e-6)


def test_region_loss_uses_sigmoid_per_region() -> None:
    seg = np.random.default_rng(0).integers(0, 4, size=(2, 1, 6, 6)).astype(np.int16)
    target = torch.from_numpy(REGIONS.encode(seg))
    perfect = (target.float() * 2 - 1) * 30  # logit sign = region membership
    loss = build_loss(Schedule(loss="dice_ce"), tiny_topology(2, num_classes=3), REGIONS)
    assert loss(perfect, target).item() == pytest.approx(0.0, abs=1e-4)
    assert loss(-perfect, target).item() > 1.0
    expected_bce = F.binary_cross_entropy_with_logits(torch.zeros(2, 3, 6, 6), target.float())
    ce_only = build_loss(Schedule(loss="ce"), tiny_topology(2, num_classes=3), REGIONS)
    assert ce_only(torch.zeros(2, 3, 6, 6), target).item() == pytest.approx(expected_bce.item())


@pytest.mark.parametrize("name", ["dice_ce", "dice", "ce", "focal", "dice_focal"])
def test_every_loss_has_gradients_towards_the_target(name: str) -> None:
    target = _random_target((2, 1, 8, 8, 8), 3)
    logits = torch.zeros(2, 3, 8, 8, 8, requires_grad=True)
    loss = build_loss(Schedule(loss=name), tiny_topology(3, num_classes=3), PLAIN)
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value) and logits.grad.abs().sum() > 0
    with torch.no_grad():  # one step down the gradient lowers the loss
        assert loss(logits - 10 * logits.grad, target) < value


def test_deep_supervision_weights_halve_and_skip_the_lowest() -> None:
    assert deep_supervision_weights(1) == (1.0,)
    assert deep_supervision_weights(3) == pytest.approx((2 / 3, 1 / 3, 0.0))
    assert deep_supervision_weights(4) == pytest.approx((4 / 7, 2 / 7, 1 / 7, 0.0))


def test_deep_supervision_combines_scales_with_downsampled_targets() -> None:
    target = _random_target((1, 1, 8, 8), 3)
    outputs = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    inner = SoftDiceLoss(regions=False)
    loss = DeepSupervisionLoss(inner, weights=(0.5, 0.3, 0.2))
    expected = sum(w * inner(o, target[..., ::s, ::s]) for w, o, s in zip((0.5, 0.3, 0.2), outputs, (1, 2, 4)))
    assert loss(outputs, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(outputs[0], target).item() == pytest.approx(inner(outputs[0], target).item())
    with pytest.raises(LossConfigError, match="has 3 entries but the network returns 2"):
        loss(outputs[:2], target)


def test_downsampling_keeps_ignore_and_label_values() -> None:
    target = torch.tensor([[0, 1, 2, -1], [1, 1, 2, -1], [2, 2, 0, 0], [-1, 0, 1, 1]], dtype=torch.int16)
    small = downsample_target(target.view(1, 1, 4, 4), (2, 2))
    assert small.dtype == torch.int16 and small.view(2, 2).tolist() == [[0, 2], [2, 0]]


def test_boundary_term_rewards_mass_inside_the_target() -> None:
    mask = np.zeros((1, 1, 9, 9), dtype=bool)
    mask[0, 0, 3:6, 3:6] = True
    distance = signed_distance(mask)
    assert distance[0, 0, 4, 4] < 0 < distance[0, 0, 0, 0]
    target = torch.from_numpy(mask.astype(np.int16))
    schedule = Schedule(loss="ce", loss_options={"boundary": 1.0})
    loss = build_loss(schedule, tiny_topology(2, num_classes=2), LabelInfo.from_labels({"background": 0, "a": 1}))
    good = _logits_from(target, 2, scale=5.0)
    assert loss(good, target) < loss(-good, target)


@pytest.mark.parametrize("schedule, message", [
    (Schedule(loss="lovasz"), "unknown loss 'lovasz'"),
    (Schedule(loss_options={"gamma": 2}), r"unknown loss option\(s\) \['gamma'\]"),
    (Schedule(loss_options={"class_weights": [1, 2]}), "class_weights has 2 entries"),
    (Schedule(loss_options={"ce_class_weights": [1, 2, 3, 4]}), "ce_class_weights has 4 entries"),
])
def test_bad_loss_settings_are_named(schedule: Schedule, message: str) -> None:
    with pytest.raises(LossConfigError, match=message):
        build_loss(schedule, tiny_topology(3, num_classes=3), PLAIN)


def test_class_weights_shift_the_dice_towards_the_heavier_class() -> None:
    target = torch.tensor([1, 1, 2, 2], dtype=torch.int16).view(1, 1, 4)
    logits = _logits_from(torch.tensor([1, 1, 1, 1]).view(1, 1, 4), 3)  # class 2 entirely missed
    light = SoftDiceLoss(False, class_weights=[1.0, 1.0, 0.1])(logits, target)
    heavy = SoftDiceLoss(False, class_weights=[1.0, 0.1, 1.0])(logits, target)
    assert heavy > light


def test_ce_class_weights_weigh_the_cross_entropy_alone() -> None:
    target = torch.tensor([0, 0, 0, 1, 2, 2], dtype=torch.int16).view(1, 1, 6)
    logits = torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(0))
    topology = tiny_topology(3, num_classes=3)
    plain = build_loss(Schedule(), topology, PLAIN).loss.terms
    weighted = build_loss(Schedule(loss_options={"ce_class_weights": [1.0, 5.0, 0.5]}), topology, PLAIN).loss.terms
    assert torch.equal(weighted["dice"](logits, target), plain["dice"](logits, target))
    expected = FocalLoss(False, gamma=0, class_weights=[1.0, 5.0, 0.5])(logits, target)
    assert weighted["ce"](logits, target).item() == pytest.approx(expected.item())
    assert weighted["ce"](logits, target).item() != pytest.approx(plain["ce"](logits, target).item())

