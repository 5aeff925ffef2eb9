"""Conformance suite: every registered architecture, 2D and 3D (isotropic and anisotropic strides).

The suite is parametrised over ``available_networks()`` at collection time, so any architecture
registered by then (including the plugin registered below) must pass every test here.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

from autoseg.networks import (
    AnatomicalPriorNetwork,
    PriorSettings,
    available_networks,
    build_network,
    check_input_size,
    classic_unet_2d_topology,
    count_parameters,
    cumulative_strides,
    describe_network,
    prior_settings,
    register_network,
    resenc_topology,
    valid_input_size,
)
from autoseg.networks.blocks import ResidualBlock
from autoseg.networks.unet import PlainUNet
from autoseg.plan import ChannelNormalization, Configuration, Topology


@register_network("test_prelu_unet")
def build_prelu_unet(topology: Topology) -> PlainUNet:
    """A plugin registered from outside the package: the plain U-Net with PReLU."""
    return PlainUNet(dataclasses.replace(topology, options={**topology.options, "activation": "prelu"}))


ARCHS = available_networks()
BUILT_IN = ("unet", "resenc", "vnet", "unetpp", "attention_unet")


def tiny_topology(case: str, in_channels: int = 1, **options) -> Topology:
    """Three stages of 4, 8, 16 features: ``2d``, ``3d`` (isotropic) or ``3d_aniso`` ((1, 2, 2) strides)."""
    if case == "2d":
        kernels, strides = ((3, 3),) * 3, ((1, 1), (2, 2), (2, 2))
    elif case == "3d":
        kernels, strides = ((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2))
    else:
        kernels, strides = ((1, 3, 3), (3, 3, 3), (3, 3, 3)), ((1, 1, 1), (1, 2, 2), (1, 2, 2))
    return Topology(arch="unet", dim=len(strides[0]), in_channels=in_channels, num_classes=3,
                    features_per_stage=(4, 8, 16), kernel_sizes=kernels, strides=strides,
                    n_conv_per_stage=(2, 2, 2), n_conv_per_stage_decoder=(1, 1), deep_supervision=True,
                    options=options)


INPUT_SIZE = {"2d": (32, 32), "3d": (16, 16, 16), "3d_aniso": (8, 16, 16)}
CASES = tuple(INPUT_SIZE)


def train_step_gradients(net: torch.nn.Module, x: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """One forward/backward with cross-entropy against a random target at every output's size."""
    outputs = net(x)
    generator = torch.Generator().manual_seed(1)
    loss = 0.0
    for output in outputs:
        target = torch.randint(0, num_classes, (output.shape[0], *output.shape[2:]), generator=generator)
        loss = loss + F.cross_entropy(output, target)
    loss.backward()
    return outputs


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_shapes_and_every_parameter_learns(arch: str, case: str) -> None:
    torch.manual_seed(0)
    topology = tiny_topology(case)
    net = build_network(topology, arch=arch).train()
    size = INPUT_SIZE[case]
    x = torch.randn(2, 1, *size)
    outputs = train_step_gradients(net, x, topology.num_classes)

    assert isinstance(outputs, list) and len(outputs) == topology.num_stages - 1
    expected_strides = cumulative_strides(topology)[:-1]
    assert net.output_strides == expected_strides
    for output, stride in zip(outputs, expected_strides):
        assert output.shape == (2, 3, *(s // k for s, k in zip(size, stride)))
        assert torch.isfinite(output).all()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, f"{name} received no gradient"
        assert parameter.grad.abs().sum() > 0, f"{name}'s gradient is zero everywhere"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_single_output_without_deep_supervision(arch: str, case: str) -> None:
    net = build_network(tiny_topology(case), arch=arch)
    x = torch.randn(1, 1, *INPUT_SIZE[case])
    with torch.no_grad():
        assert net.eval()(x).shape == (1, 3, *INPUT_SIZE[case])  # inference: one full-size output
        net.train()
        assert isinstance(net(x), list)
        net.deep_supervision = False
        assert net(x).shape == (1, 3, *INPUT_SIZE[case])
        net.set_deep_supervision(True)
        assert isinstance(net(x), list)
        built_off = build_network(tiny_topology(case), arch=arch, deep_supervision=False).train()
        assert built_off(x).shape == (1, 3, *INPUT_SIZE[case])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_same_weights(arch: str, case: str) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_network(tiny_topology(case), arch=arch).state_dict()

    first, again, other = weights(7), weights(7), weights(8)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(("case", "bad_size", "valid"), [
    ("2d", (30, 32), "28x32 or 32x32"),
    ("3d", (16, 18, 16), "16x16x16 or 16x20x16"),
    ("3d_aniso", (7, 16, 14), "7x16x12 or 7x16x16"),
])
@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_input_size_names_the_valid_sizes(arch: str, case: str, bad_size: tuple, valid: str) -> None:
    net = build_network(tiny_topology(case), arch=arch)
    with pytest.raises(ValueError, match=re.escape(f"valid sizes near it: {valid}")):
        net(torch.zeros(1, 1, *bad_size))


@pytest.mark.parametrize("stem", [{"fusion": "per_channel"}, {"multiscale_stem": True},
                                  {"fusion": "per_channel", "multiscale_stem": True}],
                         ids=["per_channel", "multiscale", "both"])
@pytest.mark.parametrize("arch", ARCHS)
def test_stems_work_in_front_of_every_architecture(arch: str, stem: dict) -> None:
    torch.manual_seed(0)
    topology = tiny_topology("3d_aniso", in_channels=2, **stem)
    net = build_network(topology, arch=arch).train()
    outputs = train_step_gradients(net, torch.randn(2, 2, 8, 16, 16), 3)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 8, 16, 16), (2, 3, 8, 8, 8)]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert "stem" in dict(net.named_children())
    net.deep_supervision = False
    assert net(torch.randn(1, 2, 8, 16, 16)).shape == (1, 3, 8, 16, 16)
    with pytest.raises(ValueError, match="channel"):
        net(torch.randn(1, 1, 8, 16, 16))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_anatomical_prior_wraps_every_architecture(arch: str, case: str) -> None:
    """The prior option: same outputs as the plain network, every parameter (prior included)
    learns, the prior's logits are kept for its own loss, and the fusion never goes below the floor."""
    torch.manual_seed(0)
    topology = tiny_topology(case, anatomical_prior=True)
    net = build_network(topology, arch=arch).train()
    assert isinstance(net, AnatomicalPriorNetwork) and "prior" in dict(net.named_children())
    size = INPUT_SIZE[case]
    x = torch.randn(2, 1, *size)
    outputs = net(x)
    assert net.output_strides == cumulative_strides(topology)[:-1]
    assert [tuple(o.shape) for o in outputs] == [
        (2, 3, *(s // k for s, k in zip(size, stride))) for stride in net.output_strides]
    prior_logits = net.prior_logits
    assert prior_logits is not None and prior_logits.shape[:2] == (2, 3)
    # the prior's own term and the fused outputs' loss reach every parameter
    target = torch.randint(0, 3, (2, *size))
    loss = sum(F.cross_entropy(o, F.interpolate(target[:, None].float(), size=o.shape[2:])[:, 0].long())
               for o in outputs) + F.binary_cross_entropy_with_logits(prior_logits, torch.rand_like(prior_logits))
    loss.backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name} learned nothing"
    with torch.no_grad():
        net.eval()
        fused = net(x)
        plain = net.network(x)
        assert fused.shape == (2, 3, *size)
        # log-prior fusion, bounded: no structure is ever made impossible
        assert torch.all(fused - plain >= math.log(net.settings.floor) - 1e-5)
        assert torch.all(fused - plain <= 1e-5)
        probabilities = net.prior_probabilities(x)
        assert probabilities.shape == (2, 3, *size) and probabilities.min() >= net.settings.floor - 1e-6
        net.deep_supervision = False
        assert net.train()(x).shape == (2, 3, *size)


def test_anatomical_prior_options() -> None:
    assert prior_settings(tiny_topology("2d")) is None
    assert prior_settings(tiny_topology("2d", anatomical_prior=False)) is None
    assert prior_settings(tiny_topology("2d", anatomical_prior=True)) == PriorSettings()
    net = build_network(tiny_topology("3d_aniso", anatomical_prior={"downsample": 8, "floor": 0.1}))
    assert net.prior.pool == (1, 4, 4)  # limited to the total stride (1, 4, 4): every valid size stays valid
    assert net.settings.floor == 0.1
    stemmed = build_network(tiny_topology("3d_aniso", in_channels=2, fusion="per_channel", anatomical_prior=True))
    assert "stem" in dict(stemmed.network.named_children())
    assert stemmed.eval()(torch.randn(1, 2, 8, 16, 16)).shape == (1, 3, 8, 16, 16)
    for options, message in [({"floor": 0.0}, "impossible"), ({"size": 3}, "unknown key"),
                             ("yes", "true, false or a mapping")]:
        with pytest.raises(ValueError, match=message):
            build_network(tiny_topology("2d", anatomical_prior=options))


def test_stem_structure() -> None:
    topology = tiny_topology("3d_aniso", in_channels=3, fusion="per_channel", multiscale_stem=True)
    net = build_network(topology)
    fusion, multiscale = net.stem
    assert len(fusion.branches) == 3  # one encoder per channel
    # thick slices: the first stage's kernel is 1 along z, so are the stem's 3, 5, 7 kernels
    assert [branch[0].kernel_size for branch in multiscale.branches] == [(1, 3, 3), (1, 5, 5), (1, 7, 7)]
    assert net.body.topology.in_channels == 4 and net.topology.in_channels == 3
    with pytest.raises(ValueError, match="fusion"):
        build_network(tiny_topology("2d", fusion="late"))


@pytest.mark.parametrize("case", CASES)
def test_unetpp_nested_supervision_and_pruned_inference(case: str) -> None:
    torch.manual_seed(0)
    topology = tiny_topology(case, unetpp_supervision="nested")
    net = build_network(topology, arch="unetpp").train()
    size = INPUT_SIZE[case]
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        nested = net(x)  # X[0][2], X[0][1]: every nested output is at full resolution
        assert net.output_strides == [(1,) * topology.dim] * 2
        assert [tuple(o.shape) for o in nested] == [(1, 3, *size)] * 2
        net.eval()
        assert torch.allclose(net(x), nested[0], atol=1e-5)
        net.set_pruned_depth(1)  # only X[0][0], X[1][0] and X[0][1] are computed
        pruned = net(x)
        assert pruned.shape == (1, 3, *size)
        assert torch.allclose(pruned, nested[1], atol=1e-5)
        net.train()  # pruned inference gives one tensor whatever the mode
        assert torch.allclose(net(x), nested[1], atol=1e-5)
        net.pruned_depth = None
        assert isinstance(net(x), list)
    with pytest.raises(ValueError, match="from 1 to 2"):
        net.set_pruned_depth(3)
    default = build_network(tiny_topology(case), arch="unetpp")
    with pytest.raises(ValueError, match="nested"):
        default.set_pruned_depth(1)
    pruned_from_plan = build_network(topology, arch="unetpp", pruned_depth=1).eval()
    assert pruned_from_plan.pruned_depth == 1


def test_resenc_topology_preset() -> None:
    base = dataclasses.replace(tiny_topology("3d"), features_per_stage=(4, 8, 16))
    topology = resenc_topology(base)
    assert topology.arch == "resenc"
    assert topology.n_conv_per_stage == (1, 3, 4) and topology.n_conv_per_stage_decoder == (1, 1)
    net = build_network(topology)
    blocks = [sum(isinstance(m, ResidualBlock) for m in stage.modules()) for stage in net.encoder.stages]
    assert blocks == [1, 3, 4]
    five = dataclasses.replace(base, features_per_stage=(4,) * 8, kernel_sizes=((3, 3, 3),) * 8,
                               strides=((1, 1, 1),) * 8, n_conv_per_stage=(2,) * 8,
                               n_conv_per_stage_decoder=(2,) * 7)
    assert resenc_topology(five).n_conv_per_stage == (1, 3, 4, 6, 6, 6, 6, 6)
    overridden = build_network(tiny_topology("2d", blocks_per_stage=[2, 2, 1]), arch="resenc")
    assert [sum(isinstance(m, ResidualBlock) for m in s.modules()) for s in overridden.encoder.stages] == [2, 2, 1]


def test_vnet_kernels_follow_the_plan() -> None:
    net = build_network(tiny_topology("3d_aniso"), arch="vnet")
    first = net.encoder[0].convs[0][0]
    deeper = net.encoder[1].convs[0][0]
    assert first.kernel_size == (1, 5, 5) and deeper.kernel_size == (5, 5, 5)
    assert isinstance(net.encoder[0].activation, torch.nn.PReLU)
    assert net.downsamples[1][0].stride == (1, 2, 2)


def test_attention_gates_on_every_skip() -> None:
    net = build_network(tiny_topology("3d"), arch="attention_unet")
    assert len(net.decoder.gates) == 2
    skip, gate = torch.randn(1, 4, 16, 16, 16), torch.randn(1, 8, 8, 8, 8)
    coefficients = net.decoder.gates[1].attention(skip, gate)
    assert coefficients.shape == (1, 1, 16, 16, 16)
    assert ((coefficients >= 0) & (coefficients <= 1)).all()


def test_classic_2d_unet_preset() -> None:
    topology = classic_unet_2d_topology()
    assert topology.features_per_stage == (64, 128, 256, 512, 1024)
    params = count_parameters(topology)  # meta device: no 124 MB of weights allocated
    assert abs(params - 31_000_000) <= 1_000_000
    with torch.device("meta"):
        output = build_network(topology).eval()(torch.empty(1, 1, 512, 512))
    assert output.shape == (1, 2, 512, 512)  # padded convolutions: output size == input size
    assert count_parameters(classic_unet_2d_topology(in_channels=3, num_classes=5)) > params


def test_registry() -> None:
    assert set(BUILT_IN) <= set(available_networks())
    assert "test_prelu_unet" in available_networks()
    plugin = build_network(tiny_topology("2d"), arch="test_prelu_unet")
    assert any(isinstance(m, torch.nn.PReLU) for m in plugin.modules())
    with pytest.raises(ValueError, match="unknown network architecture 'nope'; available: attention_unet"):
        build_network(tiny_topology("2d"), arch="nope")
    with pytest.raises(ValueError, match="already registered"):
        register_network("unet")(build_prelu_unet)
    assert register_network("test_prelu_unet")(build_prelu_unet) is build_prelu_unet  # idempotent


def test_build_from_configuration_and_overrides() -> None:
    topology = dataclasses.replace(tiny_topology("3d_aniso"), arch="attention_unet")
    configuration = Configuration(
        name="3d_fullres", spacing=(3.0, 1.0, 1.0), patch_size=(8, 16, 16), batch_size=2,
        median_shape=(20, 64, 64), normalization=(ChannelNormalization(channel="CT", scheme="none"),),
        topology=topology)
    net = build_network(configuration)
    assert type(net).__name__ == "AttentionUNet" and net.topology == topology
    assert type(build_network(configuration, arch="vnet")).__name__ == "VNet"
    net = build_network(configuration, deep_supervision=False, norm="batch")
    assert net.deep_supervision is False and net.topology.options == {"norm": "batch"}
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    with pytest.raises(TypeError, match="Topology or a Configuration"):
        build_network({"arch": "unet"})


@pytest.mark.parametrize(("options", "message"), [
    ({"norm": "layer"}, "options\\['norm'\\]"),
    ({"activation": "gelu"}, "options\\['activation'\\]"),
    ({"multiscale_stem": "yes"}, "multiscale_stem"),
    ({"multiscale_stem": True, "multiscale_kernels": [3, 4]}, "multiscale_kernels"),
])
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_network(tiny_topology("2d", **options))


def test_first_stage_must_not_downsample() -> None:
    topology = dataclasses.replace(tiny_topology("2d"), strides=((2, 2), (2, 2), (2, 2)))
    for arch in BUILT_IN:
        with pytest.raises(ValueError, match="first stage must not downsample"):
            build_network(topology, arch=arch)


@pytest.mark.parametrize(("case", "size", "expected"), [
    ("2d", (32, 32), (32, 32)),
    ("2d", (30, 33), (32, 36)),
    ("2d", (1, 1), (4, 4)),
    ("3d", (17, 16, 9), (20, 16, 12)),
    ("3d_aniso", (7, 13, 16), (7, 16, 16)),
])
def test_valid_input_size(case: str, size: tuple, expected: tuple) -> None:
    topology = tiny_topology(case)
    assert valid_input_size(topology, size) == expected
    check_input_size(topology, expected)


def test_check_input_size_messages() -> None:
    topology = tiny_topology("3d")
    check_input_size(topology, (2, 1, 16, 32, 8))
    with pytest.raises(ValueError, match="has 2 channel"):
        check_input_size(topology, (1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="3D"):
        check_input_size(topology, (16, 16))
    with pytest.raises(ValueError, match="total stride 4x4x4"):
        check_input_size(topology, (15, 16, 16))


def test_describe_network() -> None:
    topology = tiny_topology("3d_aniso")
    text = describe_network(topology, patch_size=(8, 16, 16), batch_size=2, arch="resenc")
    params = count_parameters(topology, arch="resenc")
    assert f"total parameters: {params:,}" in text
    assert "'resenc'" in text and "total stride 1x4x4" in text
    head_rows = [line for line in text.splitlines() if line.startswith("decoder.heads.")]
    assert [line.split()[2] for line in head_rows] == ["3x8x8x8", "3x8x16x16"]  # deepest decoder first
    assert re.search(r"^\s+total\s+[\d.]+ MiB$", text, flags=re.M)
    with pytest.raises(ValueError, match="valid sizes"):
        describe_network(topology, patch_size=(8, 15, 16))
