"""The ``autoseg`` command line: a thin layer over the library, one subcommand per stage.

Every subcommand takes explicit paths; nothing is read from environment variables. Each handler
imports its stage lazily so that ``autoseg --help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import sys
import textwrap
import traceback
import zipfile
from collections.abc import Callable
from pathlib import Path

from autoseg.constants import (
    AUGMENTATION_PRESET_NAMES,
    COMPILE_CHOICES,
    CONFIGURATION_NAMES,
    DEFAULT_FILE_ENDING,
    DEFAULT_TOLERANCE_MM,
    EXAMPLE_KIND_NAMES,
    EXPORT_FORMAT_NAMES,
    LOSS_NAMES,
    NETWORK_NAMES,
    OUTPUT_FORMAT_NAMES,
    PLAN_PRESET_NAMES,
    PRECISION_CHOICES,
    RUNTIME_NAMES,
)
from autoseg.errors import AutosegError
from autoseg.processes import sigterm_as_interrupt

EPILOG = """\
typical run:
  autoseg make-example data/ct --kind ct          # or use your own nnU-Net v2 style dataset
  autoseg validate data/ct
  autoseg plan data/ct --work work/ct --explain
  autoseg preprocess work/ct
  autoseg train work/ct -c 3d_fullres -f 0
  autoseg predict work/ct -i new_scans/ -o predictions/ -c 3d_fullres -f 0
  autoseg evaluate predictions/ references/ --dataset-json data/ct/dataset.json
"""


class CommandError(AutosegError):
    """A user-facing failure: printed without a traceback, exit code 1."""


def _precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                        help="autocast precision (auto: bf16 where the device computes it natively, fp16 on "
                             "older CUDA GPUs, else fp32)")


def _device_argument(parser: argparse.ArgumentParser, help: str = "") -> None:
    parser.add_argument("--device", default="auto",
                        help=help or "auto (default: CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps")


def _chosen_device(name: str) -> str:
    """Resolve ``--device`` (``auto`` included) and say at the start of the command what was chosen."""
    from autoseg.devices import describe_device, resolve_device

    device = resolve_device(name)
    print(f"device: {describe_device(device)}" + (" (auto)" if name == "auto" else ""), flush=True)
    return str(device)


def _subcommand(subparsers, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog="example:\n" + textwrap.indent(example.strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _scheduler_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="run the per-case work on a Dask cluster: local:N (N worker processes here) or a "
                             "scheduler address such as tcp://host:8786 (needs autoseg[distributed])")


def _scheduler(args: argparse.Namespace) -> str | None:
    """The ``--scheduler`` value, checked before any work starts."""
    if args.scheduler is None:
        if getattr(args, "devices", None):
            from autoseg.cluster import require_distributed

            require_distributed()
        return None
    from autoseg.cluster import parse_scheduler, require_distributed

    parse_scheduler(args.scheduler)
    require_distributed()
    return args.scheduler


# --- handlers -------------------------------------------------------------------------------------


def _cmd_validate(args: argparse.Namespace) -> int:
    from autoseg.validate import format_report, validate_dataset

    problems = validate_dataset(args.dataset, n_jobs=args.jobs, progress=not args.quiet)
    print(format_report(problems))
    return 1 if any(p.severity == "error" for p in problems) else 0


def _cmd_make_example(args: argparse.Namespace) -> int:
    from autoseg.examples import make_example

    path = make_example(args.dest, kind=args.kind, num_cases=args.num_cases, seed=args.seed,
                        num_test_cases=args.num_test_cases, progress=True)
    print(f"wrote example {args.kind} dataset to {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from autoseg import convert

    if args.spec:
        src, dst = args.paths if len(args.paths) == 2 else (None, None)
        if src is None:
            raise CommandError("usage: autoseg convert --spec SPEC SRC DST")
        out = convert.convert_with_spec(args.spec, src, dst, progress=True)
    else:
        if len(args.paths) != 3 or args.paths[0] != "msd":
            raise CommandError("usage: autoseg convert msd SRC DST   or   autoseg convert --spec SPEC SRC DST")
        out = convert.convert_msd(args.paths[1], args.paths[2], progress=True)
    print(f"converted dataset written to {out}")
    return 0


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    from autoseg.fingerprint import load_or_compute_fingerprint
    from autoseg.workdir import WorkDir

    work = WorkDir.for_dataset(args.dataset, args.work)
    fingerprint, reused = load_or_compute_fingerprint(args.dataset, work.root, n_jobs=args.jobs, force=args.force)
    print(f"{'reused' if reused else 'wrote'} {work.fingerprint}")
    for warning in getattr(fingerprint, "warnings", ()) or ():
        print(f"warning: {warning}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from autoseg.planning import explain_plan, plan_dataset, verify_memory
    from autoseg.workdir import WorkDir

    work = WorkDir.for_dataset(args.dataset, args.work)
    device = _chosen_device(args.device)
    plan = plan_dataset(
        args.dataset, work.root,
        gpu_memory_gb=args.gpu_memory_gb,
        configurations=args.configurations,
        arch=args.arch,
        preset=args.preset,
        ct_priors=args.ct_priors,
        time_budget_hours=args.time_budget,
        device=device,
        n_jobs=args.jobs,
        scheduler=_scheduler(args),
    )
    print(f"wrote {work.plan}: configurations {', '.join(plan.configurations)} (recommended: "
          f"{plan.recommended_configuration})")
    if args.explain:
        print(explain_plan(plan))
    if args.verify:
        for name in plan.configurations:
            print(verify_memory(plan, name, device=device))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from autoseg.preprocessing import preprocess_dataset

    summaries = preprocess_dataset(args.work, configurations=args.configurations, n_jobs=args.jobs,
                                   force=args.force, dataset_dir=args.dataset, scheduler=_scheduler(args))
    for name, summary in summaries.items():
        print(f"{name}: {summary}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from autoseg.plan import load_plan
    from autoseg.training import TrainOverrides, train
    from autoseg.training.budget import parse_duration

    overrides = TrainOverrides(
        epochs=args.epochs,
        iterations_per_epoch=args.iters_per_epoch,
        validation_iterations=args.val_iters,
        initial_lr=args.lr,
        loss=args.loss,
        augmentation=args.augmentation,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    fold: int | str = args.fold if args.fold == "all" else int(args.fold)
    configuration = args.configuration
    if configuration is None:
        configuration = load_plan(args.work).recommended()
        print(f"configuration {configuration}: the plan's recommended one (`autoseg plan --explain` says why)")
    folder = train(args.work, configuration, fold, overrides=overrides, device=_chosen_device(args.device),
                   workers=args.workers, resume=args.resume, pretrained=args.pretrained,
                   precision=args.precision, compile_network=args.compile,
                   time_budget=parse_duration(args.time_budget) if args.time_budget else None)
    print(f"model written to {folder}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from autoseg.inference import predict_folder

    predict_folder(
        args.model, args.input, args.output,
        configuration=args.configuration,
        folds=args.folds,
        device=_chosen_device(args.device),
        precision=args.precision,
        runtime=args.runtime,
        tta=not args.no_tta,
        step=args.step,
        save_probabilities=args.save_probabilities,
        overwrite=args.overwrite,
        fast=args.fast,
        checkpoint=args.checkpoint,
        output_format=args.output_format,
        scheduler=_scheduler(args),
        devices=args.devices,
        summary=not args.no_summary,
        save_uncertainty=args.save_uncertainty,
    )
    _print_flagged(args.output)
    return 0


def _print_flagged(output: Path) -> None:
    """The cases ``summary.json`` flags for review, least trusted first (nothing without a summary)."""
    from autoseg.trust.summary import SUMMARY_FILE, flagged_lines, load_summary

    if not (output / SUMMARY_FILE).is_file():
        return
    summary = load_summary(output / SUMMARY_FILE)
    flagged = [case for case in summary.cases if case.flags]
    print(f"{len(flagged)} of {len(summary.cases)} case(s) flagged for review (details: {output / SUMMARY_FILE}; "
          f"review sheet: autoseg report {output} -o report/)")
    for line in flagged_lines(summary):
        print(f"  {line}")
    if summary.temperature is None:
        print(f"note: no calibration.json for {summary.configuration}: run `autoseg calibrate WORK -c "
              f"{summary.configuration}` for calibrated confidence and the checks against the training cases")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from autoseg.trust.fit import calibrate

    calibration = calibrate(args.work, args.configuration, folds=args.folds, device=_chosen_device(args.device))
    print(f"temperature {calibration.temperature:.3f} from {calibration.num_cases} held-out case(s); expected "
          f"calibration error {calibration.ece_before:.4f} -> {calibration.ece_after:.4f} "
          f"({calibration.ece_evaluation})")
    print(f"wrote calibration.json and reference_stats.json to {Path(args.work) / 'models' / args.configuration}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from autoseg.trust.report import write_report

    page = write_report(args.predictions, args.output, reference_dir=args.reference, images_dir=args.images)
    print(f"wrote {page} (open it in a browser; no server needed)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from autoseg.evaluation import evaluate_folders, parse_label_specs, summary_lines, write_results

    result = evaluate_folders(
        args.pred_dir, args.ref_dir,
        labels=parse_label_specs(args.labels) if args.labels else None,
        dataset_json=args.dataset_json, ignore_label=args.ignore_label, file_ending=args.file_ending,
        tolerance_mm=args.tolerance_mm, include_background=args.include_background,
        clinical=args.clinical, n_jobs=args.n_jobs,
    )
    out_json = args.out_json or args.pred_dir / "evaluation.json"
    out_csv = args.out_csv or args.pred_dir / "evaluation.csv"
    write_results(result, out_json, out_csv)
    for line in summary_lines(result):
        print(line)
    print(f"wrote {out_json} and {out_csv}")
    return 0


def _cmd_find_postprocessing(args: argparse.Namespace) -> int:
    from autoseg.postprocessing import POSTPROCESSING_FILE, find_postprocessing
    from autoseg.workdir import WorkDir

    decision = find_postprocessing(args.work, args.configuration, folds=args.folds,
                                   compute_probabilities=args.probabilities, device=_chosen_device(args.device))
    print(f"{decision.num_cases} validation cases of folds {', '.join(decision.folds)} ({decision.source})")
    for step in decision.steps:
        print(f"  {step.step}: mean Dice {step.mean_dice_before:.4f} -> {step.mean_dice_after:.4f}, "
              f"{'kept' if step.accepted else 'not kept'}")
    print(f"mean Dice {decision.mean_dice_before:.4f} -> {decision.mean_dice_after:.4f}; wrote "
          f"{WorkDir(args.work).models(args.configuration) / POSTPROCESSING_FILE}")
    return 0


def _cmd_describe_network(args: argparse.Namespace) -> int:
    from autoseg.networks.describe import describe_network
    from autoseg.plan import load_plan

    plan = load_plan(args.work)
    names = [args.configuration] if args.configuration else list(plan.configurations)
    for name in names:
        configuration = plan.configuration(name)
        print(f"== {name} ==")
        print(describe_network(configuration.topology, configuration.patch_size, configuration.batch_size))
    return 0


def _cmd_augment_preview(args: argparse.Namespace) -> int:
    from autoseg.training.preview import augment_preview

    out = augment_preview(args.work, args.output, num_samples=args.num_samples, seed=args.seed,
                          configuration=args.configuration, preset=args.preset)
    print(f"wrote {out}")
    return 0


def _cmd_export_model(args: argparse.Namespace) -> int:
    from autoseg.inference import export_model, export_networks

    if args.format == "zip":
        print(f"wrote {export_model(args.work, args.output, configurations=args.configurations)}")
    else:
        print(f"wrote {export_networks(args.work, args.output, args.format, configurations=args.configurations)} "
              f"(predict with --runtime {args.format})")
    return 0


def _cmd_import_model(args: argparse.Namespace) -> int:
    from autoseg.inference import import_model

    print(f"model imported to {import_model(args.zip, args.dest)}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from autoseg.bench.run import run_benchmark

    run_benchmark(dataset=args.dataset, example=args.example, device=_chosen_device(args.device), output=args.output,
                  repeats=args.repeats)
    return 0


# --- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full ``autoseg`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="autoseg",
        description="Self-configuring medical image segmentation: point it at a labelled dataset "
                    "and it plans, preprocesses, trains, predicts and evaluates.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _subcommand(sub, "validate", "Check a raw dataset and list every problem, naming each file; writes nothing.",
                    "autoseg validate data/Dataset001_Liver")
    p.add_argument("dataset", type=Path, help="raw dataset folder (dataset.json, imagesTr, labelsTr)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="parallel readers")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_validate)

    p = _subcommand(sub, "make-example", f"Generate a small, seeded example dataset ({', '.join(EXAMPLE_KIND_NAMES)}).",
                    "autoseg make-example data/example_ct --kind ct --num-cases 10")
    p.add_argument("dest", type=Path)
    p.add_argument("--kind", choices=EXAMPLE_KIND_NAMES, default="ct")
    p.add_argument("--num-cases", type=int, default=None, help="training cases (default per kind)")
    p.add_argument("--num-test-cases", type=int, default=0, help="held-out cases in imagesTs (+ labelsTs)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_make_example)

    p = _subcommand(sub, "convert", "Convert a public dataset (Decathlon, or any datasets_spec/ entry) to the raw layout.",
                    "autoseg convert msd Task04_Hippocampus data/Hippocampus\n"
                    "autoseg convert --spec datasets_spec/BraTS2021.json BraTS2021_Training data/BraTS")
    p.add_argument("paths", nargs="+", help="msd SRC DST, or SRC DST with --spec")
    p.add_argument("--spec", help="a datasets_spec JSON file or its name")
    p.set_defaults(handler=_cmd_convert)

    p = _subcommand(sub, "fingerprint", "Compute (or reuse) the dataset fingerprint: spacings, shapes, intensities, classes.",
                    "autoseg fingerprint data/ct --work work/ct")
    p.add_argument("dataset", type=Path)
    p.add_argument("--work", type=Path, default=None, help="work folder (default ./autoseg_work/<dataset name>)")
    p.add_argument("-j", "--jobs", type=int, default=None)
    p.add_argument("--force", action="store_true", help="recompute even if the dataset did not change")
    p.set_defaults(handler=_cmd_fingerprint)

    p = _subcommand(sub, "plan", "Fingerprint the dataset and derive the plan (spacing, normalization, network, "
                                 "patch, batch, schedule) within a GPU-memory budget.",
                    "autoseg plan data/ct --work work/ct --gpu-memory-gb 8 --explain")
    p.add_argument("dataset", type=Path)
    p.add_argument("--work", type=Path, default=None, help="work folder (default ./autoseg_work/<dataset name>)")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GPU memory budget for training (default 8, or the preset's size)")
    p.add_argument("--configurations", nargs="+", default=None, choices=CONFIGURATION_NAMES)
    p.add_argument("--arch", default="unet", choices=NETWORK_NAMES,
                   help="network architecture (see `autoseg describe-network`)")
    p.add_argument("--preset", default=None, choices=PLAN_PRESET_NAMES,
                   help="network size preset: the resenc ones are sized for 8, 24 and 40 GB, cpu is a small "
                        "U-Net for machines without a GPU")
    p.add_argument("--ct-priors", action="store_true", help="add Hounsfield-window prior channels for CT")
    p.add_argument("--time-budget", type=float, default=None, metavar="HOURS",
                   help="set epochs from a short throughput probe so training fits this many hours")
    _device_argument(p, "device for --time-budget and --verify (default auto: CUDA, then MPS, then CPU)")
    p.add_argument("--explain", action="store_true", help="print every decision with its reason")
    p.add_argument("--verify", action="store_true", help="run one real training step per configuration (CUDA) "
                                                         "and compare measured with estimated memory")
    p.add_argument("-j", "--jobs", type=int, default=None)
    _scheduler_argument(p)
    p.set_defaults(handler=_cmd_plan)

    p = _subcommand(sub, "preprocess", "Crop, resample and normalize every training case per the plan (resumable).",
                    "autoseg preprocess work/ct -c 3d_fullres -j 4")
    p.add_argument("work", type=Path)
    p.add_argument("-c", "--configurations", nargs="+", default=None)
    p.add_argument("-j", "--jobs", type=int, default=None, help="parallel workers (default: all cores)")
    p.add_argument("--force", action="store_true", help="redo every case")
    p.add_argument("--dataset", type=Path, default=None, help="raw dataset folder if it moved since planning")
    _scheduler_argument(p)
    p.set_defaults(handler=_cmd_preprocess)

    p = _subcommand(sub, "train", "Train one fold (or all cases) of a configuration; resumable and extendable.",
                    "autoseg train work/ct -c 3d_fullres -f 0\n"
                    "autoseg train work/ct -f all --time-budget 20m   # the plan's recommended configuration\n"
                    "autoseg train work/ct -c 3d_fullres -f 0 --resume --epochs 1500\n"
                    "autoseg train work/ct -c 3d_cascade_fullres -f 0   # after every 3d_lowres fold\n"
                    "torchrun --nproc_per_node 2 -m autoseg.cli train work/ct -c 3d_fullres -f 0")
    p.add_argument("work", type=Path)
    p.add_argument("-c", "--configuration", default=None,
                   help="default: the plan's recommended_configuration (see `autoseg plan --explain`)")
    p.add_argument("-f", "--fold", required=True, help="fold number, or 'all' to train on every case")
    _device_argument(p)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iters-per-epoch", type=int, default=None)
    p.add_argument("--val-iters", type=int, default=None, help="validation iterations per epoch")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate")
    p.add_argument("--loss", default=None, choices=LOSS_NAMES, help="loss function (default: the plan's)")
    p.add_argument("--augmentation", default=None, choices=AUGMENTATION_PRESET_NAMES,
                   help="augmentation preset (default: the plan's)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="epochs between checkpoints")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="data loading processes (0: in the main process)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--pretrained", type=Path, default=None, help="fold folder of a model to fine-tune from")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help="wall time for this command, e.g. 30m, 2h, 1h30m: epochs, iterations and the learning-rate "
                        "decay are fitted to it from the measured speed, and it ends with a validated model")
    _precision_argument(p)
    p.add_argument("--compile", default="auto", choices=COMPILE_CHOICES,
                   help="torch.compile the network (auto: on CUDA; the CPU gains too little for its warm-up)")
    p.set_defaults(handler=_cmd_train)

    p = _subcommand(sub, "predict", "Segment a folder of new scans and write results in their own geometry.",
                    "autoseg predict work/ct -i scans/ -o predictions/ -c 3d_fullres -f 0 1 2 3 4")
    p.add_argument("model", type=Path, help="work folder or imported model folder")
    p.add_argument("-i", "--input", type=Path, required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("-c", "--configuration", default=None,
                   help="default: the plan's recommended configuration if trained, else 3d_fullres, else the only one")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to ensemble (default: all trained)")
    _device_argument(p)
    p.add_argument("--runtime", default="torch", choices=RUNTIME_NAMES,
                   help="torch (checkpoints), or onnx / torchscript for a folder from export-model --format")
    p.add_argument("--no-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--step", type=float, default=0.5, help="tile step as a fraction of the patch")
    p.add_argument("--save-probabilities", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="redo cases already predicted")
    p.add_argument("--fast", action="store_true", help="one fold, no TTA, step 0.75")
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    p.add_argument("--output-format", default="nifti", choices=OUTPUT_FORMAT_NAMES,
                   help="nifti: label maps in the inputs' format (the dataset's file ending for DICOM series); "
                        "dicom-seg: a DICOM Segmentation CASE.dcm per DICOM series input (sub-folder of -i)")
    _precision_argument(p)
    _scheduler_argument(p)
    p.add_argument("--devices", nargs="+", default=None, metavar="DEVICE",
                   help="one worker per device on this machine, e.g. cuda:0 cuda:1 (needs autoseg[distributed])")
    p.add_argument("--save-uncertainty", action="store_true",
                   help="also write CASE_uncertainty<ending>: the voxel-wise normalised entropy (0 certain, 1 unsure)")
    p.add_argument("--no-summary", action="store_true",
                   help="skip summary.json (per-case confidence and review flags) and the flagged-case list")
    p.set_defaults(handler=_cmd_predict)

    p = _subcommand(sub, "calibrate", "Fit the temperature that calibrates a configuration's probabilities and the "
                                      "training statistics its predictions are checked against.",
                    "autoseg calibrate work/ct -c 3d_fullres")
    p.add_argument("work", type=Path)
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-f", "--folds", nargs="+", default=None, help="cross-validation folds (default: every trained)")
    _device_argument(p)
    p.set_defaults(handler=_cmd_calibrate)

    p = _subcommand(sub, "report", "Write one HTML review sheet of predictions: contours on three slices per "
                                   "structure, flags and confidence, least trusted case first.",
                    "autoseg report predictions/ --images scans/ --reference labelsTs/ -o report/")
    p.add_argument("predictions", type=Path, help="folder written by autoseg predict")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for index.html and its PNGs")
    p.add_argument("--reference", type=Path, default=None, help="reference label maps (same file names)")
    p.add_argument("--images", type=Path, default=None, help="the input images (CASE_0000<ending>)")
    p.set_defaults(handler=_cmd_report)

    p = _subcommand(sub, "evaluate", "Score predictions against references: Dice, IoU, HD95, NSD and more.",
                    "autoseg evaluate predictions/ data/ct/labelsTs --dataset-json data/ct/dataset.json")
    p.add_argument("pred_dir", type=Path, help="folder of predicted label maps")
    p.add_argument("ref_dir", type=Path, help="folder of reference label maps (same file names)")
    p.add_argument("--labels", nargs="+", metavar="NAME=V[,V...]",
                   help="labels to evaluate; a list of values is a region (default: dataset.json, "
                        "else every value in the references)")
    p.add_argument("--dataset-json", type=Path, help="dataset.json for labels, ignore label, file ending")
    p.add_argument("--ignore-label", type=int, help="reference value excluded from every metric")
    p.add_argument("--file-ending", help=f"file ending (default: dataset.json, else {DEFAULT_FILE_ENDING})")
    p.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM,
                   help="normalized surface Dice tolerance in mm (default %(default)s)")
    p.add_argument("--include-background", action="store_true", help="also evaluate value 0")
    p.add_argument("--clinical", action="store_true", help="add the clinical_quality column")
    p.add_argument("--n-jobs", type=int, default=1, help="worker processes (default %(default)s)")
    p.add_argument("--out-json", type=Path, help="default: PRED_DIR/evaluation.json")
    p.add_argument("--out-csv", type=Path, help="default: PRED_DIR/evaluation.csv")
    p.set_defaults(handler=_cmd_evaluate)

    p = _subcommand(sub, "find-postprocessing", "Decide from cross-validation which post-processing steps help: "
                                                "the largest component, per class, and with the validation "
                                                "probabilities the mean-field refinement.",
                    "autoseg find-postprocessing work/ct -c 3d_fullres --probabilities")
    p.add_argument("work", type=Path)
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-f", "--folds", nargs="+", default=None)
    p.add_argument("--probabilities", action="store_true",
                   help="first predict each validation case's probabilities with its fold's checkpoint (one "
                        "sliding-window prediction per case), so the mean-field refinement is evaluated "
                        "(`calibrate` writes them too)")
    _device_argument(p)
    p.set_defaults(handler=_cmd_find_postprocessing)

    p = _subcommand(sub, "describe-network", "Print the network's layer table, parameters and memory estimate.",
                    "autoseg describe-network work/ct -c 3d_fullres")
    p.add_argument("work", type=Path)
    p.add_argument("-c", "--configuration", default=None)
    p.set_defaults(handler=_cmd_describe_network)

    p = _subcommand(sub, "augment-preview", "Write a PNG grid of augmented training samples.",
                    "autoseg augment-preview work/ct -c 3d_fullres -o preview.png")
    p.add_argument("work", type=Path)
    p.add_argument("-c", "--configuration", default=None)
    p.add_argument("-o", "--output", type=Path, default=Path("augment_preview.png"))
    p.add_argument("-n", "--num-samples", type=int, default=8)
    p.add_argument("--preset", default=None, choices=AUGMENTATION_PRESET_NAMES,
                   help="augmentation preset (default: the plan's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_augment_preview)

    p = _subcommand(sub, "export-model", "Pack a trained model (plan, dataset.json, checkpoints, post-processing) "
                                         "into one zip file.",
                    "autoseg export-model work/ct -o ct_model.zip\n"
                    "autoseg export-model work/ct -o ct_onnx --format onnx   # runs with onnxruntime")
    p.add_argument("work", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("-c", "--configurations", nargs="+", default=None)
    p.add_argument("--format", default="zip", choices=EXPORT_FORMAT_NAMES,
                   help="zip: the checkpoints in one file; onnx / torchscript: a model folder of exported "
                        "networks (dynamic batch and spatial axes) for autoseg predict --runtime")
    p.set_defaults(handler=_cmd_export_model)

    p = _subcommand(sub, "import-model", "Unpack a model zip into a folder usable by `autoseg predict`.",
                    "autoseg import-model ct_model.zip models/ct")
    p.add_argument("zip", type=Path)
    p.add_argument("dest", type=Path)
    p.set_defaults(handler=_cmd_import_model)

    p = _subcommand(sub, "benchmark", "Measure planning, preprocessing, training and inference speed and memory.",
                    "autoseg benchmark --example ct -o results.json")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--dataset", type=Path, default=None)
    source.add_argument("--example", choices=EXAMPLE_KIND_NAMES, default=None)
    _device_argument(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("-o", "--output", type=Path, default=Path("bench_results.json"))
    p.set_defaults(handler=_cmd_benchmark)
    return parser


# --- errors -------------------------------------------------------------------------------------

# OS-level failures the user fixes outside autoseg (a full disk, a read-only mount); permission
# errors are matched by class, which covers EACCES and EPERM
_USER_ERRNOS = (errno.ENOSPC, errno.EROFS)


def _user_message(error: Exception) -> str | None:
    """The one-line report of an error the user can act on; None for a bug (traceback wanted)."""
    if isinstance(error, (AutosegError, FileNotFoundError, FileExistsError)):
        return str(error)
    if isinstance(error, zipfile.BadZipFile):
        return f"{_file_in_traceback(error, writing=False) or 'zip archive'}: damaged or not a zip file ({error})"
    if isinstance(error, PermissionError) or (isinstance(error, OSError) and error.errno in _USER_ERRNOS):
        name = os.fsdecode(error.filename) if error.filename is not None else _file_in_traceback(error, writing=True)
        return f"{name or 'a file'}: {error.strerror or error}"
    return None


def _file_in_traceback(error: BaseException, writing: bool) -> str | None:
    """The file the failing code was working on, from the local variables of its frames.

    A failing ``write()`` (full disk) raises an OSError without a file name, and zipfile names
    only the archive member; the innermost zip archive, or the innermost open file being written
    (``writing``), is the file to name.
    """
    for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):
        for value in frame.f_locals.values():
            if isinstance(value, zipfile.ZipFile) and value.filename:
                return value.filename
            if writing and isinstance(value, io.IOBase):
                # by now a `with` block has closed the file, so its mode tells, not writable()
                name, mode = getattr(value, "name", None), getattr(value, "mode", None)
                if isinstance(name, str) and isinstance(mode, str) and any(c in mode for c in "wax+"):
                    return name
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``autoseg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    restore_sigterm = sigterm_as_interrupt()  # a scheduler's stop takes the Ctrl-C path: work kept, hint shown
    try:
        return handler(args)
    except KeyboardInterrupt:
        hint = "continue with --resume" if args.command == "train" else "a re-run skips what is done"
        print(f"interrupted; finished work is kept ({hint})", file=sys.stderr)
        return 130
    except Exception as error:
        message = _user_message(error)
        if message is None:
            traceback.print_exc()
            print(f"autoseg {args.command}: unexpected error; please report it with the traceback above to the "
                  "autoseg issue tracker", file=sys.stderr)
        else:
            print(f"autoseg {args.command}: error: {message}", file=sys.stderr)
        return 1
    finally:
        restore_sigterm()


if __name__ == "__main__":
    sys.exit(main())
