"""``autoseg report``: the HTML review sheet, its PNGs, and the page as a browser renders it.

The predictions here are constructed (no model): label maps, images and a ``summary.json`` with
flags, so the test checks what the report does with them, not what a model predicts. The browser
test opens the page in Debian's headless chromium and is skipped where chromium is not installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from autoseg.cli import main
from autoseg.io import Image, write_image
from autoseg.trust import CaseSummary, Flag, PredictionSummary, save_summary
from autoseg.trust.report import CLASS_COLOURS, REFERENCE_COLOUR, ReportError, write_report
from autoseg.trust.summary import ClassSummary

SPACING = (3.0, 1.0, 1.0)
LABELS = {"organ": 1, "lesion": 2}


def make_case(shift: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image, its predicted label map and a reference that differs by ``shift`` voxels."""
    reference = np.zeros((12, 40, 40), np.uint8)
    reference[3:9, 10:30, 10:30] = 1
    reference[5:7, 18:24, 18:24] = 2
    prediction = np.roll(reference, shift, axis=2)
    image = (reference * 100 + np.random.default_rng(shift).normal(50, 5, reference.shape)).astype(np.float32)
    return image, prediction, reference


def class_summary(score: float) -> dict[str, ClassSummary]:
    return {name: ClassSummary(voxels=100, volume_mm3=300.0, probability=0.9, entropy=1 - score, mirror_agreement=score,
                               score=score) for name in LABELS}


@pytest.fixture
def predictions(tmp_path: Path) -> Path:
    """Three cases: a confident one, a flagged one, a doubtful one (in that file order)."""
    folders = {name: tmp_path / name for name in ("predictions", "images", "references")}
    cases = []
    for case_id, shift, score, flags in (("a_good", 0, 0.95, ()), ("b_flagged", 4, 0.9,
                                         (Flag("volume", "organ volume 9 ml is outside the training range", "organ"),)),
                                         ("c_doubtful", 1, 0.4, ())):
        image, prediction, reference = make_case(shift)
        write_image(Image(image, SPACING), folders["images"] / f"{case_id}_0000.nii.gz")
        write_image(Image(prediction, SPACING), folders["predictions"] / f"{case_id}.nii.gz")
        write_image(Image(reference, SPACING), folders["references"] / f"{case_id}.nii.gz")
        cases.append(CaseSummary(case_id=case_id, label_file=f"{case_id}.nii.gz", score=score,
                                 classes=class_summary(score), flags=flags, seconds=1.5))
    save_summary(PredictionSummary(configuration="3d_fullres", folds=("0", "1"), tta=True, temperature=1.2,
                                   cases=tuple(cases), labels=LABELS), folders["predictions"] / "summary.json")
    return tmp_path


def colour_pixels(path: Path, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    """Pixels of a PNG within ``tolerance`` of ``colour`` (per channel)."""
    rgb = np.asarray(PILImage.open(path).convert("RGB"), dtype=int).reshape(-1, 3)
    return int(np.all(np.abs(rgb - np.array(colour)) <= tolerance, axis=1).sum())


def png_size(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG."""
    width, height = PILImage.open(path).size
    return height, width


def test_page_lists_the_least_trusted_case_first_with_overlays(predictions: Path) -> None:
    page = write_report(predictions / "predictions", predictions / "report", reference_dir=predictions / "references",
                        images_dir=predictions / "images")
    text = page.read_text()
    order = re.findall(r'<section id="([^"]+)"', text)
    assert order == ["b_flagged", "c_doubtful", "a_good"]  # flagged, then by ascending score
    assert "organ volume 9 ml is outside the training range" in text and "1 flagged for review" in text
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == 6  # two structures per case
    for source in images:
        png = predictions / "report" / source
        assert png.is_file() and png.stat().st_size < 100_000
    organ = predictions / "report" / "images" / "b_flagged_0.png"
    lesion = predictions / "report" / "images" / "b_flagged_1.png"
    assert colour_pixels(organ, CLASS_COLOURS[0]) > 50       # the predicted organ's contour
    assert colour_pixels(lesion, CLASS_COLOURS[1]) > 20      # the lesion's, in its own colour
    assert colour_pixels(organ, CLASS_COLOURS[1]) == 0
    assert colour_pixels(organ, REFERENCE_COLOUR) > 20  # the reference, dashed yellow
    height, width = png_size(organ)
    assert width > 2.5 * height  # three panels side by side (axial, coronal, sagittal)


def test_report_without_summary_or_images_still_draws_every_label(predictions: Path) -> None:
    (predictions / "predictions" / "summary.json").unlink()
    page = write_report(predictions / "predictions", predictions / "bare")
    text = page.read_text()
    assert "label 1" in text and "label 2" in text and "0 flagged" in text
    png = predictions / "bare" / "images" / "a_good_0.png"
    assert colour_pixels(png, CLASS_COLOURS[0]) > 50


def test_report_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="autoseg predict"):
        write_report(tmp_path / "empty", tmp_path / "out")


def test_report_command(predictions: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(predictions / "predictions"), "-o", str(predictions / "cli"),
                 "--images", str(predictions / "images")]) == 0
    assert "index.html" in capsys.readouterr().out
    assert (predictions / "cli" / "index.html").is_file()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_page_renders_in_a_headless_browser(predictions: Path) -> None:
    page = write_report(predictions / "predictions", predictions / "report", reference_dir=predictions / "references",
                        images_dir=predictions / "images")
    screenshot = predictions / "screenshot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={screenshot}",
                    "--window-size=1400,1000", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert png_size(screenshot) == (1000, 1400)
    # the browser drew the PNGs (the contours' colours reach the screen) and the red "needs review" badge
    assert colour_pixels(screenshot, CLASS_COLOURS[0]) > 50
    assert colour_pixels(screenshot, (198, 40, 40), tolerance=12) > 100
