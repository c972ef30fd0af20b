"""Shared test utilities: float64 references and tolerances that mean something."""
from __future__ import annotations

import torch

# Relative L2 error bounds per dtype for one op against a float64 reference. They follow from
# the unit roundoff u of the storage dtype (fp32 2^-24, fp16 2^-11, bf16 2^-8): inputs and
# outputs are each rounded once (~u each) and float32 accumulation adds far less, so a few u
# suffice; tf32 dots round the operands to 10 mantissa bits (u = 2^-11).
REL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 4e-3,
           torch.bfloat16: 3e-2}
TF32_REL_TOL = 4e-3


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), "result has NaN (unwritten or poisoned elements?)"
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, tol=None, what=""):
    tol = tol if tol is not None else REL_TOL[dtype or actual.dtype]
    err = rel_err(actual, expected)
    assert err <= tol, f"{what} relative error {err:.3e} > {tol:.1e}"
