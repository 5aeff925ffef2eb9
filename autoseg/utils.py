"""Small shared helpers: atomic writes, content hashes and a mask's bounding box."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from autoseg.atomic import atomic_write  # noqa: F401  (re-exported: the writers import it from here)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically (UTF-8); the written size is checked against the text's."""
    data = text.encode()

    def check(tmp: Path) -> str | None:
        size = tmp.stat().st_size
        return None if size == len(data) else f"{size} of {len(data)} bytes written"

    return atomic_write(path, lambda tmp: tmp.write_bytes(data), check=check, allow_empty=not data)


def atomic_write_json(path: str | os.PathLike, data: object) -> Path:
    """Write JSON (indented, key order kept) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike) -> object:
    """Read a JSON file; the error names the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def sha256_of_json(data: object) -> str:
    """A stable hash of JSON-able data (sorted keys), to tell whether an input changed."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def validate_model(adapter, data: object, source: str, kind: str, error_class: type[Exception]):
    """Validate JSON data into a typed model; every problem is listed with its field path.

    Args:
        adapter: a pydantic ``TypeAdapter`` of the model class.
        source: where the data came from (a file name), for the message.
        kind: what the model is ("plan", "fingerprint"), for the message.
        error_class: the exception to raise, with one line per problem.
    """
    from pydantic import ValidationError

    try:
        return adapter.validate_python(data)
    except ValidationError as error:
        lines = [f"  {'.'.join(str(p) for p in item['loc']) or '(top level)'}: {item['msg']}"
                 for item in error.errors()]
        raise error_class(f"{source} is not a valid {kind}:\n" + "\n".join(lines)) from None


def read_model_file(path: str | os.PathLike, file_name: str, error_class: type[Exception],
                    missing_hint: str) -> tuple[object, Path]:
    """Read the JSON of ``file_name`` (``path`` is the file or the folder holding it).

    Returns the data and the file's path; a missing or non-JSON file raises ``error_class``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise error_class(f"{path}: no {file_name} here; {missing_hint}")
    try:
        return read_json(path), path
    except ValueError as error:
        raise error_class(str(error)) from None


def bounding_slices(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel of ``mask``, grown by ``margin`` voxels
    and clipped to the array; None when no voxel is True."""
    box = []
    for axis, size in enumerate(mask.shape):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(max(0, int(hits[0]) - margin), min(size, int(hits[-1]) + 1 + margin)))
    return tuple(box)
