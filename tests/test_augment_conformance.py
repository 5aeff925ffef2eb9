"""The contract every registered augmentation transform keeps, checked per transform.

Replay from logged parameters is what makes an augmented batch reproducible and debuggable, so each
transform must: sample plain JSON from a seeded generator (same seed, same parameters), apply them
bit-exactly again (also after a JSON round trip), keep the patch shape and the dtypes, never give
a label map a value it did not have, and keep a cascade stage's one-hot channels one-hot.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_augment import (
    ALL_ON,
    CT,
    MRI,
    assert_one_hot,
    cascade_batch,
    make_cascade_configuration,
    make_configuration,
    random_batch,
)

from autoseg.training.augment import (
    Augmentation,
    InPlaceTransform,
    available_transforms,
    build_augmentation,
    get_transform,
    register_transform,
    replay,
    sampled_transforms,
    unregister_transform,
)

# every transform forced on; small cascade radii so tiny patches are neither emptied nor flooded
OPTIONS = {**ALL_ON, "cascade_operator_radius": (1, 2)}
CONFIGURATIONS = {
    "2d": make_configuration((32, 32), spacing=(1.0, 0.8, 0.8)),
    "3d": make_configuration((12, 20, 20), spacing=(1.5, 1.0, 1.0)),
    "dummy_2d": make_configuration((4, 32, 32), spacing=(5.0, 0.8, 0.8)),
    "cascade_2d": make_cascade_configuration((16, 16)),
    "cascade_3d": make_cascade_configuration((8, 16, 16), channels=(CT, MRI)),
}
SEEDS = range(6)


def augmentation_for(config_name: str) -> Augmentation:
    return build_augmentation(CONFIGURATIONS[config_name], "medical", OPTIONS)


def batch_for(augmentation: Augmentation, seg_dtype: type, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    make = cascade_batch if augmentation.cascade_channels else random_batch
    data, seg = make(augmentation, 2, rng)
    # the int16 labels are -1..3; shifted for an unsigned label map
    return data, (seg if seg_dtype == np.int16 else (seg + 1).astype(seg_dtype))


def sampled_ops(name: str, config_name: str, seed: int) -> list[dict]:
    """What the transform registered as ``name`` draws for one sample of the configuration."""
    return get_transform(name)(augmentation_for(config_name).context).sample(np.random.default_rng(seed))


def with_first_op(name: str, ops: list[dict]) -> list[dict]:
    """``ops`` as a whole sample: a centred crop first unless the transform sets the output shape."""
    return ops if get_transform(name).sets_output_shape else [{"op": "crop"}, *ops]


def test_every_sampled_transform_is_registered_once_and_crop_is_the_fallback():
    names = [cls.name for cls in sampled_transforms()]
    assert len(names) == len(set(names))
    assert set(available_transforms()) == set(names) | {"crop"}
    assert sampled_transforms()[0].sets_output_shape  # the first op brings the input to the patch size


def test_sampling_order_is_pinned():
    """The order of draws within a sample: changing it changes every augmented batch of a seed,
    so runs would stop being reproducible against earlier results."""
    assert [cls.name for cls in sampled_transforms()] == [
        "spatial", "ct_tissue_remap", "bias_field", "metal_streaks", "gaussian_noise", "poisson_noise",
        "gaussian_blur", "brightness", "contrast", "low_resolution", "gamma", "mirror", "rot90",
        "binary_operator", "remove_component"]


@pytest.mark.parametrize("name", available_transforms())
def test_sampling_is_seeded_plain_json(name):
    drawn = 0
    for config_name in CONFIGURATIONS:
        for seed in SEEDS:
            ops = sampled_ops(name, config_name, seed)
            assert ops == sampled_ops(name, config_name, seed)
            assert json.loads(json.dumps(ops)) == ops  # plain JSON: no numpy scalars, no tuples
            assert all(op["op"] == name for op in ops)
            drawn += len(ops)
    assert drawn > 0, f"{name} never fired with every probability at 1"


@pytest.mark.parametrize("seg_dtype", [np.int16, np.uint8])
@pytest.mark.parametrize("name", available_transforms())
def test_replay_is_exact_and_keeps_shapes_dtypes_and_labels(name, seg_dtype):
    exercised = 0
    for config_name in CONFIGURATIONS:
        augmentation = augmentation_for(config_name)
        rng = np.random.default_rng(len(config_name))
        data, seg = batch_for(augmentation, seg_dtype, rng)
        samples = [sampled_ops(name, config_name, seed) for seed in SEEDS]
        samples = [ops for ops in samples if ops][:2]
        if len(samples) < 2:
            continue
        exercised += 1
        params = [{"input_shape": list(data.shape[2:]), "output_shape": list(augmentation.patch_size),
                   "ops": with_first_op(name, ops)} for ops in samples]
        data_before, seg_before = data.copy(), seg.copy()
        out, out_seg = replay(data, seg, params)
        again, again_seg = replay(data, seg, params)
        from_json, from_json_seg = replay(data, seg, json.loads(json.dumps(params)))
        for other, other_seg in ((again, again_seg), (from_json, from_json_seg)):
            assert other.tobytes() == out.tobytes() and other_seg.tobytes() == out_seg.tobytes()
        assert out.shape == (*data.shape[:2], *augmentation.patch_size) and out.dtype == np.float32
        assert out_seg.shape == (seg.shape[0], 1, *augmentation.patch_size) and out_seg.dtype == seg_dtype
        assert np.isfinite(out).all()
        for b in range(len(params)):
            assert set(np.unique(out_seg[b])) <= set(np.unique(seg[b])), (name, config_name)
        if augmentation.cascade_channels:
            assert_one_hot(out[:, list(augmentation.cascade_channels)])
        # the caller's arrays (memory-mapped cases in training) are never written to
        np.testing.assert_array_equal(data, data_before)
        np.testing.assert_array_equal(seg, seg_before)
    assert exercised > 0, f"{name} fired for no configuration"


class Negate(InPlaceTransform):
    """A toy plugin transform: negates every normalized channel (when brightness is on)."""

    def sample(self, rng: np.random.Generator) -> list[dict]:
        fired = self.settings.p_brightness > 0 and rng.random() < self.settings.p_brightness
        return [{"op": self.name, "channels": self.context.channels()}] if fired else []

    @classmethod
    def apply_to_image(cls, image: np.ndarray, op: dict) -> None:
        image[op["channels"]] *= -1.0


def test_a_registered_plugin_is_sampled_in_its_order_and_replayed():
    register_transform("negate", order=115)(Negate)
    try:
        augmentation = augmentation_for("2d")  # p_brightness = 1: negate always fires
        data, seg = random_batch(augmentation, 3, np.random.default_rng(0))
        out, out_seg, params = augmentation(data, seg, np.random.default_rng(1))
        for p in params:
            names = [op["op"] for op in p["ops"]]
            # drawn after gamma (order 110), before mirror (order 120)
            assert names.index("negate") == len(names) - names[::-1].index("gamma")
            assert names[names.index("negate") + 1] == "mirror"
        replayed, replayed_seg = replay(data, seg, json.loads(json.dumps(params)))
        assert replayed.tobytes() == out.tobytes() and replayed_seg.tobytes() == out_seg.tobytes()
        only = [{"input_shape": list(data.shape[2:]), "output_shape": [32, 32],
                 "ops": [{"op": "crop"}, {"op": "negate", "channels": [0]}]}] * 3
        cropped, _ = replay(data, seg, [{**only[0], "ops": [{"op": "crop"}]}] * 3)
        negated, _ = replay(data, seg, only)
        np.testing.assert_array_equal(negated[:, 0], -cropped[:, 0])
        np.testing.assert_array_equal(negated[:, 1], cropped[:, 1])
        with pytest.raises(ValueError, match="clashes"):
            register_transform("negate_again", order=115)(type("Other", (Negate,), {}))
        with pytest.raises(ValueError, match="clashes"):
            register_transform("gamma", order=None)(type("Other", (Negate,), {}))
    finally:
        unregister_transform("negate")
    assert "negate" not in available_transforms()
    with pytest.raises(ValueError, match="unknown augmentation op 'negate'"):
        replay(data, seg, only)
