"""X-ray: the example radiographs, the planner's radiograph branch, and what the anatomical prior learns.

The conformance of the prior wrapper around every architecture is in ``tests/test_networks.py``;
the measurement on the full pipeline is ``tests/benchmarks/xray_prior.py`` (numbers in the README).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from autoseg.dataset import load_dataset_json
from autoseg.examples import EXAMPLE_KINDS, example_case, make_example
from autoseg.fingerprint import compute_fingerprint, modality_from_name
from autoseg.networks import PRIOR_OPTION, AnatomicalPriorNetwork, build_network
from autoseg.plan import Schedule, Topology, load_plan, save_plan
from autoseg.planning import anatomical_prior_for, explain_plan, make_plan
from autoseg.planning.heuristics import XRAY_ANATOMICAL_PRIOR
from autoseg.training.labels import IGNORE_INDEX, LabelInfo
from autoseg.training.losses import anatomical_prior_loss, build_loss, prior_loss_term
from autoseg.validate import validate_dataset

_BENCHMARK = Path(__file__).parent / "benchmarks" / "xray_prior.py"
_spec = importlib.util.spec_from_file_location("xray_prior", _BENCHMARK)
xray_prior = importlib.util.module_from_spec(_spec)
sys.modules["xray_prior"] = xray_prior
_spec.loader.exec_module(xray_prior)
implausible_islands = xray_prior.implausible_islands

LABELS = dict(EXAMPLE_KINDS["xray"].labels)


@pytest.fixture(scope="module")
def xray_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    dest = tmp_path_factory.mktemp("xray") / "dataset"
    start = time.perf_counter()
    make_example(dest, kind="xray", num_cases=4, seed=0)
    return dest, time.perf_counter() - start


def test_make_example_xray_is_quick_and_valid(xray_dataset) -> None:
    folder, seconds = xray_dataset
    assert seconds < 10, f"{seconds:.1f} s for 4 radiographs"
    assert validate_dataset(folder) == []
    dataset = load_dataset_json(folder)
    assert dataset.channel_list == ["X-ray"] and dataset.file_ending == ".png"


@pytest.mark.parametrize(("name", "modality"), [
    ("CR", "xray"), ("DX", "xray"), ("X-ray", "xray"), ("xray", "xray"), ("XRAY", "xray"),
    ("radiograph", "xray"), ("chest_X_ray", "xray"), ("Xray_PA", "xray"),
    ("x", "other"), ("ray", "other"), ("CT", "ct"), ("T1", "mri"),
])
def test_modality_from_name_recognises_radiographs(name: str, modality: str) -> None:
    assert modality_from_name(name) == modality


def test_planner_plans_radiographs_2d_with_per_image_zscore_and_the_prior(xray_dataset, tmp_path: Path) -> None:
    folder, _ = xray_dataset
    fingerprint = compute_fingerprint(folder, n_jobs=1, progress=False)
    plan = make_plan(fingerprint, folder / "dataset.json")
    assert list(plan.configurations) == ["2d"]
    configuration = plan.configurations["2d"]
    (normalization,) = configuration.normalization
    assert normalization.scheme == "zscore" and not normalization.use_nonzero_mask
    assert configuration.schedule.mirror_axes == ()  # a mirrored chest has its heart on the wrong side
    assert (PRIOR_OPTION in configuration.topology.options) == XRAY_ANATOMICAL_PRIOR
    decisions = {d.key: d for d in plan.decisions}
    assert decisions["anatomical_prior"].value == ("on" if XRAY_ANATOMICAL_PRIOR else "off")
    assert "radiograph" in decisions["anatomical_prior"].reason
    assert "anatomical_prior" in explain_plan(plan)
    assert anatomical_prior_for(["ct"])[0] is False and anatomical_prior_for(["mri", "ct"])[0] is False
    # the option lives in the topology's options: it round-trips through plan.json, and a plan
    # written before it existed (no such key) still loads and builds the plain network
    assert load_plan(save_plan(plan, tmp_path / "plan.json")) == plan
    network = build_network(configuration)
    assert isinstance(network, AnatomicalPriorNetwork) == XRAY_ANATOMICAL_PRIOR
    options = {k: v for k, v in configuration.topology.options.items() if k != PRIOR_OPTION}
    assert not isinstance(build_network(configuration.topology, options=options), AnatomicalPriorNetwork)


def test_implausible_islands_counts_components_away_from_the_reference() -> None:
    ref = np.zeros((8, 8), int)
    ref[2:6, 1:4] = 1
    pred = ref.copy()
    pred[0, 7] = pred[7, 7] = 1  # two islands
    pred[6, 1] = 1  # touches the reference's lung through its own component: not an island
    pred[1, 6] = 2  # a structure the reference does not have: every component counts
    assert implausible_islands(pred, ref, [1, 2]) == {1: 2, 2: 1}
    assert implausible_islands(ref, ref, [1, 2]) == {1: 0, 2: 0}


def test_prior_loss_scores_the_fraction_each_cell_covers() -> None:
    target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    target[..., :4, :] = 1  # the top half is class 1
    perfect = torch.full((1, 2, 2, 2), -20.0)
    perfect[:, 1, 0], perfect[:, 0, 1] = 20.0, 20.0  # cell rows: class 1 on top, background below
    assert float(anatomical_prior_loss(perfect, target, regions=False)) < 1e-6
    assert float(anatomical_prior_loss(-perfect, target, regions=False)) > 10
    # regions (sigmoid outputs): the target's channels are the structures, and ignored pixels
    # (IGNORE_INDEX) leave the cells they fall in
    regions = torch.cat([target, 1 - target], dim=1)
    regions[..., 4:, :4] = IGNORE_INDEX
    region_logits = torch.full((1, 2, 2, 2), -20.0)
    region_logits[:, 0, 0], region_logits[:, 1, 1] = 20.0, 20.0
    assert float(anatomical_prior_loss(region_logits, regions, regions=True)) < 1e-6
    # a network without a prior adds nothing
    plain = build_network(_topology(prior=False))
    assert prior_loss_term(plain, target, LabelInfo.from_labels({"background": 0, "a": 1})) == 0.0


# --- learning: the prior alone, and the fused network against the plain one at equal training -----------

SIZE = 64  # radiographs shrunk to 64x64 so that two trainings take seconds on one core


def _topology(prior: bool, num_classes: int = 5) -> Topology:
    return Topology(arch="unet", dim=2, in_channels=1, num_classes=num_classes, features_per_stage=(8, 16, 32, 32),
                    kernel_sizes=((3, 3),) * 4, strides=((1, 1),) + ((2, 2),) * 3, n_conv_per_stage=(2,) * 4,
                    n_conv_per_stage_decoder=(1,) * 3, deep_supervision=True,
                    options={PRIOR_OPTION: {"downsample": 4}} if prior else {})


def _radiographs(indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for index in indices:
        case = example_case("xray", index, seed=0)
        zoom = (SIZE / case.label.array.shape[0], SIZE / case.label.array.shape[1])
        image = ndimage.zoom(case.images[0].array.astype(np.float32), zoom, order=1)
        images.append((image - image.mean()) / image.std())  # the planner's per-image z-score
        labels.append(ndimage.zoom(case.label.array, zoom, order=0))
    return torch.tensor(np.stack(images))[:, None], torch.tensor(np.stack(labels).astype(np.int64))[:, None]


def _train(prior: bool, images: torch.Tensor, labels: torch.Tensor, iterations: int = 80) -> torch.nn.Module:
    """The training loop's loss (fused outputs with deep supervision, plus the prior's own term)."""
    torch.manual_seed(0)
    topology = _topology(prior)
    network = build_network(topology).train()
    label_info = LabelInfo.from_labels(LABELS)
    loss_function = build_loss(Schedule(), topology, label_info)
    # Adam rather than the trainer's SGD: the same comparison in a few seconds
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(iterations):
        batch = torch.randperm(len(images), generator=generator)[:4]
        loss = loss_function(network(images[batch]), labels[batch]) + \
            prior_loss_term(network, labels[batch], label_info)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return network.eval()


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(2 * (pred & ref).sum() / max(pred.sum() + ref.sum(), 1))


def test_prior_learns_the_lungs_and_the_fused_network_has_fewer_islands() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fair on a shared machine
    try:
        images, labels = _radiographs(range(8))
        test_images, test_labels = _radiographs(range(8, 12))
        plain, fused = _train(False, images, labels), _train(True, images, labels)
        with torch.no_grad():
            plain_pred = plain(test_images).argmax(1).numpy()
            fused_pred = fused(test_images).argmax(1).numpy()
            prior = fused.prior_probabilities(test_images).numpy()
    finally:
        torch.set_num_threads(threads)
    reference = test_labels[:, 0].numpy()
    lungs = (reference == LABELS["right_lung"]) | (reference == LABELS["left_lung"])
    # the prior alone, from an image down-sampled 4x: where the lung fields are
    prior_lungs = (prior[:, LABELS["right_lung"]] + prior[:, LABELS["left_lung"]]) > 0.5
    prior_dice = np.mean([_dice(p, r) for p, r in zip(prior_lungs, lungs)])
    assert prior_dice > 0.5, f"the prior alone reaches lung Dice {prior_dice:.3f}"

    def islands(predictions: np.ndarray) -> int:
        return sum(sum(implausible_islands(p, r, range(1, 5)).values()) for p, r in zip(predictions, reference))

    def lung_dice(predictions: np.ndarray) -> float:
        return float(np.mean([_dice(np.isin(p, (1, 2)), r) for p, r in zip(predictions, lungs)]))

    # equal training, both networks found the lungs: the fused one leaves fewer islands
    assert lung_dice(plain_pred) > 0.7 and lung_dice(fused_pred) > 0.7
    assert islands(fused_pred) < islands(plain_pred), (islands(fused_pred), islands(plain_pred))


def test_prior_network_exports_to_onnx_with_dynamic_sizes(tmp_path: Path) -> None:
    """Export keeps working: the fused network traced once serves other tile sizes too."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from autoseg.inference.export import _to_onnx

    torch.manual_seed(0)
    network = build_network(_topology(prior=True), deep_supervision=False).eval()
    example = torch.randn(2, 1, 64, 64)
    _to_onnx(network, example, tmp_path / "network.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "network.onnx"))
    for tile in (example, torch.cat([example, example.flip(-1)], dim=-1)):
        got = session.run(None, {session.get_inputs()[0].name: tile.numpy()})[0]
        with torch.no_grad():
            expected = network(tile).numpy()
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-3
