"""Benchmark: ``autoseg predict`` on the example CT dataset, on the CPU (a script, not a test).

Usage::

    python tests/benchmarks/bench_predict.py                      # example CT, 3 test cases
    python tests/benchmarks/bench_predict.py --cases 2 --threads 2 -o predict_bench.json
    python tests/benchmarks/bench_predict.py --work WORK --inputs DIR -c 3d_fullres   # your own model

What is measured, per mode (``tta``: mirroring over every trained axis, ``no_tta``, ``fast``: one
fold, no TTA, step 0.75):

* **cli**: the ``autoseg predict`` command as a user runs it (a fresh process: imports, model
  loading, every case, background preprocessing and export overlapping the network): wall seconds
  per case, and the peak memory of the whole process tree sampled from ``/proc``
  (:func:`autoseg.benchmark.run_measured`: summed RSS and PSS, and the exact ``ru_maxrss`` of the
  largest process).
* **stages**: the same work one step at a time in one process (model loaded before the clock
  starts), so the share of each step is visible: ``preprocess`` (read + :func:`preprocess_case`), ``network``
  (:func:`predict_preprocessed`: sliding window, TTA), ``export`` (label map, post-processing,
  :func:`restore_to_original`, write). nnU-Net's export is often slower than its inference; this
  shows whether ours is.

Without ``--work`` the script makes the example CT dataset (``make_example("ct")``), plans it
(``3d_fullres`` only) and saves an *untrained* network of the planned topology in the trainer's
checkpoint format as fold ``all``: timing and memory do not depend on the weights, so no training
is needed. Numbers depend on the machine and its load; the JSON records both
(:func:`autoseg.benchmark.machine_info`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = {"tta": [], "no_tta": ["--no-tta"], "fast": ["--fast"]}


def make_model(folder: Path, cases: int, configuration: str) -> tuple[Path, Path]:
    """Example CT dataset, its plan, and an untrained fold-``all`` checkpoint; returns (work, inputs)."""
    import torch
    from pydantic import TypeAdapter

    from autoseg.examples import make_example
    from autoseg.networks import build_network
    from autoseg.plan import Schedule, Topology, plan_hash
    from autoseg.planning import plan_dataset
    from autoseg.training.checkpoint import save_checkpoint
    from autoseg.workdir import WorkDir

    dataset = make_example(folder / "ct", "ct", num_cases=4, num_test_cases=cases, seed=0)
    work = folder / "work"
    plan = plan_dataset(dataset, work, progress=False, configurations=[configuration])
    config = plan.configuration(configuration)
    torch.manual_seed(0)
    network = build_network(config.topology)
    save_checkpoint(WorkDir(work).fold(configuration, "all") / "checkpoint_latest.pt", {
        "network": network.state_dict(),
        "topology": TypeAdapter(Topology).dump_python(config.topology, mode="json"),
        "schedule": TypeAdapter(Schedule).dump_python(config.schedule, mode="json"),
        "configuration": configuration, "fold": "all", "plan_hash": plan_hash(plan),
    })
    return work, dataset / "imagesTs"


def stages_worker(params_path: str, result_path: str) -> int:
    """Time each step of every case in this (warm) process; write the result as JSON."""
    import numpy as np
    import torch

    from autoseg.dataset import index_cases, load_case
    from autoseg.inference import FAST_STEP, load_trained_model, predict_preprocessed
    from autoseg.io import file_ending, write_like
    from autoseg.postprocessing import apply_postprocessing, probabilities_to_label_map
    from autoseg.preprocessing import preprocess_case, restore_to_original

    params = json.loads(Path(params_path).read_text())
    torch.set_num_threads(params["threads"])
    fast = params["mode"] == "fast"
    tta = params["mode"] == "tta"
    step = FAST_STEP if fast else 0.5
    model = load_trained_model(params["work"], params["configuration"], folds=None, checkpoint="latest")
    if fast:
        model.folds = model.folds[:1]
    inputs = Path(params["inputs"])
    ending = next(file_ending(p) for p in inputs.iterdir() if not p.name.startswith("."))
    cases = index_cases(inputs, ending, len(model.plan.channel_names)).cases
    output = Path(params["output"])
    rows = []
    # No warm-up case: on the CPU torch has little lazy initialisation, and one more case under TTA
    # costs minutes. The model is loaded before the clock starts.
    for case in cases:
        times: dict[str, Any] = {"case": case.case_id}
        started = time.perf_counter()
        data = load_case(case, load_label=False)
        prepared = preprocess_case(data, model.plan, model.configuration.name)
        times["preprocess"] = time.perf_counter() - started
        started = time.perf_counter()
        probabilities = predict_preprocessed(model, prepared.image, step, tta)
        labels = probabilities_to_label_map(probabilities, model.label_values, model.activation,
                                            model.plan.regions_class_order)
        times["network"] = time.perf_counter() - started
        started = time.perf_counter()
        labels = apply_postprocessing(labels, model.postprocessing)
        restored = restore_to_original(labels, prepared.properties, "label")
        write_like(restored.astype(np.uint8), data.reference, output / f"{case.case_id}{ending}")
        times["export"] = time.perf_counter() - started
        times["input_shape"] = list(data.reference.array.shape)
        times["preprocessed_shape"] = list(prepared.image.shape[1:])
        rows.append(times)
    Path(result_path).write_text(json.dumps({"cases": rows}))
    return 0


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(row[key] for row in rows), 3)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from autoseg.bench.measure import machine_info, run_measured
    from autoseg.plan import load_plan

    folder = Path(args.folder or tempfile.mkdtemp(prefix="autoseg_bench_predict_"))
    if args.work:
        work, inputs = Path(args.work), Path(args.inputs)
    else:
        print(f"making the example CT dataset and an untrained {args.configuration} model in {folder} ...")
        work, inputs = make_model(folder, args.cases, args.configuration)
    config = load_plan(work).configuration(args.configuration)
    num_cases = len({p.name.rsplit("_", 1)[0] for p in inputs.iterdir() if not p.name.startswith(".")})
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    results: dict[str, Any] = {
        "machine": machine_info("cpu"),
        "configuration": args.configuration,
        "patch_size": list(config.patch_size),
        "spacing": list(config.spacing),
        "cases": num_cases,
        "threads": args.threads,
        "weights": "untrained (timing does not depend on them)" if not args.work else str(work),
        "modes": {},
    }
    for mode in args.modes:
        output = folder / f"predictions_{mode}"
        command = [sys.executable, "-m", "autoseg.cli", "predict", str(work), "-i", str(inputs), "-o", str(output),
                   "-c", args.configuration, "--overwrite", "--checkpoint", "latest", *MODES[mode]]
        cli = run_measured(command, env=env)
        if cli.returncode != 0:
            raise SystemExit(f"{mode}: autoseg predict failed ({cli.returncode}):\n{cli.output_tail}")
        params = folder / f"stages_{mode}.json"
        params.write_text(json.dumps({"work": str(work), "inputs": str(inputs), "configuration": args.configuration,
                                      "mode": mode, "threads": args.threads,
                                      "output": str(folder / f"stages_{mode}")}))
        result_path = folder / f"stages_{mode}_result.json"
        staged = run_measured([sys.executable, __file__, "--stages-worker", str(params), str(result_path)], env=env)
        if staged.returncode != 0:
            raise SystemExit(f"{mode}: stage timing failed:\n{staged.output_tail}")
        rows = json.loads(result_path.read_text())["cases"]
        results["modes"][mode] = {
            "cli": {"seconds_total": round(cli.seconds, 2), "seconds_per_case": round(cli.seconds / num_cases, 2),
                    **cli.memory()},
            "stages_median_seconds": {key: _median(rows, key) for key in ("preprocess", "network", "export")},
            "stages_memory": staged.memory(),
            "per_case": rows,
        }
        entry = results["modes"][mode]
        print(f"{mode:>7}: cli {entry['cli']['seconds_per_case']:.1f} s/case (peak tree RSS "
              f"{cli.peak_tree_rss_mb:.0f} MiB, largest process {cli.peak_process_rss_mb:.0f} MiB); warm stages "
              + ", ".join(f"{k} {v:.2f} s" for k, v in entry["stages_median_seconds"].items()))
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--stages-worker":
        return stages_worker(argv[1], argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3, help="example test cases to predict")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch/OpenMP threads")
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--work", default=None, help="a trained work or model folder (default: make one)")
    parser.add_argument("--inputs", default=None, help="with --work: the folder of images to predict")
    parser.add_argument("--folder", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.work and not args.inputs:
        parser.error("--work needs --inputs")
    results = run(args)
    if args.output:
        from autoseg.utils import atomic_write_json

        atomic_write_json(args.output, results)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
