"""See inside FASA: what its global and local branches compute on an image, stage by stage.

    python -m classification.visualize IMAGE --model fat_b0 [--checkpoint CKPT] --output fasa.png
        [--query Y X] [--stages 1 2 3 4] [--heads mean|each]

For the last block of each stage asked for, beside the image as the model sees it (evaluation's preprocessing, the
query marked in red), one row of maps upsampled to the image: the local branch's self-modulated context
``silu(dwconv(q))``, its magnitude (L2 norm over the channels) at each position; the gate that the global branch
applies to it, ``silu(global)``, averaged over the channels (FASA's output is ``proj(local * silu(global))``); and
the global branch's attention for the query (``Y X`` in the input's pixels, by default its centre) over the
downsampled keys, averaged over the heads or one panel per head. Each map is coloured from its own minimum to its
maximum (viridis). The maps come from each FASA's input, recorded by a forward
hook that leaves the model's output as it is, through the layer's own weights (``fasa_maps``).
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from . import dependencies, export
from .checkpoint_io import CheckpointError, UnsafeCheckpointError, load_checkpoint_file
from .commands import program_name
from .fat import FAT, FASA
from .predict import preprocessing
from .registry import model_names

QUERY_COLOR = (255, 0, 0)
HEADER = 14  # pixels of the row of column titles


class VisualizeError(ValueError):
    """A model, image or option that cannot be visualised."""


def fasa_layers(model: torch.nn.Module, stages: Sequence[int]) -> Dict[int, FASA]:
    """The FASA of the last block of each stage asked for (1-4), by stage."""
    if not isinstance(model, FAT):
        raise VisualizeError(f'{type(model).__name__} has no FASA: visualize a FAT model')
    layers = {}
    for stage in stages:
        if not 1 <= stage <= len(model.stages):
            raise VisualizeError(f'stage {stage}: the model has stages 1-{len(model.stages)}')
        mixer = model.stages[stage - 1].blocks[-1].attn
        if not isinstance(mixer, FASA):
            raise VisualizeError(f'stage {stage} mixes its tokens with {type(mixer).__name__}, not FASA')
        layers[stage] = mixer
    return layers


def record_inputs(layers: Dict[int, FASA]) -> Tuple[Dict[int, torch.Tensor], List]:
    """Forward hooks that record each layer's input (returning nothing, so the output is the model's own)."""
    inputs: Dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_hook(lambda module, args, output, stage=stage:
                                           inputs.__setitem__(stage, args[0].detach()))
               for stage, layer in layers.items()]
    return inputs, handles


@torch.no_grad()
def fasa_maps(layer: FASA, x: torch.Tensor, query: Tuple[float, float]) -> Dict[str, torch.Tensor]:
    """FASA's branches on its input ``x`` (1, C, H, W), through the layer's own weights: ``attention`` (heads, key
    rows, key columns), the query's attention over the downsampled keys; ``local`` (H, W), the magnitude of the
    local branch's self-modulated context; ``gate`` (H, W), ``silu(global)`` averaged over the channels;
    ``output``, what the layer computes from them (its forward's output, to float rounding); ``query`` (row,
    column), where ``query`` (fractions of the height and width) falls on the layer's map."""
    batch, dim, height, width = x.shape
    q = layer.q(x)
    local = F.silu(layer.local_mixer(q))
    keys = layer.kv_downsample(x)
    kv = layer.kv(keys).reshape(batch, 2, layer.num_heads, layer.head_dim, -1)
    k, v = kv.unbind(1)
    scores = q.reshape(batch, layer.num_heads, layer.head_dim, height * width).transpose(-1, -2) @ k
    attention = (scores * layer.head_dim ** -0.5).softmax(dim=-1)  # (B, heads, queries, keys)
    glob = (attention @ v.transpose(-1, -2)).transpose(-1, -2).reshape(batch, dim, height, width)
    row, column = min(int(query[0] * height), height - 1), min(int(query[1] * width), width - 1)
    return dict(attention=attention[0, :, row * width + column].reshape(layer.num_heads, *keys.shape[-2:]),
                local=local[0].norm(dim=0), gate=F.silu(glob)[0].mean(dim=0),
                output=layer.proj(local * F.silu(glob)) if layer.interaction == 'fat' else None, query=(row, column))


def _colored(values: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    """A map upsampled (bilinear) to ``size`` and coloured (viridis, its own minimum to maximum), RGB uint8."""
    from matplotlib import colormaps

    upsampled = F.interpolate(values[None, None].float(), size=size, mode='bilinear', align_corners=False)[0, 0]
    span = (upsampled.max() - upsampled.min()).clamp_min(1e-12)
    scaled = ((upsampled - upsampled.min()) / span).numpy()
    return (colormaps['viridis'](scaled)[..., :3] * 255).round().astype(np.uint8)


def _shown(image: torch.Tensor, query: Tuple[int, int]) -> np.ndarray:
    """The normalised input as RGB uint8, the query marked by a red square of 5 pixels."""
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    pixels = ((image * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy().copy()
    y, x = query
    pixels[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = QUERY_COLOR
    return pixels


def draw(image: torch.Tensor, query: Tuple[int, int], rows: Dict[int, Dict[str, torch.Tensor]],
         heads: str) -> Image.Image:
    """One row per stage: the image with the query, local, gate, then the attention (mean, or each head); a header
    row of titles. Every panel is the image's size, so that a pixel of a panel is that pixel of the image."""
    height, width = image.shape[-2:]
    panels = []
    for maps in rows.values():
        attention = [maps['attention'].mean(dim=0)] if heads == 'mean' else list(maps['attention'])
        panels.append([_shown(image, query), _colored(maps['local'], (height, width)),
                       _colored(maps['gate'], (height, width))] + [_colored(a, (height, width)) for a in attention])
    columns = max(len(row) for row in panels)
    blank = np.full((height, width, 3), 255, np.uint8)  # where a stage has fewer heads than another
    grid = np.concatenate([np.concatenate(row + [blank] * (columns - len(row)), axis=1) for row in panels], axis=0)
    header = np.full((HEADER, grid.shape[1], 3), 255, np.uint8)
    picture = Image.fromarray(np.concatenate([header, grid], axis=0))
    canvas = ImageDraw.Draw(picture)
    titles = ['image', 'local', 'gate'] + (['attention'] if heads == 'mean' else
                                           [f'head {index + 1}' for index in range(columns - 3)])
    for index, title in enumerate(titles):
        canvas.text((index * width + 2, 1), title, fill=(0, 0, 0))
    for index, stage in enumerate(rows):
        canvas.text((2, HEADER + index * height + 2), f'stage {stage}', fill=(255, 255, 255))
    return picture


def visualize(model: torch.nn.Module, image: torch.Tensor, query: Tuple[int, int], stages: Sequence[int],
              heads: str = 'mean') -> Tuple[Image.Image, torch.Tensor, Dict[int, Dict[str, torch.Tensor]]]:
    """The picture, the model's logits for ``image`` (C, H, W; normalised) and each stage's maps."""
    height, width = image.shape[-2:]
    if not (0 <= query[0] < height and 0 <= query[1] < width):
        raise VisualizeError(f'--query {query[0]} {query[1]} is outside the {height}x{width} input')
    layers = fasa_layers(model, stages)
    inputs, handles = record_inputs(layers)
    try:
        with torch.no_grad():
            logits = model(image[None])
    finally:
        for handle in handles:
            handle.remove()
    fractions = ((query[0] + 0.5) / height, (query[1] + 0.5) / width)
    rows = {stage: fasa_maps(layer, inputs[stage], fractions) for stage, layer in layers.items()}
    return draw(image, query, rows, heads), logits, rows


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog=program_name(__spec__.name), description=__doc__.splitlines()[0])
    parser.add_argument('image')
    parser.add_argument('--model', required=True, choices=model_names('fat', ablations=True), metavar='NAME',
                        help='a FAT model (fat_b0 ... fat_b5, the ablation variants with FASA)')
    parser.add_argument('--checkpoint', help='weights (any checkpoint the project reads, or a published folder)')
    parser.add_argument('--output', required=True, type=Path, help='the picture to write (.png)')
    parser.add_argument('--query', nargs=2, type=int, metavar=('Y', 'X'),
                        help="the query's pixel in the model's input (default: its centre)")
    parser.add_argument('--stages', nargs='+', type=int, default=[1, 2, 3, 4], help='stages to draw (1-4)')
    parser.add_argument('--heads', choices=('mean', 'each'), default='mean',
                        help='the attention averaged over the heads, or a panel per head')
    args = parser.parse_args(argv)
    dependencies.require('matplotlib', 'plots', 'Drawing the maps')
    try:
        checkpoint = load_checkpoint_file(args.checkpoint) if args.checkpoint else None
        transform = preprocessing(args.model, checkpoint if isinstance(checkpoint, dict) else None)
        with Image.open(args.image) as opened:
            image = transform(opened.convert('RGB'))
        model = export.build_model(args.model, Path(args.checkpoint) if args.checkpoint else None, deploy=False)
        height, width = image.shape[-2:]
        query = tuple(args.query) if args.query else (height // 2, width // 2)
        picture, _, _ = visualize(model, image, query, args.stages, args.heads)
    except (VisualizeError, CheckpointError, UnsafeCheckpointError, FileNotFoundError, OSError) as error:
        sys.exit(f'error: {error}')
    picture.save(args.output)
    print(f'wrote {args.output}: stages {", ".join(map(str, args.stages))}, query at {query[0]} {query[1]} of the '
          f'{height}x{width} input')


if __name__ == '__main__':
    main()
