"""The token mixers that the FAT paper's ablation puts in place of FASA, inside FAT-B0's frame.

Each takes and returns an NCHW map, so that it drops into a FAT block beside the CPE, the norms and the ConvFFN.
timm's own attention modules do the attending (Swin's window attention, MaxViT's partition attention, PVT-v2's
spatial-reduction attention, Twins' locally-grouped and global sub-sampled attention); only CSWin's cross-shaped
window attention, which timm lacks, is written here. Maps whose size is not a multiple of a window are padded with
zeros at the bottom and right and cropped back, as Swin's own implementation does for detection.

``TOKEN_MIXERS`` maps a name to a builder ``(dim, num_heads, window_size, stage, index) -> module``: ``window_size``
is FAT's key/value downsampling factor of the stage (8, 4, 2, 1 in FAT-B0), which the reduction-based mixers take as
their reduction ratio; ``index`` is the block's position in its stage, by which alternating mixers alternate.
"""
from functools import partial
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import RelPosBias, register_notrace_module
from timm.models import maxxvit, swin_transformer
from timm.models.pvt_v2 import Attention as SpatialReductionAttention
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn

__all__ = ['TOKEN_MIXERS', 'CrossShapedWindowAttention', 'PartitionAttention', 'ShiftedWindowAttention',
           'StripeAttention', 'TokenAttention', 'TokenAttentionWithSize']

WINDOW = 7  # the window of Swin, MaxViT's block and grid, Twins' groups: 224 / 32
CSWIN_STRIPE_WIDTHS = (1, 2, 7, 7)  # CSWin-T's stripe widths at strides 4, 8, 16, 32


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """An NHWC map zero-padded at the bottom and right to multiples of ``multiple``."""
    pad_h = (multiple - x.shape[1] % multiple) % multiple
    pad_w = (multiple - x.shape[2] % multiple) % multiple
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h))


def _shifted_window_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Swin's attention mask of the rolled map: -100 between tokens of a window that were not neighbours before
    the roll (they come from the nine regions that the roll brings together)."""
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_region = (rows >= height - window).long() + (rows >= height - shift).long()
    col_region = (cols >= width - window).long() + (cols >= width - shift).long()
    region = (row_region[:, None] * 3 + col_region[None, :])[None, :, :, None]
    windows = swin_transformer.window_partition(region, (window, window)).reshape(-1, window * window)
    mask = torch.zeros(windows.shape[0], window * window, window * window, device=device)
    return mask.masked_fill(windows[:, None, :] != windows[:, :, None], -100.)


@register_notrace_module
class ShiftedWindowAttention(nn.Module):
    """Swin's (shifted) window attention, timm's ``WindowAttention`` with its relative position bias. Shifted
    windows roll the map by half a window; a map that one window covers is not shifted (Swin's rule)."""

    def __init__(self, dim: int, num_heads: int, window_size: int = WINDOW, shifted: bool = False):
        super().__init__()
        self.window_size = window_size
        self.shift = window_size // 2 if shifted else 0
        self.attn = swin_transformer.WindowAttention(dim, num_heads, window_size=window_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = x.shape
        window = self.window_size
        x = _pad_to_multiple(x.permute(0, 2, 3, 1), window)
        padded_height, padded_width = x.shape[1], x.shape[2]
        shift = self.shift if min(height, width) > window else 0
        mask: Optional[torch.Tensor] = None
        if shift > 0:
            x = torch.roll(x, (-shift, -shift), (1, 2))
            mask = _shifted_window_mask(padded_height, padded_width, window, shift, x.device).to(x.dtype)
        windows = swin_transformer.window_partition(x, (window, window)).reshape(-1, window * window, dim)
        windows = self.attn(windows, mask).reshape(-1, window, window, dim)
        x = swin_transformer.window_reverse(windows, (window, window), padded_height, padded_width)
        if shift > 0:
            x = torch.roll(x, (shift, shift), (1, 2))
        return x[:, :height, :width].permute(0, 3, 1, 2)


@register_notrace_module
class PartitionAttention(nn.Module):
    """MaxViT's multi-axis attention: timm's ``AttentionCl`` with its relative position bias over block windows
    (neighbouring tokens) or over the grid (tokens strided across the whole map)."""

    def __init__(self, dim: int, head_dim: int, partition_size: int = WINDOW, grid: bool = False):
        super().__init__()
        self.partition_size = partition_size
        self.grid = grid
        self.attn = maxxvit.AttentionCl(
            dim, dim_head=head_dim, rel_pos_cls=partial(RelPosBias, window_size=(partition_size, partition_size)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        size = [self.partition_size, self.partition_size]
        x = _pad_to_multiple(x.permute(0, 2, 3, 1), self.partition_size)
        padded_size = [x.shape[1], x.shape[2]]
        if self.grid:
            x = maxxvit.grid_reverse(self.attn(maxxvit.grid_partition(x, size)), size, padded_size)
        else:
            x = maxxvit.window_reverse(self.attn(maxxvit.window_partition(x, size)), size, padded_size)
        return x[:, :height, :width].permute(0, 3, 1, 2)


@register_notrace_module
class TokenAttention(nn.Module):
    """An attention over (B, N, C) tokens that takes the map's size as a list (PVT-v2's), applied to an NCHW map."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = x.shape
        x = self.attn(x.flatten(2).transpose(1, 2), [height, width])
        return x.transpose(1, 2).reshape(batch, dim, height, width)


@register_notrace_module
class TokenAttentionWithSize(nn.Module):
    """An attention over (B, N, C) tokens that takes the map's size as a tuple (Twins'), applied to an NCHW map."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = x.shape
        x = self.attn(x.flatten(2).transpose(1, 2), (height, width))
        return x.transpose(1, 2).reshape(batch, dim, height, width)


class StripeAttention(nn.Module):
    """Multi-head attention within horizontal stripes of ``stripe_width`` rows, plus CSWin's LePE: a depthwise 3x3
    conv of the values within each stripe. Takes q, k, v as NHWC maps whose height is a multiple of the width."""

    def __init__(self, dim: int, num_heads: int, stripe_width: int):
        super().__init__()
        self.num_heads = num_heads
        self.stripe_width = stripe_width
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = q.shape
        stripe = self.stripe_width
        num_stripes = batch * (height // stripe)
        shape = [num_stripes, stripe * width, self.num_heads, dim // self.num_heads]
        out = F.scaled_dot_product_attention(
            q.reshape(shape).transpose(1, 2), k.reshape(shape).transpose(1, 2), v.reshape(shape).transpose(1, 2))
        position = self.lepe(v.reshape(num_stripes, stripe, width, dim).permute(0, 3, 1, 2))
        out = out.transpose(1, 2).reshape(num_stripes, stripe, width, dim) + position.permute(0, 2, 3, 1)
        return out.reshape(batch, height, width, dim)


@register_notrace_module
class CrossShapedWindowAttention(nn.Module):
    """CSWin's cross-shaped window self-attention with its locally-enhanced positional encoding (LePE).

    The heads are split in two groups (the first gets ``num_heads // 2``): one attends within horizontal stripes of
    ``stripe_width`` rows across the whole width, the other within vertical stripes of as many columns (the
    horizontal attention of the transposed map).
    """

    def __init__(self, dim: int, num_heads: int, stripe_width: int):
        super().__init__()
        if num_heads < 2 or dim % num_heads:
            raise ValueError(f'cross-shaped windows need >= 2 heads dividing dim {dim}, got {num_heads}')
        head_dim = dim // num_heads
        horizontal_heads = num_heads // 2
        self.stripe_width = stripe_width
        self.split = [horizontal_heads * head_dim, (num_heads - horizontal_heads) * head_dim]
        self.qkv = nn.Linear(dim, 3 * dim)
        self.horizontal = StripeAttention(self.split[0], horizontal_heads, stripe_width)
        self.vertical = StripeAttention(self.split[1], num_heads - horizontal_heads, stripe_width)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = _pad_to_multiple(x.permute(0, 2, 3, 1), self.stripe_width)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        qs, ks, vs = q.split(self.split, -1), k.split(self.split, -1), v.split(self.split, -1)
        horizontal = self.horizontal(qs[0], ks[0], vs[0])
        vertical = self.vertical(qs[1].transpose(1, 2), ks[1].transpose(1, 2), vs[1].transpose(1, 2))
        x = self.proj(torch.cat([horizontal, vertical.transpose(1, 2)], dim=-1))
        return x[:, :height, :width].permute(0, 3, 1, 2)


def _swin(dim: int, num_heads: int, window_size: int, stage: int, index: int) -> nn.Module:
    return ShiftedWindowAttention(dim, num_heads, shifted=index % 2 == 1)


def _maxsa(dim: int, num_heads: int, window_size: int, stage: int, index: int) -> nn.Module:
    return PartitionAttention(dim, dim // num_heads, grid=index % 2 == 1)


def _sra(dim: int, num_heads: int, window_size: int, stage: int, index: int) -> nn.Module:
    return TokenAttention(SpatialReductionAttention(dim, num_heads, sr_ratio=window_size))


def _twins(dim: int, num_heads: int, window_size: int, stage: int, index: int) -> nn.Module:
    if index % 2 == 0:
        return TokenAttentionWithSize(LocallyGroupedAttn(dim, num_heads, ws=WINDOW))
    return TokenAttentionWithSize(GlobalSubSampleAttn(dim, num_heads, sr_ratio=window_size))


def _cswin(dim: int, num_heads: int, window_size: int, stage: int, index: int) -> nn.Module:
    return CrossShapedWindowAttention(dim, num_heads, CSWIN_STRIPE_WIDTHS[min(stage, len(CSWIN_STRIPE_WIDTHS) - 1)])


TOKEN_MIXERS: Dict[str, Callable[[int, int, int, int, int], nn.Module]] = {
    'maxsa': _maxsa,  # MaxViT: block attention, then grid attention in the next block
    'swin': _swin,  # Swin: window attention, then shifted windows in the next block
    'sra': _sra,  # PVT-v2: spatial-reduction attention, reduction ratio = FAT's window
    'twins': _twins,  # Twins-SVT: locally-grouped, then global sub-sampled attention (ratio = FAT's window)
    'cswin': _cswin,  # CSWin: cross-shaped windows with LePE
}
