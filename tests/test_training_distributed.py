"""Two processes under torchrun on the CPU (gloo): replicas stay identical, files are written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_training_support import cube_cases, make_work, tiny_plan

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
