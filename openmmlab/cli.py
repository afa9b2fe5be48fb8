"""The train and test command lines of ``detection`` and ``segmentation``.

MMDetection's and MMSegmentation's ``tools/train.py`` and ``tools/test.py`` on MMEngine's Runner (the same
arguments, the same ``--cfg-options`` overrides), with bad input reported in a short message instead of a
traceback: a missing config, dataset folder or checkpoint, backbone arguments this project's backbone does not
take, a checkpoint that carries code or does not fit the model. Every other error, from the config of an
upstream component say, keeps its traceback.
"""
import argparse
import inspect
import os
import os.path as osp
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from mmengine.config import Config, DictAction
from mmengine.runner import Runner

from classification.checkpoint_io import CheckpointError, UnsafeCheckpointError
from classification.commands import find_config

from .backbone import BACKBONES, BackboneConfigError

__all__ = ['train', 'test']

# missing files, refused or ill-fitting checkpoints, backbone arguments out of range: this project's own errors,
# reported without a traceback wherever they surface
_INPUT_ERRORS = (FileNotFoundError, CheckpointError, UnsafeCheckpointError, BackboneConfigError)


def _add_common_arguments(parser: argparse.ArgumentParser):
    parser.add_argument('--work-dir', help='directory for logs, checkpoints and metrics '
                                           '(default: ./work_dirs/CONFIG_NAME)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config settings, e.g. train_dataloader.dataset.data_root=/data/coco/ '
                             'train_cfg.max_epochs=1; lists as key="[a,b]" or key=a,b, no spaces')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher: pytorch under torchrun')
    # torch.distributed.launch passes --local-rank (torchrun sets LOCAL_RANK instead)
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)


def _load_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    args.config = find_config(args.config)
    if not osp.isfile(args.config):
        parser.error(f'config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        try:
            cfg.merge_from_dict(args.cfg_options)
        except (KeyError, TypeError, ValueError) as error:
            parser.error(f'--cfg-options: {error}')
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def _dataset_paths(section: str, dataset: Dict) -> Iterator[Tuple[str, str]]:
    """(config key, local path) of a dataset's data_root, or of its ann_file and data_prefix folders."""
    key = f'{section}.dataset'
    while 'dataset' in dataset:  # wrappers: RepeatDataset, ClassBalancedDataset, ...
        dataset, key = dataset['dataset'], f'{key}.dataset'
    data_root = dataset.get('data_root') or ''
    if data_root and not osp.isdir(data_root):
        yield f'{key}.data_root', data_root
        return
    if dataset.get('ann_file'):
        yield f'{key}.ann_file', osp.join(data_root, dataset['ann_file'])
    for name, prefix in (dataset.get('data_prefix') or {}).items():
        if prefix:
            yield f'{key}.data_prefix.{name}', osp.join(data_root, prefix)


def _missing_dataset_paths(cfg: Config, stages: Sequence[str]) -> List[Tuple[str, str]]:
    paths = []
    for stage in stages:
        dataloader = cfg.get(f'{stage}_dataloader')
        if dataloader:
            paths += _dataset_paths(f'{stage}_dataloader', dataloader['dataset'])
        evaluators = cfg.get(f'{stage}_evaluator') or []
        for i, evaluator in enumerate([evaluators] if isinstance(evaluators, dict) else evaluators):
            if evaluator.get('ann_file'):
                key = f'{stage}_evaluator' + ('' if isinstance(evaluators, dict) else f'.{i}')
                paths.append((f'{key}.ann_file', evaluator['ann_file']))
    return [(key, path) for key, path in paths if '://' not in path and not osp.exists(path)]


def _check_datasets(parser: argparse.ArgumentParser, cfg: Config, stages: Sequence[str]):
    missing = _missing_dataset_paths(cfg, stages)
    if missing:
        lines = '\n'.join(f'  {key}: {path}' for key, path in missing)
        parser.error(f'dataset files not found:\n{lines}\n'
                     'point the config at your copy with --cfg-options, e.g. '
                     f'{missing[0][0]}=PATH (see the README)')


def _check_backbone_arguments(parser: argparse.ArgumentParser, cfg: Config):
    """The arguments of a backbone of this project against what its class takes."""
    backbone = (cfg.get('model') or {}).get('backbone') or {}
    backbone_class = BACKBONES.get(backbone.get('type'))
    if backbone_class is None:
        return
    parameters = inspect.signature(backbone_class).parameters
    unexpected = sorted(set(backbone) - {'type'} - set(parameters))
    missing = [name for name, parameter in parameters.items()
               if parameter.default is inspect.Parameter.empty and name not in backbone]
    if unexpected or missing:
        problems = [f"unexpected keyword argument '{name}'" for name in unexpected]
        problems += [f"missing argument '{name}'" for name in missing]
        parser.error(f"model.backbone: {'; '.join(problems)} ({backbone['type']} takes {', '.join(parameters)})")


def _build_runner(cfg: Config) -> Runner:
    try:
        return Runner.from_cfg(cfg)
    except _INPUT_ERRORS as error:
        sys.exit(f'error: cannot build the runner from the config: {error}')


def train(prog: str, description: str, argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument('config', help='config file')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CHECKPOINT',
                        help='resume from CHECKPOINT, or without one from the latest in the work dir')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate by the total batch size / auto_scale_lr.base_batch_size')
    _add_common_arguments(parser)
    args = parser.parse_args(argv)

    cfg = _load_config(parser, args)
    if args.amp:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            parser.error('--auto-scale-lr: the config has no auto_scale_lr.base_batch_size')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    _check_datasets(parser, cfg, ['train', 'val'] if cfg.get('val_cfg') else ['train'])
    _check_backbone_arguments(parser, cfg)

    runner = _build_runner(cfg)
    try:
        runner.train()
    except _INPUT_ERRORS as error:
        sys.exit(f'error: {error}')


def test(prog: str, description: str, argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file of a model trained with this config')
    _add_common_arguments(parser)
    args = parser.parse_args(argv)

    cfg = _load_config(parser, args)
    if not osp.isfile(args.checkpoint):
        parser.error(f'checkpoint not found: {args.checkpoint}')
    _check_datasets(parser, cfg, ['test'])
    _check_backbone_arguments(parser, cfg)

    runner = _build_runner(cfg)
    try:
        # strict: a checkpoint of another model fails here instead of testing half-initialised weights
        runner.load_checkpoint(args.checkpoint, strict=True)
    except _INPUT_ERRORS as error:
        sys.exit(f'error: {error}')
    except RuntimeError as error:
        sys.exit(f'error: {args.checkpoint} does not fit the model of {args.config}:\n{_shorten(str(error))}')
    try:
        runner.test()
    except _INPUT_ERRORS as error:
        sys.exit(f'error: {error}')


def _shorten(message: str, width: int = 300) -> str:
    """MMEngine lists every mismatched key on one line."""
    return '\n'.join(line if len(line) <= width else line[:width] + ' ...'
                     for line in message.strip().splitlines())
