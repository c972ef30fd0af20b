"""fastconv train under torchrun: 2 CPU processes (gloo) end with the parameters of one process
trained on the same global batches."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model", "lenet", "--model-arg", "variant=relu", "--data", "synthetic",
          "--synthetic-size", "64", "--batch-size", "16", "--epochs", "1", "--max-steps", "4",
          "--lr", "0.1", "--backend", "torch", "--device", "cpu", "--no-progress"]


def _run(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    err = proc.stderr if len(proc.stderr) < 8000 else proc.stderr[:3000] + "\n...\n" + \
        proc.stderr[-5000:]
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{err}"
    return proc.stdout


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_processes_match_one(tmp_path):
    out1 = _run([sys.executable, "-m", "fastconv", "train", *COMMON, "--save", "one.pt"],
                tmp_path)
    out2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", "2", "-m", "fastconv", "train", *COMMON,
                 "--save", "two.pt"], tmp_path)
    assert "batch 16 over 2 processes" in out2 and "over 2 processes" not in out1
    assert out2.count("epoch 1/1:") == 1  # rank 0 alone prints
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one["steps"] == two["steps"] == 4
    torch.manual_seed(0)
    from fastconv import models
    from fastconv.tools.common import xavier_init
    init = xavier_init(models.lenet(variant="relu")).state_dict()
    for k, a in one["model"].items():
        b = two["model"][k]
        moved = float((a.double() - init[k].double()).norm() / init[k].double().norm())
        assert moved > 1e-4, f"{k} did not train"
        # the runs differ only in summation order (the loss mean over 16 vs two means of 8
        # averaged by all-reduce): a few float32 roundoffs per step, over 4 steps
        err = float((a.double() - b.double()).norm() / a.double().norm())
        assert err < 1e-6, f"{k}: 2-process parameters differ from 1-process by {err:.2e}"
    # examples per epoch are counted over both processes
    assert one["history"][0]["examples"] == two["history"][0]["examples"] == 64
    assert abs(one["history"][0]["loss"] - two["history"][0]["loss"]) < 1e-5
