"""The command line: how it reports errors, and that its choice lists are the library's names."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from autoseg import constants, examples, networks, plan, planning
from autoseg.cli import main
from autoseg.evaluation import DEFAULT_FILE_ENDING
from autoseg.io import Image, write_image
from autoseg.model_archive import MANIFEST
from autoseg.training import augment, losses

REPORT_LINE = "please report it with the traceback above to the autoseg issue tracker"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of ``autoseg ARGV``."""
    code = main(argv)
    return code, capsys.readouterr().err


def fail_make_example(monkeypatch: pytest.MonkeyPatch, fail: Callable[[Path], None]) -> None:
    """``autoseg make-example DEST`` calls ``fail(DEST)`` instead of writing a dataset."""
    monkeypatch.setattr(examples, "make_example", lambda dest, **_: fail(dest))


def assert_one_line(stderr: str, expected: str) -> None:
    assert stderr == expected + "\n"


# --- user-facing errors: one line, no traceback -----------------------------------------------------


def test_autoseg_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["evaluate", str(tmp_path / "missing"), str(tmp_path)], capsys)
    assert code == 1
    assert_one_line(err, f"autoseg evaluate: error: {tmp_path / 'missing'}: prediction folder does not exist")


def test_unreadable_image_in_plan_workers_is_one_line(make_dataset, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # the error is raised in a joblib worker (default jobs) and must come back as itself
    dataset = make_dataset(num_cases=3, num_channels=1)
    broken = dataset / "imagesTr" / f"case_001_0000{DEFAULT_FILE_ENDING}"
    broken.write_bytes(broken.read_bytes()[:40])
    code, err = run_cli(["plan", str(dataset), "--work", str(tmp_path / "work"), "-j", "2"], capsys)
    assert code == 1
    report = err.splitlines()[-1]  # after the progress bar
    assert report.startswith("autoseg plan: error: ") and str(broken) in report
    assert "Traceback" not in err and "BrokenProcessPool" not in err


def test_unreadable_prediction_in_evaluate_workers_is_one_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    for case in ("a", "b"):
        label = np.zeros((4, 6, 6), np.uint8)
        label[1:3, 2:4, 2:4] = 1
        for folder in (pred_dir, ref_dir):
            write_image(Image(label, spacing=(2.0, 1.0, 1.0)), folder / f"{case}.nii.gz")
    (pred_dir / "b.nii.gz").write_bytes(b"")
    code, err = run_cli(["evaluate", str(pred_dir), str(ref_dir), "--n-jobs", "2"], capsys)
    assert code == 1
    assert err.startswith("autoseg evaluate: error: ") and str(pred_dir / "b.nii.gz") in err
    assert "Traceback" not in err and "BrokenProcessPool" not in err


# --- OS-level failures the user fixes: one line naming the file ---------------------------------------


@pytest.mark.parametrize("error_class, code", [(PermissionError, errno.EACCES), (OSError, errno.EROFS)])
def test_permission_and_read_only_errors_name_the_file(error_class: type[OSError], code: int, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def fail(dest: Path) -> None:
        raise error_class(code, os.strerror(code), str(dest / "dataset.json"))

    fail_make_example(monkeypatch, fail)
    exit_code, err = run_cli(["make-example", str(tmp_path / "ex")], capsys)
    assert exit_code == 1
    assert_one_line(err, f"autoseg make-example: error: {tmp_path / 'ex' / 'dataset.json'}: {os.strerror(code)}")


def test_full_disk_names_the_file_being_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # a failing write() carries no file name: the CLI finds the open file in the traceback
    def fail(dest: Path) -> None:
        dest.mkdir()
        with open(dest / "image.nii.gz", "wb") as handle:
            handle.write(b"header")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fail_make_example(monkeypatch, fail)
    code, err = run_cli(["make-example", str(tmp_path / "ex")], capsys)
    assert code == 1
    assert_one_line(err, f"autoseg make-example: error: {tmp_path / 'ex' / 'image.nii.gz'}: "
                         f"{os.strerror(errno.ENOSPC)}")


def test_damaged_zip_names_the_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zip_file:
        zip_file.writestr(MANIFEST, '{"files": {}}')
        zip_file.writestr("plan.json", "{}" * 64)
    data = archive.read_bytes()
    position = data.index(b"{}{}{}")  # a byte of plan.json: the CRC check fails when it is read
    archive.write_bytes(data[:position] + b"[" + data[position + 1:])
    code, err = run_cli(["import-model", str(archive), str(tmp_path / "model")], capsys)
    assert code == 1
    assert err.startswith(f"autoseg import-model: error: {archive}: damaged or not a zip file (")
    assert "Traceback" not in err and err.count("\n") == 1


# --- anything else is a bug: traceback plus where to report it ----------------------------------------


def test_unexpected_error_shows_traceback_and_where_to_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    def fail(dest: Path) -> None:
        raise RuntimeError("boom")

    fail_make_example(monkeypatch, fail)
    code, err = run_cli(["make-example", str(tmp_path / "ex")], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.splitlines()[-1] == f"autoseg make-example: unexpected error; {REPORT_LINE}"


# --- choice lists --------------------------------------------------------------------------------------


def test_choice_lists_are_the_library_names() -> None:
    assert constants.CONFIGURATION_NAMES == plan.CONFIGURATION_NAMES
    assert constants.PLAN_PRESET_NAMES == tuple(planning.PRESETS)
    # other tests register networks of their own: compare with those autoseg.networks registers
    built_in = [n for n in networks.available_networks() if networks.get_builder(n).__module__.startswith("autoseg.")]
    assert constants.NETWORK_NAMES == tuple(built_in)
    assert constants.LOSS_NAMES == losses.LOSS_NAMES
    assert constants.AUGMENTATION_PRESET_NAMES == tuple(augment.PRESETS)
    assert constants.EXAMPLE_KIND_NAMES == tuple(examples.EXAMPLE_KINDS)


def test_unknown_choice_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "work", "-c", "3d_fullres", "-f", "0", "--loss", "lovasz"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'lovasz'" in capsys.readouterr().err


def test_help_imports_no_heavy_module() -> None:
    # `autoseg --help` builds every parser: it must not import numpy or torch (seconds on a cold start)
    script = ("import sys; from autoseg.cli import build_parser; build_parser(); "
              "print(sorted(m for m in ('numpy', 'torch', 'scipy', 'pydantic') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- the plan's recommended configuration -----------------------------------------------------------


def test_train_and_predict_without_c_use_the_plans_recommendation(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from test_training_support import cube_cases, make_work, tiny_plan

    from autoseg.inference.model import resolve_configuration

    work = make_work(tmp_path / "work", tiny_plan(epochs=1, iterations_per_epoch=1), cube_cases(3))
    code, err = run_cli(["train", str(work), "-f", "0", "--workers", "0"], capsys)  # an older plan: none named
    assert code == 1 and "the plan recommends no configuration" in err and "choose one with -c: 3d_fullres" in err
    plan.save_plan(dataclasses.replace(plan.load_plan(work), recommended_configuration="3d_fullres"),
                   work / "plan.json")
    code = main(["train", str(work), "-f", "0", "--workers", "0"])
    assert code == 0
    assert "configuration 3d_fullres: the plan's recommended one" in capsys.readouterr().out
    assert (work / "models" / "3d_fullres" / "fold_0" / "checkpoint_latest.pt").is_file()
    # predict: the recommended configuration wins over 3d_fullres when both are trained
    trained = plan.load_plan(work)
    both = dataclasses.replace(trained, recommended_configuration="2d", configurations={
        **trained.configurations, **tiny_plan(name="2d", dim=2, patch=(16, 16)).configurations})
    for name in ("2d", "3d_fullres"):
        fold = tmp_path / "model" / "models" / name / "fold_0"
        fold.mkdir(parents=True)
        (fold / "checkpoint_latest.pt").write_bytes(b"")
    assert resolve_configuration(tmp_path / "model", both, None) == "2d"
    assert resolve_configuration(tmp_path / "model", dataclasses.replace(both, recommended_configuration=""),
                                 None) == "3d_fullres"
