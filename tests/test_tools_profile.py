"""fastconv profile: op/kernel categories, time attribution, the command and its traces."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from fastconv import cli
from fastconv.tools import profile as P


@pytest.mark.parametrize("name,category", [
    ("aten::conv2d", "conv"), ("aten::convolution_backward", "conv"),
    ("autograd::engine::evaluate_function: ConvolutionBackward0", "conv"),
    ("fastconv::conv2d_relu", "conv"), ("fastconv::triton_conv2d_relu_backward", "conv"),
    ("sm90_xmma_fprop_implicit_gemm_tf32f32_tf32f32_f32_nhwckrsc_nchw", "conv"),
    ("fastconv::max_pool2d", "pool"), ("aten::max_pool2d_with_indices_backward", "pool"),
    ("fastconv::adaptive_avg_pool2d", "pool"), ("max_pool_forward_nchw", "pool"),
    ("aten::native_batch_norm", "batch norm"), ("fastconv::batch_norm_backward", "batch norm"),
    ("autograd::engine::evaluate_function: NativeBatchNormBackward0", "batch norm"),
    ("aten::addmm", "linear"), ("aten::mm", "linear"), ("AddmmBackward0", "linear"),
    ("aten::linear", "linear"), ("ampere_sgemm_128x64_tn", "linear"),
    ("aten::relu", None), ("aten::_convert_indices_from_coo_to_csr", None),
    ("Optimizer.step#SGD.step", None), (P.STEP_LABEL, None), ("aten::mmap_thing", None),
])
def test_categories(name, category):
    assert P.categorize(name) == category


def _evt(name, parent=None, device="CPU", kernels=(), self_us=0.0, total_us=0.0, span=(0, 0)):
    return SimpleNamespace(name=name, cpu_parent=parent, device_type=f"DeviceType.{device}",
                           kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels],
                           self_cpu_time_total=self_us, cpu_time_total=total_us,
                           time_range=SimpleNamespace(start=span[0], end=span[1]),
                           is_async=False)


def test_gpu_kernels_are_charged_through_the_op_that_launched_them():
    step = _evt(P.STEP_LABEL, total_us=1000.0)
    conv = _evt("aten::conv2d", step, kernels=[("implicit_convolve_sgemm", 300.0)])
    # a GEMM launched inside a convolution is convolution time, not linear
    inner = _evt("aten::cudnn_convolution", conv, kernels=[("sm90_xmma_gemm_f32f32", 100.0)])
    bn = _evt("fastconv::batch_norm", step, kernels=[("_bn_stats_kernel", 50.0)])
    lin = _evt("aten::addmm", step, kernels=[("sm90_xmma_gemm_f32f32", 120.0)])
    relu = _evt("aten::relu", step, kernels=[("vectorized_elementwise_kernel", 30.0)])
    device = [_evt(k.name, device="CUDA", span=(0, k.duration))
              for e in (conv, inner, bn, lin, relu) for k in e.kernels]
    orphan = _evt("max_pool_forward_nchw", device="CUDA", span=(10, 50))  # claimed by no op
    mirror = _evt(P.STEP_LABEL, device="CUDA", span=(0, 990))  # kineto's GPU-side annotation
    s = P.summarize([step, conv, inner, bn, lin, relu, *device, orphan, mirror],
                    on_device=True)
    assert s["wall_us"] == 1000.0
    assert s["shares"] == {"conv": 400.0, "batch norm": 50.0, "linear": 120.0, "rest": 30.0,
                           "pool": 40.0, "idle": 360.0}
    assert s["total_us"] == 1000.0
    names = [t[0] for t in s["top"]]
    assert names[0] == "implicit_convolve_sgemm"
    gemm = [t for t in s["top"] if t[0] == "sm90_xmma_gemm_f32f32"][0]
    assert gemm[1] == 220.0 and gemm[2] == 2  # one name, two calls, two categories' time


def test_cpu_self_time_goes_to_the_outermost_layer_op():
    step = _evt(P.STEP_LABEL, total_us=100.0)
    conv = _evt("aten::conv2d", step, self_us=2.0)
    mm = _evt("aten::mm", conv, self_us=30.0)  # im2col GEMM under a conv: conv time
    lin = _evt("aten::linear", step, self_us=1.0)
    addmm = _evt("aten::addmm", lin, self_us=20.0)
    relu = _evt("aten::relu", step, self_us=7.0)
    s = P.summarize([step, conv, mm, lin, addmm, relu], on_device=False)
    assert s["shares"] == {"conv": 32.0, "linear": 21.0, "rest": 7.0 + 40.0}
    assert sum(s["shares"].values()) == s["total_us"] == 100.0


def test_profile_command_writes_traces_and_shares(tmp_path, capsys):
    out_dir = tmp_path / "prof"
    rc = cli.main(["profile", "--model", "lenet_bn", "--batch", "4", "--steps", "2",
                   "--warmup", "1", "--backends", "torch", "--device", "cpu",
                   "--out", str(out_dir), "--json", "--top", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(stock|torch)\s+([\d.]+)\s+((?:[\d.]+%\s*){5})$", line)
        if m:
            rows[m.group(1)] = [float(v) for v in re.findall(r"([\d.]+)%", m.group(3))]
    assert set(rows) == {"stock", "torch"}, out
    for name, shares in rows.items():
        assert abs(sum(shares) - 100.0) < 0.6, (name, shares)
        conv, pool, bn, linear, rest = shares
        assert conv > 0 and pool > 0 and bn > 0 and linear > 0, (name, shares)
    assert "top ops (self time): torch" in out
    for variant in ("stock", "torch"):
        trace = json.loads((out_dir / f"lenet_bn-{variant}.trace.json").read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert P.STEP_LABEL in names
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["kind"] == "fastconv-profile" and set(summary["variants"]) == {"stock",
                                                                                 "torch"}
    torch_names = {t[0] for t in summary["variants"]["torch"]["top"]}
    assert any(n.startswith("aten::") for n in torch_names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profile_on_cuda_charges_kernels(tmp_path, capsys):
    rc = cli.main(["profile", "--model", "resnet18", "--batch", "16", "--steps", "2",
                   "--warmup", "2", "--device", "cuda", "--out", str(tmp_path), "--json"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "idle" in out and "top kernels: stock" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name, v in summary["variants"].items():
        shares = v["shares"]
        assert shares.get("conv", 0) > 0 and shares.get("batch norm", 0) > 0, (name, shares)
        assert shares.get("linear", 0) > 0 and shares.get("pool", 0) > 0, (name, shares)
        assert abs(sum(shares.values()) - v["total_us"]) < 1e-6 * v["total_us"] + 1
        # kernels doing conv work are far more than the rest in ResNet-18
        assert shares["conv"] > shares.get("rest", 0), (name, shares)
