"""Ahead-of-time compilation for Hopper (sm_90) without a GPU: the main configuration of every
Triton kernel module's ``aot_specs()`` builds, spills nothing, fits in shared memory and turns its
16-bit dots into wgmma (see fastconv/backends/triton/aot.py).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastconv.backends.triton import aot  # noqa: E402


@pytest.fixture(scope="module")
def results():
    # compiles in a child process when the interpreter is on (interpreted kernels cannot compile)
    return aot.compile_modules(aot.MODULES, main_only=True)


def test_conv_main_specs_cover_every_kernel(results):
    names = {r.name.split()[0] for r in results if r.module == "conv"}
    assert {"conv_fwd", "conv_dgrad", "conv_wgrad"} <= names
    conv_specs = aot.module_specs("conv")
    # the heuristic's default for each kernel/dtype is among the compiled main specs
    assert sum(s.main for s in conv_specs) == sum(1 for r in results if r.module == "conv")


def test_main_specs_build_without_spills(results):
    assert results, "no module defines aot_specs()"
    bad = [f"{r.module}: {r.name} [{r.config}]: {'; '.join(r.problems())}"
           for r in results if r.problems()]
    assert not bad, "\n".join(bad)


def test_16bit_dots_use_wgmma(results):
    wgmma_specs = [r for r in results if r.expect_wgmma]
    assert any(r.module == "conv" for r in wgmma_specs)
    assert all(r.ok and r.wgmma for r in wgmma_specs), [r.name for r in wgmma_specs if not r.wgmma]


def test_shared_memory_within_sm90_limit(results):
    for r in results:
        assert r.ok and r.shared_bytes is not None and 0 <= r.shared_bytes <= aot.SM90_SHARED_LIMIT, r


@triton.jit
def _toy_dot(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs[:, None] * n + offs[None, :])
    tl.store(y_ptr + offs[:, None] * n + offs[None, :], tl.dot(x, x))


def test_report_detects_spills_and_wgmma():
    # the checks above have teeth: a 128x128 dot in one warp cannot fit in registers
    sig = {"x_ptr": "*fp16", "y_ptr": "*fp32", "n": "i32:16"}
    good = aot.compile_spec(aot.KernelSpec("toy", _toy_dot, sig, {"BLOCK": 64}, num_warps=4,
                                           num_stages=1, expect_wgmma=True), "test")
    assert good.ok and good.wgmma and not good.problems(), good
    bad = aot.compile_spec(aot.KernelSpec("toy", _toy_dot, sig, {"BLOCK": 128}, num_warps=1,
                                          num_stages=1, expect_wgmma=True), "test")
    assert bad.ok and (bad.stack_bytes or bad.spill_bytes)
    assert any("stack" in p or "spill" in p for p in bad.problems())
    assert "wgmma" in aot.markdown_table([good, bad])
