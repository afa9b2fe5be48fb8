"""Publish a trained checkpoint the way timm models are shared: the folder ``timm.models.save_for_hf`` writes.

    python -m classification.publish --checkpoint output/fat_b0/best.pth --output fat_b0-imagenet [--model NAME]

The folder holds ``config.json`` (the architecture, ``num_classes``, the class names as ``label_names`` and a
``pretrained_cfg`` with the run's evaluation preprocessing), ``model.safetensors`` (the weights the checkpoint calls
best, ``checkpoint_io.best_weights``: what every loader of this project takes) and ``README.md``, a model card with
the accuracy the run measured, the command and config that trained it, and the license. After ``import
classification`` (or ``import fat_vit``), ``timm.create_model('local-dir:FOLDER', pretrained=True)`` loads it;
``timm.models.push_to_hf_hub`` or ``huggingface-cli upload`` publishes it; ``predict`` and ``export`` take the folder
in place of a checkpoint.
"""
import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import timm
from yacs.config import CfgNode

from . import export
from .checkpoint_io import CheckpointError, UnsafeCheckpointError, best_weights, load_checkpoint_file
from .commands import program_name
from .data import split_name
from .registry import model_names

LICENSE = 'apache-2.0'  # this repository's (LICENSE)


class PublishError(ValueError):
    """A checkpoint or destination that cannot be published."""


def _trainer_config(checkpoint: Dict) -> Optional[CfgNode]:
    saved = checkpoint.get('config')
    return CfgNode.load_cfg(saved) if isinstance(saved, str) else None


def model_card(name: str, num_classes: int, classes: Optional[Sequence[str]], config: Optional[CfgNode],
               accuracy: Optional[str]) -> str:
    lines = ['---', f'license: {LICENSE}', 'library_name: timm', 'tags:', '- image-classification', '- timm',
             '- fat-vit', '---', '', f'# {name}', '',
             f'A `{name}` classifier of {num_classes} classes' +
             (f" ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})" if classes else '') +
             ', trained with fat-vit (FAT: Lightweight Vision Transformer with Bidirectional Interaction, '
             'NeurIPS 2023; LVT: Lite Vision Transformer with Enhanced Self-Attention, CVPR 2022).', '',
             '## Accuracy', '', accuracy or 'Not recorded in the checkpoint this folder was published from.', '',
             '## Use', '', '```python', 'import timm', 'import classification  # or: import fat_vit (registers the '
             'models with timm)', '', "model = timm.create_model('hf-hub:USER/REPO', pretrained=True)  # or "
             "'local-dir:FOLDER'", "data_config = timm.data.resolve_data_config({}, model=model)  # the run's "
             'evaluation preprocessing', '```', '']
    if config is not None:
        lines += ['## Training', '', 'The run that trained these weights, with this config (as the trainer resolved '
                  'it, saved as `config.yaml`):', '', '```bash',
                  'python -m classification.train --cfg config.yaml --data-path DATA', '```', '', '```yaml',
                  config.dump().rstrip(), '```', '']
    lines += ['## License', '', 'The weights and the code are under the Apache License 2.0.', '']
    return '\n'.join(lines)


def publish(checkpoint_path: str, output: Path, model_name: Optional[str] = None) -> Dict:
    """Write the folder; what it holds (``name``, ``num_classes``, ``weights``: which the checkpoint called best)."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise PublishError(f'{output} exists and is not an empty folder: publish into a new one')
    checkpoint = load_checkpoint_file(checkpoint_path)
    if not isinstance(checkpoint, dict):
        raise PublishError(f'{checkpoint_path} holds no weights')
    config = _trainer_config(checkpoint)
    name = model_name or (config.MODEL.NAME if config is not None else None)
    if name is None:
        raise PublishError(f'{checkpoint_path} records no model name (not this trainer\'s checkpoint): pass --model')
    model = export.build_model(name, Path(checkpoint_path), deploy=False)
    weights, reason = best_weights(checkpoint)
    classes = checkpoint.get('classes')
    data_config = None
    accuracy = None
    if config is not None:
        data_config = dict(input_size=(3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE),
                           interpolation=config.DATA.INTERPOLATION,
                           crop_pct=config.TEST.CROP_PCT if config.TEST.CROP else 1.0)
        scores = checkpoint.get('scores') or {}
        if weights in scores:
            accuracy = (f"acc@1 {scores[weights]:.2f} % on the validation split `{split_name(config, training=False)}`"
                        f" of `{config.DATA.DATA_PATH}` ({config.DATA.DATASET or 'class folders'}), after epoch "
                        f"{scores.get('epoch', '?')} of {config.TRAIN.EPOCHS}: {reason}.")
    model_config = dict(label_names=list(classes)) if classes else None
    output.mkdir(parents=True, exist_ok=True)
    timm.models.save_for_hf(model, str(output), model_config=model_config, model_args=dict(
        num_classes=model.num_classes), safe_serialization=True, data_config=data_config)
    if config is not None:
        (output / 'config.yaml').write_text(config.dump())
    (output / 'README.md').write_text(model_card(name, model.num_classes, classes, config, accuracy))
    return dict(name=name, num_classes=model.num_classes, weights=reason)


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog=program_name(__spec__.name), description=__doc__.splitlines()[0])
    parser.add_argument('--checkpoint', required=True, help="a checkpoint (this trainer's, or any the project reads "
                                                            'with --model)')
    parser.add_argument('--output', required=True, type=Path, help='the folder to write (new or empty)')
    parser.add_argument('--model', choices=model_names(), metavar='NAME',
                        help="the model's name (default: the one the trainer recorded)")
    args = parser.parse_args(argv)
    try:
        published = publish(args.checkpoint, args.output, args.model)
    except (PublishError, CheckpointError, UnsafeCheckpointError, FileNotFoundError) as error:
        sys.exit(f'error: {error}')
    print(f"wrote {args.output}: {published['name']}, {published['num_classes']} classes, {published['weights']}; "
          f"load it with timm.create_model('local-dir:{args.output}', pretrained=True) after import classification")


if __name__ == '__main__':
    main()
