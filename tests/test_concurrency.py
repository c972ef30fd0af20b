"""Two processes at once leave a valid cache: autotuning results and the extension build.

The per-user cache (fastconv/_cache.py) writes JSON atomically (temporary file + os.replace)
under an fcntl lock, and the extension build runs under a per-key lock with a completion
marker. Here real processes (``sys.executable``) race on a shared temporary
``FASTCONV_CACHE_DIR``:

* two writers of the Triton autotune table, each adding its own entries and overwriting
  shared ones, interleaved: the file is valid JSON holding every entry (no lost update);
* a writer killed (SIGKILL) in the middle of its writes: the file is still valid JSON;
* on a GPU, two processes autotuning the same conv for real (``FASTCONV_TUNE_TRITON=1``; tuning
  runs on CUDA only, the interpreter never tunes);
* the extension build race is tests/test_extension_build.py's (two processes, one compiles,
  both load the same library, a third loads it without building), on a schema-only source
  tree: the lock does not depend on which sources it guards, and the real sources' build and
  ops are the rest of the suite's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def _env(cache: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_NO_EXTENSION_BUILD"}
    env.update(PYTHONPATH=str(ROOT), FASTCONV_CACHE_DIR=str(cache), **extra)
    return env


def _spawn(code: str, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"rc={p.returncode}\n{out}\n{err[-3000:]}"
    return [out for out, _ in outs]


def _table(cache: Path) -> dict:
    path = cache / "autotune" / "conv.json"
    data = json.loads(path.read_text())  # must parse: never a torn file
    assert data["format"] == 1 and isinstance(data["entries"], dict)
    return data["entries"]


WRITER = """
import sys, time
from fastconv.backends.triton import autotune
who, n = sys.argv[1], int(sys.argv[2])
table = autotune.ConfigTable("conv")
for i in range(n):
    cfg = dict(BLOCK_M=16 * (i % 8 + 1), BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    table.put("interpreter", f"{who}|key{i}", cfg, 0.01 * i)
    table.put("interpreter", f"shared|key{i % 7}", dict(cfg, writer=who), 0.5)
print("done", flush=True)
"""


def test_two_processes_writing_the_autotune_cache(tmp_path):
    cache = tmp_path / "cache"
    n = 60
    procs = [_spawn(WRITER, _env(cache), who, str(n)) for who in ("a", "b")]
    _finish(procs, timeout=300)
    entries = _table(cache)["interpreter"]
    for who in ("a", "b"):
        missing = [i for i in range(n) if f"{who}|key{i}" not in entries]
        assert not missing, f"writer {who} lost {len(missing)} updates: {missing[:5]}"
    shared = [entries[f"shared|key{i}"]["config"]["writer"] for i in range(7)]
    assert set(shared) <= {"a", "b"}
    assert oct((cache / "autotune").stat().st_mode & 0o777) == "0o700"
    # a fresh process reads what both wrote (through the same lookup the kernels use)
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        from fastconv.backends.triton import autotune
        t = autotune.ConfigTable("conv")
        print(t.get("interpreter", "a|key5")["BLOCK_M"], t.get("interpreter", "b|key59")["BLOCK_M"])
    """)], cwd=ROOT, env=_env(cache), capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["96", "64"]


def test_killed_writer_leaves_a_valid_cache(tmp_path):
    cache = tmp_path / "cache"
    proc = _spawn(WRITER, _env(cache), "k", "100000")
    path = cache / "autotune" / "conv.json"
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # well into its stream of writes
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"
    entries = _table(cache)["interpreter"]
    assert len(entries) >= 2
    # the lock is an fcntl lock, released by the kernel with the process: a new writer goes on
    _finish([_spawn(WRITER, _env(cache), "after", "3")], timeout=120)
    assert "after|key2" in _table(cache)["interpreter"]


TUNER = """
import json, torch
import fastconv.functional as FF
x = torch.randn(4, 32, 20, 20, device="cuda", requires_grad=True)
w = torch.randn(64, 32, 3, 3, device="cuda", requires_grad=True)
b = torch.randn(64, device="cuda", requires_grad=True)
y = FF.conv2d_relu(x, w, b, padding=1, backend="triton")
y.backward(torch.randn_like(y))
torch.cuda.synchronize()
ref = torch.relu(torch.nn.functional.conv2d(x.detach().double(), w.detach().double(),
                                            b.detach().double(), padding=1))
print(json.dumps(float((y.double() - ref).norm() / ref.norm())))
"""


@pytest.mark.skipif(not HAS_CUDA, reason="autotuning runs on CUDA devices only")
def test_two_processes_autotuning_the_same_conv(tmp_path):
    cache = tmp_path / "cache"
    env = _env(cache, FASTCONV_TUNE_TRITON="1")
    outs = _finish([_spawn(TUNER, env) for _ in range(2)], timeout=600)
    for out in outs:
        assert json.loads(out.strip().splitlines()[-1]) < 4e-3  # TF32 at worst
    entries = _table(cache)
    (device,) = entries  # one GPU: one device tag
    kinds = {key.split("|")[0] for key in entries[device]}
    assert kinds == {"fwd", "dgrad", "wgrad"}, kinds
    for key, entry in entries[device].items():
        cfg = entry["config"]
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} <= set(cfg), key
        assert entry["ms"] > 0
