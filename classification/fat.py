"""FAT: Fully Adaptive Transformer, built on Fully Adaptive Self-Attention (FASA).

Paper: `Lightweight Vision Transformer with Bidirectional Interaction` (NeurIPS 2023),
https://arxiv.org/abs/2306.00396

This is the authors' model, operation for operation; the golden data produced by their released code
(float64 logits of a perturbed FAT-B0) is reproduced to < 1e-6 relative error. Two things differ in form,
never in result:

* Module names are timm's (``stem``, ``stages.i.downsample`` / ``stages.i.blocks.j``, ``norm_pre``,
  ``head.fc``); ``checkpoint_filter_fn`` maps the authors' names onto them.
* The authors end stages 1-3 with a downsampling block. Here that block opens the next stage as its
  ``downsample``, so every stage output is a pyramid level taken where its resolution has had the most
  processing: stride 4 is the input of the authors' first downsampling block, ..., stride 32 the output
  of the last stage. ``pyramid='dense'`` takes the features of strides 4-16 where the authors' dense-prediction
  backbone does, inside those blocks (see ``FAT``).

The interaction of FASA's two branches follows the released code, ``proj(local * sigmoid(g) * g)``, not
the symmetric two-way gate of the paper's prose (see the README).

``timm.utils.reparameterize_model(model)`` gives the inference form, equal to the eval-mode model: every
BatchNorm folded into the convolution before it, the residuals of the position encoding and of the FFN's
depthwise convolution folded into their kernels, and the 1x1 convolutions run as matrix products over the
channels of channels-last tensors. Its state dict differs; checkpoints are of the training form.
"""
import copy
import logging
import re
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, GroupNorm1, trunc_normal_
from timm.layers.fast_norm import fast_group_norm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq, named_apply

from .checkpoint_io import CheckpointError, check_state_dict_fits, load_weights, timm_overlay
from .graph_forms import (depthwise_conv_in_bands, group_norm1_in_xnnpack_ops, in_bands_for_xnnpack,
                          recording_now_for_xnnpack, tracing_for_deployment)
from .token_mixers import TOKEN_MIXERS

__all__ = ['FAT', 'checkpoint_filter_fn']

_logger = logging.getLogger(__name__)


class DepthwiseConv(nn.Conv2d):
    """A depthwise convolution of an odd square kernel, padded to keep the size at stride 1. In a graph recorded for
    ExecuTorch's XNNPACK delegate, a stride-1 kernel of more taps than XNNPACK's depthwise kernels take (FAT's 7x7
    and 9x9) runs in bands of its rows (``graph_forms.depthwise_conv_in_bands``), which XNNPACK runs 3-4x faster
    than the grouped matrix product it makes of the whole kernel."""

    def __init__(self, dim: int, kernel_size: int, stride: int = 1, **kwargs):
        super().__init__(dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convolve(x)

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch (the other reads a module's global)
            return self._conv_forward(x, self.weight, self.bias)
        elif in_bands_for_xnnpack(self):
            return depthwise_conv_in_bands(x, self.weight, self.bias)
        return self._conv_forward(x, self.weight, self.bias)


def _dwconv(dim: int, kernel_size: int, stride: int = 1) -> DepthwiseConv:
    return DepthwiseConv(dim, kernel_size, stride=stride)


class OneGroupNorm(GroupNorm1):
    """timm's ``GroupNorm1``: normalised over channels, height and width. In a graph recorded for ExecuTorch's XNNPACK
    delegate, which has no group norm, it takes operations that the delegate does
    (``graph_forms.group_norm1_in_xnnpack_ops``): the norms no longer split the program between portable kernels
    (FAT-B0's static program is one delegate, not 27)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles only this branch (the other reads a module's global)
            return self.group_norm(x)
        elif recording_now_for_xnnpack():
            return group_norm1_in_xnnpack_ops(x, self.weight, self.bias, self.eps)
        return self.group_norm(x)

    def group_norm(self, x: torch.Tensor) -> torch.Tensor:
        """``GroupNorm1.forward``, which TorchScript cannot call as ``super().forward``."""
        if self._fast_norm:
            return fast_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution. ``fuse()`` gives its inference form, a ``PointwiseLinear``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim, 1)

    def fuse(self) -> 'PointwiseLinear':
        linear = PointwiseLinear(
            self.in_channels, self.out_channels, 1, device=self.weight.device, dtype=self.weight.dtype)
        linear.load_state_dict(self.state_dict())
        return linear


class PointwiseLinear(nn.Conv2d):
    """Inference form of ``PointwiseConv``: a channels-last input runs as one matrix product over its channels,
    without the copies and the oneDNN overhead of a 1x1 convolution, and stays channels-last. Any other layout (the
    NCHW graphs exported for ONNX, OpenVINO and ExecuTorch) runs the 1x1 convolution of the module's own weight,
    which each runtime's convolution kernels take as a constant: ExecuTorch's XNNPACK delegate leaves a convolution
    whose weight is computed in the graph to a slow portable kernel (FAT-B0: 2.6 s instead of milliseconds)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return self._conv_forward(x, self.weight, self.bias)


class ResidualDepthwiseConv(DepthwiseConv):
    """``x + dwconv(x)``, a depthwise convolution with its residual. ``fuse()`` folds the identity into the
    kernel's centre tap, giving a plain ``DepthwiseConv``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.convolve(x)

    def fuse(self) -> DepthwiseConv:
        fused = DepthwiseConv(self.in_channels, self.kernel_size[0], device=self.weight.device,
                              dtype=self.weight.dtype)
        centre = self.kernel_size[0] // 2
        with torch.no_grad():
            fused.weight.copy_(self.weight)
            fused.weight[:, 0, centre, centre] += 1
            fused.bias.copy_(self.bias)
        return fused.train(self.training)


class ConvBnSequential(nn.Sequential):
    """A sequence in which every BatchNorm directly follows a convolution. ``reparameterize()`` folds each
    BatchNorm into its convolution (the inference form: equal to the eval-mode sequence)."""

    def reparameterize(self):
        names = list(self._modules)
        for conv_name, name in zip(names, names[1:]):
            if isinstance(self._modules[name], nn.BatchNorm2d):
                conv = self._modules[conv_name]
                if isinstance(conv, ResidualDepthwiseConv):
                    conv = conv.fuse()
                setattr(self, conv_name, _fold_batchnorm(conv, self._modules[name]))
                delattr(self, name)


def _fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``conv`` then ``bn`` as one convolution: the BatchNorm's eval-mode function (its running statistics) folded
    into the kernel whatever mode the two are in, as timm's reparameterizable models fold theirs (tools that call
    ``reparameterize_model`` before ``eval()``, timmx among them, get the same inference form)."""
    fused = copy.deepcopy(conv)  # of its own class: a PointwiseConv is fused further by reparameterize_model
    fused.weight, fused.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                    bn.weight, bn.bias)
    return fused


def _conv_bn_relu(in_dim: int, out_dim: int, stride: int) -> ConvBnSequential:
    return ConvBnSequential(OrderedDict(
        conv=nn.Conv2d(in_dim, out_dim, 3, stride=stride, padding=1),
        bn=nn.BatchNorm2d(out_dim),
        act=nn.ReLU(inplace=True),
    ))


class Stem(nn.Sequential):
    """Four conv3x3-BN-ReLU (strides 2, 2, 1, 1), a 1x1 projection and GroupNorm: stride 4."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__(OrderedDict(
            conv1=_conv_bn_relu(in_chans, dim // 2, stride=2),
            conv2=_conv_bn_relu(dim // 2, dim, stride=2),
            conv3=_conv_bn_relu(dim, dim, stride=1),
            conv4=_conv_bn_relu(dim, dim, stride=1),
            proj=PointwiseConv(dim, dim),
            norm=OneGroupNorm(dim),
        ))


class RefinedDownsample(ConvBnSequential):
    """FASA's key/value downsampling by ``window_size`` = 2^n.

    n times a depthwise 5x5 stride-2 conv followed by BatchNorm, with a 1x1 conv between consecutive
    ones. A window of 1 keeps full resolution (no modules at all).
    """

    def __init__(self, dim: int, window_size: int):
        num_halvings = window_size.bit_length() - 1
        if window_size < 1 or 2 ** num_halvings != window_size:
            raise ValueError(f'window_size must be a power of two, got {window_size}')
        layers = OrderedDict()
        for i in range(num_halvings):
            layers[f'conv{i}'] = _dwconv(dim, 5, stride=2)
            layers[f'bn{i}'] = nn.BatchNorm2d(dim)
            if i < num_halvings - 1:
                layers[f'linear{i}'] = PointwiseConv(dim, dim)
        super().__init__(layers)


def kv_downsample_layer(kind: str, dim: int, window_size: int) -> nn.Module:
    """FASA's key/value downsampling by ``window_size``: ``'refined'`` (the paper's), or one of the ablation's
    alternatives: ``'pool'`` (average pooling of window w), ``'conv'`` (a depthwise conv with kernel = stride = w)
    or ``'overlap'`` (a depthwise conv of kernel 2w - 1, stride w: overlapping windows)."""
    if kind == 'refined':
        return RefinedDownsample(dim, window_size)
    if kind not in KV_DOWNSAMPLINGS:
        raise ValueError(f"kv_downsample must be one of {', '.join(KV_DOWNSAMPLINGS)}, got {kind!r}")
    if window_size == 1:
        return nn.Identity()
    if kind == 'pool':
        return nn.AvgPool2d(window_size, ceil_mode=True)
    kernel_size = window_size if kind == 'conv' else 2 * window_size - 1
    # the padding that keeps the output at size / w for sizes divisible by w, as the refined downsampling does
    padding = (kernel_size - window_size + 1) // 2
    return nn.Conv2d(dim, dim, kernel_size, stride=window_size, padding=padding, groups=dim)


def deployment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head attention of the queries ``q`` (batch, channels, height, width) over the keys and values ``k``,
    ``v`` (batch, channels, height', width'), as FASA's 1x1 convolutions give them, in the form that a graph recorded
    for deployment (``graph_forms``) computes: matrix products of 3-d tensors (batch x heads, ...) and a softmax over
    the last dimension. ExecuTorch's XNNPACK delegate takes these whole, where it leaves the broadcast of a 4-d matrix
    product and a softmax over another dimension to ExecuTorch's portable kernels (FAT-B0's program with a bounded
    dynamic batch: 13x slower); OpenVINO and ONNX Runtime run it as fast as any other form (docs/benchmarks.md).
    Returns (batch x heads, head_dim, queries); equal to ``F.scaled_dot_product_attention`` up to float rounding."""
    batch, head_dim = q.shape[0], q.shape[1] // num_heads
    q = q.reshape(batch * num_heads, head_dim, -1)
    k = k.reshape(batch * num_heads, head_dim, -1) * head_dim ** -0.5
    v = v.reshape(batch * num_heads, head_dim, -1)
    weights = torch.bmm(q.transpose(1, 2), k).softmax(dim=-1)  # (batch x heads, queries, keys)
    return torch.bmm(v, weights.transpose(1, 2))


KV_DOWNSAMPLINGS = ('refined', 'pool', 'conv', 'overlap')
# How FASA combines its local branch l (self-modulated: silu of the local mixer) and its attention output g:
# the released code's proj(l * silu(g)), or the ablation's proj(l + g), proj([l, g]), proj(l * g).
INTERACTIONS = ('fat', 'add', 'cat', 'mul')


class FASA(nn.Module):
    """Fully Adaptive Self-Attention.

    A global branch (multi-head attention of full-resolution queries over refined-downsampled keys and
    values) and a local branch (a depthwise conv of the queries, self-modulated by its own sigmoid),
    combined multiplicatively and projected by a 1x1 conv. ``interaction`` and ``kv_downsample`` select the
    paper's ablation alternatives (``INTERACTIONS``, ``kv_downsample_layer``).
    """
    interaction: torch.jit.Final[str]

    def __init__(self, dim: int, num_heads: int, kernel_size: int, window_size: int, interaction: str = 'fat',
                 kv_downsample: str = 'refined'):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        if interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {', '.join(INTERACTIONS)}, got {interaction!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.interaction = interaction
        self.q = PointwiseConv(dim, dim)
        self.kv_downsample = kv_downsample_layer(kv_downsample, dim, window_size)
        self.kv = PointwiseConv(dim, 2 * dim)
        self.local_mixer = _dwconv(dim, kernel_size)
        self.proj = PointwiseConv(2 * dim if interaction == 'cat' else dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = x.shape
        q = self.q(x)
        local = F.silu(self.local_mixer(q))

        kv = self.kv(self.kv_downsample(x))
        if tracing_for_deployment():
            glob = deployment_attention(q, kv[:, :dim], kv[:, dim:], self.num_heads)
        else:
            q = q.reshape(batch, self.num_heads, self.head_dim, height * width).transpose(-1, -2)
            k, v = kv.reshape(batch, 2, self.num_heads, self.head_dim, -1).transpose(-1, -2).unbind(1)
            glob = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)
        glob = glob.reshape(batch, dim, height, width)
        if self.interaction == 'add':
            return self.proj(local + glob)
        if self.interaction == 'cat':
            return self.proj(torch.cat([local, glob], dim=1))
        if self.interaction == 'mul':
            return self.proj(local * glob)
        return self.proj(local * F.silu(glob))


class ConvFFN(ConvBnSequential):
    """1x1 expansion, GELU, depthwise conv (residual at stride 1), BatchNorm, 1x1 projection."""

    def __init__(self, dim: int, out_dim: int, hidden_dim: int, kernel_size: int, stride: int = 1):
        super().__init__(OrderedDict(
            fc1=PointwiseConv(dim, hidden_dim),
            act=nn.GELU(),
            dwconv=ResidualDepthwiseConv(hidden_dim, kernel_size) if stride == 1
            else _dwconv(hidden_dim, kernel_size, stride=stride),
            bn=nn.BatchNorm2d(hidden_dim),
            fc2=PointwiseConv(hidden_dim, out_dim),
        ))


class FATBlock(nn.Module):
    """Conditional position encoding, FASA and ConvFFN, each residual.

    With ``stride=2`` the block halves the resolution and widens to ``out_dim``: its FFN downsamples and
    its shortcut is a depthwise 5x5 stride-2 conv, BatchNorm and a 1x1 conv.

    The paper's ablation options: ``interaction`` and ``kv_downsample`` (see ``FASA``), ``cpe=False`` (no
    conditional position encoding), ``token_mixer`` (``'fasa'`` or one of ``token_mixers.TOKEN_MIXERS`` in
    FASA's place; ``stage`` and ``index``, the block's stage and its position there, are theirs).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            kernel_size: int,
            window_size: int,
            out_dim: Optional[int] = None,
            stride: int = 1,
            mlp_ratio: float = 4.,
            ffn_kernel_size: int = 5,
            drop_path: float = 0.,
            interaction: str = 'fat',
            kv_downsample: str = 'refined',
            cpe: bool = True,
            token_mixer: str = 'fasa',
            stage: int = 0,
            index: int = 0,
    ):
        super().__init__()
        out_dim = out_dim or dim
        if stride == 1 and out_dim != dim:
            raise ValueError('a block that changes width must downsample (stride=2)')
        self.cpe = ResidualDepthwiseConv(dim, kernel_size) if cpe else nn.Identity()
        self.norm1 = OneGroupNorm(dim)
        if token_mixer == 'fasa':
            self.attn = FASA(dim, num_heads, kernel_size, window_size, interaction, kv_downsample)
        elif token_mixer in TOKEN_MIXERS:
            self.attn = TOKEN_MIXERS[token_mixer](dim, num_heads, window_size, stage, index)
        else:
            raise ValueError(f"token_mixer must be 'fasa' or one of {', '.join(TOKEN_MIXERS)}, got {token_mixer!r}")
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = OneGroupNorm(dim)
        self.ffn = ConvFFN(dim, out_dim, int(dim * mlp_ratio), ffn_kernel_size, stride=stride)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        if stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = ConvBnSequential(
                _dwconv(dim, 5, stride=stride),
                nn.BatchNorm2d(dim),
                PointwiseConv(dim, out_dim),
            )

    def forward_token_mixer(self, x: torch.Tensor) -> torch.Tensor:
        """The position encoding and the token mixer's residual: where the dense pyramid takes a stride-2
        block's feature."""
        x = self.cpe(x)
        return x + self.drop_path1(self.attn(self.norm1(x)))

    def forward_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.drop_path2(self.ffn(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_ffn(self.forward_token_mixer(x))


class DenseTap(nn.Module):
    """What the dense pyramid needs of a stride-2 block whose output it does not use: the block's position encoding
    and token mixer, under their names in the block (``prune_intermediate_layers`` keeps this much of the block that
    follows the last requested level). Its FFN half is the identity."""

    def __init__(self, block: FATBlock):
        super().__init__()
        self.cpe, self.norm1, self.attn, self.drop_path1 = block.cpe, block.norm1, block.attn, block.drop_path1

    forward_token_mixer = FATBlock.forward_token_mixer

    def forward_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_token_mixer(x)


class FATStage(nn.Module):
    def __init__(self, downsample: Optional[FATBlock], blocks: List[FATBlock]):
        super().__init__()
        self.downsample = downsample or nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(self.downsample(x))


# Where FAT's pyramid features are taken (``FAT(pyramid=...)``): each stage's output, or the authors' dense-prediction
# backbone's taps, inside the stride-2 block that follows each of the first three stages.
PYRAMIDS = ('stages', 'dense')


class FAT(nn.Module):
    """FAT backbone and classifier.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        global_pool: timm pooling type of the head.
        embed_dims: widths C0..C3 of the four stages.
        depths: blocks per stage as the authors count them (the downsampling block included).
        num_heads: attention heads per stage.
        kernel_sizes: CPE and local-branch kernel per stage.
        window_sizes: FASA key/value downsampling per stage (powers of two).
        mlp_ratio: ConvFFN expansion.
        ffn_kernel_size: ConvFFN depthwise kernel.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear in block order up to this value.
        interaction, kv_downsample, cpe, token_mixer: the paper's ablation options (see ``FATBlock``); the
            defaults are the paper's model.
        pyramid: where ``forward_intermediates`` (and ``features_only``) take the features of strides 4, 8 and 16
            (one of ``PYRAMIDS``; the stride-32 feature is the last stage's output in both):

            * ``'stages'``: each stage's output, i.e. the input of the stride-2 block that follows it;
            * ``'dense'``: the authors' dense-prediction backbone (their segmentation code), which ends each of the
              first three stages with that stride-2 block and takes its tensor after the position encoding and
              the token mixer's residual, before the ConvFFN and the stride-2 shortcut.

            Either way the weights, ``forward`` and ``forward_features`` are the same.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (32, 80, 160, 256),
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (2, 5, 10, 16),
            kernel_sizes: Sequence[int] = (3, 5, 7, 9),
            window_sizes: Sequence[int] = (8, 4, 2, 1),
            mlp_ratio: float = 4.,
            ffn_kernel_size: int = 5,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            interaction: str = 'fat',
            kv_downsample: str = 'refined',
            cpe: bool = True,
            token_mixer: str = 'fasa',
            pyramid: str = 'stages',
    ):
        super().__init__()
        if pyramid not in PYRAMIDS:
            raise ValueError(f"pyramid must be one of {', '.join(PYRAMIDS)}, got {pyramid!r}")
        num_stages = len(embed_dims)
        if not all(len(arg) == num_stages for arg in (depths, num_heads, kernel_sizes, window_sizes)):
            raise ValueError('embed_dims, depths, num_heads, kernel_sizes and window_sizes need one entry per stage')
        if any(depth < 2 for depth in depths[:-1]) or depths[-1] < 1:
            raise ValueError(f'depths {tuple(depths)}: stages 1-3 need >= 2 blocks (one downsamples), the last >= 1')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.depths = tuple(depths)
        self.pyramid = pyramid
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.stem = Stem(in_chans, embed_dims[0])

        drop_path_rates = iter(torch.linspace(0, drop_path_rate, sum(depths)).tolist())

        def block(stage: int, index: int, **kwargs) -> FATBlock:
            return FATBlock(
                embed_dims[stage], num_heads[stage], kernel_sizes[stage], window_sizes[stage],
                mlp_ratio=mlp_ratio, ffn_kernel_size=ffn_kernel_size, drop_path=next(drop_path_rates),
                interaction=interaction, kv_downsample=kv_downsample, cpe=cpe, token_mixer=token_mixer,
                stage=stage, index=index, **kwargs)

        stages = []
        self.feature_info = []
        for i in range(num_stages):
            # the authors' stage i-1 ends with the block that brings the features to this resolution
            downsample = block(i - 1, depths[i - 1] - 1, out_dim=embed_dims[i], stride=2) if i > 0 else None
            num_blocks = depths[i] - 1 if i < num_stages - 1 else depths[i]
            stages.append(FATStage(downsample, [block(i, j) for j in range(num_blocks)]))
            tap = f'stages.{i + 1}.downsample' if pyramid == 'dense' and i < num_stages - 1 else f'stages.{i}'
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=tap))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm_pre = OneGroupNorm(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

        named_apply(_init_weights, self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm_pre', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the pyramid features (strides 4, 8, 16, 32), taken where ``pyramid`` says.

        Args:
            x: input images.
            indices: the last n levels if an int, all if None, else the level indices to return.
            norm: apply ``norm_pre`` to the last stage's feature.
            stop_early: stop after the last requested level.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the features.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        dense = self.pyramid == 'dense'
        # a dense level below the last ends inside the next stage's stride-2 block
        num_stages = max_index + 1 + int(dense and max_index < last_index)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:num_stages]

        intermediates = []
        x = self.stem(x)
        for index, stage in enumerate(stages):
            if dense and index > 0:
                x = stage.downsample.forward_token_mixer(x)
                if index - 1 in take_indices:
                    intermediates.append(x)
                if stop_early and index - 1 == max_index:
                    break
                x = stage.forward_blocks(stage.downsample.forward_ffn(x))
            else:
                x = stage(x)
            if index in take_indices and (not dense or index == last_index):
                intermediates.append(self.norm_pre(x) if norm and index == last_index else x)
        if intermediates_only:
            return intermediates
        if index == last_index:
            x = self.norm_pre(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        if self.pyramid == 'dense' and prune_end:
            # the last requested level is taken inside the next stage's stride-2 block: keep that much of it
            tap_stage = self.stages[max_index + 1]
            tap_stage.downsample = DenseTap(tap_stage.downsample)
            tap_stage.blocks = nn.Sequential()
            self.stages = self.stages[:max_index + 2]
        else:
            self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm_pre = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.head = ClassifierHead(self.num_features, 0, pool_type='')
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_pre(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def remap_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The authors' key names renamed onto this model's; this project's pass unchanged."""
        return remap_official_keys(state_dict, self.depths)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str):
        """Load a checkpoint in any supported format: the authors' training checkpoints (a dict with
        ``model``, ``epoch``, ``max_accuracy`` and a yacs ``config``), this project's checkpoints, or a
        plain state dict (.pth or .safetensors). Nothing is unpickled beyond tensors and plain data.

        timm routes ``pretrained_cfg_overlay=dict(file=PATH)`` here (``checkpoint_io.timm_overlay``), so that
        timm's ``pretrained`` takes the weights every other loader of this project takes: of a training checkpoint,
        those it calls best (``checkpoint_io.best_weights``). A classifier of another size than this model's is
        dropped, leaving the freshly initialised one.
        """
        load_weights(self, checkpoint_path, head='drop', logger=_logger)


def _init_weights(module: nn.Module, name: str = ''):
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# The authors' state-dict names, in order, and ours.
_OFFICIAL_KEY_RENAMES = (
    (r'^patch_embed\.conv(\d)\.conv\.0\.', r'stem.conv\1.conv.'),
    (r'^patch_embed\.conv(\d)\.conv\.1\.', r'stem.conv\1.bn.'),
    (r'^patch_embed\.conv5\.', 'stem.proj.'),
    (r'^patch_embed\.layernorm\.', 'stem.norm.'),
    (r'\.attn\.pool\.', '.attn.kv_downsample.'),
    (r'\.attn\.mixer\.', '.attn.proj.'),
    (r'\.downsample\.(\d)\.', r'.shortcut.\1.'),
    (r'^norm\.', 'norm_pre.'),
    (r'^head\.', 'head.fc.'),
)


def _official_block_index(depths: Sequence[int]) -> Dict[Tuple[int, int], str]:
    """Where each of the authors' ``layers.i.blocks.j`` lives in a FAT of these depths (the authors' count)."""
    index = {}
    for i, depth in enumerate(depths):
        last_stage = i == len(depths) - 1
        for j in range(depth if last_stage else depth - 1):
            index[(i, j)] = f'stages.{i}.blocks.{j}'
        if not last_stage:
            index[(i, depth - 1)] = f'stages.{i + 1}.downsample'
    return index


def remap_official_keys(state_dict: Dict[str, torch.Tensor], depths: Sequence[int]) -> Dict[str, torch.Tensor]:
    """A state dict with the authors' key names renamed onto those of a FAT of these depths; one with this
    project's names is returned as it is. Raises CheckpointError for a block such a FAT lacks."""
    if not any(k.startswith('layers.') or k.startswith('patch_embed.') for k in state_dict):
        return state_dict
    block_index = _official_block_index(depths)
    renamed = {}
    for key, value in state_dict.items():
        match = re.match(r'^layers\.(\d+)\.blocks\.(\d+)\.', key)
        if match:
            location = block_index.get((int(match.group(1)), int(match.group(2))))
            if location is None:
                raise CheckpointError(f'checkpoint has block {match.group(0)[:-1]}, which this FAT variant '
                                      'lacks: it is of another variant')
            key = f'{location}.{key[match.end():]}'
        for pattern, replacement in _OFFICIAL_KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: FAT) -> Dict[str, torch.Tensor]:
    """timm's filter: ``state_dict`` mapped onto ``model`` (see ``remap_official_keys``). Raises CheckpointError
    naming the first mismatch if the weights are of another FAT variant."""
    state_dict = model.remap_checkpoint(state_dict)
    check_state_dict_fits(state_dict, model)
    return state_dict


def _create_fat(variant: str, pretrained: bool = False, pretrained_cfg_overlay: Optional[Dict] = None,
                **kwargs) -> FAT:
    if kwargs.get('pyramid', 'stages') == 'stages':
        feature_cfg = dict(out_indices=(0, 1, 2, 3), flatten_sequential=True)
    else:
        # the dense taps lie inside blocks: features_only goes through forward_intermediates
        feature_cfg = dict(out_indices=(0, 1, 2, 3), feature_cls='getter')
    return build_model_with_cfg(
        FAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_cfg_overlay=timm_overlay(pretrained_cfg_overlay),
        feature_cfg=feature_cfg,
        **kwargs,
    )


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1.conv', 'classifier': 'head.fc',
        'paper_ids': 'arXiv:2306.00396', 'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'fat_b0.in1k': _cfg(),
    'fat_b1.in1k': _cfg(),
    'fat_b2.in1k': _cfg(),
    'fat_b3.in1k': _cfg(),
    'fat_b3_st.in1k': _cfg(),
    'fat_b4.in1k': _cfg(),
    'fat_b5.in1k': _cfg(),
    **{f'{name}.in1k': _cfg() for name in (
        'fat_b0_add', 'fat_b0_cat', 'fat_b0_mul', 'fat_b0_pool_down', 'fat_b0_conv_down', 'fat_b0_overlap_down',
        'fat_b0_no_cpe', 'fat_b0_maxsa', 'fat_b0_swin', 'fat_b0_sra', 'fat_b0_twins', 'fat_b0_cswin')},
})

# b0-b3 are the authors' published configurations. b3_st, b4 and b5 were never released: their layouts
# are inferred from the paper's sizes, their drop path rates are those of the Swin layouts they follow.

_FAT_B0_ARGS = dict(embed_dims=(32, 80, 160, 256), depths=(2, 2, 6, 2), num_heads=(2, 5, 10, 16), drop_path_rate=0.05)


@register_model
def fat_b0(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat('fat_b0', pretrained=pretrained, **dict(_FAT_B0_ARGS, **kwargs))


@register_model
def fat_b1(pretrained: bool = False, **kwargs) -> FAT:
    model_args = dict(embed_dims=(48, 96, 192, 384), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.1)
    return _create_fat('fat_b1', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fat_b2(pretrained: bool = False, **kwargs) -> FAT:
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.1)
    return _create_fat('fat_b2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fat_b3(pretrained: bool = False, **kwargs) -> FAT:
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(4, 4, 16, 4), num_heads=(2, 4, 8, 16), drop_path_rate=0.15)
    return _create_fat('fat_b3', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fat_b3_st(pretrained: bool = False, **kwargs) -> FAT:
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)
    return _create_fat('fat_b3_st', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fat_b4(pretrained: bool = False, **kwargs) -> FAT:
    model_args = dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3)
    return _create_fat('fat_b4', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fat_b5(pretrained: bool = False, **kwargs) -> FAT:
    model_args = dict(embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5)
    return _create_fat('fat_b5', pretrained=pretrained, **dict(model_args, **kwargs))


# The paper's ablation study: FAT-B0 with one component replaced (see the README's ablation section).

def _create_fat_b0_ablation(variant: str, pretrained: bool, ablation: Dict, kwargs: Dict) -> FAT:
    return _create_fat(variant, pretrained=pretrained, **dict(_FAT_B0_ARGS, **ablation, **kwargs))


@register_model
def fat_b0_add(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_add', pretrained, dict(interaction='add'), kwargs)


@register_model
def fat_b0_cat(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_cat', pretrained, dict(interaction='cat'), kwargs)


@register_model
def fat_b0_mul(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_mul', pretrained, dict(interaction='mul'), kwargs)


@register_model
def fat_b0_pool_down(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_pool_down', pretrained, dict(kv_downsample='pool'), kwargs)


@register_model
def fat_b0_conv_down(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_conv_down', pretrained, dict(kv_downsample='conv'), kwargs)


@register_model
def fat_b0_overlap_down(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_overlap_down', pretrained, dict(kv_downsample='overlap'), kwargs)


@register_model
def fat_b0_no_cpe(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_no_cpe', pretrained, dict(cpe=False), kwargs)


@register_model
def fat_b0_maxsa(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_maxsa', pretrained, dict(token_mixer='maxsa'), kwargs)


@register_model
def fat_b0_swin(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_swin', pretrained, dict(token_mixer='swin'), kwargs)


@register_model
def fat_b0_sra(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_sra', pretrained, dict(token_mixer='sra'), kwargs)


@register_model
def fat_b0_twins(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_twins', pretrained, dict(token_mixer='twins'), kwargs)


@register_model
def fat_b0_cswin(pretrained: bool = False, **kwargs) -> FAT:
    return _create_fat_b0_ablation('fat_b0_cswin', pretrained, dict(token_mixer='cswin'), kwargs)
