"""Parameters and FLOPs of every registered model, beside its paper's figures.

    python -m classification.model_table [--variants fat_b0 fat_b1] [--img-size 224] [--markdown]
    python -m classification.model_table --ablation [--markdown]

Builds each model, runs a forward pass and counts FLOPs with fvcore (one multiply-add = one FLOP,
fvcore's convention). fvcore also counts the attention matrix products, which the paper leaves out, so
FLOPs read 5-10 % above the paper's (the authors' own code gives 0.77, 1.26, 2.15, 4.67 G for b0-b3).

``--ablation`` prints the FAT paper's ablation tables instead: each row's model with its parameters, its FLOPs
in the paper's convention (without the attention matrix products) and fvcore's, beside the paper's figures, and an
empty column for the top-1 that training it reproduces.
"""
import argparse
import math
from typing import Dict, List, Optional, Sequence

import timm
import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape

from .commands import program_name
from .registry import ABLATIONS, MODELS, model_names

# The products of two activations (the attention matrix q k^T and its product with v), which the FAT paper's FLOPs
# leave out; every weight of these models is applied by a conv or a linear op. Named as fvcore's by_operator names them.
ATTENTION_PRODUCT_OPS = ('scaled_dot_product_attention', 'matmul', 'bmm')


def _sdpa_flops(inputs, outputs) -> int:
    """Multiply-adds of q @ k^T and attn @ v inside scaled_dot_product_attention."""
    q_shape, k_shape, v_shape = (get_shape(x) for x in inputs[:3])
    *batch, queries, head_dim = q_shape
    return math.prod(batch) * queries * k_shape[-2] * (head_dim + v_shape[-1])


def flop_counts(model: torch.nn.Module, img_size: int = 224) -> Dict[str, int]:
    """From one trace: fvcore's count (``'total'``) and the paper's, without the attention matrix products
    (``'paper'``)."""
    analysis = FlopCountAnalysis(model.eval(), torch.zeros(1, 3, img_size, img_size))
    analysis.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flops)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with torch.no_grad():
        total = analysis.total()
    by_operator = analysis.by_operator()
    return dict(total=total, paper=total - sum(by_operator.get(op, 0) for op in ATTENTION_PRODUCT_OPS))


def count_flops(model: torch.nn.Module, img_size: int = 224, attention_products: bool = True) -> int:
    """fvcore's count; ``attention_products=False`` leaves out the attention matrix products (the paper's count)."""
    return flop_counts(model, img_size)['total' if attention_products else 'paper']


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(variants: Sequence[str] = model_names(), img_size: int = 224) -> List[Dict]:
    rows = []
    for name in variants:
        model = timm.create_model(name)
        rows.append(dict(model=name, params_m=count_params(model) / 1e6, gflops=count_flops(model, img_size) / 1e9))
    return rows


def measure_ablations(img_size: int = 224) -> List[Dict]:
    """Each ablation row's model measured: params, FLOPs in the paper's convention and fvcore's."""
    measured = {}
    for name in dict.fromkeys(row.model for row in ABLATIONS):
        model = timm.create_model(name)
        flops = flop_counts(model, img_size)
        measured[name] = dict(params_m=count_params(model) / 1e6, paper_gflops=flops['paper'] / 1e9,
                              gflops=flops['total'] / 1e9)
    rows = [dict(row._asdict(), **{f'our_{key}': value for key, value in measured[row.model].items()})
            for row in ABLATIONS]
    fat_b0 = {row['group']: row for row in rows if row['model'] == 'fat_b0'}
    for row in rows:
        # the paper's count of FAT-B0 itself differs from ours (0.72 G in its first table, 0.7 in its second; 0.712
        # here): a row's FLOPs are compared as ours plus that difference of its table
        offset = fat_b0[row['group']]['gflops'] - fat_b0[row['group']]['our_paper_gflops']
        row['matches_paper'] = (_rounds_to(row['params_m'], row['our_params_m'])
                                and _rounds_to(row['gflops'], row['our_paper_gflops'] + offset))
    return rows


def _rounds_to(paper: float, value: float) -> bool:
    """Whether ``value`` rounds to ``paper`` at the paper's precision (its digits after the point)."""
    return round(value, len(repr(paper).split('.')[-1])) == paper


def _figure(value: Optional[float], digits: int = 1) -> str:
    return '–' if value is None else f'{value:.{digits}f}'


def format_ablation_table(rows: List[Dict], markdown: bool = False) -> str:
    header = ['group', 'row', 'model', 'params (M)', 'paper params (M)', 'GFLOPs (paper convention)',
              'GFLOPs (fvcore)', 'paper GFLOPs', 'matches paper', 'paper top-1 (%)', 'reproduced top-1 (%)',
              'paper AP^b', 'paper AP^m', 'paper mIoU']
    lines = [[row['group'], row['row'], row['model'], f"{row['our_params_m']:.2f}", _figure(row['params_m']),
              f"{row['our_paper_gflops']:.3f}", f"{row['our_gflops']:.3f}", str(row['gflops']),
              'yes' if row['matches_paper'] else 'no (see below)', _figure(row['top1']), '', _figure(row['box_ap']),
              _figure(row['mask_ap']), _figure(row['miou'])] for row in rows]
    notes = [f"{row['model']}: {row['deviation']}" for row in rows if row['deviation']]
    return format_lines(header, lines, markdown) + ''.join(f'\n\n{note}' for note in dict.fromkeys(notes))


def format_table(rows: List[Dict], markdown: bool = False) -> str:
    header = ['model', 'params (M)', 'paper params (M)', 'GFLOPs (fvcore)', 'paper GFLOPs', 'paper top-1 (%)']
    lines = []
    for row in rows:
        paper = MODELS[row['model']].paper
        figures = (paper.params_m, paper.gflops, paper.top1) if paper else (None, None, None)
        params_m, gflops, top1 = (_figure(figure) for figure in figures)
        lines.append([row['model'], f"{row['params_m']:.2f}", params_m, f"{row['gflops']:.2f}", gflops, top1])
    return format_lines(header, lines, markdown)


def format_lines(header: List[str], lines: List[List[str]], markdown: bool = False) -> str:
    if markdown:
        table = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        table += ['| ' + ' | '.join(line) + ' |' for line in lines]
        return '\n'.join(table)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines)]
    return '\n'.join('  '.join(str(cell).rjust(width) for cell, width in zip(line, widths))
                     for line in [header] + lines)


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog=program_name(__spec__.name), description=__doc__.splitlines()[0])
    parser.add_argument('--variants', nargs='+', default=model_names(), choices=model_names(), metavar='NAME',
                        help=f'models to measure (default: all of {", ".join(model_names())})')
    parser.add_argument('--img-size', type=int, default=224, help='square input size (default: 224)')
    parser.add_argument('--markdown', action='store_true', help='print a Markdown table')
    parser.add_argument('--ablation', action='store_true',
                        help="print the FAT paper's ablation tables, each row's model measured (ignores --variants)")
    args = parser.parse_args(argv)
    if args.ablation:
        print(format_ablation_table(measure_ablations(args.img_size), markdown=args.markdown))
    else:
        print(format_table(measure(args.variants, args.img_size), markdown=args.markdown))


if __name__ == '__main__':
    main()
