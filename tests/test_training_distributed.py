"""Two processes under torchrun on the CPU (gloo): replicas stay identical, files are written once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_training_support import cube_cases, make_work, tiny_plan

from autoseg.training import TrainOverrides, train
from autoseg.training.checkpoint import load_checkpoint
from autoseg.training.monitor import read_log

# Each rank saves its replica's final weights just before the end-of-fold validation.
SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    import autoseg.training.loop as loop
    from autoseg.training import TrainOverrides, train

    work = Path(sys.argv[1])
    validate_fold = loop._validate_fold

    def keep_weights(run, show_progress):
        torch.save(run.network.state_dict(), work / f"rank{dist.get_rank()}.pt")
        return validate_fold(run, show_progress)

    loop._validate_fold = keep_weights
    train(work, "3d_fullres", 0, overrides=TrainOverrides(epochs=2, iterations_per_epoch=4), workers=0,
          progress=False, num_threads=1)
""")


@pytest.mark.slow
def test_two_gloo_processes_train_one_model(tmp_path: Path) -> None:
    work = make_work(tmp_path / "work", tiny_plan(validation_iterations=2), cube_cases(4))
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(work)], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]

    rank0 = torch.load(work / "rank0.pt", weights_only=True)
    rank1 = torch.load(work / "rank1.pt", weights_only=True)
    fold_dir = work / "models" / "3d_fullres" / "fold_0"
    saved = load_checkpoint(fold_dir / "checkpoint_latest.pt")
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name  # gradients were averaged: replicas agree
        assert torch.equal(tensor, saved["network"][name]), name
    assert saved["world_size"] == 2

    log = read_log(fold_dir / "training_log.jsonl")
    assert [e["epoch"] for e in log] == [0, 1]  # one writer: no duplicated lines
    assert all(e["iterations"] == 4 for e in log)  # 2 per rank
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    splits = json.loads((work / "models" / "3d_fullres" / "splits.json").read_text())
    assert summary["cases"] == splits[0]["val"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_localhost_then_resumed_by_one_process(tmp_path: Path) -> None:
    """The multi-machine launch (one torchrun per node, static rendezvous at node 0), then a resume on one process.

    Each "node" is a separate torchrun with ``--nnodes 2 --node_rank i`` pointing at the same
    master address, as on two machines (docs/scale.md); the run is then extended by one more epoch
    in a single process, as after losing a machine.
    """
    work = make_work(tmp_path / "work", tiny_plan(validation_iterations=2), cube_cases(4))
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = str(_free_port())
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, str(script), str(work)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)

    fold_dir = work / "models" / "3d_fullres" / "fold_0"
    rank0 = torch.load(work / "rank0.pt", weights_only=True)
    rank1 = torch.load(work / "rank1.pt", weights_only=True)
    assert all(torch.equal(tensor, rank1[name]) for name, tensor in rank0.items())
    assert load_checkpoint(fold_dir / "checkpoint_latest.pt")["world_size"] == 2

    train(work, "3d_fullres", 0, overrides=TrainOverrides(epochs=3, iterations_per_epoch=4), resume=True,
          workers=0, progress=False, num_threads=1)
    resumed = load_checkpoint(fold_dir / "checkpoint_latest.pt")
    assert resumed["world_size"] == 1 and resumed["progress"]["epoch"] == 3
    log = read_log(fold_dir / "training_log.jsonl")
    assert [e["epoch"] for e in log] == [0, 1, 2]
    assert [e["iterations"] for e in log] == [4, 4, 4]  # 2 per rank on two nodes, then 4 on one
