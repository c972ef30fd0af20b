"""The contract every backend implements.

The public layer (``fastconv.functional``) validates and normalises arguments, handles
autocast, then asks the dispatcher for a backend. A backend therefore always receives:

* 4-D tensors on one device, already checked for rank, dtype and shape agreement;
* every geometric argument as a tuple of two Python ints (``stride``, ``padding``, ...);
* ``bias``/``weight``/``running_*`` as a tensor or ``None``.

The five ops and their normalised signatures (``Pair`` = ``tuple[int, int]``)::

    conv2d_relu(input, weight, bias, stride: Pair, padding: Pair, dilation: Pair,
                groups: int, relu: bool) -> Tensor
    max_pool2d(input, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
               ceil_mode: bool, return_indices: bool, relu: bool)
        -> Tensor, or (Tensor, int64 indices) when return_indices
    batch_norm(input, running_mean, running_var, weight, bias, training: bool,
               momentum: float, eps: float, relu: bool, residual) -> Tensor
        # when training and running stats are given they are updated in place;
        # residual (Tensor or None; the input's shape, dtype, device and memory format) is
        # added after the normalisation, before the ReLU: relu(bn(input) + residual)
    avg_pool2d(input, kernel_size: Pair, stride: Pair, padding: Pair, ceil_mode: bool,
               count_include_pad: bool, divisor_override: int | None) -> Tensor
    adaptive_avg_pool2d(input, output_size: Pair) -> Tensor

Every op is differentiable with respect to its floating-point tensor arguments, exactly as the
matching ``torch.nn.functional`` composition (``relu`` applied last for conv and batch norm,
first for max-pool, where the two commute). Batch norm's residual gets ``grad_output`` masked
by ``output > 0`` (``relu``) or ``grad_output`` itself.
"""
from __future__ import annotations

from typing import Any, Optional

OPS = ("conv2d_relu", "max_pool2d", "batch_norm", "avg_pool2d", "adaptive_avg_pool2d")
# how many leading arguments of each op are tensors (or None in their place)
TENSOR_ARGS = {"conv2d_relu": 3, "max_pool2d": 1, "batch_norm": 5, "avg_pool2d": 1,
               "adaptive_avg_pool2d": 1}


class Backend:
    """Base class: a named set of op implementations that can say why it cannot run a call."""

    name: str = "?"

    def unavailable_reason(self) -> Optional[str]:
        """``None`` when the backend can run at all on this machine, else the reason."""
        return None

    def prepare(self) -> None:
        """Do one-time imports now, outside any torch.compile trace (default: nothing)."""

    def why_not(self, op: str, args: dict[str, Any]) -> Optional[str]:
        """``None`` when this backend can run ``op`` with these (normalised) ``args``.

        ``args`` maps the op's argument names (as in the module docstring) to values.
        The default refuses ops the backend does not define.
        """
        if not callable(getattr(self, op, None)):
            return f"{self.name} has no {op} kernel"
        return None

    def conv2d_relu_passes(self) -> Optional["ConvPasses"]:
        """This backend's conv2d_relu split into passes (see :class:`ConvPasses`), or ``None``
        when it cannot serve them separately (it is then no candidate for a mixed choice)."""
        return None

    def bind(self, op: str, args: dict[str, Any]):
        """``op`` with ``args``' non-tensor arguments fixed: a function of the leading tensor
        arguments (conv: input, weight, bias; pools: input; batch norm: input, running_mean,
        running_var, weight, bias, then ``residual``, None by default), used by the decided
        fast path."""
        method = getattr(self, op)
        if op == "batch_norm":  # residual, the last argument, is a tensor: passed per call
            rest = tuple(v for k, v in args.items() if k != "residual")[TENSOR_ARGS[op]:]
            return lambda x, rm, rv, w, b, residual=None: method(x, rm, rv, w, b, *rest,
                                                                 residual)
        rest = tuple(args.values())[TENSOR_ARGS[op]:]
        return lambda *tensors: method(*tensors, *rest)

    def __repr__(self) -> str:
        return f"<fastconv backend {self.name!r}>"


class ConvPasses:
    """conv2d_relu as separate passes, so that ``auto`` may take each from another backend.

    Every implementation saves the same tensors: the input, the weight and, with ``relu``, the
    output (the ReLU mask is ``output > 0``). Any ``forward`` therefore pairs with any
    ``backward``, and the backward of one backend may serve grad_input while another serves
    grad_weight (+ grad_bias). ``backward`` masks ``grad_output`` itself (its own mask pass).
    """

    def forward(self, input, weight, bias, stride, padding, dilation, groups, relu):
        """The output alone (no autograd graph is recorded by the caller's Function)."""
        raise NotImplementedError

    def backward(self, grad_output, input, weight, output, stride, padding, dilation, groups,
                 relu, output_mask):
        """``(grad_input, grad_weight, grad_bias)``; an entry whose ``output_mask`` is False
        may be anything (the caller drops it). ``output`` is None without ``relu``."""
        raise NotImplementedError
