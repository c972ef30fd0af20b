"""Building and loading the extension: never at import, cached and locked, failures reported.

The subprocess tests point FASTCONV_CACHE_DIR at a temporary directory and, where they compile,
FASTCONV_EXTENSION_SOURCES at a small source tree (the schema file alone, or a broken one), so
they take seconds, not the minutes of the real build. The real build (csrc/; its CUDA half where
a device is present or FASTCONV_BUILD_CUDA=1) is the one test_extension_cpu.py uses; here it is
checked for its CUDA half.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastconv.backends import extension
from fastconv.backends.base import OPS

ROOT = Path(__file__).resolve().parents[1]
BUILDING = "fastconv: building the"


def run_py(code: str, env_extra: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_NO_EXTENSION_BUILD"}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


needs_toolchain = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")

PROBE = """
    import json
    import fastconv
    from fastconv.backends import extension as e
    b = e.ExtensionBackend()
    r1 = b.unavailable_reason()
    r2 = b.unavailable_reason()
    print(json.dumps([r1, r2, list(e.status()), e.loaded()]))
"""


def test_import_and_info_never_build(tmp_path):
    env = {"FASTCONV_CACHE_DIR": str(tmp_path / "cache"), "FASTCONV_NO_EXTENSION_BUILD": "1"}
    proc = run_py("""
        import json, fastconv
        from fastconv.backends import extension as e
        print(json.dumps([list(e.status()), e.ExtensionBackend().unavailable_reason()]))
    """, env)
    (ok, text), reason = last_json(proc)
    assert not ok and "not built" in text
    assert "FASTCONV_NO_EXTENSION_BUILD" in reason
    assert BUILDING not in proc.stderr
    info = subprocess.run([sys.executable, "-m", "fastconv", "info"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "extension" in info.stdout and "FASTCONV_NO_EXTENSION_BUILD" in info.stdout
    assert BUILDING not in info.stderr
    assert not any((tmp_path / "cache").rglob("*.so"))


def test_missing_sources_leave_the_backend_unavailable(tmp_path):
    env = {"FASTCONV_CACHE_DIR": str(tmp_path / "cache"),
           "FASTCONV_EXTENSION_SOURCES": str(tmp_path / "nowhere")}
    r1, r2, (ok, text), loaded = last_json(run_py(PROBE, env))
    assert "sources" in r1 and "not present" in r1 and r1 == r2
    assert not ok and not loaded


@needs_toolchain
def test_failed_build_is_reported_remembered_and_retried_on_request(tmp_path):
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    (src / "fastconv.cpp").write_text('#error "fastconv deliberate build failure"\n')
    env = {"FASTCONV_CACHE_DIR": str(tmp_path / "cache"), "FASTCONV_EXTENSION_SOURCES": str(src)}
    proc = run_py(PROBE, env)
    r1, r2, (ok, text), loaded = last_json(proc)
    assert "deliberate build failure" in r1, r1
    assert r1 == r2 and not ok and not loaded
    assert proc.stderr.count(BUILDING) == 1, "a failure is not retried within the process"
    # a later process does not rebuild lazily: it reports the remembered failure
    proc = run_py(PROBE, env)
    r1, *_ = last_json(proc)
    assert "failed" in r1 and "deliberate build failure" in r1 and "build-ext" in r1
    assert BUILDING not in proc.stderr
    # an explicit build() (fastconv build-ext) tries again
    proc = run_py("""
        from fastconv.backends import extension as e
        try:
            e.build()
        except e.ExtensionBuildError as exc:
            print("raised", "deliberate build failure" in str(exc))
    """, env)
    assert proc.stdout.strip().endswith("raised True"), proc.stdout + proc.stderr
    assert proc.stderr.count(BUILDING) == 1


@needs_toolchain
def test_concurrent_first_use_builds_once_then_reuses(tmp_path):
    """Two processes asking at once: one compiles under the lock, the other waits and loads."""
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    shutil.copy(ROOT / "csrc" / "fastconv.cpp", src / "fastconv.cpp")  # schemas, no kernels
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTCONV_CACHE_DIR": str(tmp_path / "cache"),
           "FASTCONV_EXTENSION_SOURCES": str(src), "MAX_JOBS": "1"}
    env.pop("FASTCONV_NO_EXTENSION_BUILD", None)
    code = textwrap.dedent("""
        import json, torch
        from fastconv.backends import extension as e
        path = e.build()
        print(json.dumps([str(path), hasattr(torch.ops.fastconv, "conv2d_relu")]))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0] == results[1] and results[0][1]
    assert sum(err.count(BUILDING) for _, err in outs) == 1
    build_dir = Path(results[0][0])
    assert any(build_dir.glob("*.o")), "object files stay in the build directory"
    # a third process, forbidden to build, finds and loads the cached build
    proc = run_py(PROBE, {"FASTCONV_CACHE_DIR": str(tmp_path / "cache"),
                          "FASTCONV_EXTENSION_SOURCES": str(src),
                          "FASTCONV_NO_EXTENSION_BUILD": "1"})
    r1, r2, (ok, text), loaded = last_json(proc)
    assert r1 is None and ok and loaded and str(build_dir) in text
    assert BUILDING not in proc.stderr


def test_a_waiting_process_says_whom_it_waits_for(tmp_path):
    """A process that finds the build lock held prints the holder's pid, host and start time at
    once and then its progress, instead of hanging silently; it builds once the lock is free."""
    import socket

    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    shutil.copy(ROOT / "csrc" / "fastconv.cpp", src / "fastconv.cpp")
    env = {"FASTCONV_CACHE_DIR": str(tmp_path / "cache"), "FASTCONV_EXTENSION_SOURCES": str(src)}
    code = textwrap.dedent("""
        import sys
        from fastconv.backends import extension as e
        e._WAIT_REPORT_S = 0.5
        print("READY", flush=True)
        e.build()
        print("BUILT", flush=True)
    """)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        plan = extension._Plan()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    lock = plan.dir.parent / f"{plan.key}.lock"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full_env.pop("FASTCONV_NO_EXTENSION_BUILD", None)
    with extension._build_lock(lock):
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=full_env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(2.5)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "BUILT" in out, err
    assert f"waiting for the extension build of pid {os.getpid()} on {socket.gethostname()}" in err
    assert "building since" in err and err.count("still waiting (") >= 2, err
    assert "the other build finished" in err and err.count(BUILDING) == 1


PREBUILT_CHILD = """
    import json, os, torch
    import torch.nn.functional as F
    from fastconv.backends import extension as e
    reason = e.ExtensionBackend().unavailable_reason()
    ok, text = e.status()
    ran = None
    if reason is None:
        torch.manual_seed(0)
        x = torch.randn(2, 3, 6, 6)
        y = torch.ops.fastconv.avg_pool2d(x, [2, 2], [2, 2], [0, 0], False, True, None)
        ran = bool(torch.allclose(y, F.avg_pool2d(x, 2), rtol=1e-6, atol=1e-7))
    print(json.dumps([reason, ok, text, ran]))
"""


@needs_toolchain
def test_prebuilt_library_loads_without_a_build_and_falls_back_when_stale(tmp_path):
    """`fastconv build-ext --prebuilt DIR` (here the CPU half of a small source tree) writes a
    library that links no Python and a manifest; FASTCONV_EXTENSION_LIB=DIR loads it in another
    process without building, and a manifest for another torch or other sources is refused with
    the reason (then the usual build runs)."""
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    for rel in ("fastconv.cpp", "poison.h", "cpu/common.h", "cpu/avg_pool2d.cpp"):
        shutil.copy(ROOT / "csrc" / rel, src / rel)
    lib = tmp_path / "prebuilt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTCONV_CACHE_DIR": str(tmp_path / "cache"),
           "FASTCONV_EXTENSION_SOURCES": str(src), "FASTCONV_BUILD_CUDA": "0"}
    env.pop("FASTCONV_NO_EXTENSION_BUILD", None)
    env.pop("FASTCONV_EXTENSION_LIB", None)
    proc = subprocess.run([sys.executable, "-m", "fastconv", "build-ext", "--prebuilt", str(lib)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((lib / "manifest.json").read_text())
    assert manifest["torch"] == torch.__version__ and manifest["cuda_archs"] == ""
    assert manifest["sources"] == extension.source_hash(src) and manifest["built_at"]
    so = lib / "fastconv_ext.so"
    if shutil.which("readelf"):
        dyn = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True).stdout
        needed = re.findall(r"\(NEEDED\).*\[(.+?)\]", dyn)
        assert needed and not [n for n in needed if "python" in n], needed
    (ninja,) = (tmp_path / "cache").rglob("build.ninja")
    assert "-march=native" not in ninja.read_text(), "a prebuilt library runs on other CPUs"

    child = {"FASTCONV_CACHE_DIR": str(tmp_path / "cache2"), "FASTCONV_EXTENSION_SOURCES": str(src),
             "FASTCONV_EXTENSION_LIB": str(lib), "FASTCONV_NO_EXTENSION_BUILD": "1"}
    proc = run_py(PREBUILT_CHILD, child)
    reason, ok, text, ran = last_json(proc)
    assert reason is None and ok and ran, (reason, text)
    assert f"prebuilt library loaded from {lib}" in text
    assert BUILDING not in proc.stderr

    # a local version tag (PyPI's 2.11.0 vs an index's 2.11.0+cu130) is the same libtorch
    manifest["torch"] = torch.__version__.split("+")[0] + "+other"
    (lib / "manifest.json").write_text(json.dumps(manifest))
    proc = run_py(PREBUILT_CHILD, child)
    reason, ok, text, ran = last_json(proc)
    assert reason is None and ok and ran, (reason, text)

    manifest["torch"] = "0.0.1"
    (lib / "manifest.json").write_text(json.dumps(manifest))
    proc = run_py(PREBUILT_CHILD, child)
    reason, ok, text, ran = last_json(proc)
    assert not ok and "FASTCONV_NO_EXTENSION_BUILD" in reason, reason
    assert "not used: built for torch 0.0.1" in proc.stderr and "not used" in text

    manifest["torch"] = torch.__version__
    (lib / "manifest.json").write_text(json.dumps(manifest))
    (src / "cpu" / "avg_pool2d.cpp").write_text((src / "cpu" / "avg_pool2d.cpp").read_text() + "\n")
    proc = run_py(PREBUILT_CHILD, child)
    reason, ok, text, ran = last_json(proc)
    assert not ok and "source hash differs" in proc.stderr


def test_cuda_arch_flags(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert extension.cuda_arch_flags() == ["-gencode=arch=compute_80,code=sm_80",
                                           "-gencode=arch=compute_90,code=sm_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a+PTX 8.6")
    assert extension.cuda_arch_flags() == ["-gencode=arch=compute_90a,code=sm_90a",
                                           "-gencode=arch=compute_90a,code=compute_90a",
                                           "-gencode=arch=compute_86,code=sm_86"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "Hopper")
    with pytest.raises(extension.ExtensionBuildError, match="TORCH_CUDA_ARCH_LIST"):
        extension.cuda_arch_flags()


def _cuda_expected() -> str | None:
    """Why the real build should not contain CUDA here, or None if it must."""
    asked = os.environ.get("FASTCONV_BUILD_CUDA", "").strip()
    if asked == "0":
        return "FASTCONV_BUILD_CUDA=0"
    if not asked and torch.cuda.device_count() == 0:
        return ("no CUDA device and FASTCONV_BUILD_CUDA unset (CI compiles every .cu in "
                "test_extension_cuda.py instead)")
    if not torch.version.cuda:
        return "torch is a CPU-only build"
    if extension._cuda_home() is None:
        return "no nvcc"
    if not list((ROOT / "csrc" / "cuda").glob("*.cu")):
        return "no CUDA sources"
    return None


@needs_toolchain
@pytest.mark.skipif(_cuda_expected() is not None, reason=f"no CUDA build here: {_cuda_expected()}")
def test_real_build_compiles_the_cuda_half_wherever_it_can():
    """With a CUDA torch and nvcc, and a device or FASTCONV_BUILD_CUDA=1 (CI), the CUDA sources
    must compile (no GPU needed): a compile error fails here rather than leaving the extension
    silently CPU-only. (tests/test_extension_cuda.py compiles every .cu on its own as well.)"""
    try:
        path = extension.build()
    except extension.ExtensionBuildError as exc:
        pytest.fail(f"the extension (with its CUDA sources) failed to build: {exc}")
    assert extension.has_cuda_kernels()
    ok, text = extension.status()
    assert ok and "CUDA kernels compiled in" in text
    assert any(path.glob("*.cuda.o")), "CUDA object files stay in the build dir (cuobjdump)"
    for op in OPS:
        for name in (op, f"{op}_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "CUDA"), name
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{name}", "CPU"), name
