"""Per-layer benchmark: every conv, pool and batch-norm layer of the MODELS.md networks
(``layers.py``, made runnable by ``cases.py``), forward (``fwd``) and forward+backward
(``fwdbwd``), for each provider. Each provider is timed in alternation with ``eager`` on the
same rotated inputs (``fastconv.timing``), so its ratio to eager is measured in the same run,
with its spread.
"""
from __future__ import annotations

import pytest

from fastconv.tools.common import rel_err

from . import cases
from .conftest import PROVIDER_NAMES, SANITY, first_call, measure, provider_skip_reason


def test_layer(benchmark, fc, layer, mode, provider):
    reason = provider_skip_reason(provider, fc)
    if reason:
        pytest.skip(reason)
    sets = cases.input_sets(layer, fc, mode)
    call = cases.step(layer, provider, mode, sets)

    # sanity: the first result against eager on the same inputs (a copy of the BN statistics,
    # which both update)
    got = first_call(lambda: call(sets[0]), provider)
    eager = call if provider == "eager" else cases.step(layer, "eager", mode, sets)
    if provider != "eager":
        ref_inputs = {k: (v.detach().clone().requires_grad_(v.requires_grad)
                          if v is not None else None) for k, v in sets[0].items()}
        expected = cases.run(layer, cases.forward(layer, "eager"), mode)(ref_inputs)
        errs = [rel_err(a, b) for a, b in zip(got, expected)]
        benchmark.extra_info["rel_err_vs_eager"] = max(errs)
        assert max(errs) <= SANITY[fc.dtype], (
            f"{provider} disagrees with eager on {layer.id} ({mode}): relative errors {errs}")
    del got

    backward = mode == "fwdbwd"
    measure(benchmark, {"eager": eager, provider: call}, provider, fc, dict(
        kind="layer", case=layer.id, op=layer.op, mode=mode, provider=provider,
        provider_name=PROVIDER_NAMES[provider], flops=layer.flops(fc.batch, backward),
        bytes=layer.bytes(fc.batch, fc.dtype.itemsize, backward) if layer.op != "conv2d_relu"
        else 0, input_shape=[fc.batch, *layer.in_shape], where=list(layer.where),
        key=layer.key, input_sets=len(sets)), inputs=sets)
