"""Training configuration: the authors' yacs schema, with their ImageNet recipe as the defaults.

A config file states only what differs from these defaults; ``--opts KEY VALUE ...`` overrides any key.
Learning rates are given per 512 images and scaled linearly with the global batch
(per-GPU batch x GPUs x accumulation steps).
"""
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml
from yacs.config import CfgNode as CN

from .commands import PACKAGED_CONFIGS
from .registry import MODELS, model_names

_C = CN()
_C.BASE = ['']

_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # per process
_C.DATA.VAL_BATCH_SIZE = None  # per process; None: DATA.BATCH_SIZE
_C.DATA.DATA_PATH = ''
# The layout of DATA_PATH, named as timm's dataset factory (timm.data.create_dataset) names it:
# '' or 'folder': a folder of class folders per split (DATA_PATH/train/<class>/<image>, DATA_PATH/val/...)
# 'tar': a tar of class folders per split (DATA_PATH/train.tar, DATA_PATH/val.tar)
# 'wds/<name>': WebDataset shards, described by DATA_PATH/_info.json (timm's format: splits, shards, sample counts)
# 'hfds/<name or folder>': a Hugging Face dataset (from the Hub or a local folder); DATA_PATH is its cache ('' for
#     the library's default)
# 'synthetic_shapes': class folders generated into DATA_PATH on first use (the demo)
_C.DATA.DATASET = ''
# the splits' names: '' is 'train', and 'val' for folders and tars, 'validation' for 'wds/' and 'hfds/' (timm's
# and Hugging Face's name); for 'wds/' also a shard pattern with the sample count, 'train-{0000..0099}.tar|128116'
_C.DATA.TRAIN_SPLIT = ''
_C.DATA.VAL_SPLIT = ''
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = 'bicubic'
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
# normalise (and in training randomly erase) batches on the training device, so that the loader's workers only
# decode, crop and augment (timm's prefetcher idea)
_C.DATA.DEVICE_NORMALIZE = False

_C.MODEL = CN()
_C.MODEL.NAME = 'fat_b0'  # a model of classification.registry
_C.MODEL.PRETRAINED = ''  # weights to start from (any format classification.checkpoint_io reads)
_C.MODEL.RESUME = ''
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = None  # None: the registered model's rate
_C.MODEL.LABEL_SMOOTHING = 0.1

_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300  # of the schedule: warm-up, then cosine decay to MIN_LR
_C.TRAIN.COOLDOWN_EPOCHS = 0  # then this many epochs at MIN_LR
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0  # 0 disables clipping
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.KEEP_CHECKPOINTS = 3  # ckpt_epoch_N.pth files kept, the newest (latest.pth and best.pth besides)
_C.TRAIN.ACCUMULATION_STEPS = 1
_C.TRAIN.USE_CHECKPOINT = False  # gradient checkpointing
_C.TRAIN.CHANNELS_LAST = False
_C.TRAIN.COMPILE = False

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLED = False
_C.TRAIN.EMA.DECAY = 0.9998

_C.AUG = CN()
_C.AUG.SCALE = (0.08, 1.0)  # area range of the random resized crop
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'  # 'none' disables it
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'

# Token labelling (LV-ViT's; LVT's recipe), for models with per-token predictions (lvt_cls): the class token learns
# the image label, mixed by MixToken's box; every patch token the dense score map of its place (DATA), or, without
# score maps, its image's label.
_C.TOKEN_LABEL = CN()
_C.TOKEN_LABEL.ENABLED = False
_C.TOKEN_LABEL.DATA = ''  # a folder of score maps, one <class folder>/<image name>.pt per training image
_C.TOKEN_LABEL.MIX_TOKEN = True
_C.TOKEN_LABEL.CLS_WEIGHT = 1.0
_C.TOKEN_LABEL.DENSE_WEIGHT = 0.5

_C.TEST = CN()
_C.TEST.CROP = True  # resize to IMG_SIZE / 0.875 and centre-crop IMG_SIZE; else resize to IMG_SIZE
_C.TEST.CROP_PCT = 0.875

# 'auto': bf16 on GPUs that support it, else fp16 with a GradScaler; off on the CPU
_C.AMP = 'auto'
# where the run writes (and from where it resumes); '': output/<MODEL.NAME>/<config file's path> (_run_name), so
# that runs of different models or config files never share a folder
_C.OUTPUT = ''
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 10
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False

AMP_CHOICES = ('auto', 'bf16', 'fp16', 'off')


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def total_epochs(config: CN) -> int:
    """Epochs of a run: the schedule's and the cool-down's."""
    return config.TRAIN.EPOCHS + config.TRAIN.COOLDOWN_EPOCHS


# DATA.DATASET's names for each layout that the trainer reads; 'imagefolder' is this trainer's former name for folders
_FOLDER_NAMES = ('', 'folder', 'imagefolder', 'synthetic_shapes')
_PREFIXES = ('wds', 'hfds')


def dataset_layout(name: str) -> str:
    """The layout that DATA.DATASET ``name`` names: 'folder', 'tar', 'wds' or 'hfds'. As in timm, the prefix
    before '/' is case-insensitive and the rest is passed on as it is."""
    prefix, slash, rest = name.partition('/')
    if slash and prefix.lower() in _PREFIXES and rest:
        return prefix.lower()
    if name.lower() in _FOLDER_NAMES:
        return 'folder'
    if name.lower() == 'tar':
        return 'tar'
    unsupported = f' ({prefix}/ is one of timm\'s datasets that this trainer does not read)' if slash else ''
    raise ConfigError(f"DATA.DATASET (--dataset) must be '' or 'folder' (class folders), 'tar' (a tar of class "
                      f"folders per split), 'wds/<name>' (WebDataset shards), 'hfds/<name or folder>' (a Hugging Face "
                      f"dataset) or 'synthetic_shapes' (the demo), got {name!r}{unsupported}")


def get_defaults() -> CN:
    return _C.clone()


def _merge_file(config: CN, path: str):
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    with open(path) as f:
        try:
            content = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ConfigError(f'{path} is not valid YAML: {" ".join(str(error).split())}') from None
    content = {} if content is None else content
    if not isinstance(content, dict):
        raise ConfigError(f'{path}: a config file holds a mapping of keys (MODEL:, TRAIN:, ...), this one a '
                          f'{type(content).__name__}')
    for base in content.get('BASE', ['']):
        if base:
            _merge_file(config, os.path.join(os.path.dirname(path), base))
    try:
        config.merge_from_file(path)
    except (KeyError, ValueError) as error:
        raise ConfigError(f'{path}: {_describe(error)}') from None


def _describe(error: Exception) -> str:
    # yacs names the offending key in its messages ("Non-existent config key: X", "Type mismatch ...")
    return str(error.args[0]) if error.args else repr(error)


_CONFIG_DIR = str(PACKAGED_CONFIGS / 'classification')


def _run_name(cfg_path: Optional[str]) -> str:
    """The default output folder's name for a config file: its path without the suffix, relative to this project's
    ``configs/classification`` (``fat_b0``, ``ablation/fat_b0_add``), else to the working directory
    (``exp1/fat_b0``), else absolute: two config files never share a run folder, even under one name."""
    if not cfg_path:
        return 'default'
    path = os.path.splitext(os.path.abspath(cfg_path))[0]
    for root in (_CONFIG_DIR, os.getcwd()):
        relative = os.path.relpath(path, root)
        if not relative.startswith(os.pardir + os.sep):
            return relative
    return path.lstrip(os.sep)


def load_config(cfg_path: Optional[str] = None, opts: Sequence[str] = (), **overrides) -> CN:
    """The defaults, merged with ``cfg_path``, ``opts`` (KEY VALUE pairs), then ``overrides`` whose
    non-None values are set as given (``{'DATA.BATCH_SIZE': 64}``)."""
    config = get_defaults()
    config.defrost()
    if cfg_path:
        _merge_file(config, cfg_path)
    if len(opts) % 2:
        raise ConfigError(f'--opts takes KEY VALUE pairs, got an odd number of items: {list(opts)}')
    try:
        config.merge_from_list(list(opts))
        config.merge_from_list([item for key, value in overrides.items() if value is not None
                                for item in (key, value)])
    except (KeyError, ValueError, AssertionError) as error:
        raise ConfigError(f'--opts: {_describe(error)}') from None
    if not config.OUTPUT:
        config.OUTPUT = os.path.join('output', config.MODEL.NAME, _run_name(cfg_path))
    _validate(config)
    config.freeze()
    return config


# What a resumed run may change without --allow-config-change: where things are and how fast they run, the length
# of the schedule, and the batch per process (the learning-rate schedule is then rebuilt for the new global batch,
# with a warning). Anything else (the model, the recipe, the seed) makes it another run.
RESUMABLE_KEYS = frozenset({
    'OUTPUT', 'MODEL.RESUME', 'MODEL.PRETRAINED', 'TRAIN.AUTO_RESUME', 'TRAIN.START_EPOCH', 'EVAL_MODE',
    'THROUGHPUT_MODE',
    'TRAIN.EPOCHS', 'TRAIN.COOLDOWN_EPOCHS',
    'DATA.DATASET', 'DATA.DATA_PATH', 'DATA.TRAIN_SPLIT', 'DATA.VAL_SPLIT', 'TOKEN_LABEL.DATA', 'DATA.NUM_WORKERS',
    'DATA.PIN_MEMORY',
    'DATA.VAL_BATCH_SIZE', 'DATA.BATCH_SIZE', 'TRAIN.ACCUMULATION_STEPS',
    'AMP', 'TRAIN.COMPILE', 'TRAIN.CHANNELS_LAST', 'TRAIN.USE_CHECKPOINT', 'DATA.DEVICE_NORMALIZE',
    'PRINT_FREQ', 'SAVE_FREQ', 'TRAIN.KEEP_CHECKPOINTS',
})


def _flatten(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def config_changes(saved: str, config: CN) -> List[Tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for every key of the schema whose value ``config`` changes from
    ``saved`` (a run's config as ``CfgNode.dump()`` wrote it), other than RESUMABLE_KEYS. Keys that only one of
    them has (a schema of another version) are not compared."""
    before = _flatten(yaml.safe_load(saved) or {})
    after = _flatten(yaml.safe_load(config.dump()))
    return [(key, before[key], after[key]) for key in sorted(before.keys() & after.keys())
            if key not in RESUMABLE_KEYS and before[key] != after[key]]


def _validate(config: CN):
    if config.AMP not in AMP_CHOICES:
        raise ConfigError(f'AMP must be one of {AMP_CHOICES}, got {config.AMP!r}')
    if config.MODEL.NAME not in model_names(ablations=True):
        raise ConfigError(f'MODEL.NAME must be one of {", ".join(model_names(ablations=True))}, '
                          f'got {config.MODEL.NAME!r}')
    if config.TOKEN_LABEL.ENABLED:
        capable = [name for name, entry in MODELS.items() if entry.token_labelling]
        if config.MODEL.NAME not in capable:
            raise ConfigError(f'TOKEN_LABEL.ENABLED needs a model with per-token predictions ({", ".join(capable)}), '
                              f'MODEL.NAME is {config.MODEL.NAME!r}')
        if config.AUG.MIXUP > 0 or config.AUG.CUTMIX > 0 or config.AUG.CUTMIX_MINMAX is not None:
            raise ConfigError('token labelling mixes with MixToken: set AUG.MIXUP and AUG.CUTMIX to 0')
    elif config.TOKEN_LABEL.DATA:
        raise ConfigError('TOKEN_LABEL.DATA (--token-label-data) is set but TOKEN_LABEL.ENABLED is not')
    dataset_layout(config.DATA.DATASET)
    if not 0 <= config.TRAIN.WARMUP_EPOCHS < config.TRAIN.EPOCHS:
        raise ConfigError(f'TRAIN.WARMUP_EPOCHS ({config.TRAIN.WARMUP_EPOCHS}) must be at least 0 and less than '
                          f'TRAIN.EPOCHS ({config.TRAIN.EPOCHS})')
    if config.TRAIN.COOLDOWN_EPOCHS < 0:
        raise ConfigError(f'TRAIN.COOLDOWN_EPOCHS must be >= 0, got {config.TRAIN.COOLDOWN_EPOCHS}')
    for key, value in (('DATA.BATCH_SIZE', config.DATA.BATCH_SIZE),
                       ('DATA.VAL_BATCH_SIZE', 1 if config.DATA.VAL_BATCH_SIZE is None else config.DATA.VAL_BATCH_SIZE),
                       ('TRAIN.KEEP_CHECKPOINTS', config.TRAIN.KEEP_CHECKPOINTS),
                       ('PRINT_FREQ', config.PRINT_FREQ),
                       ('TRAIN.ACCUMULATION_STEPS', config.TRAIN.ACCUMULATION_STEPS),
                       ('TRAIN.EPOCHS', config.TRAIN.EPOCHS), ('SAVE_FREQ', config.SAVE_FREQ)):
        if value < 1:
            raise ConfigError(f'{key} must be >= 1, got {value}')
