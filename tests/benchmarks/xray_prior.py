"""Measurement: the anatomical prior on the X-ray example, with few and with more training cases (not a test).

Usage::

    taskset -c 1 nice -n 19 python tests/benchmarks/xray_prior.py -o xray_prior.json
    python tests/benchmarks/xray_prior.py --train-cases 8 --iterations 100    # a quick look

The example radiographs (``autoseg.examples.make_example(kind="xray")``, seed 0) are generated once
with ``max(--train-cases)`` training cases and ``--test-cases`` held-out ones; a smaller training
set is the first cases of the larger one with the same test set. Each training set is planned
(``--preset cpu``: the plan switches the prior on for radiographs by default) and preprocessed once;
then the same plan trains twice on fold ``all`` with the same seed and the same number of
iterations, once with ``topology.options["anatomical_prior"]`` off and once on (the only
difference). The test cases are predicted with the last checkpoint and scored with
:func:`autoseg.evaluation.evaluate_folders` (Dice, HD95 per structure) and with
:func:`implausible_islands`: connected components of a predicted structure that touch no pixel of
that structure in the reference, counted over all test cases (islands in the background, a lung
field outside the thorax).

Prints one Markdown table and, with ``-o``, writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

CONFIGURATION = "2d"


def implausible_islands(pred: np.ndarray, ref: np.ndarray, values: Iterable[int]) -> dict[int, int]:
    """Per label value: connected components of ``pred == value`` that touch no pixel of ``ref == value``.

    Components are connected through faces, edges and corners (8-connectivity in 2D). A structure
    predicted where the reference has none at all counts every one of its components.

    Example:
        >>> ref = np.zeros((5, 7), int); ref[1:4, 1:3] = 1
        >>> pred = ref.copy(); pred[0, 5] = 1; pred[4, 6] = 1   # two specks away from the lung
        >>> implausible_islands(pred, ref, [1])
        {1: 2}
    """
    structure = ndimage.generate_binary_structure(pred.ndim, pred.ndim)
    out = {}
    for value in values:
        components, count = ndimage.label(pred == value, structure)
        touching = np.unique(components[(ref == value) & (components > 0)])
        out[int(value)] = int(count - touching.size)
    return out


def make_datasets(root: Path, train_cases: list[int], test_cases: int, seed: int) -> dict[int, Path]:
    """The example with the most training cases, and smaller ones made of its first cases."""
    from autoseg.examples import make_example

    largest = max(train_cases)
    full = make_example(root / f"xray_{largest}", kind="xray", num_cases=largest, num_test_cases=test_cases,
                        seed=seed)
    out = {largest: full}
    for n in sorted(set(train_cases) - {largest}):
        subset = root / f"xray_{n}"
        for folder in ("imagesTs", "labelsTs"):
            shutil.copytree(full / folder, subset / folder)
        for folder, suffix in (("imagesTr", "_0000.png"), ("labelsTr", ".png")):
            (subset / folder).mkdir(parents=True)
            for i in range(n):
                shutil.copy2(full / folder / f"chest_{i:03d}{suffix}", subset / folder / f"chest_{i:03d}{suffix}")
        dataset = json.loads((full / "dataset.json").read_text())
        dataset["numTraining"] = n
        (subset / "dataset.json").write_text(json.dumps(dataset, indent=2))
        out[n] = subset
    return out


def prepare(dataset: Path, work: Path) -> None:
    from autoseg.planning import plan_dataset
    from autoseg.preprocessing import preprocess_dataset

    plan_dataset(dataset, work, preset="cpu", progress=False, n_jobs=1)
    preprocess_dataset(work, configurations=[CONFIGURATION], progress=False, n_jobs=1)


def arm_work(work: Path, scratch: Path, prior: bool) -> Path:
    """A work folder with ``work``'s preprocessed data and plan, the prior switched on or off."""
    from autoseg.networks import PRIOR_OPTION

    (scratch / "preprocessed").mkdir(parents=True)
    os.symlink((work / "preprocessed" / CONFIGURATION).resolve(), scratch / "preprocessed" / CONFIGURATION)
    shutil.copy2(work / "dataset.json", scratch / "dataset.json")
    plan = json.loads((work / "plan.json").read_text())
    options = plan["configurations"][CONFIGURATION]["topology"]["options"]
    options.pop(PRIOR_OPTION, None)
    if prior:
        options[PRIOR_OPTION] = True
    (scratch / "plan.json").write_text(json.dumps(plan, indent=2))
    return scratch


def run_arm(scratch: Path, dataset: Path, iterations: int, epochs: int, seed: int) -> dict[str, Any]:
    from autoseg.evaluation import evaluate_folders
    from autoseg.io import read_image
    from autoseg.training import train
    from autoseg.training.loop import TrainOverrides

    started = time.perf_counter()
    overrides = TrainOverrides(epochs=epochs, iterations_per_epoch=max(1, iterations // epochs),
                               validation_iterations=0, seed=seed)
    train(scratch, CONFIGURATION, "all", overrides, device="cpu", workers=0, progress=False,
          num_threads=1, compile_network="off")
    train_seconds = time.perf_counter() - started

    from autoseg.inference import predict_folder

    predictions = scratch / "test_predictions"
    predict_folder(scratch, dataset / "imagesTs", predictions, configuration=CONFIGURATION, folds=["all"],
                   device="cpu", checkpoint="latest", num_workers=0, progress=False)
    result = evaluate_folders(predictions, dataset / "labelsTs", dataset_json=dataset / "dataset.json")
    labels = {name: value for name, value in json.loads((dataset / "dataset.json").read_text())["labels"].items()
              if name != "background"}
    islands = dict.fromkeys(labels, 0)
    for reference in sorted((dataset / "labelsTs").glob("*.png")):
        ref = read_image(reference).array
        pred = read_image(predictions / reference.name).array
        for name, count in zip(labels, implausible_islands(pred, ref, labels.values()).values()):
            islands[name] += count
    per_structure = {name: {"dice": result.summary[name]["dice"]["mean"],
                            "hd95": result.summary[name]["hd95"]["mean"],
                            "islands": islands[name]} for name in labels}
    return {"train_seconds": round(train_seconds, 1), "structures": per_structure,
            "islands_total": sum(islands.values()),
            "mean_dice": float(np.mean([s["dice"] for s in per_structure.values()]))}


def table(results: dict[str, dict[str, Any]]) -> str:
    structures = list(next(iter(results.values()))["structures"])
    head = "| training cases | prior | " + " | ".join(f"Dice {s}" for s in structures) + \
        " | mean Dice | " + " | ".join(f"HD95 {s}" for s in structures) + " | islands (all test cases) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, r in results.items():
        n, arm = key.split("_")
        s = r["structures"]
        lines.append(f"| {n} | {arm} | " + " | ".join(f"{s[x]['dice']:.3f}" for x in structures)
                     + f" | {r['mean_dice']:.3f} | " + " | ".join(f"{s[x]['hd95']:.1f}" for x in structures)
                     + f" | {r['islands_total']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-cases", type=int, nargs="+", default=[8, 40])
    parser.add_argument("--test-cases", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=600, help="training iterations per run")
    parser.add_argument("--epochs", type=int, default=10, help="epochs the iterations are split into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example data")
    parser.add_argument("--train-seed", type=int, default=None, help="seed of the training (default: --seed)")
    parser.add_argument("--root", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)

    root = args.root or Path(tempfile.mkdtemp(prefix="xray_prior_"))
    datasets = make_datasets(root, args.train_cases, args.test_cases, args.seed)
    results: dict[str, dict[str, Any]] = {}
    for n in args.train_cases:
        work = root / f"work_{n}"
        prepare(datasets[n], work)
        for arm, prior in (("plain", False), ("prior", True)):
            scratch = arm_work(work, root / f"run_{n}_{arm}", prior)
            train_seed = args.seed if args.train_seed is None else args.train_seed
            results[f"{n}_{arm}"] = run_arm(scratch, datasets[n], args.iterations, args.epochs, train_seed)
            print(f"{n} cases, {arm}: {json.dumps(results[f'{n}_{arm}'])}", flush=True)
    print(table(results))
    if args.output:
        record = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "load": os.getloadavg(), "results": results}
        args.output.write_text(json.dumps(record, indent=2))
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
