"""Parameters and FLOPs of every FAT variant, beside the paper's figures.

    python -m classification.model_table [--variants fat_b0 fat_b1] [--img-size 224] [--markdown]

Builds each variant, runs a forward pass and counts FLOPs with fvcore (one multiply-add = one FLOP,
fvcore's convention). fvcore also counts the attention matrix products, which the paper leaves out, so
FLOPs read 5-10 % above the paper's (the authors' own code gives 0.77, 1.26, 2.15, 4.67 G for b0-b3).
"""
import argparse
import math
from typing import Dict, List, NamedTuple, Optional, Sequence

import timm
import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape


VARIANTS = ('fat_b0', 'fat_b1', 'fat_b2', 'fat_b3', 'fat_b3_st', 'fat_b4', 'fat_b5')


class PaperFigures(NamedTuple):
    params_m: float
    gflops: float
    top1: float


# Table 1 of the paper (ImageNet-1K, 224x224)
PAPER = {
    'fat_b0': PaperFigures(4.5, 0.7, 77.6),
    'fat_b1': PaperFigures(7.8, 1.2, 80.1),
    'fat_b2': PaperFigures(13.5, 2.0, 81.9),
    'fat_b3': PaperFigures(29.0, 4.4, 83.6),
    'fat_b3_st': PaperFigures(29.0, 4.7, 83.0),
    'fat_b4': PaperFigures(52.0, 9.3, 84.8),
    'fat_b5': PaperFigures(88.0, 15.1, 85.2),
}


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


def measure(variants: Sequence[str] = VARIANTS, img_size: int = 224) -> List[Dict]:
    rows = []
    for name in variants:
        model = timm.create_model(name)
        rows.append(dict(model=name, params_m=count_params(model) / 1e6, gflops=count_flops(model, img_size) / 1e9))
    return rows


def format_table(rows: List[Dict], markdown: bool = False) -> str:
    header = ['model', 'params (M)', 'paper params (M)', 'GFLOPs (fvcore)', 'paper GFLOPs', 'paper top-1 (%)']
    lines = []
    for row in rows:
        paper = PAPER[row['model']]
        lines.append([row['model'], f"{row['params_m']:.2f}", f'{paper.params_m:.1f}',
                      f"{row['gflops']:.2f}", f'{paper.gflops:.1f}', f'{paper.top1:.1f}'])
    if markdown:
        table = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        table += ['| ' + ' | '.join(line) + ' |' for line in lines]
        return '\n'.join(table)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    return '\n'.join('  '.join(str(cell).rjust(width) for cell, width in zip(line, widths))
                     for line in [header] + lines)


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--variants', nargs='+', default=VARIANTS, choices=VARIANTS, metavar='NAME',
                        help=f'variants to measure (default: all of {", ".join(VARIANTS)})')
    parser.add_argument('--img-size', type=int, default=224, help='square input size (default: 224)')
    parser.add_argument('--markdown', action='store_true', help='print a Markdown table')
    args = parser.parse_args(argv)
    print(format_table(measure(args.variants, args.img_size), markdown=args.markdown))


if __name__ == '__main__':
    main()
