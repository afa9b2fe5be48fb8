"""Train and evaluate the models of this repository (FAT, LVT) on ImageNet-style data, on one process or many
(torchrun, DDP).

    python -m classification.train --cfg configs/classification/fat_b0.yaml --data-path /data/imagenet
    torchrun --nproc_per_node 8 -m classification.train --cfg configs/classification/fat_b0.yaml \\
        --data-path /data/imagenet
    torchrun --nproc_per_node 8 -m classification.train --cfg configs/classification/fat_b0.yaml \\
        --dataset wds/imagenet --data-path /data/imagenet-wds   # or tar, hfds/...: see data.py
    python -m classification.train --cfg ... --data-path ... --eval --resume CHECKPOINT
    python -m classification.train --cfg ... --throughput

Everything the run writes goes to --output (by default output/<model>/<config file's path>): ``log.txt``, the
resolved ``config.yaml``, TensorBoard events (x-axis: optimizer steps), ``summary.csv`` (a row per epoch),
``latest.pth``, ``best.pth``, ``ckpt_epoch_N.pth`` every SAVE_FREQ epochs (the newest TRAIN.KEEP_CHECKPOINTS kept)
and ``summary.json`` (each epoch's figures, its last logged interval's among them, and the checkpoint the run
resumed from); ``--eval`` and ``--throughput`` write their own logs there, ``eval_log.txt`` and
``throughput_log.txt``. Restarted with the same --output, a run resumes from ``latest.pth`` (TRAIN.AUTO_RESUME),
unless its config differs in more than ``config.RESUMABLE_KEYS`` (``--allow-config-change`` overrides); a run
already complete stops at once.

The training loop never waits for the device between two reports: the loss, its finiteness and the gradient norm
are summed on the device and read, over all processes, once every PRINT_FREQ batches.
"""
import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import random
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3, accuracy, distribute_bn, update_summary
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map
from tqdm import tqdm
from yacs.config import CfgNode

from .checkpoint_io import (CheckpointError, UnsafeCheckpointError, best_weights, higher_scoring, load_checkpoint_file,
                            load_weights, weight_entries)
from .checkpointing import Checkpointer, is_trainer_checkpoint, set_rng_state
from .commands import find_config, program_name, progress
from .config import ConfigError, config_changes, load_config, total_epochs
from .data import (DatasetError, DeviceNormalize, build_datasets, build_train_loader, build_val_dataset,
                   build_val_loader, describe, split_name)
from .synthetic_shapes import ensure_synthetic_shapes
from .token_labelling import TokenLabelLoss

_logger = logging.getLogger(__spec__.name)  # classification.train, or fat_vit.classification.train installed

THROUGHPUT_BATCH = 64
LR_REFERENCE_BATCH = 512


class NonFiniteLossError(FloatingPointError):
    pass


class Distributed:
    """This process's place in the job; a single process when not started by torchrun."""

    def __init__(self):
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        self.rank = int(os.environ.get('RANK', 0))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device('cuda', self.local_rank)
        else:
            self.device = torch.device('cpu')
        if self.enabled:
            dist.init_process_group('nccl' if self.device.type == 'cuda' else 'gloo')

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> torch.Tensor:
        return self.sum_tensor(torch.tensor(values, dtype=torch.float64, device=self.device))

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (in place)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=program_name(__spec__.name), description='Train or evaluate FAT or LVT',
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument('--cfg', required=True, metavar='FILE',
                        help="yacs config file, or a packaged config's path under configs/\n"
                             '(classification/fat_b0.yaml)')
    parser.add_argument('--data-path', help='the dataset (DATA.DATA_PATH): a folder with train/ and val/ class\n'
                                            'folders, or train.tar and val.tar, or WebDataset shards and _info.json')
    parser.add_argument('--dataset', metavar='NAME',
                        help="its layout, as timm names it (DATA.DATASET): '' or 'folder' (the default), 'tar',\n"
                             "'wds/<name>', 'hfds/<name or folder>'")
    parser.add_argument('--batch-size', type=int, help='images per process (DATA.BATCH_SIZE)')
    parser.add_argument('--output', help='folder for checkpoints and logs (OUTPUT; default '
                                         'output/<model>/<config file\'s path>)')
    parser.add_argument('--resume', metavar='CKPT', help='checkpoint to resume from or to evaluate (MODEL.RESUME)')
    parser.add_argument('--allow-config-change', action='store_true',
                        help='resume a run whose saved config differs from this one in more than where and how\n'
                             'fast it runs (the differences are logged)')
    parser.add_argument('--token-label-data', metavar='DIR',
                        help='score maps for token labelling (TOKEN_LABEL.DATA; the model\'s config enables it)')
    parser.add_argument('--eval', action='store_true', help='evaluate --resume CKPT and exit')
    parser.add_argument('--throughput', action='store_true', help='measure inference img/s and exit')
    parser.add_argument('--opts', nargs='+', default=[], metavar='KEY VALUE', help='config overrides, e.g. TRAIN.EPOCHS 2')
    return parser.parse_args(argv)


def setup_logging(output: Optional[str], distributed: Distributed, file_name: str = 'log.txt'):
    """Rank 0 logs everything to the console and ``output``/``file_name``; other ranks log warnings (corrupt
    images) to both. Without ``output``, to the console only."""
    level = logging.INFO if distributed.is_main else logging.WARNING
    formatter = logging.Formatter(f'[%(asctime)s rank{distributed.rank}] %(message)s', '%Y-%m-%d %H:%M:%S')
    handlers = [logging.StreamHandler(sys.stdout)]
    if output is not None:
        os.makedirs(output, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output, file_name)))
    root = logging.getLogger()
    root.handlers.clear()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(level)
        root.addHandler(handler)
    root.setLevel(level)


def resolve_amp(setting: str, device: torch.device) -> Optional[torch.dtype]:
    if setting == 'off' or (setting == 'auto' and device.type != 'cuda'):
        return None
    if setting == 'auto':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {'bf16': torch.bfloat16, 'fp16': torch.float16}[setting]


def global_batch_size(config: CfgNode, world_size: int) -> int:
    """Images per optimizer step, over all processes and accumulated batches."""
    return config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS


def scaled_learning_rates(config: CfgNode, world_size: int) -> Dict[str, float]:
    """Learning rates of the recipe (given per 512 images), scaled linearly with the global batch."""
    scale = global_batch_size(config, world_size) / LR_REFERENCE_BATCH
    return dict(lr=config.TRAIN.BASE_LR * scale, warmup_lr=config.TRAIN.WARMUP_LR * scale,
                min_lr=config.TRAIN.MIN_LR * scale)


def build_scheduler(config: CfgNode, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    world_size: int) -> CosineLRScheduler:
    """Per-step cosine schedule with linear warm-up, stepped with ``step_update(global_step)``."""
    rates = scaled_learning_rates(config, world_size)
    warmup_steps = config.TRAIN.WARMUP_EPOCHS * steps_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=(config.TRAIN.EPOCHS - config.TRAIN.WARMUP_EPOCHS) * steps_per_epoch,
        lr_min=rates['min_lr'], warmup_lr_init=rates['warmup_lr'], warmup_t=warmup_steps,
        warmup_prefix=True, cycle_limit=1, t_in_epochs=False)


def build_optimizer(config: CfgNode, model: nn.Module, world_size: int, device: torch.device):
    name = config.TRAIN.OPTIMIZER.NAME.lower()
    if name == 'adamw':
        extra = dict(eps=config.TRAIN.OPTIMIZER.EPS, betas=tuple(config.TRAIN.OPTIMIZER.BETAS),
                     fused=device.type == 'cuda')
    elif name == 'sgd':
        extra = dict(momentum=config.TRAIN.OPTIMIZER.MOMENTUM, nesterov=True)
    else:
        raise ConfigError(f"TRAIN.OPTIMIZER.NAME must be 'adamw' or 'sgd', got {config.TRAIN.OPTIMIZER.NAME!r}")
    # timm's factory puts norms and biases (1-D parameters) in a group without weight decay
    return create_optimizer_v2(model, opt=name, lr=scaled_learning_rates(config, world_size)['lr'],
                               weight_decay=config.TRAIN.WEIGHT_DECAY, **extra)


def build_mixup(config: CfgNode) -> Optional[Mixup]:
    if config.AUG.MIXUP <= 0 and config.AUG.CUTMIX <= 0 and config.AUG.CUTMIX_MINMAX is None:
        return None
    if config.DATA.BATCH_SIZE % 2:
        raise ConfigError(f'Mixup/CutMix need an even DATA.BATCH_SIZE, got {config.DATA.BATCH_SIZE}')
    return Mixup(mixup_alpha=config.AUG.MIXUP, cutmix_alpha=config.AUG.CUTMIX, cutmix_minmax=config.AUG.CUTMIX_MINMAX,
                 prob=config.AUG.MIXUP_PROB, switch_prob=config.AUG.MIXUP_SWITCH_PROB, mode=config.AUG.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


def build_criterion(config: CfgNode, mixup: Optional[Mixup]) -> nn.Module:
    if config.TOKEN_LABEL.ENABLED:
        return TokenLabelLoss(config.MODEL.NUM_CLASSES, cls_weight=config.TOKEN_LABEL.CLS_WEIGHT,
                              dense_weight=config.TOKEN_LABEL.DENSE_WEIGHT, smoothing=config.MODEL.LABEL_SMOOTHING)
    if mixup is not None:
        return SoftTargetCrossEntropy()  # Mixup already smooths the targets
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def build_model(config: CfgNode, pretrained: bool = True) -> nn.Module:
    """The configured model; drop path at the registered model's rate unless MODEL.DROP_PATH_RATE sets one, its
    dense training output for token labelling, and with ``pretrained`` MODEL.PRETRAINED's weights (those the
    checkpoint calls best, less a classifier of another size) if given."""
    options = dict(drop_rate=config.MODEL.DROP_RATE)
    if config.MODEL.DROP_PATH_RATE is not None:
        options['drop_path_rate'] = config.MODEL.DROP_PATH_RATE
    if config.TOKEN_LABEL.ENABLED:
        options.update(return_dense=True, mix_token=config.TOKEN_LABEL.MIX_TOKEN)
    model = timm.create_model(config.MODEL.NAME, num_classes=config.MODEL.NUM_CLASSES, **options)
    if pretrained and config.MODEL.PRETRAINED:
        load_weights(model, config.MODEL.PRETRAINED, head='drop', logger=_logger)
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing()
    return model


# ---- training and evaluation --------------------------------------------------------------------------------


class BatchPreparation:
    """A loader's batch on the training device: normalised there under DATA.DEVICE_NORMALIZE, channels-last under
    TRAIN.CHANNELS_LAST."""

    def __init__(self, config: CfgNode, device: torch.device):
        self.device = device
        self.channels_last = config.TRAIN.CHANNELS_LAST
        self.normalize = DeviceNormalize(config, device) if config.DATA.DEVICE_NORMALIZE else None

    def __call__(self, images: torch.Tensor, targets, training: bool):
        images = images.to(self.device, non_blocking=True)
        if self.normalize is not None:
            images = self.normalize(images, training)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, tree_map(lambda tensor: tensor.to(self.device, non_blocking=True), targets)


@torch.no_grad()
def evaluate(model: nn.Module, loader, distributed: Distributed, amp_dtype: Optional[torch.dtype],
             prepare: BatchPreparation) -> Dict[str, float]:
    model.eval()
    correct1 = correct5 = count = loss_sum = corrupt = 0
    for images, targets, num_corrupt in progress(loader, desc='evaluating', enabled=distributed.is_main):
        corrupt += num_corrupt
        if not len(images):
            continue
        images, targets = prepare(images, targets, training=False)
        with torch.autocast(distributed.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction='sum').item()
        acc1, acc5 = accuracy(logits, targets, topk=(1, 5))
        correct1 += round(acc1.item() * len(targets) / 100)
        correct5 += round(acc5.item() * len(targets) / 100)
        count += len(targets)
    correct1, correct5, count, loss_sum, corrupt = distributed.sum([correct1, correct5, count, loss_sum, corrupt]).tolist()
    if corrupt:
        _logger.warning('evaluation skipped %d corrupt image(s)', corrupt)
    if not count:
        raise DatasetError('no readable validation image')
    return dict(acc1=100 * correct1 / count, acc5=100 * correct5 / count, loss=loss_sum / count, images=int(count))


def evaluate_with_ema(model: nn.Module, ema_model: Optional[nn.Module], loader, distributed: Distributed,
                      amp_dtype: Optional[torch.dtype], prepare: BatchPreparation) -> Dict[str, float]:
    metrics = evaluate(model, loader, distributed, amp_dtype, prepare)
    if ema_model is not None:
        ema = evaluate(ema_model, loader, distributed, amp_dtype, prepare)
        metrics.update(ema_acc1=ema['acc1'], ema_acc5=ema['acc5'])
    return metrics


def prepare_datasets(config: CfgNode, distributed: Distributed):
    _ensure_generated_data(config, distributed)
    train_set, val_set = build_datasets(config)
    _logger.info('data: training %s; validation %s', describe(train_set), describe(val_set))
    return train_set, val_set


def _ensure_generated_data(config: CfgNode, distributed: Distributed):
    if config.DATA.DATASET == 'synthetic_shapes' and distributed.is_main:
        ensure_synthetic_shapes(config.DATA.DATA_PATH, seed=config.SEED)
    distributed.barrier()


def evaluate_checkpoint(config: CfgNode, distributed: Distributed) -> Dict:
    """Accuracy of a checkpoint's weights (this trainer's or another's: the authors', a timm trainer's, a state
    dict) and of its EMA weights where it has them, on the validation split alone; which of the two the checkpoint
    calls best (``checkpoint_io.best_weights``, what every loader takes)."""
    if not config.MODEL.RESUME:
        raise ConfigError('--eval needs --resume CHECKPOINT')
    checkpoint = load_checkpoint_file(config.MODEL.RESUME)
    _ensure_generated_data(config, distributed)
    val_set = build_val_dataset(config)
    _logger.info('data: validation %s', describe(val_set))
    loader = build_val_loader(config, val_set, distributed.world_size, distributed.rank)
    memory_format = torch.channels_last if config.TRAIN.CHANNELS_LAST else torch.preserve_format

    def model_from(key: Optional[str]) -> nn.Module:
        model = build_model(config, pretrained=False)
        load_weights(model, checkpoint, head='fail', key=key, logger=_logger, name=config.MODEL.RESUME)
        return model.to(distributed.device, memory_format=memory_format)

    model_key, ema_key = weight_entries(checkpoint)
    best_key, reason = best_weights(checkpoint)
    amp_dtype = resolve_amp(config.AMP, distributed.device)
    metrics = evaluate_with_ema(model_from(model_key), model_from(ema_key) if model_key and ema_key else None, loader,
                                distributed, amp_dtype, BatchPreparation(config, distributed.device))
    _logger.info('%s on %d images: acc@1 %.2f %%  acc@5 %.2f %%%s', config.MODEL.RESUME, metrics['images'],
                 metrics['acc1'], metrics['acc5'],
                 f"  (EMA {ema_key!r} acc@1 {metrics['ema_acc1']:.2f} %  acc@5 {metrics['ema_acc5']:.2f} %)"
                 if 'ema_acc1' in metrics else '')
    if model_key and ema_key:
        _logger.info('the weights the checkpoint calls best, which every loader takes: %s', reason)
    return dict(metrics, checkpoint=config.MODEL.RESUME, best_weights=best_key)


class _Interval:
    """The hot loop's sums between two reports. The loss and the gradient norm stay on the device: reading them, once
    per report, is the loop's only wait for the device."""

    def __init__(self, device: torch.device, first_batch: int):
        self.first_batch = first_batch
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.batches = self.steps = self.corrupt = 0
        self.data_seconds = 0.
        self.start = time.perf_counter()


def _validation_split(saved_config: Optional[str]) -> Optional[str]:
    """The validation split of a run's saved config (``CfgNode.dump()``), None where it does not say (a checkpoint
    of another trainer, or of a schema without DATA.VAL_SPLIT)."""
    saved = CfgNode.load_cfg(saved_config) if isinstance(saved_config, str) else CfgNode()
    if 'VAL_SPLIT' not in saved.get('DATA', {}) or 'DATASET' not in saved.DATA:
        return None
    return split_name(saved, training=False)


class Trainer:
    def __init__(self, config: CfgNode, distributed: Distributed):
        self.config = config
        self.distributed = distributed
        self.device = distributed.device
        self.amp_dtype = resolve_amp(config.AMP, self.device)
        self.epochs = total_epochs(config)
        self.checkpointer = Checkpointer(config.OUTPUT, distributed.rank, distributed.world_size,
                                         keep=config.TRAIN.KEEP_CHECKPOINTS)
        self.prepare = BatchPreparation(config, self.device)

        train_set, val_set = prepare_datasets(config, distributed)
        self.classes = train_set.classes  # the class names by label, saved for predictions (None for shards)
        self.train_loader, self.train_sampler = build_train_loader(config, train_set, distributed.world_size,
                                                                   distributed.rank)
        self.val_loader = build_val_loader(config, val_set, distributed.world_size, distributed.rank)

        self.model = build_model(config).to(self.device)
        if config.TRAIN.CHANNELS_LAST:
            self.model = self.model.to(memory_format=torch.channels_last)
        if distributed.enabled and self.device.type == 'cuda':
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif distributed.enabled:
            _logger.info('SyncBatchNorm needs CUDA: BatchNorm statistics stay per process on the CPU (rank 0\'s are '
                         'broadcast before each evaluation)')
        self.train_model = self.model
        if distributed.enabled:
            # broadcasts rank 0's weights (each rank drew its own initialisation, with seed SEED + rank)
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[distributed.local_rank] if self.device.type == 'cuda' else None)
        # after the broadcast: every rank's EMA starts from the weights that every rank trains
        self.ema = ModelEmaV3(self.model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLED else None
        # timm's EMA restarts from the weights at optimizer step 1; not when it holds a checkpoint's
        self.ema_restarts = True
        if config.TRAIN.COMPILE:
            self.train_model = torch.compile(self.train_model)

        self.steps_per_epoch = len(self.train_loader) // config.TRAIN.ACCUMULATION_STEPS
        if self.steps_per_epoch < 1:
            raise ConfigError(f'an epoch has {len(self.train_loader)} batches, fewer than '
                              f'TRAIN.ACCUMULATION_STEPS ({config.TRAIN.ACCUMULATION_STEPS})')
        self.optimizer = build_optimizer(config, self.model, distributed.world_size, self.device)
        self.scheduler = build_scheduler(config, self.optimizer, self.steps_per_epoch, distributed.world_size)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.mixup = build_mixup(config)
        self.criterion = build_criterion(config, self.mixup)
        if config.TOKEN_LABEL.ENABLED:
            _logger.info('token labelling%s, MixToken %s', f' with the score maps of {config.TOKEN_LABEL.DATA}'
                         if config.TOKEN_LABEL.DATA else ' without score maps (no TOKEN_LABEL.DATA): the patch tokens '
                         "learn their image's label", 'on' if config.TOKEN_LABEL.MIX_TOKEN else 'off')
        self.start_epoch = config.TRAIN.START_EPOCH
        self.max_accuracy = 0.0
        self.history = []
        self.resumed_from = None
        self.writer = None
        if distributed.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(config.OUTPUT, 'tensorboard'))

    def close(self):
        if self.writer is not None:
            self.writer.close()

    def resume(self, checkpoint: Dict, path: str):
        """Continue from a checkpoint: this trainer's (weights, optimizer, EMA, epoch, random state), or the weights
        of any other (another trainer's, such as the authors', or a state dict), with their EMA weights where they
        have some; training then starts at TRAIN.START_EPOCH."""
        model_key, ema_key = weight_entries(checkpoint)
        load_weights(self.model, checkpoint, head='fail', key=model_key, logger=_logger, name=path)
        self.ema_restarts = False
        if self.ema is not None:
            if ema_key is not None:
                load_weights(self.ema.module, checkpoint, head='fail', key=ema_key, logger=_logger, name=path)
            else:
                self.ema.set(self.model)
                _logger.info('%s holds no EMA weights: the EMA starts from its weights', path)
        elif ema_key is not None:
            _logger.info('%s holds EMA weights (%r), which this run does not keep (TRAIN.EMA.ENABLED False)', path,
                         ema_key)
        if not is_trainer_checkpoint(checkpoint):
            kind = "another trainer's checkpoint" if 'optimizer' in checkpoint else 'weights only'
            _logger.info('%s holds %s: its weights%s are loaded, and training starts at epoch %d with a new '
                         'optimizer and schedule', path, kind, ' and EMA weights' if ema_key and self.ema else '',
                         self.start_epoch + 1)
            return
        self.optimizer.load_state_dict(checkpoint['optimizer'])
        self._load_scaler(checkpoint.get('scaler') or {}, path)
        self.start_epoch = checkpoint['epoch'] + 1
        self.resumed_from = dict(checkpoint=path, epochs_done=self.start_epoch)
        self.max_accuracy = checkpoint['max_accuracy']
        saved_split, split = _validation_split(checkpoint.get('config')), split_name(self.config, training=False)
        if saved_split not in (None, split):
            _logger.warning("%s scored its best on the validation split %r, this run validates on %r: the best "
                            "checkpoint starts anew from this run's scores", path, saved_split, split)
            self.max_accuracy = 0.0
        self.history = checkpoint.get('history', [])
        # the learning-rate schedule is this run's (built from its config), at the resumed step
        self.scheduler.step_update(self.start_epoch * self.steps_per_epoch)
        schedule = (checkpoint.get('global_batch'), checkpoint.get('steps_per_epoch'))
        current = (global_batch_size(self.config, self.distributed.world_size), self.steps_per_epoch)
        if schedule != current:
            _logger.warning('%s was trained with a global batch of %s, %s steps per epoch; this run has %d, %d: the '
                            'learning-rate schedule is rebuilt for this run from epoch %d', path, *schedule, *current,
                            self.start_epoch + 1)
        rng = checkpoint.get('rng')
        if rng and len(rng) == self.distributed.world_size:
            set_rng_state(rng[self.distributed.rank])
        else:
            _logger.warning('%s was written by %s processes, this run has %d: random state not restored', path,
                            len(rng) if rng else 'an unknown number of', self.distributed.world_size)
        _logger.info('resuming from %s: epoch %d done, best acc@1 %.2f %%', path, checkpoint['epoch'] + 1,
                     self.max_accuracy)

    def _load_scaler(self, state: Dict, path: str):
        if self.scaler.is_enabled() and not state:
            _logger.warning('%s has no fp16 loss-scale state (trained in bf16 or float32): the GradScaler starts '
                            'afresh', path)
        elif not self.scaler.is_enabled() and state:
            _logger.warning('%s has fp16 loss-scale state, which this run (AMP %s on %s) does not use', path,
                            self.amp_dtype or 'off', self.device.type)
        else:
            self.scaler.load_state_dict(state)

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        config = self.config
        self.train_model.train()
        self.train_sampler.set_epoch(epoch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        accumulation = config.TRAIN.ACCUMULATION_STEPS
        num_batches = self.steps_per_epoch * accumulation
        loss_sum = corrupt = 0.
        start = time.perf_counter()
        bar = progress(total=num_batches, desc=f'epoch {epoch + 1}/{self.epochs}', enabled=self.distributed.is_main)
        interval = _Interval(self.device, first_batch=1)
        batches = iter(self.train_loader)
        for index in range(num_batches):
            waited = time.perf_counter()
            images, targets, num_corrupt = next(batches)
            interval.data_seconds += time.perf_counter() - waited
            interval.corrupt += num_corrupt
            images, targets = self.prepare(images, targets, training=True)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            stepping = (index + 1) % accumulation == 0
            no_sync = self.train_model.no_sync if self.distributed.enabled and not stepping else contextlib.nullcontext
            with no_sync():
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.criterion(self.train_model(images), targets)
                self.scaler.scale(loss / accumulation).backward()
            interval.loss += loss.detach().float()
            interval.batches += 1
            if stepping:
                interval.grad_norm += self.optimizer_step(epoch * self.steps_per_epoch + (index + 1) // accumulation)
                interval.steps += 1
            bar.update()
            if (index + 1) % config.PRINT_FREQ == 0 or index + 1 == num_batches:
                last_interval = self._report(interval, epoch, index + 1, num_batches, start, bar)
                loss_sum += last_interval.pop('loss_sum')
                corrupt += last_interval.pop('corrupt')
                interval = _Interval(self.device, first_batch=index + 2)
        bar.close()
        if corrupt:
            _logger.warning('epoch %d: %d corrupt image(s) skipped', epoch + 1, corrupt)
        elapsed = time.perf_counter() - start
        images = num_batches * config.DATA.BATCH_SIZE * self.distributed.world_size
        return dict(loss=loss_sum / (num_batches * self.distributed.world_size), images_per_second=images / elapsed,
                    seconds=elapsed, corrupt=int(corrupt), last_interval=last_interval)

    def _report(self, interval: _Interval, epoch: int, batch: int, num_batches: int, epoch_start: float,
                bar: tqdm) -> Dict[str, float]:
        """Read an interval's sums over all processes (the one wait for the device), stop if the loss was not
        finite, and log the interval's averages; those averages, with the interval's loss sum and corrupt images
        (``loss_sum``, ``corrupt``)."""
        world_size = self.distributed.world_size
        totals = torch.stack([interval.loss, interval.grad_norm,
                              torch.tensor(float(interval.corrupt), device=self.device)]).double()
        loss_sum, grad_norm_sum, corrupt = self.distributed.sum_tensor(totals).tolist()
        if not math.isfinite(loss_sum):
            where = f'step {batch}/{num_batches}' if interval.first_batch == batch else \
                f'steps {interval.first_batch}-{batch}/{num_batches}'
            raise NonFiniteLossError(f'non-finite loss at epoch {epoch + 1}, {where}: stopping')
        now = time.perf_counter()
        seconds = now - interval.start
        stats = dict(loss=loss_sum / (interval.batches * world_size),
                     lr=self.optimizer.param_groups[0]['lr'],
                     images_per_second=interval.batches * self.config.DATA.BATCH_SIZE * world_size / seconds,
                     data_seconds=interval.data_seconds / interval.batches,
                     compute_seconds=(seconds - interval.data_seconds) / interval.batches)
        if interval.steps:
            stats['grad_norm'] = grad_norm_sum / (interval.steps * world_size)
        if self.scaler.is_enabled():
            stats['loss_scale'] = self.scaler.get_scale()
        if self.device.type == 'cuda':
            stats['peak_memory_gib'] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        eta = (now - epoch_start) / batch * (num_batches - batch)
        _logger.info('epoch %d/%d step %d/%d  loss %.4f  lr %.3e  %s%.1f img/s  data %.3f s  compute %.3f s per batch'
                     '%s%s  eta %s', epoch + 1, self.epochs, batch, num_batches, stats['loss'], stats['lr'],
                     f"grad norm {stats['grad_norm']:.3f}  " if 'grad_norm' in stats else '',
                     stats['images_per_second'], stats['data_seconds'], stats['compute_seconds'],
                     f"  loss scale {stats['loss_scale']:g}" if 'loss_scale' in stats else '',
                     f"  peak memory {stats['peak_memory_gib']:.2f} GiB" if 'peak_memory_gib' in stats else '',
                     datetime.timedelta(seconds=int(eta)))
        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}",
                        img_s=f"{stats['images_per_second']:.1f}")
        if self.writer is not None:
            step = epoch * self.steps_per_epoch + batch // self.config.TRAIN.ACCUMULATION_STEPS
            for name, value in stats.items():
                self.writer.add_scalar(f'train/{name}', value, step)
        return dict(stats, loss_sum=loss_sum, corrupt=corrupt)

    def optimizer_step(self, global_step: int) -> torch.Tensor:
        """Clip (TRAIN.CLIP_GRAD), step, schedule and average; the gradient norm before clipping, on the device."""
        self.scaler.unscale_(self.optimizer)
        if self.config.TRAIN.CLIP_GRAD > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.TRAIN.CLIP_GRAD)
        else:
            grad_norm = nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step_update(global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=global_step if self.ema_restarts else None)
        return grad_norm

    def evaluate(self) -> Dict[str, float]:
        if self.distributed.enabled:
            # without SyncBatchNorm (on the CPU) each rank's BatchNorm statistics saw its own batches: every rank
            # evaluates (and rank 0 saves) rank 0's, as the next training step would use them
            distribute_bn(self.model, self.distributed.world_size, reduce=False)
            if self.ema is not None:
                distribute_bn(self.ema.module, self.distributed.world_size, reduce=False)
        return evaluate_with_ema(self.model, self.ema.module if self.ema else None, self.val_loader, self.distributed,
                                 self.amp_dtype, self.prepare)

    def fit(self) -> Dict:
        config = self.config
        _logger.info('training %s for epochs %d-%d, %d steps each, lr %.3e for a global batch of %d', config.MODEL.NAME,
                     self.start_epoch + 1, self.epochs, self.steps_per_epoch,
                     scaled_learning_rates(config, self.distributed.world_size)['lr'],
                     global_batch_size(config, self.distributed.world_size))
        started = time.time()
        for epoch in range(self.start_epoch, self.epochs):
            train_stats = self.train_one_epoch(epoch)
            metrics = self.evaluate()
            # recorded in every checkpoint: the loaders take the higher-scoring weights (checkpoint_io.best_weights)
            scores = dict(epoch=epoch + 1, metric='acc1', model=metrics['acc1'])
            if 'ema_acc1' in metrics:
                scores['model_ema'] = metrics['ema_acc1']
            winner = higher_scoring(scores)
            accuracy1 = scores[winner]
            best = dict(weights='ema' if winner == 'model_ema' else 'model', metric='acc1', value=accuracy1,
                        epoch=epoch + 1) if accuracy1 > self.max_accuracy else None
            self.max_accuracy = max(self.max_accuracy, accuracy1)
            epochs_done = epoch + 1 - self.start_epoch
            run_eta = (time.time() - started) / epochs_done * (self.epochs - epoch - 1)
            _logger.info('epoch %d/%d: train loss %.4f, %.1f img/s; val acc@1 %.2f %% acc@5 %.2f %%%s; best %.2f %%; '
                         'run eta %s', epoch + 1, self.epochs, train_stats['loss'], train_stats['images_per_second'],
                         metrics['acc1'], metrics['acc5'],
                         f" (EMA {metrics['ema_acc1']:.2f} %)" if 'ema_acc1' in metrics else '', self.max_accuracy,
                         datetime.timedelta(seconds=int(run_eta)))
            if self.distributed.is_main:
                step = (epoch + 1) * self.steps_per_epoch
                for name, value in metrics.items():
                    self.writer.add_scalar(f'val/{name}', value, step)
                self.writer.add_scalar('train/epoch_loss', train_stats['loss'], step)
                self.writer.flush()
                update_summary(epoch + 1, dict(loss=train_stats['loss'],
                                               images_per_second=train_stats['images_per_second']),
                               metrics, os.path.join(config.OUTPUT, 'summary.csv'),
                               lr=self.optimizer.param_groups[0]['lr'])
            self.history.append(dict(epoch=epoch + 1, train_loss=train_stats['loss'],
                                     **{k: v for k, v in train_stats.items() if k != 'loss'},
                                     val_loss=metrics['loss'], **{k: v for k, v in metrics.items() if k != 'loss'}))
            self.checkpointer.save(dict(self.state(epoch), scores=scores), epoch, best, config.SAVE_FREQ,
                                   last_epoch=epoch + 1 == self.epochs)
        return dict(model=config.MODEL.NAME, epochs=self.epochs, max_accuracy=self.max_accuracy,
                    final=self.history[-1] if self.history else None, train_seconds_this_run=time.time() - started,
                    world_size=self.distributed.world_size,
                    global_batch=global_batch_size(config, self.distributed.world_size),
                    resumed_from=self.resumed_from, history=self.history)

    def state(self, epoch: int) -> Dict:
        return dict(model=self.model.state_dict(), model_ema=self.ema.module.state_dict() if self.ema else None,
                    optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), epoch=epoch,
                    max_accuracy=self.max_accuracy, history=self.history, config=self.config.dump(),
                    global_batch=global_batch_size(self.config, self.distributed.world_size),
                    steps_per_epoch=self.steps_per_epoch, classes=self.classes)


@torch.no_grad()
def measure_throughput(config: CfgNode, device: torch.device, amp_dtype: Optional[torch.dtype],
                       batch_size: int = THROUGHPUT_BATCH, warmup: int = 50, iterations: int = 30) -> float:
    """Inference images per second, as the paper measures it: one batch of 64, after warm-up."""
    model = build_model(config).to(device).eval()
    images = torch.randn(batch_size, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE, device=device)
    if config.TRAIN.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    if config.TRAIN.COMPILE:
        model = torch.compile(model)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for _ in range(warmup):
            model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iterations):
            model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize()
    return batch_size * iterations / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> Optional[Dict]:
    config = load_config(find_config(args.cfg), args.opts, **{
        'DATA.DATA_PATH': args.data_path, 'DATA.DATASET': args.dataset, 'DATA.BATCH_SIZE': args.batch_size,
        'OUTPUT': args.output, 'MODEL.RESUME': args.resume, 'TOKEN_LABEL.DATA': args.token_label_data,
        'EVAL_MODE': args.eval or None, 'THROUGHPUT_MODE': args.throughput or None})
    distributed = Distributed()
    try:
        result = run_job(config, distributed, args.batch_size, args.allow_config_change)
        # A gloo worker thread still releasing the last collective's tensors when the process group is destroyed
        # waits for the GIL, which the destructor holds while waiting for that thread: a deadlock at exit that hit
        # about one 2-process CPU run in ten. After a barrier every worker is idle.
        distributed.barrier()
        return result
    finally:
        distributed.close()


def run_job(config: CfgNode, distributed: Distributed, cli_batch_size: Optional[int] = None,
            allow_config_change: bool = False) -> Optional[Dict]:
    seed = config.SEED + distributed.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    if config.THROUGHPUT_MODE:
        setup_logging(config.OUTPUT, distributed, 'throughput_log.txt')
        amp_dtype = resolve_amp(config.AMP, distributed.device)
        batch_size = cli_batch_size or THROUGHPUT_BATCH
        images_per_second = measure_throughput(config, distributed.device, amp_dtype, batch_size)
        _logger.info('throughput %s: %.1f img/s (batch %d, %d px, %s, AMP %s)', config.MODEL.NAME,
                     images_per_second, batch_size, config.DATA.IMG_SIZE, distributed.device,
                     amp_dtype or 'off')
        return dict(throughput=images_per_second)

    if config.EVAL_MODE:
        setup_logging(config.OUTPUT, distributed, 'eval_log.txt')
        return evaluate_checkpoint(config, distributed)

    latest = os.path.join(config.OUTPUT, 'latest.pth')
    resume_from = config.MODEL.RESUME or (latest if config.TRAIN.AUTO_RESUME and os.path.isfile(latest) else None)
    checkpoint = load_checkpoint_file(resume_from) if resume_from else None
    resuming = checkpoint is not None and is_trainer_checkpoint(checkpoint)
    changes = config_changes(checkpoint['config'], config) if resuming else []
    if changes and not allow_config_change:
        raise ConfigError(
            f'{resume_from} is a run with another config: {_describe_changes(changes)}. Start a new run with another '
            f'--output (from its weights alone: --opts MODEL.PRETRAINED {resume_from}), or pass '
            f'--allow-config-change to continue this one with the new values. Without it a resumed run may change '
            f'only where and how fast it runs, its length and its batch (classification/config.py: RESUMABLE_KEYS)')
    if resuming and checkpoint['epoch'] + 1 >= total_epochs(config):
        setup_logging(None, distributed)  # nothing is written to a finished run's folder
        _logger.info('%s: all %d epochs are done, nothing to train (raise TRAIN.EPOCHS to continue)', resume_from,
                     total_epochs(config))
        return None

    setup_logging(config.OUTPUT, distributed)
    if changes:
        _logger.warning('%s was run with another config; continuing with the new values (--allow-config-change): %s',
                        resume_from, _describe_changes(changes))
    _logger.info('config:\n%s', config.dump())
    if distributed.is_main:
        with open(os.path.join(config.OUTPUT, 'config.yaml'), 'w') as f:
            f.write(config.dump())
    trainer = Trainer(config, distributed)
    if checkpoint is not None:
        if resume_from == latest and not config.MODEL.RESUME:
            _logger.info('auto-resume: found %s', resume_from)
        trainer.resume(checkpoint, resume_from)
    try:
        summary = trainer.fit()
    finally:  # a run stopped by an error (a non-finite loss, a corrupt batch) keeps its last scalars
        trainer.close()
    if distributed.is_main:
        with open(os.path.join(config.OUTPUT, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)
        _logger.info('done: best acc@1 %.2f %%; summary in %s', summary['max_accuracy'],
                     os.path.join(config.OUTPUT, 'summary.json'))
    return summary


def _describe_changes(changes) -> str:
    return '; '.join(f'{key} {before!r} -> {after!r}' for key, before, after in changes)


def _message(error: Exception) -> str:
    """An error's message. One raised in a loader worker arrives as the text of its traceback, whose last line is
    'module.Type: message'."""
    text = str(error)
    return text.strip().splitlines()[-1].split(': ', 1)[-1] if 'Original Traceback' in text else text


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    try:
        run(args)
    except (ConfigError, DatasetError, CheckpointError, UnsafeCheckpointError, FileNotFoundError, FileExistsError,
            NonFiniteLossError) as error:
        # bad input (config, data, checkpoint) and a diverging run end with one line naming the problem
        sys.exit(f'error: {_message(error)}')


def evaluate_main(argv: Optional[Sequence[str]] = None):
    """``fat-eval``: the trainer's ``--eval``."""
    main(['--eval', *(sys.argv[1:] if argv is None else argv)])


if __name__ == '__main__':
    main()
