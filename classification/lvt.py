"""LVT: Lite Vision Transformer, built on Convolutional Self-Attention (CSA) and Recursive Atrous
Self-Attention (RASA).

Paper: `Lite Vision Transformer with Enhanced Self-Attention` (CVPR 2022), https://arxiv.org/abs/2112.10809

This is the authors' model, operation for operation; the golden data produced by their released code (float64
outputs of perturbed ``lvt`` and ``lvt_cls``) is reproduced to < 1e-6 relative error. Tokens are channels-last,
(B, H, W, C), between modules. Module names are timm's (``stem``, ``stages.i.downsample`` /
``stages.i.blocks.j``, ``norm``, ``head``); ``checkpoint_filter_fn`` maps the authors' names
(``backbone.{stage}.{0: patch embedding, 1: blocks}...``, ``post_network``) onto them.

* ``lvt``: the backbone (3.43 M parameters) with a final LayerNorm, average pooling and a linear classifier.
* ``lvt_cls``: the paper's ImageNet model (5.52 M): ``lvt`` with a class token, two class-attention blocks (the
  ones of VOLO, from timm), a classifier on the class token and an auxiliary classifier on every patch token.
  It predicts ``head(cls) + 0.5 * max over tokens of aux_head(token)``. For token labelling, built with
  ``return_dense=True`` it returns in training ``(cls logits, patch-token logits (B, H, W, classes), box)``,
  and with ``mix_token=True`` it mixes every sample with the batch-flipped one inside a box (MixToken) whose
  patch-token logits it swaps back.

Unlike the authors' code, ``drop_path_rate`` and ``num_classes`` take effect. The default drop path is 0, which
is what the authors' released training used (their model ignored the rate it was given).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._manipulate import checkpoint_seq, named_apply
from timm.models.volo import ClassBlock, rand_bbox

from .checkpoint_io import check_state_dict_fits, load_weights, timm_overlay
from .graph_forms import batched_attention, tracing_for_deployment

__all__ = ['LVT', 'LVTCls', 'checkpoint_filter_fn']


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """A strided convolution and a LayerNorm over channels: NCHW in, (B, H, W, C) out."""

    def __init__(self, in_dim: int, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_to_nhwc(self.proj(x)))


@register_notrace_function  # a leaf of torch.fx traces (which wraps only names without a leading underscore)
def overlap_add(windows: torch.Tensor, height: int, width: int, kernel_size: int, stride: int) -> torch.Tensor:
    """``F.fold``: the k x k windows (B, C, k*k, rows, columns) of a (height, width) map, taken with padding k // 2,
    added back onto it, overlaps summed. As k*k strided additions it is exact, twice as fast as ``F.fold`` on the
    CPU, and compiled correctly by inductor, which corrupts the heap folding a permuted tensor (torch 2.13, CPU)."""
    batch, dim, _, rows, columns = windows.shape
    padding = kernel_size // 2
    out = windows.new_zeros(batch, dim, stride * (rows - 1) + kernel_size, stride * (columns - 1) + kernel_size)
    for i in range(kernel_size):
        for j in range(kernel_size):
            out[:, :, i:i + stride * rows:stride, j:j + stride * columns:stride] += windows[:, :, i * kernel_size + j]
    return out[:, :, padding:padding + height, padding:padding + width]


def overlap_add_transposed_conv(windows: torch.Tensor, height: int, width: int, kernel_size: int,
                                stride: int) -> torch.Tensor:
    """``overlap_add`` as one transposed convolution whose kernel puts each window position's value at its place:
    what deployment runtimes run well, where they map the strided in-place additions to generic scatter
    operations (in OpenVINO a third of LVT's time). Equal to ``overlap_add`` up to float rounding."""
    batch, dim, positions, rows, columns = windows.shape
    padding = kernel_size // 2
    kernel = torch.eye(positions, dtype=windows.dtype, device=windows.device).reshape(
        positions, 1, kernel_size, kernel_size).repeat(dim, 1, 1, 1)
    out = F.conv_transpose2d(windows.reshape(batch, dim * positions, rows, columns), kernel, stride=stride,
                             groups=dim)
    return out[:, :, padding:padding + height, padding:padding + width]


class ConvolutionalSelfAttention(nn.Module):
    """CSA, LVT's first-stage token mixer: attention among the k x k positions of each window (stride 2).

    The k^2 x k^2 attention weights of a window come from its average-pooled input through a linear layer; the
    value at each of its k^2 positions is the input there through one C x C matrix per position (a grouped 1x1
    convolution over the unfolded windows). The weighted values are folded back, overlapping windows summed.
    A graph recorded for deployment (``graph_forms``) folds them back by a transposed convolution
    (``overlap_add_transposed_conv``), the form deployment runtimes run well.
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 3, stride: int = 2, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.stride = stride
        positions = kernel_size * kernel_size
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True)
        self.attn = nn.Linear(dim, num_heads * positions ** 2)
        self.weight = nn.Conv2d(dim * positions, dim * positions, 1, groups=positions, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        positions = self.kernel_size * self.kernel_size
        x = _to_nchw(x)
        attn = _to_nhwc(self.pool(x))
        rows, columns = attn.shape[1], attn.shape[2]
        attn = self.attn(attn).reshape(batch, rows * columns, self.num_heads, positions, positions).transpose(1, 2)
        attn = (attn * self.head_dim ** -0.5).softmax(dim=-1)

        unfolded = F.unfold(x, self.kernel_size, padding=self.kernel_size // 2, stride=self.stride)
        # (B, C * k^2, windows), channel-major: group by kernel position for one C x C matrix per position
        unfolded = unfolded.reshape(batch, dim, positions, rows * columns, 1).transpose(1, 2).reshape(
            batch, positions * dim, rows * columns, 1)
        values = self.weight(unfolded).reshape(batch, positions, self.num_heads, self.head_dim, rows * columns)
        values = values.permute(0, 2, 4, 1, 3)  # (B, heads, windows, k^2, head_dim)
        # one 3-d product per window (a 5-d one leaves its broadcast outside ExecuTorch's XNNPACK delegate)
        out = torch.bmm(attn.reshape(-1, positions, positions), values.reshape(-1, positions, self.head_dim))
        out = out.reshape(batch, self.num_heads, rows * columns, positions, self.head_dim).permute(0, 1, 4, 3, 2)
        out = out.reshape(batch, dim, positions, rows, columns)
        if tracing_for_deployment():
            out = overlap_add_transposed_conv(out, height, width, self.kernel_size, self.stride)
        else:
            out = overlap_add(out, height, width, self.kernel_size, self.stride)
        return self.proj(_to_nhwc(out))


class RecursiveAtrousSelfAttention(nn.Module):
    """RASA, LVT's token mixer in stages 2-4: self-attention whose queries gather multi-scale context through one
    depthwise 3x3 kernel shared by several dilations, applied recursively with shared weights.

    One pass: queries ``q = sum_r SiLU(dwconv_r(Linear(x)))`` over the atrous rates r; keys and values from
    ``x`` reduced by a strided convolution (kernel = stride = ``sr_ratio``) and a LayerNorm when ``sr_ratio`` > 1.
    Recursion: ``y_1 = SiLU(pass(x))``, ``y_i = SiLU(pass(y_{i-1} + x))``.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, atrous_rates: Sequence[int] = (1, 3, 5),
                 recursions: int = 2, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.atrous_rates = tuple(atrous_rates)
        self.recursions = recursions
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = self.norm = None
        self.ds = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)

    def atrous_query(self, query: torch.Tensor, rate: int) -> torch.Tensor:
        return F.silu(F.conv2d(query, self.ds.weight, padding=rate, dilation=rate, groups=query.shape[1]))

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        query = _to_nchw(self.q(x))
        q = self.atrous_query(query, self.atrous_rates[0])
        for rate in self.atrous_rates[1:]:
            q = q + self.atrous_query(query, rate)
        q = q.reshape(batch, self.num_heads, self.head_dim, height * width).transpose(-1, -2)
        if self.sr is not None:
            x = self.norm(_to_nhwc(self.sr(_to_nchw(x))))
        kv = self.kv(x)  # keys and values as channel slices: an unbind leaves a squeeze outside XNNPACK
        k = kv[..., :dim].reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = kv[..., dim:].reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        if tracing_for_deployment():
            out = batched_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.attend(x))
        for _ in range(self.recursions - 1):
            out = F.silu(self.attend(out + x))
        return out


class ConvMlp(nn.Module):
    """1x1 conv, depthwise 3x3 conv, GELU, 1x1 conv, on (B, H, W, C) tokens."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.depconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _to_nhwc(self.fc2(self.act(self.depconv(self.fc1(_to_nchw(x))))))


class LVTBlock(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(attn(LN(x)))``, then ``x + DropPath(mlp(LN(x)))``."""

    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module, drop_path: float = 0.):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class LVTStage(nn.Module):
    def __init__(self, downsample: Optional[PatchEmbed], blocks: List[LVTBlock]):
        super().__init__()
        self.downsample = downsample or nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.downsample, nn.Identity):
            x = self.downsample(_to_nchw(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class LVT(nn.Module):
    """LVT backbone and classifier (``lvt``): its tokens are channels-last, ``output_fmt`` 'NHWC'.

    Args:
        in_chans: input image channels.
        num_classes: classifier outputs (0 for no classifier).
        global_pool: 'avg' (mean over the tokens) or '' (none).
        embed_dims: widths of the four stages.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratios: MLP expansion per stage.
        sr_ratios: RASA key/value reduction per stage (the first stage's CSA has none).
        atrous_rates: RASA's dilations.
        recursions: RASA's recursions.
        qkv_bias: biases on the query, key and value projections.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear in block order up to this value.
    """
    output_fmt = 'NHWC'

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 64, 160, 256),
            depths: Sequence[int] = (2, 2, 2, 2),
            num_heads: Sequence[int] = (2, 2, 5, 8),
            mlp_ratios: Sequence[float] = (4, 8, 4, 4),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            atrous_rates: Sequence[int] = (1, 3, 5),
            recursions: int = 2,
            qkv_bias: bool = False,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        num_stages = len(embed_dims)
        if not all(len(arg) == num_stages for arg in (depths, num_heads, mlp_ratios, sr_ratios)):
            raise ValueError('embed_dims, depths, num_heads, mlp_ratios and sr_ratios need one entry per stage')
        self._check_global_pool(global_pool)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.stem = PatchEmbed(in_chans, embed_dims[0], 7, stride=4)

        drop_path_rates = iter(torch.linspace(0, drop_path_rate, sum(depths)).tolist())
        stages = []
        self.feature_info = []
        for i in range(num_stages):
            dim = embed_dims[i]
            blocks = []
            for _ in range(depths[i]):
                if i == 0:
                    attn = ConvolutionalSelfAttention(dim, num_heads[i], qkv_bias=qkv_bias)
                    mlp = Mlp(dim, int(dim * mlp_ratios[i]))
                else:
                    attn = RecursiveAtrousSelfAttention(dim, num_heads[i], sr_ratios[i], atrous_rates, recursions,
                                                        qkv_bias=qkv_bias)
                    mlp = ConvMlp(dim, int(dim * mlp_ratios[i]))
                blocks.append(LVTBlock(dim, attn, mlp, drop_path=next(drop_path_rates)))
            downsample = PatchEmbed(embed_dims[i - 1], dim, 3, stride=2) if i > 0 else None
            stages.append(LVTStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        named_apply(_init_weights, self)

    def _check_global_pool(self, global_pool: str):
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self._check_global_pool(global_pool)
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward that also returns the pyramid features (strides 4, 8, 16, 32).

        Args:
            x: input images.
            indices: the last n stages if an int, all if None, else the stage indices to return.
            norm: apply the final LayerNorm to the last stage's feature.
            stop_early: stop after the last requested stage.
            output_fmt: 'NCHW' or 'NHWC', of the features (the final output is ``forward_features``').
            intermediates_only: return only the features.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]

        intermediates = []
        x = self.stem(x)
        for index, stage in enumerate(stages):
            x = stage(x)
            if index in take_indices:
                feature = self.norm(x) if norm and index == last_index else x
                intermediates.append(_to_nchw(feature) if output_fmt == 'NCHW' else feature)
        if intermediates_only:
            return intermediates
        if index == last_index:
            x = self.final_norm(x)
        return x, intermediates

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """What ``forward_features`` does after the last stage."""
        return self.norm(x)

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def remap_checkpoint(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The authors' key names renamed onto this model's; this project's pass unchanged."""
        return remap_official_keys(state_dict)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str):
        """Load a checkpoint in any supported format: the authors' timm-trainer checkpoints (``state_dict``,
        ``epoch``, ``arch``, often ``args`` and ``optimizer``), this project's checkpoints, or a plain state dict
        (.pth or .safetensors). Nothing is unpickled beyond tensors and plain data.

        timm routes ``pretrained_cfg_overlay=dict(file=PATH)`` here (``checkpoint_io.timm_overlay``), so that
        timm's ``pretrained`` takes the weights every other loader of this project takes: of a training checkpoint,
        those it calls best (``checkpoint_io.best_weights``). A classifier of another size than this model's is
        dropped, leaving the freshly initialised one.
        """
        load_weights(self, checkpoint_path, head='drop')


class LVTCls(LVT):
    """LVT with a class token (``lvt_cls``, the paper's ImageNet model): the class-attention blocks update the class
    token from the last stage's tokens; ``head`` classifies the class token, ``aux_head`` every patch token, and
    the prediction is ``head(cls) + aux_weight * max over tokens of aux_head(token)``.

    Args (beyond ``LVT``'s):
        global_pool: 'token' (the prediction above) or '' (the normalised patch tokens, (B, H, W, C)).
        num_class_blocks: class-attention blocks (VOLO's ``ClassBlock``).
        aux_weight: weight of the auxiliary prediction.
        return_dense: in training, return ``(cls logits, patch-token logits (B, H, W, classes), box)`` for token
            labelling; ``box`` is MixToken's ``(x0, y0, x1, y1)`` on the token grid (empty without MixToken).
        mix_token: in training with ``return_dense``, mix each sample with the batch-flipped one inside a random
            box of the token grid (area fraction ~ Beta(``mix_beta``, ``mix_beta``)), applied after the stem.
    """

    def __init__(self, *args, global_pool: str = 'token', num_class_blocks: int = 2, aux_weight: float = 0.5,
                 return_dense: bool = False, mix_token: bool = False, mix_beta: float = 1.0, **kwargs):
        super().__init__(*args, global_pool=global_pool, **kwargs)
        dim = self.num_features
        self.aux_weight = aux_weight
        self.return_dense = return_dense
        self.mix_token = mix_token
        self.mix_beta = mix_beta
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.class_blocks = nn.Sequential(*[
            ClassBlock(dim, self.stages[-1].blocks[0].attn.num_heads, mlp_ratio=4.) for _ in range(num_class_blocks)])
        self.aux_head = nn.Linear(dim, self.num_classes) if self.num_classes > 0 else nn.Identity()
        named_apply(_init_weights, self.class_blocks)
        named_apply(_init_weights, self.aux_head)
        trunc_normal_(self.cls_token, std=.02)

    def _check_global_pool(self, global_pool: str):
        if global_pool not in ('token', ''):
            raise ValueError(f"global_pool must be 'token' or '', got {global_pool!r}")

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict:
        matcher = super().group_matcher(coarse)
        matcher['stem'] = r'^cls_token|^stem'
        if not coarse:
            matcher['blocks'] = matcher['blocks'][:-1] + [(r'^class_blocks\.(\d+)', (99998,)), (r'^norm', (99999,))]
        return matcher

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        super().reset_classifier(num_classes, global_pool)
        self.aux_head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        # the LayerNorm follows the class-attention blocks, in forward_head
        return x

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if prune_head:
            self.cls_token = None
            self.class_blocks = nn.Identity()
        return take_indices

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The class token, updated from the last stage's (B, H, W, C) tokens, then every token normalised."""
        batch, height, width, dim = x.shape
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, height * width, dim)], dim=1)
        return self.norm(self.class_blocks(tokens))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        batch, height, width, dim = x.shape
        tokens = self.head_drop(self._tokens(x))
        if self.global_pool == '':
            patches = tokens[:, 1:].reshape(batch, height, width, dim)
            return patches if pre_logits else self.aux_head(patches)
        if pre_logits or self.num_classes == 0:
            return tokens[:, 0]
        return self.head(tokens[:, 0]) + self.aux_weight * self.aux_head(tokens[:, 1:]).amax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.return_dense and self.training and not torch.jit.is_scripting():
            return self.forward_dense(x)
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_dense(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int, int, int]]:
        """Training output for token labelling: class-token logits, patch-token logits (B, H, W, classes) and
        MixToken's box on the token grid (x0, y0, x1, y1 along H and W; all 0 without MixToken)."""
        x = self.stem(x)
        box = (0, 0, 0, 0)
        if self.mix_token:
            # a box on the stride-32 grid of the output tokens, applied on the stride-4 grid of the stem's
            scale = 2 ** (len(self.stages) - 1)
            lam = torch.distributions.Beta(self.mix_beta, self.mix_beta).sample()
            box = rand_bbox(x.shape, lam, scale=scale)
            x = _swap_box(x, [edge * scale for edge in box])
        x = self.stages(x)
        batch, height, width, _ = x.shape
        tokens = self.head_drop(self._tokens(x))
        patch_logits = self.aux_head(tokens[:, 1:]).reshape(batch, height, width, -1)
        if self.mix_token:
            patch_logits = _swap_box(patch_logits, box)  # each sample's tokens back to the sample whose image they saw
        return self.head(tokens[:, 0]), patch_logits, box


def _swap_box(x: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    """``x`` (B, H, W, C) with the box (x0, y0, x1, y1) along H and W taken from the batch-flipped ``x``."""
    x0, y0, x1, y1 = box
    mixed = x.clone()
    mixed[:, x0:x1, y0:y1] = x.flip(0)[:, x0:x1, y0:y1]
    return mixed


def _init_weights(module: nn.Module, name: str = ''):
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (PatchEmbed, RecursiveAtrousSelfAttention)):
        conv = module.proj if isinstance(module, PatchEmbed) else module.sr
        if conv is not None:
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
            nn.init.normal_(conv.weight, std=math.sqrt(2.0 / fan_out))
            nn.init.zeros_(conv.bias)
        if isinstance(module, RecursiveAtrousSelfAttention):
            nn.init.kaiming_uniform_(module.ds.weight)


def _official_key(key: str) -> str:
    """One of the authors' key names as this model's."""
    parts = key.split('.')
    if parts[0] == 'backbone' and len(parts) > 3 and parts[1].isdigit():
        stage, part, rest = int(parts[1]), parts[2], parts[3:]
        if part == '0':
            return '.'.join((['stem'] if stage == 0 else ['stages', str(stage), 'downsample']) + rest)
        return '.'.join(['stages', str(stage), 'blocks'] + rest)
    if parts[0] == 'post_network':
        return '.'.join(['class_blocks'] + parts[1:])
    return key


def remap_official_keys(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict with the authors' key names (``backbone.{stage}.{0: patch embedding, 1: blocks}...``,
    ``post_network``), of a classifier or of their downstream backbone files, renamed onto this model's; one with
    this project's names is returned as it is."""
    return {_official_key(key): value for key, value in state_dict.items()}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: LVT) -> Dict[str, torch.Tensor]:
    """timm's filter: ``state_dict`` mapped onto ``model`` (see ``remap_official_keys``). Raises CheckpointError
    naming the first mismatch if the weights are of another model."""
    state_dict = model.remap_checkpoint(state_dict)
    check_state_dict_fits(state_dict, model)
    return state_dict


def _create(model_class: type, variant: str, pretrained: bool = False, pretrained_cfg_overlay: Optional[Dict] = None,
            **kwargs) -> LVT:
    return build_model_with_cfg(
        model_class, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_cfg_overlay=timm_overlay(pretrained_cfg_overlay),
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict:
    return {
        'url': '',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.96, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2112.10809', 'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'lvt.in1k': _cfg(),
    'lvt_cls.in1k': _cfg(classifier=('head', 'aux_head')),
})


@register_model
def lvt(pretrained: bool = False, **kwargs) -> LVT:
    """The LVT backbone with average pooling and a linear classifier (3.69 M parameters)."""
    return _create(LVT, 'lvt', pretrained=pretrained, **kwargs)


@register_model
def lvt_cls(pretrained: bool = False, **kwargs) -> LVTCls:
    """The paper's ImageNet LVT: class-attention blocks, a classifier and an auxiliary token classifier (5.52 M)."""
    return _create(LVTCls, 'lvt_cls', pretrained=pretrained, **kwargs)
