"""Which form of an operation a model's forward takes.

FAT and LVT write a few operations twice, equal to float rounding: the form that eager PyTorch and ``torch.compile``
run fastest (``scaled_dot_product_attention``, overlap-add by strided additions), and the form that deployment
runtimes run well (attention as matrix products of 3-d tensors with a softmax over the last dimension, overlap-add by
a transposed convolution). A graph recorded for deployment
takes the second: one traced by ``torch.export`` (the exporter's ONNX, OpenVINO and ExecuTorch) or by
``torch.jit.trace`` (the legacy TorchScript ONNX exporter).
"""
import torch

__all__ = ['batched_attention', 'tracing_for_deployment']


def tracing_for_deployment() -> bool:
    """Whether the calling forward is being recorded into a graph for deployment (``torch.export`` or
    ``torch.jit.trace``); False when scripted (TorchScript cannot ask), compiled or run eagerly."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.jit.is_tracing() or torch.compiler.is_exporting()


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
