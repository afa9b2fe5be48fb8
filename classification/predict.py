"""Classify images with a FAT or LVT model: the top classes of each image and their probabilities.

    python -m classification.predict IMAGE_OR_FOLDER ... --model fat_b0 [--checkpoint CKPT] [--top-k 5]
        [--batch-size 32] [--output predictions.csv|.json] [--backend onnxruntime|openvino|executorch FILE]

A folder is searched for images (recursively, sorted). ``--checkpoint`` takes any checkpoint the project reads, or a
folder of ``classification.publish``. The preprocessing is evaluation's (``data.build_transform`` of the
checkpoint's recorded image size, interpolation and crop, else of the defaults); the class names are those the
trainer recorded in the checkpoint (its training split's class folders; a published folder's label names), else
ImageNet's for 1000 classes, else the indices. ``--backend RUNTIME FILE`` runs a file of ``classification.export``
in its runtime through the same code (``--checkpoint`` then only names the classes and the preprocessing); a file
that fixes its input (``classification.export --batch-size``: a static program) is run in batches of its batch size,
the last filled up, on images preprocessed to its size; an ExecuTorch program of a bounded batch in batches of at
most its bound. A file that its runtime cannot load, or a batch that it refuses, stops prediction with one line. A
file that is not a readable image is named in one line and left out; the others are still classified.
"""
import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import yaml
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from . import export
from .checkpoint_io import CheckpointError, UnsafeCheckpointError, load_checkpoint_file
from .commands import program_name
from .config import ConfigError, load_config
from .data import build_transform
from .registry import model_names

# what evaluation's preprocessing depends on, taken from a checkpoint's recorded config where it has them
PREPROCESSING_KEYS = ('DATA.IMG_SIZE', 'DATA.INTERPOLATION', 'TEST.CROP', 'TEST.CROP_PCT')
RUNTIMES = {'onnxruntime': 'onnx', 'openvino': 'openvino', 'executorch': 'executorch'}


def _recorded(config: Any, key: str) -> Any:
    for part in key.split('.'):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def _published_preprocessing(pretrained_cfg: Dict) -> Dict[str, Any]:
    """A published folder's ``pretrained_cfg`` (``classification.publish``) in the config's keys."""
    return dict(DATA=dict(IMG_SIZE=pretrained_cfg.get('input_size', [None])[-1],
                          INTERPOLATION=pretrained_cfg.get('interpolation')),
                TEST=dict(CROP=True, CROP_PCT=pretrained_cfg.get('crop_pct')))


def preprocessing(model_name: str, checkpoint: Optional[Dict],
                  img_size: Optional[int] = None) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation's transform of a PIL image (resize, centre crop, normalise), as the checkpoint's run evaluated
    (its recorded config, or a published folder's ``pretrained_cfg``); at ``img_size`` if given."""
    checkpoint = checkpoint or {}
    saved = checkpoint.get('config')
    if isinstance(saved, str):
        saved = yaml.safe_load(saved)
    elif checkpoint.get('pretrained_cfg'):
        saved = _published_preprocessing(checkpoint['pretrained_cfg'])
    opts = ['MODEL.NAME', model_name, 'DATA.DEVICE_NORMALIZE', 'False']
    for key in PREPROCESSING_KEYS:
        value = _recorded(saved, key)
        if value is not None:
            opts += [key, str(value)]
    if img_size is not None:
        opts += ['DATA.IMG_SIZE', str(img_size)]
    return build_transform(load_config(None, opts), is_training=False)


def class_names(checkpoint: Optional[Dict], num_classes: int) -> List[str]:
    recorded = checkpoint.get('classes') if checkpoint else None
    imagenet = timm.data.ImageNetInfo() if num_classes == 1000 else None
    if recorded and len(recorded) == num_classes:
        if imagenet is not None and list(recorded) == list(imagenet.label_names()):  # ImageNet's synset folders
            return [imagenet.index_to_description(index) for index in range(num_classes)]
        return list(recorded)
    if imagenet is not None:
        return [imagenet.index_to_description(index) for index in range(num_classes)]
    return [str(index) for index in range(num_classes)]


def image_files(paths: Sequence[str]) -> Iterator[str]:
    """The files named, and the images in the folders named (recursively, sorted), in order."""
    for path in paths:
        if os.path.isdir(path):
            yield from sorted(str(file) for file in Path(path).rglob('*')
                              if file.is_file() and file.suffix.lower() in IMG_EXTENSIONS)
        else:
            yield path


def _load(path: str, transform) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    try:
        with Image.open(path) as image:
            return transform(image.convert('RGB')), None
    except (OSError, ValueError, SyntaxError) as error:  # missing, unreadable, not an image, truncated
        return None, f'{type(error).__name__}: {error}'


def predict(run: Callable[[torch.Tensor], torch.Tensor], files: Sequence[str], transform,
            names_of: Callable[[int], List[str]], top_k: int, batch_size: int,
            skipped: Callable[[str, str], None]) -> Iterator[Dict]:
    """Per readable image, in order: ``{'image', 'top': [{'index', 'name', 'probability'}, ...]}``; ``names_of``
    gives the class names for the number of classes the model turns out to have."""
    batch: List[Tuple[str, torch.Tensor]] = []
    names: List[str] = []

    def flush() -> Iterator[Dict]:
        if not batch:
            return
        probabilities = run(torch.stack([image for _, image in batch])).float().softmax(dim=-1)
        names[:] = names or names_of(probabilities.shape[-1])
        values, indices = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        for (path, _), row_values, row_indices in zip(batch, values.tolist(), indices.tolist()):
            yield dict(image=path, top=[dict(index=index, name=names[index], probability=value)
                                        for value, index in zip(row_values, row_indices)])
        batch.clear()

    for path in files:
        image, problem = _load(path, transform)
        if image is None:
            skipped(path, problem)
            continue
        batch.append((path, image))
        if len(batch) == batch_size:
            yield from flush()
    yield from flush()


def write_predictions(predictions: List[Dict], output: Path):
    if output.suffix == '.json':
        output.write_text(json.dumps(predictions, indent=1) + '\n')
        return
    with output.open('w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['image', 'rank', 'index', 'name', 'probability'])
        for prediction in predictions:
            for rank, entry in enumerate(prediction['top'], 1):
                writer.writerow([prediction['image'], rank, entry['index'], entry['name'],
                                 f"{entry['probability']:.6f}"])


class BackendFailed(RuntimeError):
    """The runtime of ``--backend`` refused a batch (an input shape that the exported file does not take)."""


def runner(args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model (in PyTorch, its inference form; or the exported file in its runtime) as a function of a batch of
    images to their logits."""
    if args.backend:
        runtime, path = args.backend
        run_array = export.load_runtime(Path(path), RUNTIMES[runtime])

        def run_file(images: torch.Tensor) -> torch.Tensor:
            try:
                return torch.from_numpy(np.asarray(run_array(images.numpy())))
            except Exception as error:  # each runtime raises its own types
                raise BackendFailed(f'{export.RUNTIME_NAMES[RUNTIMES[runtime]]} could not run {path} on a batch of '
                                    f'shape {tuple(images.shape)}: {export.runtime_problem(error)}') from error
        return run_file
    model = export.build_model(args.model, Path(args.checkpoint) if args.checkpoint else None)

    def run_model(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(images)
    return run_model


def file_input(args: argparse.Namespace) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """The batch and the image size that the ``--backend`` file fixes (a static program: ``classification.export
    --batch-size``), and the largest batch it takes (ExecuTorch's bounded dynamic programs); None where any."""
    if not args.backend:
        return None, None, None
    runtime, path = args.backend
    dims, max_batch = export.input_shape(Path(path), RUNTIMES[runtime])
    if len(dims) != 4:
        sys.exit(f'error: {path} takes a {len(dims)}-d input; prediction feeds batches of images (N, 3, H, W)')
    batch, _, height, width = dims
    if height != width:
        sys.exit(f'error: {path} takes {height or "any"}x{width or "any"} images; prediction crops square ones')
    return batch, max_batch, height


def filled_to(batch_size: int, run: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run`` of a program that takes batches of ``batch_size`` only, for a batch of at most that many images: the
    missing ones are zeros, whose outputs are dropped."""
    def run_filled(images: torch.Tensor) -> torch.Tensor:
        filler = images.new_zeros(batch_size - len(images), *images.shape[1:])
        return run(torch.cat([images, filler]))[:len(images)]
    return run_filled


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=program_name(__spec__.name), description=__doc__.splitlines()[0])
    parser.add_argument('images', nargs='+', metavar='IMAGE_OR_FOLDER')
    parser.add_argument('--model', required=True, choices=model_names(), metavar='NAME',
                        help='a registered FAT or LVT model (fat_b0, lvt_cls, ...)')
    parser.add_argument('--checkpoint', help='weights (any checkpoint the project reads; default: random weights)')
    parser.add_argument('--top-k', type=int, default=5, help='classes per image (default: 5)')
    parser.add_argument('--batch-size', type=int, default=32,
                        help="images per forward pass (default: 32; with --backend, a static program's own, and at "
                             "most an ExecuTorch program's largest)")
    parser.add_argument('--output', type=Path, help='write the predictions to a .csv or .json file')
    parser.add_argument('--backend', nargs=2, metavar=('RUNTIME', 'FILE'),
                        help='run an exported FILE in RUNTIME (onnxruntime, openvino, executorch) instead of PyTorch')
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error('--top-k and --batch-size must be at least 1')
    if args.output is not None and args.output.suffix not in ('.csv', '.json'):
        parser.error(f'--output {args.output}: write a .csv or a .json file')
    if args.backend:
        if args.backend[0] not in RUNTIMES:
            parser.error(f'--backend: the runtime is one of {", ".join(RUNTIMES)}, got {args.backend[0]!r}')
        if not os.path.isfile(args.backend[1]):
            parser.error(f'--backend: {args.backend[1]} not found')
    return args


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    try:
        checkpoint = load_checkpoint_file(args.checkpoint) if args.checkpoint else None
        checkpoint = checkpoint if isinstance(checkpoint, dict) else None
        run = runner(args)
        fixed_batch, max_batch, fixed_size = file_input(args)
        transform = preprocessing(args.model, checkpoint, fixed_size)
    except (CheckpointError, UnsafeCheckpointError, ConfigError, FileNotFoundError, export.RuntimeMissing,
            export.UnreadableExport) as error:
        sys.exit(f'error: {error}')
    if fixed_batch:
        run, args.batch_size = filled_to(fixed_batch, run), fixed_batch
    elif max_batch:
        args.batch_size = min(args.batch_size, max_batch)
    if fixed_batch or fixed_size:
        size = f' of {fixed_size}x{fixed_size} pixels' if fixed_size else ''
        print(f'{args.backend[1]} fixes its input: predicting in batches of {args.batch_size} image(s){size}',
              file=sys.stderr)
    skipped = []

    def skip(path: str, problem: str):
        skipped.append(path)
        print(f'skipped {path}: {problem}', file=sys.stderr)

    predictions = []
    try:
        for prediction in predict(run, list(image_files(args.images)), transform,
                                  lambda num_classes: class_names(checkpoint, num_classes), args.top_k,
                                  args.batch_size, skip):
            predictions.append(prediction)
            print(f"{prediction['image']}: " + '; '.join(f"{entry['name']} ({entry['probability']:.1%})"
                                                         for entry in prediction['top']))
    except BackendFailed as error:
        sys.exit(f'error: {error}' + (f'; nothing written to {args.output}' if args.output is not None else ''))
    if args.output is not None:
        write_predictions(predictions, args.output)
        print(f'wrote {len(predictions)} predictions to {args.output}')
    if not predictions:
        sys.exit(f'error: no image could be read ({len(skipped)} skipped)')


if __name__ == '__main__':
    main()
