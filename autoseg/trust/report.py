"""``autoseg report PREDICTIONS -o report/``: one HTML page to review predictions by eye.

The page (``index.html``) needs no server: it opens from disk, with its PNGs beside it in
``images/``. Cases come least trusted first (flagged ones first, then by ascending confidence
score, :meth:`~autoseg.trust.summary.PredictionSummary.least_trusted_first`); each shows its flags,
a table of per-class confidence and, per predicted structure, three orthogonal slices through the
structure's centre (one for a 2D image) with the predicted contour in the class' colour and, when
``--reference`` is given, the reference contour dashed in yellow.

The background is the input image (``--images``: ``CASE_0000<ending>``), else the voxel-wise
uncertainty map (``CASE_uncertainty<ending>`` written by ``predict --save-uncertainty``), else black.
Without ``summary.json`` (predictions made elsewhere) every label value found is a class and no
confidence is shown.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from autoseg.errors import AutosegError
from autoseg.io import SUPPORTED_ENDINGS, file_ending, read_image
from autoseg.labels import label_mask
from autoseg.trust.recorder import UNCERTAINTY_SUFFIX
from autoseg.trust.summary import SUMMARY_FILE, CaseSummary, PredictionSummary, load_summary
from autoseg.utils import atomic_write, atomic_write_text

__all__ = ["CLASS_COLOURS", "ReportError", "UNCERTAINTY_SUFFIX", "write_report"]

# distinct, saturated colours (RGB 0-255) that survive PNG compression; class i gets colour i mod 8
CLASS_COLOURS = ((255, 48, 48), (48, 220, 48), (64, 128, 255), (255, 64, 255), (0, 230, 230), (255, 128, 0),
                 (160, 96, 255), (150, 90, 40))
REFERENCE_COLOUR = (255, 255, 0)  # yellow, dashed: visible on bright structures, unlike white
_DPI = 72
_PANEL_INCHES = 2.4


class ReportError(AutosegError):
    """Nothing to report on, or a file that cannot be read (the message names it)."""


def _case_label_files(predictions: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(predictions.iterdir()):
        ending = file_ending(path.name)
        if path.name.startswith(".") or ending not in SUPPORTED_ENDINGS:
            continue
        stem = path.name[: -len(ending)]
        if stem.endswith(UNCERTAINTY_SUFFIX):
            continue
        files[stem] = path
    return files


def _summary_or_bare(predictions: Path) -> PredictionSummary:
    """``summary.json``, or a bare one (no confidence) listing every label file and value found."""
    if (predictions / SUMMARY_FILE).is_file():
        return load_summary(predictions / SUMMARY_FILE)
    files = _case_label_files(predictions)
    if not files:
        raise ReportError(f"{predictions}: no label maps and no {SUMMARY_FILE}; run `autoseg predict` first")
    values: set[int] = set()
    for path in files.values():
        values |= {int(v) for v in np.unique(read_image(path).array) if v > 0}
    cases = tuple(CaseSummary(case_id=case, label_file=path.name, score=1.0, classes={})
                  for case, path in files.items())
    return PredictionSummary(configuration="unknown", folds=(), tta=False, temperature=None, cases=cases,
                             labels={f"label {v}": v for v in sorted(values)})


def _find_image(folder: Path | None, case_id: str, label_file: str) -> Path | None:
    if folder is None:
        return None
    ending = file_ending(label_file)
    for candidate in (folder / f"{case_id}_0000{ending}", folder / label_file):
        if candidate.is_file():
            return candidate
    matches = sorted(folder.glob(f"{case_id}_0000.*"))
    return matches[0] if matches else None


def _slices(mask: np.ndarray) -> list[tuple[str, tuple[int | slice, ...]]]:
    """Three orthogonal slices through the mask's centre of mass (one for a single-slice image)."""
    centre = np.argwhere(mask).mean(0).round().astype(int) if mask.any() else np.array(mask.shape) // 2
    if mask.ndim == 2:
        return [("", (slice(None), slice(None)))]
    if mask.shape[0] == 1:
        return [("", (0, slice(None), slice(None)))]
    z, y, x = (int(v) for v in centre)
    return [(f"axial z={z}", (z, slice(None), slice(None))), (f"coronal y={y}", (slice(None), y, slice(None))),
            (f"sagittal x={x}", (slice(None), slice(None), x))]


def _aspect(spacing: Sequence[float], index: tuple[int | slice, ...]) -> float:
    kept = [s for s, i in zip(spacing, index) if isinstance(i, slice)]
    return float(kept[0] / kept[1]) if len(kept) == 2 and kept[1] > 0 else 1.0


def _render(path: Path, background: np.ndarray | None, spacing: Sequence[float], prediction: np.ndarray,
            reference: np.ndarray | None, colour: tuple[int, int, int], title: str) -> None:
    panels = _slices(prediction if prediction.any() or reference is None else reference)
    inches = _PANEL_INCHES if len(panels) > 1 else 1.5 * _PANEL_INCHES  # a 2D image gets one larger panel
    figure = Figure(figsize=(inches * len(panels), inches + 0.3), dpi=_DPI)
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=9)
    rgb = tuple(c / 255 for c in colour)
    reference_rgb = tuple(c / 255 for c in REFERENCE_COLOUR)
    for position, (name, index) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), position)
        aspect = _aspect(spacing, index)
        plane = prediction[index]
        if background is not None:
            low, high = np.percentile(background, [1, 99])
            axes.imshow(background[index], cmap="gray", vmin=low, vmax=high if high > low else low + 1,
                        aspect=aspect, interpolation="nearest")
        else:
            axes.imshow(np.zeros(plane.shape), cmap="gray", vmin=0, vmax=1, aspect=aspect)
        if plane.any() and not plane.all():
            axes.contour(plane.astype(float), levels=[0.5], colors=[rgb], linewidths=1.5)
        if reference is not None:
            reference_plane = reference[index]
            if reference_plane.any() and not reference_plane.all():
                axes.contour(reference_plane.astype(float), levels=[0.5], colors=[reference_rgb], linewidths=1.2,
                             linestyles="dashed")
        axes.set_title(name, fontsize=8)
        axes.set_axis_off()
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.85, wspace=0.05)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=_DPI))


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _case_html(case: CaseSummary, images: Sequence[tuple[str, str]], has_reference: bool) -> str:
    flags = "".join(f"<li>{html.escape(flag.reason)}</li>" for flag in case.flags)
    status = ('<span class="review">needs review</span>' if case.flags else '<span class="ok">no flags</span>')
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{c.voxels}</td><td>{c.volume_mm3 / 1000:.3g}</td>"
        f"<td>{_fmt(c.probability)}</td><td>{_fmt(c.entropy)}</td><td>{_fmt(c.fold_agreement)}</td>"
        f"<td>{_fmt(c.mirror_agreement)}</td><td>{_fmt(c.score)}</td></tr>"
        for name, c in case.classes.items())
    table = ("<table><tr><th>class</th><th>voxels</th><th>ml</th><th>probability</th><th>entropy</th>"
             f"<th>fold agreement</th><th>mirror agreement</th><th>score</th></tr>{rows}</table>") if rows else ""
    pictures = "".join(f'<figure><img src="{html.escape(src)}" alt="{html.escape(alt)}"></figure>'
                       for src, alt in images)
    seconds = f" &middot; {case.seconds:.1f} s" if case.seconds is not None else ""
    legend = " &middot; yellow dashed: reference" if has_reference else ""
    return (f'<section id="{html.escape(case.case_id)}"><h2>{html.escape(case.case_id)} {status}</h2>'
            f'<p class="meta">score {case.score:.2f}{seconds} &middot; {html.escape(case.label_file)}{legend}</p>'
            f'{"<ul class=flags>" + flags + "</ul>" if flags else ""}{table}{pictures}</section>')


_STYLE = """body{font-family:sans-serif;margin:1.5em;background:#fafafa;color:#222}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:0.8em 1em;margin:0 0 1em}
h2{font-size:1.1em;margin:0 0 0.3em}.review{color:#fff;background:#c62828;padding:1px 6px;border-radius:4px;
font-size:0.8em}.ok{color:#fff;background:#2e7d32;padding:1px 6px;border-radius:4px;font-size:0.8em}
.meta{color:#666;margin:0 0 0.4em;font-size:0.9em}ul.flags{color:#b71c1c;margin:0.2em 0 0.5em}
table{border-collapse:collapse;font-size:0.85em;margin:0.3em 0}td,th{border:1px solid #ddd;padding:2px 6px;
text-align:right}td:first-child{text-align:left}figure{display:inline-block;margin:0.3em}
img{max-width:100%;border:1px solid #ccc}"""


def write_report(predictions_dir: str | os.PathLike, output_dir: str | os.PathLike,
                 reference_dir: str | os.PathLike | None = None,
                 images_dir: str | os.PathLike | None = None) -> Path:
    """Write ``output_dir/index.html`` and its PNGs; returns the page's path.

    Args:
        predictions_dir: label maps written by ``autoseg predict`` (and its ``summary.json``).
        output_dir: where the page goes (created).
        reference_dir: reference label maps with the same file names, drawn dashed in yellow.
        images_dir: the input images (``CASE_0000<ending>``), drawn underneath.

    Raises:
        ReportError: no predictions, or a file that cannot be read.
    """
    predictions, output = Path(predictions_dir), Path(output_dir)
    reference_folder = None if reference_dir is None else Path(reference_dir)
    image_folder = None if images_dir is None else Path(images_dir)
    if not predictions.is_dir():
        raise ReportError(f"{predictions}: predictions folder does not exist")
    summary = _summary_or_bare(predictions)
    labels: Mapping[str, int | tuple[int, ...]] = summary.labels or {}
    ordered = summary.least_trusted_first()
    sections = []
    for case in ordered:
        label_path = predictions / case.label_file
        if not label_path.is_file():
            raise ReportError(f"{label_path}: listed in {SUMMARY_FILE} but missing")
        prediction = read_image(label_path)
        reference_path = None if reference_folder is None else reference_folder / case.label_file
        reference = read_image(reference_path).array if reference_path is not None and reference_path.is_file() \
            else None
        background_path = _find_image(image_folder, case.case_id, case.label_file)
        if background_path is None:
            uncertainty = predictions / f"{case.case_id}{UNCERTAINTY_SUFFIX}{file_ending(case.label_file)}"
            background_path = uncertainty if uncertainty.is_file() else None
        background = None if background_path is None else read_image(background_path).array.astype(np.float32)
        if background is not None and background.shape != prediction.array.shape:
            background = None  # a multi-channel or mismatched file: draw the contours on black
        pictures = []
        for number, (name, value) in enumerate(labels.items()):
            mask = label_mask(prediction.array, value)
            reference_mask = None if reference is None else label_mask(reference, value)
            if not mask.any() and (reference_mask is None or not reference_mask.any()):
                continue
            file_name = f"{case.case_id}_{number}.png"
            _render(output / "images" / file_name, background, prediction.spacing, mask, reference_mask,
                    CLASS_COLOURS[number % len(CLASS_COLOURS)], f"{case.case_id}: {name}")
            pictures.append((f"images/{file_name}", f"{case.case_id} {name}"))
        sections.append(_case_html(case, pictures, reference is not None))
    flagged = sum(1 for case in ordered if case.flags)
    legend = " ".join(f'<span style="color:rgb{CLASS_COLOURS[i % len(CLASS_COLOURS)]}">&#9632; {html.escape(name)}'
                      f"</span>" for i, name in enumerate(labels))
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>autoseg review: {html.escape(str(predictions))}"
            f"</title><style>{_STYLE}</style></head><body><h1>Which outputs to trust</h1>"
            f"<p>{len(ordered)} case(s), <b>{flagged} flagged for review</b>; least trusted first. "
            f"Configuration {html.escape(summary.configuration)}, folds {', '.join(summary.folds) or '-'}, "
            f"temperature {_fmt(summary.temperature) or 'none'}. {legend}</p>{''.join(sections)}</body></html>\n")
    return atomic_write_text(output / "index.html", page)
