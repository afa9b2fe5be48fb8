"""Parameters and FLOPs of every registered model, beside its paper's figures.

    python -m classification.model_table [--variants fat_b0 fat_b1] [--img-size 224] [--markdown]

Builds each model, runs a forward pass and counts FLOPs with fvcore (one multiply-add = one FLOP,
fvcore's convention). fvcore also counts the attention matrix products, which the paper leaves out, so
FLOPs read 5-10 % above the paper's (the authors' own code gives 0.77, 1.26, 2.15, 4.67 G for b0-b3).
"""
import argparse
import math
from typing import Dict, List, Optional, Sequence

import timm
import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from .registry import MODELS, model_names


def _sdpa_flops(inputs, outputs) -> int:
    """Multiply-adds of q @ k^T and attn @ v inside scaled_dot_product_attention."""
    q_shape, k_shape, v_shape = (get_shape(x) for x in inputs[:3])
    *batch, queries, head_dim = q_shape
    return math.prod(batch) * queries * k_shape[-2] * (head_dim + v_shape[-1])


def count_flops(model: torch.nn.Module, img_size: int = 224) -> int:
    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, img_size, img_size))
    analysis.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flops)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with torch.no_grad():
        return analysis.total()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(variants: Sequence[str] = model_names(), img_size: int = 224) -> List[Dict]:
    rows = []
    for name in variants:
        model = timm.create_model(name)
        rows.append(dict(model=name, params_m=count_params(model) / 1e6, gflops=count_flops(model, img_size) / 1e9))
    return rows


def format_table(rows: List[Dict], markdown: bool = False) -> str:
    header = ['model', 'params (M)', 'paper params (M)', 'GFLOPs (fvcore)', 'paper GFLOPs', 'paper top-1 (%)']
    lines = []
    for row in rows:
        paper = MODELS[row['model']].paper
        figures = (paper.params_m, paper.gflops, paper.top1) if paper else (None, None, None)
        params_m, gflops, top1 = ('–' if figure is None else f'{figure:.1f}' for figure in figures)
        lines.append([row['model'], f"{row['params_m']:.2f}", params_m, f"{row['gflops']:.2f}", gflops, top1])
    if markdown:
        table = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        table += ['| ' + ' | '.join(line) + ' |' for line in lines]
        return '\n'.join(table)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    return '\n'.join('  '.join(str(cell).rjust(width) for cell, width in zip(line, widths))
                     for line in [header] + lines)


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variants', nargs='+', default=model_names(), choices=model_names(), metavar='NAME',
                        help=f'models to measure (default: all of {", ".join(model_names())})')
    parser.add_argument('--img-size', type=int, default=224, help='square input size (default: 224)')
    parser.add_argument('--markdown', action='store_true', help='print a Markdown table')
    args = parser.parse_args(argv)
    print(format_table(measure(args.variants, args.img_size), markdown=args.markdown))


if __name__ == '__main__':
    main()
