"""Shape rules of fastconv's ops, written once: output sizes and output memory formats.

Used by the argument checks (checks.py), the extension's fake implementations
(backends/extension.py) and the Triton backend's launchers and fakes, so that all of them agree
with each other and with torch.
"""
import torch


def conv_output_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """torch's convolution output size along one axis."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def pool_output_size(size: int, k: int, stride: int, pad: int, dil: int,
                     ceil_mode: bool) -> int:
    """torch's pooling output size along one axis (a window never starts in the right
    padding)."""
    span = size + 2 * pad - dil * (k - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _channels_last_strides(size, stride) -> bool:
    # Python mirror of c10's is_channels_last_strides_2d_s4 (what suggest_memory_format uses)
    if stride[1] == 0:
        return False
    lo = 0
    for d in (1, 3, 2, 0):
        if size[d] == 0 or stride[d] < lo:
            return False
        if d == 0 and lo == stride[1]:
            return False
        lo = stride[d] * (size[d] if size[d] > 1 else 1)
    return True


def suggest_memory_format(t: torch.Tensor) -> torch.memory_format:
    """c10's ``suggest_memory_format``: the format torch's ops give an output made from ``t``.
    torch's Python copy handles symbolic shapes (fake tensors while tracing); the mirror serves
    torch versions without it."""
    if _torch_suggest is not None:
        return _torch_suggest(t)
    if t.dim() == 4 and _channels_last_strides(t.shape, t.stride()):
        return torch.channels_last
    return torch.contiguous_format


try:
    from torch._prims_common import suggest_memory_format as _torch_suggest
except ImportError:  # pragma: no cover - older torch
    _torch_suggest = None


def conv_memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The format torch's conv gives its output and grad_input: channels_last when the input
    or the weight is (cuDNN's and oneDNN's rule), e.g. a channels_last model fed NCHW images."""
    if (suggest_memory_format(input) == torch.channels_last
            or suggest_memory_format(weight) == torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense_channels_last(t: torch.Tensor) -> bool:
    """The Triton pools' and batch norm's rule: channels_last when ``t`` is densely
    channels_last and not also contiguous. It differs from suggest_memory_format only for
    non-dense views (a channel slice of a channels_last tensor gives NCHW here), which those
    kernels copy or read through strides either way."""
    return (t.dim() == 4 and not t.is_contiguous()
            and t.is_contiguous(memory_format=torch.channels_last))


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
