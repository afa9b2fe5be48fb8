"""``torch.ops.fat_kernels``: depthwise 2-D convolution (groups == channels, stride 1, NCHW, odd square
kernels 3-31) as torch custom ops.

The compiled extension ``kernels._dwconv_cuda`` defines the ops and their CUDA implementations
(``kernels/csrc``). This module registers what else the dispatcher needs: fake implementations (output
shapes for torch.compile and meta tensors), the autograd formula, and CPU implementations on aten's
convolution, which are the reference the CUDA kernels follow and let ``torch.library.opcheck`` run without
a GPU. When the extension is not built the ops do not exist and ``EXTENSION_ERROR`` says why.
"""
import importlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['EXTENSION_ERROR', 'MAX_KERNEL_SIZE', 'MIN_KERNEL_SIZE', 'dwconv2d']

MIN_KERNEL_SIZE = 3
MAX_KERNEL_SIZE = 31
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_SPATIAL_SIZE = 65535

try:
    importlib.import_module(f'{__package__}._dwconv_cuda')  # registers torch.ops.fat_kernels, CUDA kernels
except ImportError as error:
    EXTENSION_ERROR: Optional[str] = f'{type(error).__name__}: {error}'
else:
    EXTENSION_ERROR = None


def dwconv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: int) -> torch.Tensor:
    """``F.conv2d(input, weight, bias, padding=padding, groups=input.shape[1])`` on the extension's kernels:
    weight [C, 1, k, k], bias [C] or None, 0 <= padding < k. Differentiable. Needs the extension."""
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f'the CUDA extension kernels._dwconv_cuda is not built ({EXTENSION_ERROR})')
    return torch.ops.fat_kernels.dwconv2d(input, weight, bias, padding)


# The checks of kernels/csrc/depthwise_conv_ops.cpp, less the device being CUDA.

def _check_floating(tensor: torch.Tensor, name: str):
    if tensor.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f'fat_kernels: {name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}')


def _check_matches(tensor: torch.Tensor, name: str, reference: torch.Tensor, reference_name: str):
    if tensor.device != reference.device:
        raise ValueError(f'fat_kernels: {name} is on {tensor.device} but {reference_name} on {reference.device}')
    if tensor.dtype != reference.dtype:
        raise TypeError(f'fat_kernels: {name} is {tensor.dtype} but {reference_name} is {reference.dtype}')


def _check_activation(tensor: torch.Tensor, name: str):
    if tensor.dim() != 4:
        raise ValueError(f'fat_kernels: {name} must be 4-D (N, C, H, W), got shape {list(tensor.shape)}')
    _check_floating(tensor, name)


def _check_kernel_size(kernel_size: int) -> int:
    if kernel_size % 2 != 1 or not MIN_KERNEL_SIZE <= kernel_size <= MAX_KERNEL_SIZE:
        raise ValueError(f'fat_kernels: the kernel size must be odd and in [{MIN_KERNEL_SIZE}, {MAX_KERNEL_SIZE}], '
                         f'got {kernel_size}')
    return kernel_size


def _check_weight(weight: torch.Tensor, activation: torch.Tensor, activation_name: str) -> int:
    channels = activation.shape[1]
    if weight.dim() != 4 or weight.shape[0] != channels or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f'fat_kernels: a depthwise convolution (groups == channels) of {channels} channels needs a '
                         f'weight of shape [{channels}, 1, k, k], got {list(weight.shape)}')
    _check_matches(weight, 'weight', activation, activation_name)
    return _check_kernel_size(weight.shape[2])


def _check_padding(padding: int, kernel_size: int):
    if not 0 <= padding < kernel_size:
        raise ValueError(f'fat_kernels: padding must be in [0, {kernel_size - 1}] for kernel size {kernel_size}, '
                         f'got {padding}')


def _output_size(input_shape, kernel_size: int, padding: int) -> Tuple[int, int]:
    _check_padding(padding, kernel_size)
    batch, channels, height, width = input_shape
    out_height = height + 2 * padding - kernel_size + 1
    out_width = width + 2 * padding - kernel_size + 1
    if out_height < 1 or out_width < 1:
        raise ValueError(f'fat_kernels: an input of {height}x{width} is smaller than the kernel '
                         f'{kernel_size}x{kernel_size} with padding {padding}')
    if max(height, width, out_height, out_width) > _MAX_SPATIAL_SIZE:
        raise ValueError(f'fat_kernels: spatial sizes up to {_MAX_SPATIAL_SIZE} are supported, got {height}x{width}')
    if batch * channels > 2 ** 31 - 1:
        raise ValueError(f'fat_kernels: batch * channels must fit in 32 bits, got {batch} * {channels}')
    return out_height, out_width


def _check_dwconv2d(input, weight, bias, padding) -> Tuple[int, int]:
    _check_activation(input, 'input')
    kernel_size = _check_weight(weight, input, 'input')
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != input.shape[1]:
            raise ValueError(f'fat_kernels: bias must have shape [{input.shape[1]}], got {list(bias.shape)}')
        _check_matches(bias, 'bias', input, 'input')
    return _output_size(input.shape, kernel_size, padding)


def _check_grad_input(grad_output, weight, padding) -> Tuple[int, int]:
    _check_activation(grad_output, 'grad_output')
    kernel_size = _check_weight(weight, grad_output, 'grad_output')
    _check_padding(padding, kernel_size)
    return _output_size(grad_output.shape, kernel_size, kernel_size - 1 - padding)


def _check_grad_weight(grad_output, input, kernel_size, padding):
    _check_activation(input, 'input')
    _check_activation(grad_output, 'grad_output')
    _check_matches(grad_output, 'grad_output', input, 'input')
    _check_kernel_size(kernel_size)
    output_shape = [*input.shape[:2], *_output_size(input.shape, kernel_size, padding)]
    if list(grad_output.shape) != output_shape:
        raise ValueError(f'fat_kernels: grad_output must have shape {output_shape} for an input of shape '
                         f'{list(input.shape)}, got {list(grad_output.shape)}')


def _setup_context(ctx, inputs, output):
    input, weight, bias, padding = inputs
    ctx.save_for_backward(input, weight)
    ctx.padding = padding


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    needs_input, needs_weight, needs_bias, _ = ctx.needs_input_grad
    grad_input = grad_weight = grad_bias = None
    if needs_input:
        grad_input = torch.ops.fat_kernels.dwconv2d_grad_input(grad_output, weight, ctx.padding)
    if needs_weight or needs_bias:
        grad_weight, grad_bias = torch.ops.fat_kernels.dwconv2d_grad_weight(
            grad_output, input, weight.shape[-1], ctx.padding)
    return grad_input, grad_weight if needs_weight else None, grad_bias if needs_bias else None, None


def _register():
    @torch.library.register_fake('fat_kernels::dwconv2d')
    def _(input, weight, bias, padding):
        out_height, out_width = _check_dwconv2d(input, weight, bias, padding)
        return input.new_empty((input.shape[0], input.shape[1], out_height, out_width))

    @torch.library.register_fake('fat_kernels::dwconv2d_grad_input')
    def _(grad_output, weight, padding):
        height, width = _check_grad_input(grad_output, weight, padding)
        return grad_output.new_empty((grad_output.shape[0], grad_output.shape[1], height, width))

    @torch.library.register_fake('fat_kernels::dwconv2d_grad_weight')
    def _(grad_output, input, kernel_size, padding):
        _check_grad_weight(grad_output, input, kernel_size, padding)
        channels = input.shape[1]
        return input.new_empty((channels, 1, kernel_size, kernel_size)), input.new_empty((channels,))

    # The CUDA kernels return contiguous NCHW tensors whatever the inputs' layout; so do these.
    @torch.library.register_kernel('fat_kernels::dwconv2d', 'cpu')
    def _(input, weight, bias, padding):
        _check_dwconv2d(input, weight, bias, padding)
        return F.conv2d(input, weight, bias, padding=padding, groups=input.shape[1]).contiguous()

    @torch.library.register_kernel('fat_kernels::dwconv2d_grad_input', 'cpu')
    def _(grad_output, weight, padding):
        _check_grad_input(grad_output, weight, padding)
        kernel_size = weight.shape[-1]
        return F.conv2d(grad_output, weight.flip((2, 3)), padding=kernel_size - 1 - padding,
                        groups=grad_output.shape[1]).contiguous()

    @torch.library.register_kernel('fat_kernels::dwconv2d_grad_weight', 'cpu')
    def _(grad_output, input, kernel_size, padding):
        _check_grad_weight(grad_output, input, kernel_size, padding)
        channels = input.shape[1]
        grad_weight = torch.nn.grad.conv2d_weight(input, (channels, 1, kernel_size, kernel_size), grad_output,
                                                  padding=padding, groups=channels)
        return grad_weight.contiguous(), grad_output.sum((0, 2, 3))

    torch.library.register_autograd('fat_kernels::dwconv2d', _backward, setup_context=_setup_context)


if EXTENSION_ERROR is None:
    _register()
