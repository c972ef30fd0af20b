"""The CUDA half of the extension (csrc/cuda/*.cu).

Without a GPU (CI): every .cu compiles with nvcc for sm_90, no main kernel spills (the committed
csrc/cuda/RESOURCES.md and a fresh build both), the conv kernels contain tensor-core (HMMA) and
16-byte memory instructions, and a CPU emulation of the tensor-core conv kernels
(tests/csrc/conv2d_relu_emulate.cuh: the real loaders, swizzle, fragment addressing and epilogues, with
ldmatrix/mma emulated from their PTX definitions) matches a float64 reference.

On a GPU: every op against a float64 torch reference in float32/float16/bfloat16 (float64 for
conv and the pools), NCHW and channels_last, the AlexNet and VGG-11 conv layers at full size,
determinism, the current stream, opcheck, and compute-sanitizer memcheck over one run of every
kernel variant.

Tolerances are elementwise bounds from rounding-error analysis, not fudge factors: a sum of L
terms accumulated in float32 errs by at most gamma_L * sum|terms| (gamma_L = L u / (1 - L u),
u = 2^-24; 16-bit products are exact in float32); storing in a 16-bit dtype adds half an ulp,
2^-11 (fp16) or 2^-8 (bf16) of |result|. sum|terms| is computed by running the same float64 op
on absolute values. Inputs are rounded to the test dtype first and the reference is computed from
those rounded values.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMULATION_DIR = ROOT / "tests" / "csrc"  # CPU emulations of the CUDA kernels (test-only)
sys.path.insert(0, str(ROOT / "scripts"))
import cuda_resource_report as rr  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

U_OUT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
         torch.bfloat16: 2.0**-8}


def u_acc(dtype) -> float:
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def gamma(n: int, dtype) -> float:
    u = u_acc(dtype)
    return n * u / (1 - n * u)


def assert_within(got, ref, bound, what):
    """Elementwise |got - ref| <= bound (NaN in got fails); reports the worst element."""
    got = got.double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got - ref).abs()
    bad = ~(err <= bound)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.numel()} elements off; first at {idx}: "
            f"got {float(got[idx]):.6g}, want {float(ref[idx]):.6g}, bound {float(bound[idx]):.3g}")


# ================================================================================================
# CPU part: compile check, resources, emulation
# ================================================================================================


def _nvcc_ok() -> str | None:
    if torch.version.cuda is None:
        return "torch is a CPU-only build (no CUDA headers)"
    if rr.find_tool("nvcc") is None:
        return "nvcc not found"
    if rr.find_tool("cuobjdump") is None:
        return "cuobjdump not found"
    return None


@pytest.fixture(scope="module")
def cuda_objects(tmp_path_factory):
    """sm_90 objects of every .cu: the extension build's if it holds the current sources, else
    compiled here (this is CI's compile check: a compile error fails it)."""
    why = _nvcc_ok()
    if why:
        pytest.skip(why)
    objects = rr.built_objects()
    if not objects:
        objects = rr.compile_objects(tmp_path_factory.mktemp("cuobj"), "sm_90")
    kernels = [k for k in rr.collect(objects) if k.arch == "sm_90"]
    assert kernels, "no sm_90 kernels found in the objects"
    return kernels


def test_every_cuda_source_has_kernels(cuda_objects):
    sources = {k.source for k in cuda_objects}
    assert sources == {p.name for p in CUDA_DIR.glob("*.cu")}


def test_main_kernels_do_not_spill(cuda_objects):
    main = [k for k in cuda_objects if k.main]
    assert len(main) >= 40, f"only {len(main)} main kernels recognised: report patterns stale?"
    bad = rr.spills(cuda_objects)
    assert not bad, "spilling kernels: " + ", ".join(f"{k.name} ({k.stack} B)" for k in bad)


def test_conv_uses_tensor_cores_and_16_byte_accesses(cuda_objects):
    conv = {k.name: k for k in cuda_objects if k.name.startswith("mma_gemm_kernel")}
    for dt in ("Half", "BF16"):
        fwd = [k for n, k in conv.items() if n.startswith(f"mma_gemm_kernel<{dt}, FwdAVec")]
        dgrad = [k for n, k in conv.items() if n.startswith(f"mma_gemm_kernel<{dt}, DgradAVec")]
        wgrad = [k for n, k in conv.items()
                 if n.startswith(f"mma_gemm_kernel<{dt}, WgradAVec<{dt}>, WgradBVec")]
        assert fwd and dgrad and wgrad, f"missing {dt} conv kernels in {sorted(conv)}"
        # 32 mma.m16n8k16 per 32-deep slice of a 128x128 tile (8 warps x 16 per k16 x 2)
        for k in fwd + dgrad + wgrad:
            assert k.sass.get("HMMA", 0) >= 32, f"{k.name}: no tensor-core instructions"
        assert fwd[0].sass["LDGSTS128"] > 0, "forward A/B are not 16-byte cp.async"
        assert dgrad[0].sass["LDG128"] > 0, "grad_input loads are not 16-byte"
        assert wgrad[0].sass["LDG128"] > 0, "grad_weight loads are not 16-byte"
        assert fwd[0].sass["STG128"] > 0, "forward stores are not 16-byte"


def test_large_tile_conv_kernels_use_tensor_cores_and_cp_async(cuda_objects):
    """conv2d_relu_tc.cuh: forward (and stride-1 grad_input) and grad_weight in both tiles, 16-bit."""
    tc = [k for k in cuda_objects if k.name.startswith("tc_gemm_kernel")]
    for dt in ("Half", "BF16"):
        fwd = [k for k in tc if k.name.startswith(f"tc_gemm_kernel<{dt},") and "FwdLoadA" in k.name]
        wgrad = [k for k in tc if k.name.startswith(f"tc_gemm_kernel<{dt},") and "PixLoadMN" in k.name
                 and "Im2colLoadMN" in k.name]
        assert len(fwd) == 2 and len(wgrad) == 2, f"missing {dt} tiles in {[k.name for k in tc]}"
        for k in fwd + wgrad:
            big = "Cfg<256" in k.name
            # a 64-deep k-tile: 4 k16 steps x (64x64 warp tile: 32 mma; 64x32: 16 mma)
            assert k.sass.get("HMMA", 0) >= (128 if big else 64), f"{k.name}: HMMA {k.sass}"
            assert k.sass.get("LDSM", 0) >= (32 if big else 24), f"{k.name}: ldmatrix {k.sass}"
            assert k.sass.get("LDGSTS128", 0) > 0, f"{k.name}: operands are not 16-byte cp.async"
            assert k.stack == 0, f"{k.name} spills ({k.stack} B)"
        for k in fwd:
            assert k.sass.get("STG128", 0) > 0, f"{k.name}: output stores are not 16-byte"
    masks = [k for k in cuda_objects if k.name.startswith("mask_bias_kernel")]
    assert len(masks) == 8 and all(k.stack == 0 for k in masks), [k.name for k in masks]


def test_pool_and_batchnorm_vector_paths_are_16_byte(cuda_objects):
    vec = [k for k in cuda_objects
           if re.match(r"(maxpool_fwd|avgpool_fwd|apply_nhwc|apply_nchw)_kernel<(Half|BF16), 8",
                       k.name)]
    assert len(vec) >= 8, [k.name for k in cuda_objects]
    for k in vec:
        assert k.sass["LDG128"] > 0 and k.sass["STG128"] > 0, f"{k.name}: not 16-byte"


def test_committed_resource_report_has_no_spills():
    text = (CUDA_DIR / "RESOURCES.md").read_text()
    rows = [r for r in text.splitlines() if r.startswith("| ") and "`" in r]
    assert len(rows) > 50, "csrc/cuda/RESOURCES.md looks empty: regenerate it"
    names = {p.name for p in CUDA_DIR.glob("*.cu")}
    assert {r.split("|")[1].strip() for r in rows} == names, "RESOURCES.md is stale: regenerate"
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        if cells[2].startswith("*"):
            assert cells[4] == "0", f"RESOURCES.md: main kernel spills: {r}"
    # the Hopper forward kernel, compiled for sm_90a: warpgroup MMAs, no spills
    wg = [[c.strip() for c in r.strip("|").split("|")] for r in rows
          if "| sm_90a |" in r and "wg_gemm_kernel<" in r]
    assert len(wg) == 2, "RESOURCES.md lacks the sm_90a wg_gemm_kernel rows (--arch sm_90,sm_90a)"
    for cells in wg:
        assert cells[4] == "0" and int(cells[-1]) >= 8, f"wg_gemm_kernel: {cells}"


EMULATION_MAIN = """
#include "conv2d_relu_emulate.cuh"
#include "pool_emulate.cuh"
#include "batch_norm_emulate.cuh"
int main() {
  const int conv = fastconv_cuda::emu::run_all();
  const int pool = fastconv_cuda::emu_pool::run_all();
  const int bn = fastconv_cuda::emu_bn::run_all();
  printf("EMULATION conv %d pool %d batchnorm %d\\n", conv, pool, bn);
  return conv || pool || bn;
}
"""


def test_kernels_emulated_on_cpu(tmp_path):
    """The per-thread code of every kernel, run on the CPU as the GPU would run it (CTA by CTA,
    thread by thread; ldmatrix/mma emulated from their PTX definitions) against float64 / ATen
    references: conv fwd, grad_input and grad_weight on every loader (vector, gather; groups,
    stride, dilation, padding, channel tails), the pools and batch norm in both layouts and both
    vector widths. Catches index, layout and planning bugs without a GPU."""
    why = _nvcc_ok()
    if why:
        pytest.skip(why)
    main = tmp_path / "emu_main.cu"
    main.write_text(EMULATION_MAIN)
    lib = Path(torch.__file__).parent / "lib"
    cmd = rr.nvcc_command(main, tmp_path / "emu", "sm_80")
    cmd = [c for c in cmd if c not in ("-c", "-DTORCH_API_INCLUDE_EXTENSION_H", "-O3", "-lineinfo")]
    cmd += ["-O1", "-I", str(CUDA_DIR), "-I", str(EMULATION_DIR), "-L", str(lib), "-ltorch_cpu", "-lc10",
            "-Xlinker", f"-rpath={lib}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"emulation build failed:\n{res.stderr[-4000:]}"
    run = subprocess.run([str(tmp_path / "emu")], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "EMULATION conv 0 pool 0 batchnorm 0" in run.stdout, \
        run.stdout[-6000:] + run.stderr[-2000:]


# ================================================================================================
# GPU part
# ================================================================================================


@pytest.fixture(scope="module")
def ops():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    from fastconv.backends import extension

    extension.build()
    if not extension.has_cuda_kernels():
        pytest.skip("the extension was built without its CUDA kernels")
    return torch.ops.fastconv


def _fmt(cl):
    return torch.channels_last if cl else torch.contiguous_format


def _rand(shape, dtype, cl=False, lo=-1.0, hi=1.0, gen=None):
    x = torch.empty(shape, device="cuda", dtype=torch.float32).uniform_(lo, hi, generator=gen)
    return x.to(dtype).contiguous(memory_format=_fmt(cl))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONV_DTYPES = DTYPES + [torch.float64]

# (N, C, H, W, K, R, S, stride, padding, dilation, groups, bias)
CONV_CASES = [
    (2, 16, 9, 7, 24, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),
    (2, 40, 6, 5, 136, 3, 3, (2, 1), (1, 0), (1, 1), 1, True),
    (1, 16, 8, 8, 16, 3, 2, (1, 2), (2, 1), (2, 1), 2, False),
    (2, 3, 11, 11, 16, 5, 5, (2, 2), (2, 2), (1, 1), 1, True),
    (2, 1, 28, 28, 8, 11, 11, (4, 4), (1, 1), (1, 1), 1, True),
    (2, 16, 7, 6, 12, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),
    (3, 8, 5, 5, 8, 1, 1, (2, 2), (0, 0), (1, 1), 1, False),
    (2, 96, 13, 13, 256, 5, 5, (1, 1), (2, 2), (1, 1), 2, True),
    (4, 64, 20, 20, 128, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),
    (2, 20, 9, 9, 50, 3, 3, (1, 1), (0, 0), (1, 1), 1, True),
]


def conv_reference(x, w, b, stride, padding, dilation, groups, relu):
    x64, w64 = x.double(), w.double()
    b64 = b.double() if b is not None else None
    ref = F.conv2d(x64, w64, b64, stride, padding, dilation, groups)
    mag = F.conv2d(x64.abs(), w64.abs(), b64.abs() if b is not None else None, stride, padding,
                   dilation, groups)
    return (ref.clamp_min(0) if relu else ref), mag


def conv_bound(ref, mag, L, dtype):
    return U_OUT[dtype] * ref.abs() + gamma(L + 1, dtype) * mag + 1e-300


def _conv_args(case, dtype, cl, relu):
    N, C, H, W, K, R, S, stride, padding, dilation, groups, has_bias = case
    x = _rand((N, C, H, W), dtype, cl)
    w = _rand((K, C // groups, R, S), dtype, cl)
    b = _rand((K,), dtype) if has_bias else None
    return x, w, b, list(stride), list(padding), list(dilation), groups, relu


@requires_cuda
@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_conv_forward(ops, case, cl, dtype):
    for relu in (True, False):
        x, w, b, st, pd, dl, g, _ = _conv_args(case, dtype, cl, relu)
        out = ops.conv2d_relu(x, w, b, st, pd, dl, g, relu)
        assert out.is_contiguous(memory_format=_fmt(cl)), "output lost the input's layout"
        ref, mag = conv_reference(x, w, b, st, pd, dl, g, relu)
        L = w.shape[1] * w.shape[2] * w.shape[3]
        assert_within(out, ref, conv_bound(ref, mag, L, dtype), f"conv relu={relu}")


def conv_backward_reference(dy, x, w, y, stride, padding, dilation, groups, relu):
    dy64 = dy.double()
    if relu:
        dy64 = dy64 * (~(y <= 0)).double()  # threshold_backward on the saved output
    x64, w64 = x.double(), w.double()
    args = (stride, padding, dilation, groups)
    gi = torch.nn.grad.conv2d_input(x.shape, w64, dy64, *args)
    gi_mag = torch.nn.grad.conv2d_input(x.shape, w64.abs(), dy64.abs(), *args)
    gw = torch.nn.grad.conv2d_weight(x64, w.shape, dy64, *args)
    gw_mag = torch.nn.grad.conv2d_weight(x64.abs(), w.shape, dy64.abs(), *args)
    gb = dy64.sum((0, 2, 3))
    gb_mag = dy64.abs().sum((0, 2, 3))
    return (gi, gi_mag), (gw, gw_mag), (gb, gb_mag)


@requires_cuda
@pytest.mark.parametrize("dtype", CONV_DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_conv_backward(ops, case, cl, dtype):
    relu = case[0] != 3  # one case without the ReLU mask
    x, w, b, st, pd, dl, g, _ = _conv_args(case, dtype, cl, relu)
    y = ops.conv2d_relu(x, w, b, st, pd, dl, g, relu)
    dy = _rand(y.shape, dtype, cl)
    out = ops.conv2d_relu_backward(dy, x, w, y if relu else dy.new_empty((0,)), st, pd, dl, g,
                                   relu, [True, True, True])
    (gi, gim), (gw, gwm), (gb, gbm) = conv_backward_reference(dy, x, w, y, st, pd, dl, g, relu)
    N, P, Q = y.shape[0], y.shape[2], y.shape[3]
    Kg = w.shape[0] // g
    assert out[0].is_contiguous(memory_format=_fmt(cl))
    assert_within(out[0], gi, conv_bound(gi, gim, Kg * w.shape[2] * w.shape[3], dtype), "grad_input")
    assert_within(out[1], gw, conv_bound(gw, gwm, N * P * Q, dtype), "grad_weight")
    assert_within(out[2], gb, conv_bound(gb, gbm, N * P * Q, dtype), "grad_bias")
    # output_mask: only what is asked for
    only_w = ops.conv2d_relu_backward(dy, x, w, y, st, pd, dl, g, relu, [False, True, False])
    assert only_w[0].numel() == 0 and only_w[2].numel() == 0
    assert torch.equal(only_w[1], out[1]), "grad_weight is not deterministic"
    again = ops.conv2d_relu_backward(dy, x, w, y, st, pd, dl, g, relu, [True, True, True])
    for a, c in zip(again, out):
        assert torch.equal(a, c), "conv backward is not deterministic"


# Shapes of the large-tile tensor-core paths (C % 8 == 0 and K % 8 == 0): several row and column
# tiles, 5x5, groups, dilation, 1x1 stride 2 (grad_input of strided convs takes the 128x128x32
# kernel on the masked gradient), no padding, and a tail in every tile dimension.
# (N, C, H, W, K, R, S, stride, padding, dilation, groups, bias)
TC_CASES = [
    (3, 64, 30, 30, 264, 3, 3, (1, 1), (1, 1), (1, 1), 1, True),
    (2, 96, 13, 13, 256, 5, 5, (1, 1), (2, 2), (1, 1), 2, True),
    (2, 16, 12, 10, 32, 3, 3, (1, 1), (2, 1), (2, 1), 2, False),
    (4, 40, 9, 11, 136, 3, 3, (2, 1), (1, 0), (1, 1), 1, True),
    (3, 8, 5, 5, 8, 1, 1, (2, 2), (0, 0), (1, 1), 1, False),
    (2, 24, 8, 8, 48, 3, 3, (1, 1), (0, 0), (1, 1), 1, True),
]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile", ["big", "mid", "old", "wgmma"])
@pytest.mark.parametrize("case", TC_CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_conv_tiles(ops, monkeypatch, case, tile, dtype):
    """Every tile the dispatcher can pick (FASTCONV_CONV_TILE forces one; wgmma falls back to the
    automatic choice where the build has no sm_90a code): forward, grad_input, grad_weight,
    grad_bias against float64, channels_last and NCHW, each gradient alone = all together."""
    monkeypatch.setenv("FASTCONV_CONV_TILE", tile)
    for cl in (True, False):
        relu = case[0] != 3
        x, w, b, st, pd, dl, g, _ = _conv_args(case, dtype, cl, relu)
        y = ops.conv2d_relu(x, w, b, st, pd, dl, g, relu)
        ref, mag = conv_reference(x, w, b, st, pd, dl, g, relu)
        assert_within(y, ref, conv_bound(ref, mag, w.shape[1] * w.shape[2] * w.shape[3], dtype),
                      f"forward ({tile}, cl={cl})")
        dy = _rand(y.shape, dtype, cl)
        saved = y if relu else dy.new_empty((0,))
        out = ops.conv2d_relu_backward(dy, x, w, saved, st, pd, dl, g, relu, [True, True, True])
        (gi, gim), (gw, gwm), (gb, gbm) = conv_backward_reference(dy, x, w, y, st, pd, dl, g, relu)
        N, P, Q = y.shape[0], y.shape[2], y.shape[3]
        Kg = w.shape[0] // g
        assert out[0].is_contiguous(memory_format=_fmt(cl))
        assert_within(out[0], gi, conv_bound(gi, gim, Kg * w.shape[2] * w.shape[3], dtype),
                      f"grad_input ({tile}, cl={cl})")
        assert_within(out[1], gw, conv_bound(gw, gwm, N * P * Q, dtype), f"grad_weight ({tile})")
        assert_within(out[2], gb, conv_bound(gb, gbm, N * P * Q, dtype), f"grad_bias ({tile})")
        for mask in ([True, False, False], [False, True, False], [False, False, True]):
            part = ops.conv2d_relu_backward(dy, x, w, saved, st, pd, dl, g, relu, mask)
            for i in range(3):
                if mask[i]:
                    assert torch.equal(part[i], out[i]), f"gradient {i} differs alone ({tile})"
                else:
                    assert part[i].numel() == 0


# Full-size conv layers (docs/MODELS.md), batch 8.
ALEXNET = [(1, 96, 224, 11, 4, 1), (96, 256, 26, 5, 1, 2), (256, 384, 12, 3, 1, 1),
           (384, 384, 12, 3, 1, 1), (384, 256, 12, 3, 1, 1)]
VGG11 = [(1, 64, 224, 3, 1, 1), (64, 128, 112, 3, 1, 1), (128, 256, 56, 3, 1, 1),
         (256, 256, 56, 3, 1, 1), (256, 512, 28, 3, 1, 1), (512, 512, 28, 3, 1, 1),
         (512, 512, 14, 3, 1, 1), (512, 512, 14, 3, 1, 1)]
MODEL_LAYERS = [("alexnet", i, *l) for i, l in enumerate(ALEXNET)] + \
               [("vgg11", i, *l) for i, l in enumerate(VGG11)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layer", MODEL_LAYERS, ids=lambda l: f"{l[0]}{l[1]}")
def test_conv_model_layers_full_size(ops, layer, dtype):
    _, idx, C, K, HW, k, s, p = layer
    x = _rand((8, C, HW, HW), dtype, True)
    w = _rand((K, C, k, k), dtype, True) * (1.0 / math.sqrt(C * k * k))
    b = _rand((K,), dtype)
    y = ops.conv2d_relu(x, w, b, [s, s], [p, p], [1, 1], 1, True)
    ref, mag = conv_reference(x, w, b, [s, s], [p, p], [1, 1], 1, True)
    assert_within(y, ref, conv_bound(ref, mag, C * k * k, dtype), "forward")
    if idx in (1, 4):  # grad_input and grad_weight on two layers
        dy = _rand(y.shape, dtype, True)
        gi, gw, gb = ops.conv2d_relu_backward(dy, x, w, y, [s, s], [p, p], [1, 1], 1, True,
                                              [True, True, True])
        (ri, rim), (rw, rwm), (rb, rbm) = conv_backward_reference(dy, x, w, y, [s, s], [p, p],
                                                                  [1, 1], 1, True)
        P = y.shape[2]
        assert_within(gi, ri, conv_bound(ri, rim, K * k * k, dtype), "grad_input")
        assert_within(gw, rw, conv_bound(rw, rwm, 8 * P * P, dtype), "grad_weight")
        assert_within(gb, rb, conv_bound(rb, rbm, 8 * P * P, dtype), "grad_bias")


@requires_cuda
def test_conv_runs_on_the_current_stream(ops):
    x = _rand((4, 32, 16, 16), torch.float16, True)
    w = _rand((64, 32, 3, 3), torch.float16, True)
    want = ops.conv2d_relu(x, w, None, [1, 1], [1, 1], [1, 1], 1, True)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(1_000_000)  # keep the side stream busy: a launch elsewhere would race
        got = ops.conv2d_relu(x, w, None, [1, 1], [1, 1], [1, 1], 1, True)
    s.synchronize()
    assert torch.equal(got, want)


@requires_cuda
def test_conv_rejects_bad_input(ops):
    x = _rand((2, 8, 8, 8), torch.float16)
    with pytest.raises(RuntimeError, match="weight"):
        ops.conv2d_relu(x, _rand((8, 3, 3, 3), torch.float16), None, [1, 1], [0, 0], [1, 1], 1, True)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.conv2d_relu(x, _rand((8, 8, 3, 3), torch.float32), None, [1, 1], [0, 0], [1, 1], 1, True)


# ---------------------------------------------------------------------------------------- pools

POOL_DTYPES = DTYPES + [torch.float64]
# (N, C, H, W, kernel, stride, padding, dilation, ceil_mode)
MAXPOOL_CASES = [
    (2, 16, 13, 13, (3, 3), (2, 2), (0, 0), (1, 1), False),
    (2, 8, 8, 8, (2, 2), (2, 2), (0, 0), (1, 1), False),
    (2, 24, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1), False),
    (2, 16, 14, 14, (3, 3), (2, 2), (1, 1), (1, 1), True),
    (1, 3, 12, 11, (3, 2), (2, 1), (1, 1), (2, 2), True),
    (2, 32, 6, 6, (12, 12), (1, 1), (3, 3), (1, 1), False),  # 144 > 127 window: int32 local index
]


def _maxpool_ref(x, k, s, p, d, ceil, relu):
    x64 = x.double()
    if relu:
        x64 = F.relu(x64)
    return F.max_pool2d(x64, k, s, p, d, ceil, return_indices=True)


@requires_cuda
@pytest.mark.parametrize("dtype", POOL_DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", MAXPOOL_CASES, ids=lambda c: f"{c[1]}x{c[2]}x{c[3]}k{c[4][0]}")
def test_max_pool(ops, case, cl, dtype):
    N, C, H, W, k, s, p, d, ceil = case
    x = _rand((N, C, H, W), dtype, cl)
    for relu in (False, True):
        ref, ref_idx = _maxpool_ref(x, k, s, p, d, ceil, relu)
        for ret in (True, False):
            out, idx = ops.max_pool2d(x, list(k), list(s), list(p), list(d), ceil, ret, relu)
            assert out.is_contiguous(memory_format=_fmt(cl))
            assert torch.equal(out.double(), ref), "max-pool values differ"
            if ret:
                assert idx.dtype == torch.int64 and torch.equal(idx, ref_idx)
            else:
                assert idx.dtype == (torch.int8 if k[0] * k[1] <= 127 else torch.int32)
                OH, OW = out.shape[2], out.shape[3]
                hs = (torch.arange(OH, device="cuda") * s[0] - p[0]).view(1, 1, OH, 1)
                ws = (torch.arange(OW, device="cuda") * s[1] - p[1]).view(1, 1, 1, OW)
                loc = idx.long()
                flat = (hs + (loc // k[1]) * d[0]) * W + ws + (loc % k[1]) * d[1]
                assert torch.equal(flat, ref_idx), "window-local indices decode wrongly"
            dy = _rand(out.shape, dtype, cl)
            gx = ops.max_pool2d_backward(dy, out if relu else dy.new_empty((0,)), idx, list(x.shape),
                                         list(k), list(s), list(p), list(d), ceil, ret, relu)
            xr = x.double().requires_grad_()
            o = F.max_pool2d(F.relu(xr) if relu else xr, k, s, p, d, ceil)
            (gref,) = torch.autograd.grad(o, xr, dy.double())
            (gmag,) = torch.autograd.grad(F.max_pool2d(F.relu(xr) if relu else xr, k, s, p, d, ceil),
                                          xr, dy.double().abs())
            n_terms = math.ceil(k[0] / s[0]) * math.ceil(k[1] / s[1])
            bound = U_OUT[dtype] * gref.abs() + gamma(n_terms, dtype) * gmag + 1e-300
            assert gx.is_contiguous(memory_format=_fmt(cl))
            assert_within(gx, gref, bound, f"max-pool grad relu={relu} indices={ret}")


@requires_cuda
def test_max_pool_propagates_nan_like_torch(ops):
    x = _rand((1, 8, 6, 6), torch.float32, True)
    x[0, 3, 2, 2] = float("nan")
    x[0, 5, 0, 1] = float("nan")
    for relu in (False, True):
        out, idx = ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False, True, relu)
        ref, ref_idx = F.max_pool2d(F.relu(x) if relu else x, 3, 2, 1, return_indices=True)
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        assert torch.equal(idx, ref_idx)
        assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref))


# (N, C, H, W, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_CASES = [
    (2, 16, 8, 8, (2, 2), (2, 2), (0, 0), False, True, None),
    (2, 8, 7, 9, (3, 3), (2, 2), (1, 1), True, False, None),
    (2, 24, 7, 7, (3, 3), (1, 1), (1, 1), False, True, None),
    (1, 3, 10, 11, (3, 2), (2, 3), (1, 1), True, True, 5),
]


@requires_cuda
@pytest.mark.parametrize("dtype", POOL_DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case", AVG_CASES, ids=lambda c: f"{c[1]}x{c[2]}x{c[3]}k{c[4][0]}")
def test_avg_pool(ops, case, cl, dtype):
    N, C, H, W, k, s, p, ceil, cip, div = case
    x = _rand((N, C, H, W), dtype, cl)
    out = ops.avg_pool2d(x, list(k), list(s), list(p), ceil, cip, div)
    xr = x.double().requires_grad_()
    ref = F.avg_pool2d(xr, k, s, p, ceil, cip, div)
    mag = F.avg_pool2d(xr.detach().abs(), k, s, p, ceil, cip, div)
    L = k[0] * k[1]
    assert out.is_contiguous(memory_format=_fmt(cl))
    assert_within(out, ref.detach(), U_OUT[dtype] * ref.detach().abs() + gamma(L + 1, dtype) * mag
                  + 1e-300, "avg_pool2d")
    dy = _rand(out.shape, dtype, cl)
    gx = ops.avg_pool2d_backward(dy, list(x.shape), list(k), list(s), list(p), ceil, cip, div)
    (gref,) = torch.autograd.grad(ref, xr, dy.double())
    (gmag,) = torch.autograd.grad(F.avg_pool2d(xr, k, s, p, ceil, cip, div), xr, dy.double().abs())
    assert gx.is_contiguous(memory_format=_fmt(cl))
    assert_within(gx, gref, U_OUT[dtype] * gref.abs() + gamma(2 * L + 1, dtype) * gmag + 1e-300,
                  "avg_pool2d grad")


@requires_cuda
@pytest.mark.parametrize("dtype", POOL_DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape,osize", [((2, 16, 7, 7), (1, 1)), ((2, 8, 7, 9), (3, 4)),
                                         ((1, 24, 5, 5), (5, 5)), ((2, 3, 10, 6), (4, 5))])
def test_adaptive_avg_pool(ops, shape, osize, cl, dtype):
    x = _rand(shape, dtype, cl)
    out = ops.adaptive_avg_pool2d(x, list(osize))
    xr = x.double().requires_grad_()
    ref = F.adaptive_avg_pool2d(xr, osize)
    mag = F.adaptive_avg_pool2d(xr.detach().abs(), osize)
    L = math.ceil(shape[2] / osize[0] + 1) * math.ceil(shape[3] / osize[1] + 1)
    assert out.is_contiguous(memory_format=_fmt(cl))
    assert_within(out, ref.detach(), U_OUT[dtype] * ref.detach().abs() + gamma(L + 1, dtype) * mag
                  + 1e-300, "adaptive_avg_pool2d")
    dy = _rand(out.shape, dtype, cl)
    gx = ops.adaptive_avg_pool2d_backward(dy, list(x.shape))
    (gref,) = torch.autograd.grad(ref, xr, dy.double())
    (gmag,) = torch.autograd.grad(F.adaptive_avg_pool2d(xr, osize), xr, dy.double().abs())
    assert_within(gx, gref, U_OUT[dtype] * gref.abs() + gamma(2 * L + 1, dtype) * gmag + 1e-300,
                  "adaptive_avg_pool2d grad")


# ------------------------------------------------------------------------------------ batch norm

BN_SHAPES = [(4, 16, 5, 7), (2, 64, 8, 8), (3, 3, 13, 11), (8, 32, 1, 1), (2, 40, 4, 4)]


def _bn_params(C, pdtype, affine):
    if not affine:
        return None, None
    w = _rand((C,), pdtype, lo=0.5, hi=1.5)
    b = _rand((C,), pdtype)
    return w, b


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("params", ["f32", "same", "none"])
def test_batch_norm_training(ops, shape, cl, dtype, params):
    C = shape[1]
    pdtype = torch.float32 if params == "f32" else dtype
    x = _rand(shape, dtype, cl, lo=-2.0, hi=3.0)
    w, b = _bn_params(C, pdtype, params != "none")
    rm = _rand((C,), pdtype)
    rv = _rand((C,), pdtype, lo=0.5, hi=2.0)
    rm0, rv0 = rm.double(), rv.double()
    momentum, eps = 0.1, 1e-5
    n = shape[0] * shape[2] * shape[3]
    for relu in (False, True):
        rm.copy_(rm0), rv.copy_(rv0)
        out, smean, sinv = ops.batch_norm(x, w, b, rm, rv, True, momentum, eps, relu)
        x64 = x.double()
        mean = x64.mean((0, 2, 3))
        var = x64.var((0, 2, 3), unbiased=False)
        invstd = 1 / torch.sqrt(var + eps)
        assert smean.dtype == torch.float32 and sinv.dtype == torch.float32
        u = 2.0**-24
        assert_within(smean, mean, 64 * u * (x64.abs().amax((0, 2, 3)) + mean.abs()), "save_mean")
        assert_within(sinv, invstd, 64 * u * invstd * (1 + (mean.abs() / var.sqrt())), "save_invstd")
        w64 = w.double() if w is not None else torch.ones(C, device="cuda", dtype=torch.float64)
        b64 = b.double() if b is not None else torch.zeros(C, device="cuda", dtype=torch.float64)
        xhat = (x64 - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        ref = xhat * w64.view(1, -1, 1, 1) + b64.view(1, -1, 1, 1)
        if relu:
            ref = ref.clamp_min(0)
        # stats err ~ 64u relative (Welford/Chan in float32, with a sqrt); the normalise adds a few u
        mag = (xhat.abs() + 1) * w64.abs().view(1, -1, 1, 1) + b64.abs().view(1, -1, 1, 1)
        assert out.is_contiguous(memory_format=_fmt(cl))
        assert_within(out, ref, U_OUT[dtype] * ref.abs() + 128 * u * mag, f"bn out relu={relu}")
        p_u = U_OUT[pdtype]
        want_rm = (1 - momentum) * rm0 + momentum * mean
        want_rv = (1 - momentum) * rv0 + momentum * var * n / (n - 1)
        assert_within(rm, want_rm, p_u * want_rm.abs() + 64 * u * (rm0.abs() + x64.abs().amax((0, 2, 3))),
                      "running_mean")
        assert_within(rv, want_rv, p_u * want_rv.abs() + 64 * u * (rv0.abs() + var), "running_var")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_eval(ops, shape, cl, dtype):
    C = shape[1]
    x = _rand(shape, dtype, cl, lo=-2.0, hi=3.0)
    w, b = _bn_params(C, torch.float32, True)
    rm = _rand((C,), torch.float32)
    rv = _rand((C,), torch.float32, lo=0.5, hi=2.0)
    rm0, rv0 = rm.clone(), rv.clone()
    for relu in (False, True):
        out, smean, sinv = ops.batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5, relu)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval mode changed running stats"
        ref = F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), False, 0.1,
                           1e-5)
        if relu:
            ref = ref.clamp_min(0)
        xhat = (x.double() - rm.double().view(1, -1, 1, 1)) / torch.sqrt(rv.double() + 1e-5).view(1, -1, 1, 1)
        mag = (xhat.abs() + 1) * w.double().abs().view(1, -1, 1, 1) + b.double().abs().view(1, -1, 1, 1)
        assert_within(out, ref, U_OUT[dtype] * ref.abs() + 16 * 2.0**-24 * mag, "bn eval")
        assert torch.equal(smean, rm)
        assert_within(sinv, 1 / torch.sqrt(rv.double() + 1e-5), 4 * 2.0**-24 / torch.sqrt(rv.double()),
                      "eval invstd")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_backward(ops, shape, cl, dtype, training):
    C = shape[1]
    x = _rand(shape, dtype, cl, lo=-2.0, hi=3.0)
    w, b = _bn_params(C, torch.float32, True)
    rm = _rand((C,), torch.float32)
    rv = _rand((C,), torch.float32, lo=0.5, hi=2.0)
    for relu in (False, True):
        y, smean, sinv = ops.batch_norm(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, relu)
        dy = _rand(shape, dtype, cl)
        gi, gw, gb, _ = ops.batch_norm_backward(dy, x, y if relu else dy.new_empty((0,)), w, smean,
                                                sinv, training, relu, [True, True, True, False])
        # reference: autograd of the float64 formula with the kernel's saved statistics, masked by
        # the kernel's saved output
        dy64 = dy.double() * ((~(y <= 0)).double() if relu else 1.0)
        xr = x.double().requires_grad_()
        wr = w.double().requires_grad_()
        br = b.double().requires_grad_()
        if training:
            mean = xr.mean((0, 2, 3), keepdim=True)
            var = ((xr - mean) ** 2).mean((0, 2, 3), keepdim=True)
            o = (xr - mean) / torch.sqrt(var + 1e-5) * wr.view(1, -1, 1, 1) + br.view(1, -1, 1, 1)
        else:
            o = (xr - smean.double().view(1, -1, 1, 1)) * sinv.double().view(1, -1, 1, 1) \
                * wr.view(1, -1, 1, 1) + br.view(1, -1, 1, 1)
        rgi, rgw, rgb = torch.autograd.grad(o, (xr, wr, br), dy64)
        n = shape[0] * shape[2] * shape[3]
        u = 2.0**-24
        inv = sinv.double().view(1, -1, 1, 1)
        xhat = (x.double() - smean.double().view(1, -1, 1, 1)) * inv
        sdy = dy64.abs().sum((0, 2, 3), keepdim=True)
        sdyx = (dy64 * xhat).abs().sum((0, 2, 3), keepdim=True)
        gi_mag = w.double().abs().view(1, -1, 1, 1) * inv * (dy64.abs() + (sdy + xhat.abs() * sdyx) / n)
        assert gi.is_contiguous(memory_format=_fmt(cl))
        assert_within(gi, rgi, U_OUT[dtype] * rgi.abs() + (64 * u + gamma(n, torch.float32)) * gi_mag,
                      f"bn grad_input relu={relu}")
        assert_within(gw, rgw, 64 * u * rgw.abs() + (64 * u + gamma(n, torch.float32)) * sdyx.flatten(),
                      "bn grad_weight")
        assert_within(gb, rgb, gamma(n, torch.float32) * sdy.flatten(), "bn grad_bias")
        again = ops.batch_norm_backward(dy, x, y if relu else dy.new_empty((0,)), w, smean, sinv,
                                        training, relu, [True, True, True, False])
        for a, c in zip(again, (gi, gw, gb)):
            assert torch.equal(a, c), "batch-norm backward is not deterministic"


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_residual(ops, shape, cl, dtype, training):
    """relu?(bn(x) + residual): the forward as test_batch_norm_training/eval's plus the float32
    add (u of |bn(x) + residual|); the residual's gradient is dy masked by the kernel's output,
    exactly, whether or not grad_input is asked for, and asking for it leaves grad_input,
    grad_weight and grad_bias bit-identical."""
    C = shape[1]
    x = _rand(shape, dtype, cl, lo=-2.0, hi=3.0)
    res = _rand(shape, dtype, cl, lo=-1.5, hi=1.0)
    w, b = _bn_params(C, torch.float32, True)
    rm0 = _rand((C,), torch.float32)
    rv0 = _rand((C,), torch.float32, lo=0.5, hi=2.0)
    u = 2.0**-24
    for relu in (False, True):
        rm, rv = rm0.clone(), rv0.clone()
        out, smean, sinv = ops.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5, relu, res)
        x64 = x.double()
        if training:
            mean = x64.mean((0, 2, 3))
            invstd = 1 / torch.sqrt(x64.var((0, 2, 3), unbiased=False) + 1e-5)
            slack = 128 * u
        else:
            mean, invstd = rm0.double(), 1 / torch.sqrt(rv0.double() + 1e-5)
            slack = 16 * u
        xhat = (x64 - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        lin = xhat * w.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)
        pre = lin + res.double()
        ref = pre.clamp_min(0) if relu else pre
        mag = (xhat.abs() + 1) * w.double().abs().view(1, -1, 1, 1) + b.double().abs().view(1, -1, 1, 1)
        assert out.is_contiguous(memory_format=_fmt(cl))
        assert_within(out, ref, U_OUT[dtype] * ref.abs() + u * pre.abs() + slack * mag,
                      f"bn+residual out relu={relu}")
        if not training:
            assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
        dy = _rand(shape, dtype, cl)
        y = out if relu else dy.new_empty((0,))
        want = dy * (~(out <= 0)).to(dtype) if relu else dy
        base = ops.batch_norm_backward(dy, x, y, w, smean, sinv, training, relu,
                                       [True, True, True, False])
        both = ops.batch_norm_backward(dy, x, y, w, smean, sinv, training, relu,
                                       [True, True, True, True])
        alone = ops.batch_norm_backward(dy, x, y, w, smean, sinv, training, relu,
                                        [False, False, False, True])
        for a, c in zip(both[:3], base[:3]):
            assert torch.equal(a, c), "asking for the residual's gradient changed another"
        for gr in (both[3], alone[3]):
            assert gr.is_contiguous(memory_format=_fmt(cl))
            assert torch.equal(gr, want), f"grad_residual relu={relu}"


@requires_cuda
def test_batch_norm_rejects_float64_and_one_value_per_channel(ops):
    with pytest.raises(RuntimeError, match="float64|Double"):
        ops.batch_norm(_rand((2, 4, 3, 3), torch.float64), None, None, None, None, True, 0.1,
                       1e-5, False)
    with pytest.raises(RuntimeError, match="more than 1 value"):
        ops.batch_norm(_rand((1, 4, 1, 1), torch.float32), None, None, None, None, True, 0.1,
                       1e-5, False)


# ----------------------------------------------------------------------------- opcheck, 64-bit


def _opcheck_samples():
    x = _rand((2, 16, 6, 6), torch.float16, True)
    xf = _rand((2, 3, 7, 7), torch.float32)
    w = _rand((24, 16, 3, 3), torch.float16, True)
    wf = _rand((8, 3, 3, 3), torch.float32)
    yield "conv2d_relu", (x, w, _rand((24,), torch.float16), [1, 1], [1, 1], [1, 1], 1, True)
    yield "conv2d_relu", (xf, wf, None, [2, 2], [0, 0], [1, 1], 1, False)
    y = torch.ops.fastconv.conv2d_relu(x, w, None, [1, 1], [1, 1], [1, 1], 1, True)
    yield "conv2d_relu_backward", (torch.randn_like(y), x, w, y, [1, 1], [1, 1], [1, 1], 1, True,
                                   [True, True, True])
    yield "max_pool2d", (x, [3, 3], [2, 2], [1, 1], [1, 1], False, False, True)
    yield "max_pool2d", (xf, [2, 2], [2, 2], [0, 0], [1, 1], True, True, False)
    o, i = torch.ops.fastconv.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False, False, True)
    yield "max_pool2d_backward", (torch.randn_like(o), o, i, list(x.shape), [3, 3], [2, 2], [1, 1],
                                  [1, 1], False, False, True)
    yield "avg_pool2d", (x, [2, 2], [2, 2], [0, 0], False, True, None)
    yield "avg_pool2d_backward", (_rand((2, 16, 3, 3), torch.float16, True), list(x.shape), [2, 2],
                                  [2, 2], [0, 0], False, True, None)
    yield "adaptive_avg_pool2d", (xf, [1, 1])
    yield "adaptive_avg_pool2d_backward", (_rand((2, 3, 1, 1), torch.float32), list(xf.shape))
    c = x.shape[1]
    wb = torch.rand(c, device="cuda") + 0.5
    yield "batch_norm", (x, wb, torch.randn(c, device="cuda"), torch.zeros(c, device="cuda"),
                         torch.ones(c, device="cuda"), True, 0.1, 1e-5, True)
    yb, m, s = torch.ops.fastconv.batch_norm(x, wb, None, None, None, True, 0.1, 1e-5, True)
    yield "batch_norm_backward", (torch.randn_like(yb), x, yb, wb, m, s, True, True,
                                  [True, True, True, True])


@requires_cuda
def test_opcheck(ops):
    failures = []
    for name, args in _opcheck_samples():
        op = getattr(ops, name).default
        try:
            torch.library.opcheck(op, args)
        except Exception as exc:  # collect all, report together
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:400]}")
    assert not failures, "\n".join(failures)


@requires_cuda
@pytest.mark.slow
def test_tensors_beyond_2_to_the_31_elements(ops):
    """64-bit offsets: a channels_last fp16 tensor of 2^31 + 2^25 elements (4.3 GB)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    N, C, H = 520, 64, 256
    x = torch.empty((N, C, H, H), device="cuda", dtype=torch.float16,
                    memory_format=torch.channels_last).uniform_(-1, 1)
    assert x.numel() > 2**31
    out, _ = ops.max_pool2d(x, [2, 2], [2, 2], [0, 0], [1, 1], False, False, False)
    tail = slice(N - 3, N)
    assert torch.equal(out[tail], F.max_pool2d(x[tail], 2, 2))
    del out
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    y, _, _ = ops.batch_norm(x, None, None, rm, rv, False, 0.1, 1e-5, True)
    ref = F.relu(F.batch_norm(x[tail].float(), rm, rv, None, None, False, 0.1, 1e-5))
    assert (y[tail].float() - ref).abs().max() <= 2.0**-10
    del y
    w = _rand((16, C, 1, 1), torch.float16, True)
    c = ops.conv2d_relu(x, w, None, [1, 1], [0, 0], [1, 1], 1, False)
    cref = F.conv2d(x[tail].double(), w.double())
    assert_within(c[tail], cref, 2.0**-11 * cref.abs() + gamma(C, torch.float32) *
                  F.conv2d(x[tail].double().abs(), w.double().abs()), "conv beyond 2^31")


# ---------------------------------------------------------------------------- compute-sanitizer

SANITIZER_SCRIPT = r'''
import torch
from fastconv.backends import extension
extension.build()
ops = torch.ops.fastconv
torch.manual_seed(0)
def r(shape, dt, cl=False):
    x = torch.randn(shape, device="cuda").to(dt)
    return x.contiguous(memory_format=torch.channels_last) if cl else x
import os
for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
    for cl in (False, True):
        for tile in (("big", "mid", "old", "wgmma") if dt.itemsize == 2 else ("",)):
            os.environ["FASTCONV_CONV_TILE"] = tile  # every conv kernel variant
            for C, K, k, s, g in ((16, 24, 3, 1, 1), (3, 16, 5, 2, 1), (16, 16, 3, 1, 2),
                                  (16, 12, 1, 2, 1), (16, 40, 3, 2, 1), (24, 264, 3, 1, 1)):
                x = r((2, C, 9, 9), dt, cl); w = r((K, C // g, k, k), dt, cl); b = r((K,), dt)
                y = ops.conv2d_relu(x, w, b, [s, s], [1, 1], [1, 1], g, True)
                for relu in (True, False):
                    ops.conv2d_relu_backward(torch.randn_like(y), x, w, y, [s, s], [1, 1], [1, 1],
                                             g, relu, [True, True, True])
        os.environ["FASTCONV_CONV_TILE"] = ""
        x = r((2, 16, 9, 9), dt, cl)
        for ret in (False, True):
            o, i = ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], True, ret, True)
            ops.max_pool2d_backward(torch.randn_like(o), o, i, list(x.shape), [3, 3], [2, 2],
                                    [1, 1], [1, 1], True, ret, True)
        o = ops.avg_pool2d(x, [3, 3], [2, 2], [1, 1], True, False, None)
        ops.avg_pool2d_backward(torch.randn_like(o), list(x.shape), [3, 3], [2, 2], [1, 1], True,
                                False, None)
        o = ops.adaptive_avg_pool2d(x, [2, 3])
        ops.adaptive_avg_pool2d_backward(torch.randn_like(o), list(x.shape))
        if dt != torch.float64:
            for shape in ((2, 16, 9, 9), (3, 3, 5, 5)):
                xb = r(shape, dt, cl); c = shape[1]
                wb, bb = torch.rand(c, device="cuda"), torch.randn(c, device="cuda")
                rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
                for training in (True, False):
                    yb, m, sd = ops.batch_norm(xb, wb, bb, rm, rv, training, 0.1, 1e-5, True)
                    ops.batch_norm_backward(torch.randn_like(yb), xb, yb, wb, m, sd, training, True,
                                            [True, True, True, True])
torch.cuda.synchronize()
print("SANITIZER-SCRIPT-DONE")
'''


@requires_cuda
def test_compute_sanitizer_memcheck(ops, tmp_path):
    tool = rr.find_tool("compute-sanitizer")
    if tool is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "every_kernel.py"
    script.write_text(SANITIZER_SCRIPT)
    # no caching allocator: every tensor its own cudaMalloc, so that memcheck sees overruns
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", FASTCONV_NO_EXTENSION_BUILD="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable,
                          str(script)], capture_output=True, text=True, timeout=1500, env=env,
                         cwd=str(ROOT))
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "SANITIZER-SCRIPT-DONE" in out, out[-6000:]
    assert re.search(r"ERROR SUMMARY: 0 errors", out), out[-6000:]
