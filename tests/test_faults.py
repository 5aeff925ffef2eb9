"""The fault suite: full disks, read-only folders, signals, concurrent runs, worker errors, bad zips.

Each test asserts the message the user sees, the exit code where a command runs, and that no
published file is corrupt (nothing half-written under a final name, no temporary file left).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from test_training_support import cube_cases, make_work, tiny_plan

from autoseg import atomic
from autoseg.atomic import WriteError, is_temporary, remove_stale_temporaries
from autoseg.cli import main
from autoseg.cluster import WORKER_START_ENV
from autoseg.dataset import DatasetError
from autoseg.fingerprint import compute_fingerprint
from autoseg.io import Image, ImageReadError, read_image, write_image
from autoseg.locks import LOCK_FILE, AutosegLockError, folder_lock
from autoseg.model_archive import MANIFEST, ModelArchiveError, import_model
from autoseg.planning import plan_dataset
from autoseg.training import TrainOverrides, train
from autoseg.training.checkpoint import load_checkpoint, save_checkpoint
from autoseg.training.data import IncompletePreprocessingError, PreprocessedDataset
from autoseg.utils import atomic_write, atomic_write_json
from autoseg.validate import DatasetValidationError, require_valid_dataset

REPO = Path(__file__).resolve().parents[1]
# WORKER_START_ENV 0: -j 2 starts its worker processes even for these tiny cases
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), WORKER_START_ENV: "0"}


def leftovers(folder: Path) -> list[str]:
    """Temporary files of autoseg's naming under ``folder``."""
    return sorted(p.name for p in folder.rglob(".*") if is_temporary(p.name))


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def error_line(err: str, command: str) -> str:
    """The one ``autoseg COMMAND: error: ...`` line of a failed command's stderr, which has no traceback.

    Other lines (a progress bar, a warning from a background thread) may surround it.
    """
    lines = [line for line in err.splitlines() if line.startswith(f"autoseg {command}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"autoseg {command}: error: "), lines[0]
    return lines[0]


# --- full disk: a writer that raises ENOSPC, in every writer --------------------------------------


def _disk_full(*_: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


WRITERS = {
    "json": lambda path: atomic_write_json(path, {"a": 1}),
    "numpy": lambda path: atomic_write(path, lambda tmp: np.save(tmp, np.zeros(10))),
    "image": lambda path: write_image(Image(np.ones((4, 5, 6), np.float32), (1.0, 1.0, 1.0)), path),
    "png": lambda path: write_image(Image(np.ones((5, 6), np.uint8), (1.0, 1.0)), path),
    "checkpoint": lambda path: save_checkpoint(path, {"network": {"w": torch.zeros(3)}}),
}
ENDINGS = {"json": ".json", "numpy": ".npy", "image": ".nii.gz", "png": ".png", "checkpoint": ".pt"}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_every_writer_reports_a_full_disk_and_keeps_the_old_file(kind: str, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / f"out{ENDINGS[kind]}"
    WRITERS[kind](path)
    before = path.read_bytes()
    monkeypatch.setattr(atomic.os, "fsync", _disk_full)  # the write "succeeds", flushing it fails
    with pytest.raises(WriteError) as caught:
        WRITERS[kind](path)
    assert str(caught.value).startswith(f"{path}: cannot be written: the disk is full")
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_image_writer_that_silently_truncates_is_caught(tmp_path: Path, monkeypatch) -> None:
    # SimpleITK's NIfTI writer returns normally on a full disk, leaving a truncated file
    import autoseg.io as io_module

    real = io_module._write_sitk

    def truncating(image: Image, path: Path) -> None:
        real(image, path)
        path.write_bytes(path.read_bytes()[:60])

    monkeypatch.setattr(io_module, "_write_sitk", truncating)
    target = tmp_path / "case.nii.gz"
    with pytest.raises(WriteError, match="is the disk full"):
        write_image(Image(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32), (1, 1, 1)), target)
    assert not target.exists() and leftovers(tmp_path) == []


def test_torch_full_disk_error_becomes_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    def enforce_fail(*_: object, **__: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", enforce_fail)
    with pytest.raises(WriteError, match=r"checkpoint_latest.pt: cannot be written: the disk is full"):
        save_checkpoint(tmp_path / "checkpoint_latest.pt", {"network": {}})
    assert leftovers(tmp_path) == []


def test_published_files_follow_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        for kind, write in WRITERS.items():
            write(tmp_path / f"out{ENDINGS[kind]}")
    finally:
        os.umask(previous)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {oct(0o640)}


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path: Path) -> None:
    stale = [".case.nii.gz.k2j3h4g5.autoseg-tmp.nii.gz", ".tmp_x1y2z3.nii.gz", ".c0.npy.abc123.tmp.npy"]
    kept = ["case.nii.gz", ".autoseg.lock", ".hidden", "notes.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


# --- a real small disk, and a read-only one (tmpfs mounts; root only) ------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 100 kB tmpfs, or a skip where this process cannot mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_small_disk_write_image_fails_clearly_and_publishes_nothing(small_disk: Path) -> None:
    noise = np.random.default_rng(0).normal(size=(32, 64, 64)).astype(np.float32)  # 512 kB, incompressible
    write_image(Image(noise[:2, :8, :8], (1.0, 1.0, 1.0)), small_disk / "small.nii.gz")
    for index in range(3):
        target = small_disk / f"case_{index}.nii.gz"
        with pytest.raises(WriteError, match="the disk is full") as caught:
            write_image(Image(noise, (1.0, 1.0, 1.0)), target)
        assert str(target) in str(caught.value)
        assert not target.exists()
    assert sorted(p.name for p in small_disk.iterdir()) == ["small.nii.gz"]
    assert read_image(small_disk / "small.nii.gz").array.shape == (2, 8, 8)


def test_small_disk_checkpoint_keeps_the_previous_one(small_disk: Path) -> None:
    path = small_disk / "checkpoint_latest.pt"
    save_checkpoint(path, {"network": {"w": torch.ones(10)}})
    with pytest.raises(WriteError, match="the disk is full"):
        save_checkpoint(path, {"network": {"w": torch.randn(100_000)}})
    assert torch.equal(load_checkpoint(path)["network"]["w"], torch.ones(10))
    assert leftovers(small_disk) == []


def test_read_only_folder_is_one_line(small_disk: Path, make_dataset, capsys) -> None:
    (small_disk / "work").mkdir()
    if subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only")
    with pytest.raises(WriteError, match="the file system is read-only"):
        atomic_write_json(small_disk / "work" / "a.json", {})
    dataset = make_dataset(num_cases=2, num_channels=1)
    code, err = run_cli(["plan", dataset, "--work", small_disk / "work", "-j", "1"], capsys)
    line = error_line(err, "plan")
    assert code == 1 and str(small_disk / "work") in line and "read-only" in line.lower()


# --- locks ----------------------------------------------------------------------------------------


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from autoseg.locks import folder_lock
    with folder_lock(sys.argv[1], "the test folder"):
        print("held", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def tiny_work(tmp_path: Path) -> Path:
    return make_work(tmp_path / "work", tiny_plan(epochs=1, iterations_per_epoch=1), cube_cases(3))


def test_a_second_train_on_the_same_fold_is_refused_and_a_dead_ones_lock_taken_over(tiny_work: Path,
                                                                                     capsys) -> None:
    fold_dir = tiny_work / "models" / "3d_fullres" / "fold_0"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(fold_dir)], stdout=subprocess.PIPE, env=ENV)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        code, err = run_cli(["train", tiny_work, "-c", "3d_fullres", "-f", "0", "--workers", "0"], capsys)
        line = error_line(err, "train")
        assert code == 1 and line.startswith("autoseg train: error: fold 0 of configuration '3d_fullres'")
        assert f"pid {holder.pid} on {socket.gethostname()}" in line
        assert sorted(p.name for p in fold_dir.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    code, err = run_cli(["train", tiny_work, "-c", "3d_fullres", "-f", "0", "--workers", "0"], capsys)
    assert code == 0
    assert "took over the lock of fold 0 of configuration '3d_fullres'" in err and f"pid {holder.pid}" in err
    assert (fold_dir / "checkpoint_latest.pt").is_file() and not (fold_dir / LOCK_FILE).exists()


def test_lock_is_released_on_error_and_refuses_while_held(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), folder_lock(tmp_path, "x"):
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK_FILE).exists()
    with folder_lock(tmp_path, "x"):
        with pytest.raises(AutosegLockError, match=f"pid {os.getpid()} on "), folder_lock(tmp_path, "x"):
            pass
    assert not (tmp_path / LOCK_FILE).exists()


# --- signals: no orphan, SIGTERM is Ctrl-C ---------------------------------------------------------


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "autoseg.cli", *map(str, argv)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_children(process: subprocess.Popen, count: int, timeout: float = 120) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        children = psutil.Process(process.pid).children(recursive=True)
        if len(children) >= count:
            return children
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"{count} worker processes did not start")


def _assert_no_orphans(children: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(children, timeout=10)
    for process in alive:
        process.kill()
    assert alive == [], f"processes outlived their command: {[p.pid for p in alive]}"


def test_sigterm_to_train_saves_says_how_to_continue_and_leaves_no_worker(tmp_path: Path) -> None:
    work = make_work(tmp_path / "work", tiny_plan(epochs=1000, iterations_per_epoch=2), cube_cases(3))
    process = _start(["train", work, "-c", "3d_fullres", "-f", "0", "--workers", "2"])
    children = _wait_for_children(process, 2)
    time.sleep(1.0)  # inside the epoch loop
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()[-2000:]
    assert "--resume" in err.decode() and "Traceback" not in err.decode()
    _assert_no_orphans(children)
    fold_dir = work / "models" / "3d_fullres" / "fold_0"
    epoch = load_checkpoint(fold_dir / "checkpoint_latest.pt")["progress"]["epoch"]
    assert not (fold_dir / LOCK_FILE).exists()
    train(work, "3d_fullres", 0, TrainOverrides(epochs=epoch + 1), resume=True, workers=0, progress=False,
          num_threads=1)
    assert load_checkpoint(fold_dir / "checkpoint_latest.pt")["progress"]["epoch"] == epoch + 1


def test_kill_9_of_train_leaves_no_loader_worker(tmp_path: Path) -> None:
    work = make_work(tmp_path / "work", tiny_plan(epochs=1000, iterations_per_epoch=2), cube_cases(3))
    process = _start(["train", work, "-c", "3d_fullres", "-f", "0", "--workers", "2"])
    children = _wait_for_children(process, 2)
    process.kill()
    process.communicate()
    _assert_no_orphans(children)


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw dataset of 24 small cases and its plan (3d_fullres), shared read-only."""
    from conftest import tiny_label, tiny_volume

    root = tmp_path_factory.mktemp("planned")
    dataset, rng = root / "raw", np.random.default_rng(0)
    for index in range(24):
        write_image(Image(tiny_volume((12, 24, 24), rng, False), (2.0, 1.0, 1.0)),
                    dataset / "imagesTr" / f"case_{index:03d}_0000.nii.gz")
        write_image(Image(tiny_label((12, 24, 24)), (2.0, 1.0, 1.0)), dataset / "labelsTr" / f"case_{index:03d}.nii.gz")
    (dataset / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "numTraining": 24,
                                                      "labels": {"background": 0, "a": 1, "b": 2},
                                                      "file_ending": ".nii.gz"}))
    assert main(["plan", str(dataset), "--work", str(root / "work"), "-j", "1", "--configurations", "3d_fullres"]) == 0
    return root / "work"


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_preprocess_leaves_no_pool_worker(planned: Path, tmp_path: Path, how: int) -> None:
    work = tmp_path / "work"
    shutil.copytree(planned, work)
    process = _start(["preprocess", work, "-j", "2"])
    folder = work / "preprocessed" / "3d_fullres"
    deadline = time.monotonic() + 120
    # SIGTERM mid-run, once a case is done; kill -9 as soon as the workers exist (idle ones must end too)
    while how == signal.SIGTERM and not list(folder.glob("case_*.json")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        time.sleep(0.05)
    children = _wait_for_children(process, 2)
    process.send_signal(how)
    _, err = process.communicate(timeout=60)
    if how == signal.SIGTERM:
        assert process.returncode in (0, 130), err.decode()[-2000:]  # 0: it finished first
        assert "Traceback" not in err.decode()
    _assert_no_orphans(children)
    assert leftovers(work / "preprocessed") == [] or how == signal.SIGKILL


PARENT_OF_A_STAGE = textwrap.dedent("""
    import os, subprocess, sys, time
    # like the benchmark: the stage runs in a session of its own, so no signal to the group reaches it
    stage = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())], start_new_session=True)
    print(stage.pid, flush=True)
    time.sleep(60)
""")
STAGE = textwrap.dedent("""
    import sys, time
    from autoseg.processes import exit_with_parent
    exit_with_parent(int(sys.argv[1]), parent_death_signal=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("parent_death_signal", [True, False])
def test_a_process_in_its_own_session_ends_with_its_parent(parent_death_signal: bool) -> None:
    stage = STAGE.replace("parent_death_signal=True", f"parent_death_signal={parent_death_signal}")
    parent = subprocess.Popen([sys.executable, "-c", PARENT_OF_A_STAGE, stage], stdout=subprocess.PIPE, env=ENV)
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    time.sleep(0.2)  # the child may still be starting: then it finds its parent gone at once
    parent.kill()
    parent.wait()
    _assert_no_orphans([child])


# --- errors raised in worker processes come back as themselves -------------------------------------


def _four_d(path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False), str(path))


BROKEN_FILES = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:40]),
    "empty": lambda path: path.write_bytes(b""),
    "not an image": lambda path: path.write_text("hello"),
    "4D": _four_d,
}


@pytest.mark.parametrize("kind", sorted(BROKEN_FILES))
def test_unreadable_files_come_back_from_pool_workers_intact(make_dataset, kind: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_START_ENV, "0")
    dataset = make_dataset(num_cases=3, num_channels=1)
    broken = dataset / "imagesTr" / "case_001_0000.nii.gz"
    BROKEN_FILES[kind](broken)
    with pytest.raises(ImageReadError) as caught:
        compute_fingerprint(dataset, n_jobs=2, progress=False)
    assert caught.value.path == str(broken) and str(caught.value).startswith(f"{broken}: ")
    assert len(str(caught.value).splitlines()) == 1


def test_a_shape_mismatch_comes_back_from_pool_workers_in_a_few_lines(make_dataset,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_START_ENV, "0")
    dataset = make_dataset(num_cases=3, num_channels=1)
    label = dataset / "labelsTr" / "case_002.nii.gz"
    write_image(Image(np.zeros((4, 8, 9), np.uint8), (2.0, 0.75, 0.75)), label)  # shape differs from the image
    with pytest.raises(DatasetError) as caught:
        compute_fingerprint(dataset, n_jobs=2, progress=False)
    assert "case_002" in str(caught.value) and len(str(caught.value).splitlines()) <= 3


# --- the stages check their inputs -----------------------------------------------------------------


def _rewrite(dataset: Path, name: str, array: np.ndarray, spacing: tuple[float, ...]) -> Path:
    path = next(dataset.rglob(name))
    write_image(Image(array, spacing), path)
    return path


BAD_DATA = {
    "nan": ("case_001_0000.nii.gz", lambda a: np.where(a > 110, np.nan, a).astype(np.float32), None, "NaN"),
    "blank": ("case_001_0000.nii.gz", lambda a: np.zeros_like(a), None, "same value"),
    "label spacing": ("case_001.nii.gz", lambda a: a, (3.0, 0.75, 0.75), "spacing"),
    "undeclared label": ("case_001.nii.gz", lambda a: np.where(a == 2, 7, a).astype(np.uint8), None, "7"),
    "single voxel": ("case_001_0000.nii.gz", lambda a: a[:1, :1, :1], None, "single voxel"),
}


@pytest.mark.parametrize("problem", sorted(BAD_DATA))
def test_plan_and_preprocess_refuse_what_validate_rejects(problem: str, make_dataset, tmp_path: Path,
                                                          capsys) -> None:
    dataset = make_dataset(num_cases=3, num_channels=1)
    name, change, spacing, expected = BAD_DATA[problem]
    original = read_image(next(dataset.rglob(name)))
    path = _rewrite(dataset, name, change(original.array), spacing or original.spacing)
    code, err = run_cli(["plan", dataset, "--work", tmp_path / "work", "-j", "1"], capsys)
    assert code == 1 and "Traceback" not in err
    assert str(path) in err and expected in err
    assert not (tmp_path / "work" / "plan.json").exists()
    with pytest.raises(DatasetValidationError, match=expected):
        require_valid_dataset(dataset, tmp_path / "work")
    with pytest.raises(DatasetValidationError, match=expected):  # from Python too
        plan_dataset(dataset, tmp_path / "work_py", n_jobs=1, progress=False)
    assert not (tmp_path / "work_py" / "plan.json").exists()


def test_mixed_2d_and_3d_cases_are_refused(make_dataset, tmp_path: Path) -> None:
    dataset = make_dataset(num_cases=3, num_channels=1)
    _rewrite(dataset, "case_002_0000.nii.gz", np.ones((8, 8), np.float32) + np.eye(8), (0.75, 0.75))
    _rewrite(dataset, "case_002.nii.gz", np.eye(8, dtype=np.uint8), (0.75, 0.75))
    with pytest.raises(DatasetValidationError, match="mixes 2D and 3D"):
        require_valid_dataset(dataset)


def test_train_refuses_an_incomplete_preprocessed_folder(tiny_work: Path, capsys) -> None:
    folder = tiny_work / "preprocessed" / "3d_fullres"
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["expected_cases"] = [*manifest["cases"], "case_009"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IncompletePreprocessingError) as caught:
        PreprocessedDataset(folder)
    assert "case_009" in str(caught.value) and f"autoseg preprocess {tiny_work} -c 3d_fullres" in str(caught.value)
    code, err = run_cli(["train", tiny_work, "-c", "3d_fullres", "-f", "0", "--workers", "0"], capsys)
    assert code == 1 and "case_009" in err and "Traceback" not in err
    assert not (tiny_work / "splits.json").exists() and not (tiny_work / "models" / "3d_fullres" / "splits.json").exists()


# --- import-model: size limits, manifest members only, checksums ----------------------------------


def _model_zip(path: Path, extra: dict[str, bytes] | None = None, listed: dict[str, bytes] | None = None,
               compression: int = zipfile.ZIP_DEFLATED) -> Path:
    files = {"plan.json": b"{}", **(listed or {})}
    manifest = {"format": 1, "configurations": {},
                "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest))
        for name, data in {**files, **(extra or {})}.items():
            archive.writestr(name, data)
    return path


def test_import_keeps_only_manifest_members_with_the_umask_modes(tmp_path: Path) -> None:
    archive = _model_zip(tmp_path / "m.zip", extra={"extra.bin": b"x" * 1000})
    previous = os.umask(0o022)
    try:
        dest = import_model(archive, tmp_path / "model")
    finally:
        os.umask(previous)
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST, "plan.json"]
    assert dest.stat().st_mode & 0o777 == 0o755 and (dest / "plan.json").stat().st_mode & 0o777 == 0o644


def test_import_refuses_oversized_and_bomb_archives(tmp_path: Path, capsys) -> None:
    archive = _model_zip(tmp_path / "big.zip", listed={"models/weights.bin": os.urandom(4000)})
    with pytest.raises(ModelArchiveError, match="over the limit"):
        import_model(archive, tmp_path / "a", max_unpacked_bytes=2000)
    bomb = _model_zip(tmp_path / "bomb.zip", listed={"models/zeros.bin": bytes(50 * 1024 ** 2)})
    code, err = run_cli(["import-model", bomb, tmp_path / "b"], capsys)
    assert code == 1 and "zip bomb" in error_line(err, "import-model")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and leftovers(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_import_refuses_corrupted_members_in_one_line(tmp_path: Path, capsys) -> None:
    payload = os.urandom(3000)
    archive = _model_zip(tmp_path / "m.zip", listed={"models/weights.bin": payload}, compression=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    data[data.index(payload) + 100] ^= 0xFF  # one flipped byte: the zip's CRC fails
    archive.write_bytes(bytes(data))
    code, err = run_cli(["import-model", archive, tmp_path / "model"], capsys)
    line = error_line(err, "import-model")
    assert code == 1 and line.startswith(f"autoseg import-model: error: {archive}: ") and "damaged or not a zip" in line
    assert not (tmp_path / "model").exists()

    bad_field = tmp_path / "f.zip"
    with zipfile.ZipFile(bad_field, "w") as target:
        target.writestr(MANIFEST, json.dumps({"format": "one", "files": {}}))
        target.writestr("plan.json", "{}")
    with pytest.raises(ModelArchiveError, match='"format" must be a whole number'):
        import_model(bad_field, tmp_path / "model2")


# --- predict: a crashed run's temporary files, a skipped case ---------------------------------------


def test_predict_cleans_a_crashed_runs_leftovers_and_fails_on_a_skipped_case(tmp_path: Path, capsys,
                                                                           request) -> None:
    from test_inference import ThresholdNet, case_image, make_model, write_cases

    from autoseg.networks import register_network, unregister_network

    register_network("test_threshold")(ThresholdNet)  # the test model's network (see test_inference)
    request.addfinalizer(lambda: unregister_network("test_threshold"))
    model = make_model(tmp_path / "model", folds=("0",))
    inputs = tmp_path / "in"
    write_cases(inputs, count=1)
    write_image(Image(case_image(), (1.0, 1.0, 1.0)), inputs / "case_009_0001.nii.gz")  # a 1-channel model
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp_x1y2z3.nii.gz").write_bytes(b"half a prediction")  # what a killed run left
    with pytest.warns(UserWarning, match="case_009_0001.nii.gz: channel 0001"):
        code, err = run_cli(["predict", model, "-i", inputs, "-o", out, "-c", "3d_fullres", "--device", "cpu"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "autoseg predict: error: " in err and "case_009_0001.nii.gz" in err
    names = sorted(p.name for p in out.iterdir())
    assert "case_000.nii.gz" in names and not [n for n in names if n.startswith(".") or "case_009" in n]
    assert read_image(out / "case_000.nii.gz").array.shape == read_image(inputs / "case_000_0000.nii.gz").array.shape


def test_predict_and_export_on_a_full_then_read_only_disk(small_disk: Path, tmp_path: Path, capsys,
                                                          request) -> None:
    from test_inference import ThresholdNet, make_model, write_cases

    from autoseg.networks import register_network, unregister_network

    register_network("test_threshold")(ThresholdNet)
    request.addfinalizer(lambda: unregister_network("test_threshold"))
    model = make_model(tmp_path / "model", folds=("0",))
    inputs = tmp_path / "in"
    write_cases(inputs, count=3)
    out = small_disk / "out"
    out.mkdir()
    filler = small_disk / "filler"
    stat = os.statvfs(small_disk)
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 4096))  # one page left: the lock file's
    code, err = run_cli(["predict", model, "-i", inputs, "-o", out, "-c", "3d_fullres", "--device", "cpu"], capsys)
    assert code == 1 and "Traceback" not in err and "the disk is full" in err
    for path in out.iterdir():  # whatever was published is complete; nothing temporary is left
        assert not path.name.startswith(".")
        if path.name.endswith(".nii.gz"):
            assert read_image(path).array.shape == (10, 24, 20)

    filler.unlink()
    if subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot remount the tmpfs read-only")
    code, err = run_cli(["predict", model, "-i", inputs, "-o", small_disk / "out2", "-c", "3d_fullres",
                         "--device", "cpu"], capsys)
    assert code == 1 and "read-only" in error_line(err, "predict")
    code, err = run_cli(["export-model", model, "-o", small_disk / "model.zip"], capsys)
    assert code == 1 and "read-only" in error_line(err, "export-model").lower()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"expected_cases": "case_000"}'])
def test_a_damaged_preprocessing_manifest_is_one_line(tiny_work: Path, capsys, content: str) -> None:
    manifest = tiny_work / "preprocessed" / "3d_fullres" / "manifest.json"
    manifest.write_text(content)
    code, err = run_cli(["train", tiny_work, "-c", "3d_fullres", "-f", "0", "--workers", "0"], capsys)
    line = error_line(err, "train")
    assert code == 1 and str(manifest) in line and "autoseg preprocess" in line
