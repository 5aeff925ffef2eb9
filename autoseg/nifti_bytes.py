"""Byte-level checks of NIfTI files for what ITK's reader hides.

ITK reads a truncated ``.nii``/``.nii.gz`` without an error (the missing voxels become zeros) and
turns NaN and Inf into 0, so :func:`check_nifti_bytes` looks at the raw bytes.
:func:`nifti_truncation` is the cheap part (header + gzip trailer, no decompression for intact
files) that :func:`autoseg.io.read_image` runs on every NIfTI it reads.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np


@dataclass(frozen=True)
class NiftiByteCheck:
    """What the raw bytes of a NIfTI file hold that ITK does not tell."""

    truncated: bool
    problems: tuple[str, ...]


@dataclass(frozen=True)
class _NiftiHeader:
    byte_order: str
    datatype: int
    bitpix: int
    vox_offset: int
    voxels: int

    @property
    def expected_size(self) -> int:
        return self.vox_offset + self.voxels * self.bitpix // 8


# NIfTI datatype codes of floating-point voxels, the only ones that can hold NaN or Inf.
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
_CHUNK_BYTES = 1 << 23


def check_nifti_bytes(path: str | os.PathLike) -> NiftiByteCheck:
    """Check what ITK hides when it reads a NIfTI file: missing voxel bytes and NaN/Inf values.

    ITK reads a truncated ``.nii``/``.nii.gz`` without an error and fills the missing voxels with
    zeros, and its NIfTI reader silently turns NaN and Inf into 0, so both are checked on the
    raw bytes. Integer files are checked by size only, which for ``.nii.gz`` is the gzip trailer's
    size field (four bytes, no decompression); float files, or a trailer that disagrees (a truncated
    file, or an unusual but valid multi-member stream), are decompressed once in chunks.
    """
    path = Path(path)
    compressed = path.name.lower().endswith(".gz")

    def open_() -> BinaryIO:
        return gzip.open(path, "rb") if compressed else open(path, "rb")  # type: ignore[return-value]

    try:
        with open_() as f:
            header = _parse_nifti_header(f.read(540))
    except (OSError, EOFError, zlib.error) as error:
        return NiftiByteCheck(True, (f"cannot be read ({error}); is it truncated or corrupt?",))
    if header is None:
        return NiftiByteCheck(False, ())  # not a NIfTI-1/2 header we can parse; ITK read it, trust it
    float_type = _NIFTI_FLOAT_TYPES.get(header.datatype)
    expected = header.expected_size

    if float_type is None and not compressed:
        actual, n_nan, n_inf = path.stat().st_size, 0, 0
    elif float_type is None and _gzip_trailer_size(path) == expected % 2**32:
        return NiftiByteCheck(False, ())
    else:
        dtype = np.dtype(header.byte_order + float_type) if float_type else None
        try:
            with open_() as f:
                actual, n_nan, n_inf = _scan_voxels(f, header, dtype)
        except (OSError, EOFError, zlib.error) as error:
            return NiftiByteCheck(True, (f"the compressed data ends early or is corrupt ({error}); "
                                         "the file is truncated",))
    problems = []
    if actual < expected:
        problems.append(f"truncated: {actual} bytes where the header promises {expected} "
                        "(ITK would fill the missing voxels with zeros)")
    if n_nan or n_inf:
        problems.append(f"{n_nan} NaN and {n_inf} infinite voxel value(s), which ITK reads as 0; "
                        "replace them with finite numbers")
    return NiftiByteCheck(actual < expected, tuple(problems))


def _parse_nifti_header(raw: bytes) -> _NiftiHeader | None:
    """The fields that fix the voxel data's size and type, from a NIfTI-1 or NIfTI-2 header."""
    for order in "<>":
        if len(raw) >= 348 and struct.unpack(order + "i", raw[:4])[0] == 348:
            datatype, bitpix = struct.unpack(order + "2h", raw[70:74])
            dims = struct.unpack(order + "8h", raw[40:56])
            offset = int(struct.unpack(order + "f", raw[108:112])[0])
            break
        if len(raw) >= 540 and struct.unpack(order + "i", raw[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "2h", raw[12:16])
            dims = struct.unpack(order + "8q", raw[16:80])
            offset = struct.unpack(order + "q", raw[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or offset < 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1: dims[0] + 1]]))
    return _NiftiHeader(order, datatype, bitpix, int(offset), voxels)


def _gzip_trailer_size(path: Path) -> int:
    """The uncompressed size modulo 2**32 that a single-member gzip file records in its last bytes."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _scan_voxels(f: BinaryIO, header: _NiftiHeader, dtype: np.dtype | None) -> tuple[int, int, int]:
    """Read a whole file in chunks: its size, and the NaN and Inf counts among the voxels of ``dtype``."""
    total = n_nan = n_inf = 0
    to_skip = header.vox_offset
    to_scan = header.voxels * dtype.itemsize if dtype is not None else 0
    pending = b""  # bytes of a voxel split across two chunks
    while chunk := f.read(_CHUNK_BYTES):
        total += len(chunk)
        skipped = min(to_skip, len(chunk))
        to_skip -= skipped
        take = chunk[skipped: skipped + to_scan]
        to_scan -= len(take)
        if not take:
            continue
        data = pending + take
        usable = len(data) - len(data) % dtype.itemsize  # type: ignore[union-attr]
        values = np.frombuffer(data[:usable], dtype=dtype)
        pending = data[usable:]
        nan = int(np.count_nonzero(np.isnan(values)))
        n_nan += nan
        n_inf += values.size - int(np.count_nonzero(np.isfinite(values))) - nan
    return total, n_nan, n_inf


def nifti_truncation(path: str | os.PathLike) -> str | None:
    """Why a NIfTI file is truncated, or None when its size matches its header.

    Intact ``.nii.gz`` files are judged from the gzip trailer's size field without decompressing;
    only a disagreeing trailer (a truncated file, or a rare multi-member stream) is decompressed.
    """
    path = Path(path)
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            header = _parse_nifti_header(f.read(540))
    except (OSError, EOFError, zlib.error) as error:
        return f"cannot be read ({error}); is it truncated or corrupt?"
    if header is None:
        return None
    expected = header.expected_size
    if not compressed:
        actual = path.stat().st_size
    elif _gzip_trailer_size(path) == expected % 2**32:
        return None
    else:
        return "; ".join(check_nifti_bytes(path).problems) or None
    if actual < expected:
        return f"truncated: {actual} bytes where the header promises {expected}"
    return None
