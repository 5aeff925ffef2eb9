"""A trained model as one zip file: ``autoseg export-model`` and ``autoseg import-model``.

The zip holds exactly what :func:`autoseg.inference.predict_folder` reads, in the work folder's own
layout, so an imported folder is used like a work folder::

    autoseg_model.json                  format, configurations and folds, SHA-256 of every file
    plan.json  dataset.json  fingerprint.json
    models/<configuration>/splits.json
    models/<configuration>/postprocessing.json
    models/<configuration>/fold_<k>/checkpoint_best.pt   (checkpoint_latest.pt when a fold has no best)
    models/<configuration>/fold_<k>/{plan,overrides,schedule}.json, training_log.jsonl,
                                     validation/summary.json

No preprocessed data and no validation predictions. Checkpoints are stored uncompressed (they are
zip files already), JSON deflated. Import refuses member names that would leave the destination
(absolute paths, ``..``, drive letters, links), checks every file against the recorded SHA-256, and
unpacks into a temporary sibling folder that is renamed onto the destination at the end, so an
interrupted import leaves nothing half-written under the destination's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from autoseg.errors import AutosegError
from autoseg.plan import PlanError, load_plan
from autoseg.utils import atomic_write, read_json
from autoseg.workdir import CHECKPOINT_NAMES, WorkDir

MANIFEST = "autoseg_model.json"
ARCHIVE_FORMAT = 1
TOP_FILES = ("plan.json", "dataset.json", "fingerprint.json")
CONFIGURATION_FILES = ("splits.json", "postprocessing.json")
FOLD_FILES = ("plan.json", "overrides.json", "schedule.json", "training_log.jsonl", "validation/summary.json")


class ModelArchiveError(AutosegError, ValueError):
    """A model cannot be exported or imported (the message names the file and the problem)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _previous_stage(work: Path, configuration: str) -> str | None:
    """The previous stage a cascade configuration needs at inference, else None."""
    try:
        return load_plan(work).configuration(configuration).previous_stage
    except PlanError:
        return None


def export_model(work_dir: str | os.PathLike, out_zip: str | os.PathLike,
                 configurations: Sequence[str] | None = None) -> Path:
    """Pack a trained model into one zip file (written atomically).

    Args:
        work_dir: the work folder (or an imported model folder).
        out_zip: the zip file to write.
        configurations: configurations to include; default every one with a trained fold. The
            previous stage of a cascade configuration is added.

    Returns:
        The zip path.

    Raises:
        ModelArchiveError: no plan, an unknown or untrained configuration.
    """
    work = Path(work_dir)
    if not (work / "plan.json").is_file():
        raise ModelArchiveError(f"{work / 'plan.json'}: missing; {work} is not a work or model folder")
    models = work / "models"
    trained = sorted(p.name for p in models.iterdir() if p.is_dir() and WorkDir(work).folds(p.name)) if models.is_dir() else []
    wanted = list(configurations) if configurations else list(trained)
    if not wanted:
        raise ModelArchiveError(f"{models}: no trained configuration to export")
    for name in wanted:
        if name not in trained:
            raise ModelArchiveError(f"{models / name}: configuration {name!r} has no trained fold; trained: "
                                    f"{', '.join(trained) or 'none'}")
    for name in list(wanted):
        previous = _previous_stage(work, name)
        if previous and previous not in wanted:
            if previous not in trained:
                raise ModelArchiveError(f"{models / previous}: {name!r} is a cascade stage that needs {previous!r}, "
                                        "which is not trained")
            wanted.append(previous)

    files: list[str] = [name for name in TOP_FILES if (work / name).is_file()]
    folds_by_configuration: dict[str, list[str]] = {}
    for name in wanted:
        base = f"models/{name}"
        files += [f"{base}/{f}" for f in CONFIGURATION_FILES if (work / base / f).is_file()]
        folds_by_configuration[name] = []
        for fold_name in WorkDir(work).folds(name):
            fold = WorkDir(work).fold(name, fold_name)
            fold_base = f"{base}/{fold.name}"
            checkpoint = next(c for c in CHECKPOINT_NAMES if (fold / c).is_file())
            files.append(f"{fold_base}/{checkpoint}")
            files += [f"{fold_base}/{f}" for f in FOLD_FILES if (fold / f).is_file()]
            folds_by_configuration[name].append(fold_name)

    manifest = {
        "format": ARCHIVE_FORMAT,
        "configurations": folds_by_configuration,
        "files": {member: _sha256(work / member) for member in files},
    }

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w") as archive:
            archive.writestr(MANIFEST, json.dumps(manifest, indent=2) + "\n", compress_type=zipfile.ZIP_DEFLATED)
            for member in files:
                compression = zipfile.ZIP_STORED if member.endswith(".pt") else zipfile.ZIP_DEFLATED
                archive.write(work / member, member, compress_type=compression)

    return atomic_write(out_zip, write)


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if (name.startswith(("/", "\\")) or ":" in name or not path.parts
            or any(part in ("..", "") for part in path.parts)):
        raise ModelArchiveError(f"{archive}: member {name!r} would be written outside the destination; refusing "
                                "to import")
    return path


def import_model(zip_path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Unpack a model zip (from :func:`export_model`) into ``dest``, usable by ``autoseg predict``.

    Raises:
        ModelArchiveError: the zip is missing, not a zip, not an autoseg model, has an unsafe member
            name, a file that does not match its recorded checksum, or ``dest`` is not empty.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if not zip_path.is_file():
        raise ModelArchiveError(f"{zip_path}: file does not exist")
    if not zipfile.is_zipfile(zip_path):
        raise ModelArchiveError(f"{zip_path}: not a zip file")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelArchiveError(f"{dest}: already exists and is not empty; refusing to overwrite it (choose a new "
                                "folder or empty this one)")
    with zipfile.ZipFile(zip_path) as archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        for member in members:
            _safe_member(member.filename, zip_path)
            if stat.S_ISLNK(member.external_attr >> 16):
                raise ModelArchiveError(f"{zip_path}: member {member.filename!r} is a symbolic link; refusing to import")
        names = {m.filename for m in members}
        if MANIFEST not in names or "plan.json" not in names:
            raise ModelArchiveError(f"{zip_path}: not an autoseg model (no {MANIFEST} or plan.json at the top)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".importing", dir=dest.parent))
        try:
            for member in members:
                target = staging.joinpath(*_safe_member(member.filename, zip_path).parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
            _verify(staging, zip_path)
            if dest.exists():
                dest.rmdir()  # empty (checked above); os.replace cannot rename onto a directory
            os.replace(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return dest


def _verify(folder: Path, zip_path: Path) -> None:
    try:
        manifest = read_json(folder / MANIFEST)
    except ValueError as error:
        raise ModelArchiveError(f"{zip_path}: {MANIFEST} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ModelArchiveError(f"{zip_path}: {MANIFEST} has no \"files\" table")
    if int(manifest.get("format", 0)) > ARCHIVE_FORMAT:
        raise ModelArchiveError(f"{zip_path}: model archive format {manifest['format']} is newer than this autoseg "
                                f"reads ({ARCHIVE_FORMAT})")
    for member, expected in manifest["files"].items():
        path = folder.joinpath(*_safe_member(member, zip_path).parts)
        if not path.is_file():
            raise ModelArchiveError(f"{zip_path}: {member} is listed in {MANIFEST} but missing")
        if _sha256(path) != expected:
            raise ModelArchiveError(f"{zip_path}: {member} does not match its recorded SHA-256 (corrupt archive)")
