"""Export a classifier of this repository to ONNX, with dynamic batch size and image size, and check it with
onnxruntime.

    python -m classification.export_onnx --model fat_b0 [--checkpoint PATH] --output fat_b0.onnx
        [--opset 18] [--exporter dynamo|torchscript] [--img-size 224] [--training-form] [--no-verify]

The exported graph is the inference form (``timm.utils.reparameterize_model``: FAT's BatchNorms and residual
depthwise convolutions folded) unless ``--training-form`` is given. Without ``--checkpoint`` the weights are
freshly initialised; with one, the model takes its classifier's number of classes. The graph takes ``images``
(batch x 3 x height x width, float32, any batch and size) and gives ``logits``. timm's ``onnx_export`` writes
it; then onnxruntime runs it at two sizes and its outputs are compared with PyTorch's (relative error:
max |difference| / max |PyTorch output|).

Exporters: ``dynamo`` (torch.export, the default; opset 18 and above) or ``torchscript`` (the legacy
tracer, deprecated by PyTorch; opsets 17 and above).
"""
import argparse
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import timm
import torch
from timm.utils import reparameterize_model
from timm.utils.onnx import onnx_export, onnx_forward

from .checkpoint_io import CheckpointError, UnsafeCheckpointError, load_weights
from .registry import model_names

MIN_OPSET = {'dynamo': 18, 'torchscript': 17}
VERIFY_TOLERANCE = 1e-4


def build_model(name: str, checkpoint: Optional[Path] = None, deploy: bool = True) -> torch.nn.Module:
    """Model ``name`` in eval mode with the weights of ``checkpoint`` (any format the project reads, its
    classifier kept whatever its size), in its inference form if ``deploy``."""
    model = timm.create_model(name)
    if checkpoint is not None:
        load_weights(model, checkpoint, head='keep')
    model.eval()
    return reparameterize_model(model) if deploy else model


def check_opset(exporter: str, opset: int):
    if exporter not in MIN_OPSET:
        raise ValueError(f'exporter must be one of {", ".join(MIN_OPSET)}, got {exporter!r}')
    if opset < MIN_OPSET[exporter]:
        raise ValueError(f'the {exporter} exporter needs opset >= {MIN_OPSET[exporter]}, got {opset}'
                         + (' (the torchscript exporter writes opset 17)' if exporter == 'dynamo' else ''))


def export(model: torch.nn.Module, output: Path, opset: int = 18, exporter: str = 'dynamo',
           img_size: int = 224) -> Path:
    """Write ``model`` as ONNX with dynamic batch, height and width (and check the graph with onnx's checker)."""
    check_opset(exporter, opset)
    output.parent.mkdir(parents=True, exist_ok=True)
    # batch 2: an example batch of 1 would let the tracer treat the batch size as a constant
    example = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad(), warnings.catch_warnings():
        # the torchscript exporter is deprecated; its tracer warns about the input checks of
        # torch.nn.functional, which hold for every traced shape
        warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'torch\.onnx|timm\.utils\.onnx')
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning, module='torch.nn.functional')
        onnx_export(model, str(output), example_input=example, opset=opset, dynamic_size=True,
                    use_dynamo=exporter == 'dynamo', input_names=['images'], output_names=['logits'])
    return output


def verify(model: torch.nn.Module, onnx_path: Path, shapes: Sequence[Tuple[int, int, int, int]]) -> List[float]:
    """Relative error of onnxruntime's outputs against ``model``'s for a random input of each shape."""
    try:
        import onnxruntime  # noqa: F401  (timm's onnx_forward imports it)
    except ImportError:
        raise SystemExit('verifying the export needs onnxruntime (pip install onnxruntime), '
                         'or pass --no-verify') from None
    errors = []
    for shape in shapes:
        images = torch.randn(*shape)
        with torch.no_grad():
            expected = model(images)
        actual = torch.from_numpy(onnx_forward(str(onnx_path), images))
        if actual.shape != expected.shape:
            raise RuntimeError(f'onnxruntime gave logits of shape {tuple(actual.shape)} for input {shape}, '
                               f'PyTorch {tuple(expected.shape)}')
        errors.append(((actual - expected).abs().max() / expected.abs().max()).item())
    return errors


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True, choices=model_names(ablations=True), metavar='NAME',
                        help=f'one of {", ".join(model_names(ablations=True))}')
    parser.add_argument('--checkpoint', type=Path, help='weights to export (the authors\' or this project\'s)')
    parser.add_argument('--output', type=Path, required=True, help='the .onnx file to write')
    parser.add_argument('--opset', type=int, help='ONNX opset (default: 18 for dynamo, 17 for torchscript)')
    parser.add_argument('--exporter', choices=tuple(MIN_OPSET), default='dynamo')
    parser.add_argument('--img-size', type=int, default=224, help='size of the example input (default: 224)')
    parser.add_argument('--training-form', action='store_true',
                        help='export the model as built, without folding it into its inference form')
    parser.add_argument('--no-verify', action='store_true', help='skip the onnxruntime check')
    args = parser.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f'--checkpoint {args.checkpoint}: no such file')
    if args.img_size < 32:
        parser.error('--img-size must be at least 32 (the model downsamples by 32)')
    opset = args.opset if args.opset is not None else MIN_OPSET[args.exporter]
    try:
        check_opset(args.exporter, opset)
    except ValueError as error:
        parser.error(str(error))

    try:
        model = build_model(args.model, args.checkpoint, deploy=not args.training_form)
    except (CheckpointError, UnsafeCheckpointError) as error:
        sys.exit(f'error: {error}')
    export(model, args.output, opset=opset, exporter=args.exporter, img_size=args.img_size)
    print(f'wrote {args.output} ({args.model}, opset {opset}, {args.exporter} exporter, '
          f'{"training" if args.training_form else "inference"} form)')
    if not args.no_verify:
        shapes = [(1, 3, args.img_size, args.img_size), (3, 3, args.img_size + 32, args.img_size + 8)]
        errors = verify(model, args.output, shapes)
        for shape, error in zip(shapes, errors):
            print(f'onnxruntime vs PyTorch, input {shape}: relative error {error:.2e}')
        if max(errors) > VERIFY_TOLERANCE:
            raise SystemExit(f'onnxruntime differs from PyTorch by more than {VERIFY_TOLERANCE:g}')


if __name__ == '__main__':
    main()
