"""Which form of an operation a model's forward takes.

FAT and LVT write a few operations twice, equal to float rounding: the form that eager PyTorch and ``torch.compile``
run fastest (``scaled_dot_product_attention``, overlap-add by ``fold``), and the form that deployment runtimes run
well (attention computed channels-first, overlap-add by a transposed convolution). A graph recorded for deployment
takes the second: one traced by ``torch.export`` (the exporter's ONNX, OpenVINO and ExecuTorch) or by
``torch.jit.trace`` (the legacy TorchScript ONNX exporter).
"""
import torch

__all__ = ['tracing_for_deployment']


def tracing_for_deployment() -> bool:
    """Whether the calling forward is being recorded into a graph for deployment (``torch.export`` or
    ``torch.jit.trace``); False when scripted (TorchScript cannot ask), compiled or run eagerly."""
    if torch.jit.is_scripting():
        return False
    else:
        return torch.jit.is_tracing() or torch.compiler.is_exporting()
