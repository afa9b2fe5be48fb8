"""Depthwise 2-D convolution for FAT's large kernels: an in-tree CUDA extension (``kernels._dwconv_cuda``,
registered as ``torch.ops.fat_kernels``) with an F.conv2d fallback. See kernels/README.md."""
from .depthwise_conv import CUDA_DWCONV_SWITCH, DepthwiseConv2d, cuda_extension_available, use_cuda_dwconv
from .ops import dwconv2d

__all__ = ['CUDA_DWCONV_SWITCH', 'DepthwiseConv2d', 'cuda_extension_available', 'dwconv2d', 'use_cuda_dwconv']
