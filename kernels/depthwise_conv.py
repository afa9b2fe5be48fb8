"""``DepthwiseConv2d``, a drop-in for a depthwise ``nn.Conv2d`` that runs on the in-tree CUDA kernel, and
``use_cuda_dwconv``, the switch that is to decide where the model uses it (not wired in until measured on a GPU)."""
import functools
import logging
import os

import torch
from torch import nn

from . import ops

__all__ = ['CUDA_DWCONV_SWITCH', 'DepthwiseConv2d', 'cuda_extension_available', 'use_cuda_dwconv']

_logger = logging.getLogger(__name__)

CUDA_DWCONV_SWITCH = 'FAT_CUDA_DWCONV'
# The authors hand RepLKNet's kernel the depthwise convolutions with kernels larger than 5.
_SMALLEST_SWITCHED_KERNEL = 7


def cuda_extension_available() -> bool:
    """Whether the CUDA extension ``kernels._dwconv_cuda`` is built and loads."""
    return ops.EXTENSION_ERROR is None


@functools.cache
def _log_active_path():
    if cuda_extension_available():
        _logger.info('kernels.DepthwiseConv2d: stride-1 convolutions of CUDA tensors run on the in-tree CUDA kernel '
                     '(kernels._dwconv_cuda), everything else on F.conv2d')
    else:
        _logger.info('kernels.DepthwiseConv2d: every convolution runs on F.conv2d; the CUDA extension '
                     'kernels._dwconv_cuda is not built (%s)', ops.EXTENSION_ERROR)


@functools.cache
def _warn_switch_without_extension():
    _logger.warning('%s=1 but the CUDA extension kernels._dwconv_cuda is not built (%s): depthwise convolutions '
                    'stay nn.Conv2d', CUDA_DWCONV_SWITCH, ops.EXTENSION_ERROR)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, stride, padding=kernel_size // 2, groups=channels, bias=bias)``
    whose stride-1 convolutions of CUDA tensors (kernels 3-31) run on the extension's kernel.

    The parameters, their initialisation and the state dict are nn.Conv2d's (weight [C, 1, k, k], bias [C]),
    so checkpoints load into either. CPU tensors, stride 2, other kernel sizes, and any input when the
    extension is not built go to F.conv2d. Under autocast the inputs are cast as autocast casts conv2d's.
    The kernel's output is contiguous NCHW whatever the input's memory format.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, bias: bool = True, device=None, dtype=None):
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size must be a positive odd int (padding kernel_size // 2 keeps the size), '
                             f'got {kernel_size!r}')
        if stride not in (1, 2):
            raise ValueError(f'stride must be 1 or 2, got {stride!r}')
        super().__init__(channels, channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=channels,
                         bias=bias, device=device, dtype=dtype)
        _log_active_path()

    def _runs_on_extension(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and cuda_extension_available() and self.stride == (1, 1)
                and ops.MIN_KERNEL_SIZE <= self.kernel_size[0] <= ops.MAX_KERNEL_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._runs_on_extension(x):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        return ops.dwconv2d(x, weight, bias, self.padding[0])


def use_cuda_dwconv(kernel_size: int, stride: int = 1) -> bool:
    """Whether the model should build this depthwise convolution as a ``DepthwiseConv2d`` (the in-tree CUDA
    kernel) instead of an ``nn.Conv2d`` (cuDNN).

    Off unless the environment sets ``FAT_CUDA_DWCONV=1``, until a benchmark (``python -m kernels.benchmark``)
    shows the kernel beating cuDNN. With it on: stride-1 convolutions with odd kernels of 7 to 31, where the
    authors used RepLKNet's kernel, if the extension is built (a warning, once, if it is not).
    """
    switch = os.environ.get(CUDA_DWCONV_SWITCH, '0')
    if switch not in ('0', '1'):
        raise ValueError(f'{CUDA_DWCONV_SWITCH} must be 0 or 1, got {switch!r}')
    if switch == '0':
        return False
    if not cuda_extension_available():
        _warn_switch_without_extension()
        return False
    return stride == 1 and kernel_size % 2 == 1 and _SMALLEST_SWITCHED_KERNEL <= kernel_size <= ops.MAX_KERNEL_SIZE
