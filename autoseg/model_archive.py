"""A trained model as one zip file: ``autoseg export-model`` and ``autoseg import-model``.

The zip holds exactly what :func:`autoseg.inference.predict_folder` reads, in the work folder's own
layout, so an imported folder is used like a work folder::

    autoseg_model.json                  format, configurations and folds, SHA-256 of every file
    plan.json  dataset.json  fingerprint.json
    models/<configuration>/splits.json
    models/<configuration>/postprocessing.json
    models/<configuration>/calibration.json, reference_stats.json   (when ``autoseg calibrate`` wrote them)
    models/<configuration>/fold_<k>/checkpoint_best.pt   (checkpoint_latest.pt when a fold has no best)
    models/<configuration>/fold_<k>/{plan,overrides,schedule}.json, training_log.jsonl,
                                     validation/summary.json

No preprocessed data and no validation predictions. Checkpoints are stored uncompressed (they are
zip files already), JSON deflated. Import refuses member names that would leave the destination
(absolute paths, ``..``, drive letters, links) and archives that would unpack past
:data:`MAX_UNPACKED_BYTES`, unpacks only the files its manifest lists, checks each against the
recorded SHA-256, and unpacks into a temporary sibling folder that is renamed onto the destination
at the end, so an interrupted import leaves nothing half-written under the destination's name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from autoseg.atomic import current_umask, write_failure
from autoseg.errors import AutosegError
from autoseg.plan import PlanError, load_plan
from autoseg.trust.calibration import CALIBRATION_FILE
from autoseg.trust.plausibility import REFERENCE_STATS_FILE
from autoseg.utils import atomic_write
from autoseg.workdir import CHECKPOINT_NAMES, WorkDir

MANIFEST = "autoseg_model.json"
ARCHIVE_FORMAT = 1
TOP_FILES = ("plan.json", "dataset.json", "fingerprint.json")
# the trust artifacts (autoseg calibrate) travel with the model: predict's summary needs them
CONFIGURATION_FILES = ("splits.json", "postprocessing.json", CALIBRATION_FILE, REFERENCE_STATS_FILE)
# import limits: no autoseg model comes near them; they stop a zip bomb before it fills the disk
MAX_UNPACKED_BYTES = 20 * 1024 ** 3
MAX_MANIFEST_BYTES = 16 * 1024 ** 2
MAX_COMPRESSION_RATIO = 200  # JSON deflates about 10:1, checkpoints are stored; zeros deflate 1000:1
MIN_CHECKED_MEMBER = 1024 ** 2
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


def import_model(zip_path: str | os.PathLike, dest: str | os.PathLike,
                 max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Unpack a model zip (from :func:`export_model`) into ``dest``, usable by ``autoseg predict``.

    Only the files listed in the archive's manifest are unpacked, each checked against its
    recorded SHA-256 as it is written. Their total size is checked against ``max_unpacked_bytes``
    and the free disk space before anything is unpacked (from the sizes the zip declares), and
    again while unpacking (a member may lie about its size).

    Raises:
        ModelArchiveError: the zip is missing, not a zip, not an autoseg model, too large, damaged,
            has an unsafe member name, a file that does not match its recorded checksum, or
            ``dest`` is not empty.
        WriteError: ``dest`` is not writable or the disk is full.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if not zip_path.is_file():
        raise ModelArchiveError(f"{zip_path}: file does not exist")
    if not zipfile.is_zipfile(zip_path):
        raise ModelArchiveError(f"{zip_path}: not a zip file")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ModelArchiveError(f"{dest}: already exists and is not empty; refusing to overwrite it (choose a new "
                                "folder or empty this one)")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            return _unpack(archive, zip_path, dest, max_unpacked_bytes)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise ModelArchiveError(f"{zip_path}: damaged or not a zip file ({error}); copy or download it again") from None


def _unpack(archive: zipfile.ZipFile, zip_path: Path, dest: Path, max_bytes: int) -> Path:
    by_name = {m.filename: m for m in archive.infolist() if not m.is_dir()}
    for member in by_name.values():
        _safe_member(member.filename, zip_path)
        if stat.S_ISLNK(member.external_attr >> 16):
            raise ModelArchiveError(f"{zip_path}: member {member.filename!r} is a symbolic link; refusing to import")
    if MANIFEST not in by_name or "plan.json" not in by_name:
        raise ModelArchiveError(f"{zip_path}: not an autoseg model (no {MANIFEST} or plan.json at the top)")
    checksums = _read_manifest(archive, by_name[MANIFEST], zip_path)
    missing = sorted(set(checksums) - set(by_name))
    if missing:
        raise ModelArchiveError(f"{zip_path}: {missing[0]} is listed in {MANIFEST} but missing")
    # the manifest, plan.json (which every model has) and the listed files; anything else stays packed
    wanted = [by_name[MANIFEST]] + [by_name[name] for name in sorted(set(checksums) | {"plan.json"})]
    _check_sizes(wanted, zip_path, dest, max_bytes)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".importing", dir=dest.parent))
    except OSError as error:
        raise write_failure(dest, error) from None
    try:
        budget = max_bytes
        for member in wanted:
            target = staging.joinpath(*_safe_member(member.filename, zip_path).parts)
            try:
                budget -= _extract(archive, member, target, checksums.get(member.filename), budget, zip_path)
            except OSError as error:
                raise write_failure(dest / member.filename, error) from None
        if dest.exists():
            dest.rmdir()  # empty (checked above); os.replace cannot rename onto a directory
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp made it 0700
        os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return dest


def _read_manifest(archive: zipfile.ZipFile, member: zipfile.ZipInfo, zip_path: Path) -> dict[str, str]:
    """The manifest's ``{member: SHA-256}`` table; every malformed field is a one-line error."""
    if member.file_size > MAX_MANIFEST_BYTES:
        raise ModelArchiveError(f"{zip_path}: {MANIFEST} declares {member.file_size} bytes; not an autoseg manifest")
    try:
        manifest = json.loads(archive.read(member))
    except ValueError as error:
        raise ModelArchiveError(f"{zip_path}: {MANIFEST} is not valid JSON ({error})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ModelArchiveError(f"{zip_path}: {MANIFEST} has no \"files\" table of names and SHA-256 checksums")
    version = manifest.get("format", 0)
    if not isinstance(version, int):
        raise ModelArchiveError(f"{zip_path}: {MANIFEST} field \"format\" must be a whole number, got {version!r}")
    if version > ARCHIVE_FORMAT:
        raise ModelArchiveError(f"{zip_path}: model archive format {version} is newer than this autoseg "
                                f"reads ({ARCHIVE_FORMAT})")
    for name in files:
        _safe_member(name, zip_path)
    files.pop(MANIFEST, None)
    return files


def _check_sizes(members: Sequence[zipfile.ZipInfo], zip_path: Path, dest: Path, max_bytes: int) -> None:
    """Refuse, before unpacking, an archive whose declared sizes exceed the limit or the free space."""
    total = sum(m.file_size for m in members)
    if total > max_bytes:
        raise ModelArchiveError(f"{zip_path}: would unpack to {total / 1e6:.1f} MB, over the limit of "
                                f"{max_bytes / 1e6:.1f} MB; not an autoseg model, or a damaged one")
    for member in members:
        if member.file_size > MIN_CHECKED_MEMBER and member.file_size > MAX_COMPRESSION_RATIO * max(member.compress_size, 1):
            raise ModelArchiveError(f"{zip_path}: member {member.filename} expands {member.file_size} bytes from "
                                    f"{member.compress_size}; refusing a zip bomb")
    probe = next((p for p in (dest, *dest.parents) if p.exists()), None)
    free = shutil.disk_usage(probe).free if probe is not None else None
    if free is not None and total > free:
        raise ModelArchiveError(f"{zip_path}: needs {total / 1e6:.1f} MB but {probe} has {free / 1e6:.1f} MB free")


def _extract(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, expected: str | None,
             budget: int, zip_path: Path) -> int:
    """Write one member, checking its size as it goes and its SHA-256 at the end; returns its size."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.sha256(), 0
    with archive.open(member) as source, open(target, "wb") as out:
        for block in iter(lambda: source.read(1 << 20), b""):
            written += len(block)
            if written > member.file_size or written > budget:
                raise ModelArchiveError(f"{zip_path}: member {member.filename} unpacks to more than it declares; "
                                        "refusing a damaged or malicious archive")
            digest.update(block)
            out.write(block)
    if expected is not None and digest.hexdigest() != expected:
        raise ModelArchiveError(f"{zip_path}: {member.filename} does not match its recorded SHA-256 (corrupt archive)")
    os.chmod(target, 0o666 & ~current_umask())
    return written
