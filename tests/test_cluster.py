"""Per-case stages on a Dask cluster (autoseg.cluster): the same output as local processes, byte for byte."""

from __future__ import annotations

import doctest
import importlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_training_support import cube_cases, make_work, tiny_plan

import autoseg.cluster as cluster
from autoseg.cli import main
from autoseg.cluster import ClusterError, Scheduler, parse_scheduler
from autoseg.inference import predict_folder
from autoseg.io import Image, read_image, write_image
from autoseg.planning import plan_dataset
from autoseg.preprocessing import preprocess_dataset
from autoseg.training import train

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def scheduler_address() -> Iterator[str]:
    """A two-process local cluster reached by its address, as a remote one would be."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as local:
        yield local.scheduler_address


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_scheduler_addresses_are_read_or_named() -> None:
    assert parse_scheduler("local:3") == Scheduler(local_workers=3)
    assert parse_scheduler("tcp://127.0.0.1:8786") == Scheduler(address="tcp://127.0.0.1:8786")
    for wrong in ("local:0", "localhost:8786", "8786", "local:two"):
        with pytest.raises(ClusterError, match="--scheduler"):
            parse_scheduler(wrong)


def test_plan_and_preprocess_on_a_cluster_equal_the_local_run(make_dataset, tmp_path: Path,
                                                              scheduler_address: str) -> None:
    dataset = make_dataset(num_cases=4, num_channels=1, shape=(8, 16, 16))
    outputs = {}
    for name, scheduler in (("local", None), ("cluster", scheduler_address)):
        work = tmp_path / name
        plan_dataset(dataset, work, n_jobs=2, progress=False, scheduler=scheduler, configurations=["3d_fullres"])
        summaries = preprocess_dataset(work, n_jobs=2, progress=False, scheduler=scheduler)
        assert summaries["3d_fullres"].processed == [f"case_{i:03d}" for i in range(4)]
        outputs[name] = {"fingerprint": (work / "fingerprint.json").read_bytes(),
                         **_files(work / "preprocessed")}
    assert outputs["cluster"].keys() == outputs["local"].keys()
    for key, content in outputs["local"].items():
        assert outputs["cluster"][key] == content, key

    # resume: a case whose output went missing is the only one redone, on the cluster
    folder = tmp_path / "cluster" / "preprocessed" / "3d_fullres"
    for path in folder.glob("case_002*"):
        path.unlink()
    summary = preprocess_dataset(tmp_path / "cluster", n_jobs=2, progress=False, scheduler=scheduler_address)
    assert summary["3d_fullres"].processed == ["case_002"]
    assert _files(tmp_path / "cluster" / "preprocessed") == {
        k: v for k, v in outputs["cluster"].items() if k != "fingerprint"}


def test_the_cli_runs_a_local_cluster_of_its_own(make_dataset, tmp_path: Path, capsys) -> None:
    dataset = make_dataset(num_cases=3, num_channels=1, shape=(8, 16, 16))
    work = tmp_path / "work"
    assert main(["plan", str(dataset), "--work", str(work), "--configurations", "2d", "--scheduler", "local:2"]) == 0
    assert main(["preprocess", str(work), "--scheduler", "local:2"]) == 0
    assert len(list((work / "preprocessed" / "2d").glob("case_*.json"))) == 3


def test_without_dask_the_scheduler_is_a_one_line_error(make_dataset, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:
    real_import = importlib.import_module

    def no_dask(name: str, *args):
        if name.startswith(("dask", "distributed")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(cluster.importlib, "import_module", no_dask)
    dataset = make_dataset(num_cases=2, num_channels=1)
    assert main(["plan", str(dataset), "--work", str(tmp_path / "w"), "--scheduler", "local:2"]) == 1
    message = capsys.readouterr().err.strip()
    assert message == "autoseg plan: error: --scheduler needs Dask: pip install 'autoseg[distributed]'"
    assert not (tmp_path / "w" / "plan.json").exists()

    assert main(["plan", str(dataset), "--work", str(tmp_path / "w"), "--scheduler", "somewhere"]) == 1
    assert "expected local:N" in capsys.readouterr().err


def test_examples_in_the_docstrings_run() -> None:
    result = doctest.testmod(cluster)
    assert result.attempted > 0 and result.failed == 0


# --- prediction -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny U-Net trained for a few iterations (a real network: workers build it from the registry),
    and a folder of six new cases large enough to take a moment each."""
    root = tmp_path_factory.mktemp("trained")
    work = make_work(root / "work", tiny_plan(), cube_cases(3))
    train(work, "3d_fullres", 0, workers=0, progress=False, num_threads=1)
    inputs = root / "inputs"
    for case_id, (image, _) in cube_cases(6, seed=5, shape=(40, 40, 40)).items():
        write_image(Image(image[0], (1.0, 1.0, 1.0)), inputs / f"{case_id}_0000.nii.gz")
    return work, inputs


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read_image(p).array for p in sorted(folder.glob("*.nii.gz"))}


def test_prediction_on_a_cluster_equals_the_local_run(trained, tmp_path: Path, scheduler_address: str,
                                                      capsys) -> None:
    work, inputs = trained
    local = predict_folder(work, inputs, tmp_path / "local", device="cpu", progress=False)
    on_cluster = predict_folder(work, inputs, tmp_path / "cluster", device="cpu", scheduler=scheduler_address)
    assert [p.name for p in on_cluster] == [p.name for p in local]
    expected = _labels(tmp_path / "local")
    found = _labels(tmp_path / "cluster")
    assert found.keys() == expected.keys() and len(found) == 6
    for name, labels in expected.items():
        assert np.array_equal(found[name], labels), name
    assert "cases/hour" in capsys.readouterr().out


def test_a_worker_killed_mid_run_loses_no_case(trained, tmp_path: Path) -> None:
    """One of two workers is killed as soon as the first case is written: its cases run on the other.

    The run must end with every case written exactly once, each readable and equal to a local run's.
    """
    work, inputs = trained
    predict_folder(work, inputs, tmp_path / "local", device="cpu", progress=False)
    output = tmp_path / "cluster"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as local_cluster, \
            distributed.Client(local_cluster) as client:
        pids = list(client.run(os.getpid).values())
        failed: list[BaseException] = []

        def run() -> None:
            try:
                predict_folder(work, inputs, output, device="cpu", progress=False,
                               scheduler=local_cluster.scheduler_address)
            except BaseException as error:  # noqa: BLE001  (reported by the assertion below)
                failed.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 120
        while not list(output.glob("*.nii.gz")) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pids[1], signal.SIGKILL)
        thread.join(timeout=240)
    assert not thread.is_alive() and not failed, failed
    assert sorted(p.name for p in output.iterdir()) == sorted(_labels(tmp_path / "local"))  # no temporary file left
    for name, labels in _labels(tmp_path / "local").items():
        assert np.array_equal(read_image(output / name).array, labels), name
