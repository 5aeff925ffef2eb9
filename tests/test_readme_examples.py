"""The Python examples of the README and of the public API's docstrings run as written.

The README's "From Python" block runs in a folder laid out as it assumes (``work/liver``, a model;
``scans/liver_0000.nii.gz``, a scan), with the threshold model of test_inference standing in for
a trained one. The docstrings of ``autoseg`` (the whole chain: example dataset, plan, preprocess,
one training iteration, Predictor, evaluate) and of ``autoseg.inference.predictor`` run as doctests.
"""

from __future__ import annotations

import doctest
import re
import shutil
from pathlib import Path

import pytest
from test_inference import make_model, threshold_network, write_cases  # noqa: F401  (the fixture registers the network)

import autoseg
import autoseg.devices
import autoseg.inference.predictor
from autoseg.io import read_image

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(heading: str, language: str = "python") -> str:
    """The first ``language`` code block under the README section ``heading``."""
    text = README.read_text()
    start = text.index(f"\n{heading}\n")
    block = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert block is not None, f"no {language} block under {heading!r}"
    return block.group(1)


@pytest.fixture(scope="module")
def threshold_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"), folds=("0",))


def test_the_from_python_example_runs(threshold_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_block("## From Python")
    assert len(code.strip().splitlines()) <= 6  # "a five-line example": four lines and a blank
    shutil.copytree(threshold_model, tmp_path / "work" / "liver")
    (tmp_path / "scans").mkdir()
    source = write_cases(tmp_path / "scans", count=1)[0].rename(tmp_path / "scans" / "liver_0000.nii.gz")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    scan, labels = read_image(source), read_image(tmp_path / "liver_seg.nii.gz")
    assert labels.array.shape == scan.array.shape
    assert (labels.spacing, labels.origin, labels.direction) == (scan.spacing, scan.origin, scan.direction)
    assert set(labels.array.ravel().tolist()) == {0, 1, 2}


def test_the_predictor_docstrings_run(threshold_model: Path, tmp_path: Path) -> None:
    scan = write_cases(tmp_path, count=1)[0]
    result = doctest.testmod(autoseg.inference.predictor, extraglobs={"model_dir": threshold_model, "scan": scan},
                             optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


def test_the_device_docstring_runs() -> None:
    result = doctest.testmod(autoseg.devices)
    assert result.attempted >= 2 and result.failed == 0


def test_the_package_docstring_runs_the_whole_chain(tmp_path: Path) -> None:
    result = doctest.testmod(autoseg, extraglobs={"tmp": tmp_path}, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 15 and result.failed == 0
    assert "Predictor" in dir(autoseg) and autoseg.__version__
