"""Which form of an operation a model's forward takes.

FAT and LVT write a few operations twice, equal to float rounding: the form that eager PyTorch and ``torch.compile``
run fastest (``scaled_dot_product_attention``, overlap-add by strided additions), and the form that deployment
runtimes run well (attention as matrix products of 3-d tensors with a softmax over the last dimension, overlap-add by
a transposed convolution). A graph recorded for deployment
takes the second: one traced by ``torch.export`` (the exporter's ONNX, OpenVINO and ExecuTorch) or by
``torch.jit.trace`` (the legacy TorchScript ONNX exporter). Two forms are for ExecuTorch's XNNPACK delegate alone, where
the exporter records its graph within ``recording_for_xnnpack()``: depthwise convolutions of more than
``XNNPACK_DEPTHWISE_TAPS`` taps in bands of the kernel's rows (``depthwise_conv_in_bands``), and the one-group
GroupNorm in operations that the delegate takes (``group_norm1_in_xnnpack_ops``).
"""
import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

__all__ = ['XNNPACK_DEPTHWISE_TAPS', 'batched_attention', 'depthwise_conv_in_bands', 'group_norm1_in_xnnpack_ops',
           'in_bands_for_xnnpack', 'recording_for_xnnpack', 'recording_now_for_xnnpack', 'tracing_for_deployment']

# The most taps (kernel height x width) of XNNPACK's depthwise kernels: it runs a depthwise convolution with more as
# a grouped matrix product, one group a channel (FAT-B0's 7x7 over 160 channels at 14x14: 0.83 ms, against 0.19 ms
# as three bands of 3, 3 and 1 rows; docs/benchmarks.md).
XNNPACK_DEPTHWISE_TAPS = 25
_recording_for_xnnpack = False


def tracing_for_deployment() -> bool:
    """Whether the calling forward is being recorded into a graph for deployment (``torch.export`` or
    ``torch.jit.trace``); False when scripted (TorchScript cannot ask), compiled or run eagerly."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.jit.is_tracing() or torch.compiler.is_exporting()


@contextlib.contextmanager
def recording_for_xnnpack(enabled: bool = True) -> Iterator[None]:
    """Within it (where ``enabled``), a graph recorded for deployment is for ExecuTorch's XNNPACK delegate and takes
    its forms; its program must then fold the constants that those forms compute from the weights (ExecuTorch's
    ``constant_prop_pass``) before XNNPACK's partitioner sees it, which delegates only convolutions of constant
    weights."""
    global _recording_for_xnnpack
    recording, _recording_for_xnnpack = _recording_for_xnnpack, _recording_for_xnnpack or enabled
    try:
        yield
    finally:
        _recording_for_xnnpack = recording


def recording_now_for_xnnpack() -> bool:
    """Whether the calling forward is being recorded into a graph for ExecuTorch's XNNPACK delegate (a graph recorded
    for deployment within ``recording_for_xnnpack()``)."""
    return _recording_for_xnnpack and tracing_for_deployment()


def in_bands_for_xnnpack(conv: torch.nn.Conv2d) -> bool:
    """Whether the depthwise convolution ``conv``, called now, is being recorded into a graph for ExecuTorch's
    XNNPACK delegate with more taps than its depthwise kernels take, at stride 1: ``depthwise_conv_in_bands``."""
    return (conv.stride == (1, 1) and conv.kernel_size[0] * conv.kernel_size[1] > XNNPACK_DEPTHWISE_TAPS
            and recording_now_for_xnnpack())


def depthwise_conv_in_bands(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            max_taps: int = XNNPACK_DEPTHWISE_TAPS) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2, groups=channels)``, the stride-1 depthwise convolution of an odd
    square kernel, as the sum of the convolutions of bands of the kernel's rows, each of at most ``max_taps`` taps (a
    7x7 kernel in bands of 3, 3 and 1 rows, a 9x9 one in four of 2 rows and one of 1): each band at the whole kernel's
    padding, its output rows shifted by the band's first row. Equal to the convolution up to float rounding."""
    kernel_size = weight.shape[-1]
    padding, rows = kernel_size // 2, max(1, max_taps // kernel_size)
    height = x.shape[-2]
    out = None
    for top in range(0, kernel_size, rows):
        term = F.conv2d(x, weight[:, :, top:top + rows], bias if out is None else None, padding=padding,
                        groups=x.shape[1])[:, :, top:top + height]
        out = term if out is None else out + term
    return out


def group_norm1_in_xnnpack_ops(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.group_norm(x, 1, weight, bias, eps)`` of a (batch, channels, height, width) tensor in operations that
    ExecuTorch's XNNPACK delegate takes. It has no group norm: ExecuTorch runs one on a portable kernel between two
    delegated parts (FAT-B0 at 224 pixels, batch 1: 23.3 ms in 27 parts, 16.5 ms as one; docs/benchmarks.md). The
    mean over channels, height and width is the mean of the channels' means, each a mean over the last two dimensions
    (the only mean XNNPACK takes), the channels brought there by a permutation: a reshape of dynamic height and width
    would not be delegated. Equal to the group norm up to float rounding."""
    def mean_over_channels_and_space(t: torch.Tensor) -> torch.Tensor:
        return t.mean((2, 3), keepdim=True).permute(0, 2, 1, 3).mean((2, 3), keepdim=True)

    centred = x - mean_over_channels_and_space(x)
    variance = mean_over_channels_and_space(centred * centred)
    return centred * torch.rsqrt(variance + eps) * weight[:, None, None] + bias[:, None, None]


def batched_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` of (batch, heads, tokens, head_dim) tensors as a graph recorded for
    deployment computes it: two matrix products of 3-d tensors (batch x heads, ...) and a softmax over the last
    dimension, which ExecuTorch's XNNPACK delegate takes whole; ``scaled_dot_product_attention`` itself decomposes
    into a softmax guarded against empty rows (``eq``, ``any``, ``where``) that runs on ExecuTorch's portable kernels.
    Equal to it up to float rounding."""
    batch, heads, queries, head_dim = q.shape
    q = q.reshape(batch * heads, queries, head_dim) * head_dim ** -0.5
    k = k.reshape(batch * heads, -1, head_dim)
    v = v.reshape(batch * heads, -1, head_dim)
    weights = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
    return torch.bmm(weights, v).reshape(batch, heads, queries, head_dim)
