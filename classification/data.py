"""ImageNet-style data: ImageFolder train/ and val/ splits, timm's transforms, distributed sampling.

A corrupt or unreadable image never stops training: it is logged with its path and skipped. In training
the next readable image of the split takes its place, so every batch keeps its size (which DDP, SyncBN,
Mixup and torch.compile rely on); in evaluation it is left out, so accuracy counts real images only.
"""
import logging
import os
from typing import List, Optional, Tuple

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from yacs.config import CfgNode

_logger = logging.getLogger(__name__)

# what PIL raises for truncated, invalid or unreadable image files
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """The dataset folder does not have the expected layout."""


def _image_files(folder: str) -> List[str]:
    return [name for name in os.listdir(folder) if name.lower().endswith(IMG_EXTENSIONS)]


def check_split(root: str) -> List[str]:
    """The class names of an ImageFolder split; raises DatasetError for a missing folder or an empty class."""
    if not os.path.isdir(root):
        raise DatasetError(f'{root} not found: the data path must hold train/ and val/ folders of class folders')
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DatasetError(f'{root} has no class folders')
    for name in classes:
        if not _image_files(os.path.join(root, name)):
            raise DatasetError(f'class folder {os.path.join(root, name)} has no images '
                               f'(extensions: {", ".join(IMG_EXTENSIONS)})')
    return classes


class CheckedImageFolder(ImageFolder):
    """ImageFolder that reports and skips corrupt images.

    Items are ``(image, target, corrupt)``: ``corrupt`` counts the unreadable files skipped to produce the
    item. With ``replace_corrupt`` the following readable image takes a corrupt one's place; without, the
    item is None (see ``collate_skipping_corrupt``).
    """

    def __init__(self, root: str, transform=None, replace_corrupt: bool = True):
        check_split(root)
        super().__init__(root, transform=transform)
        self.replace_corrupt = replace_corrupt

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, int, int]]:
        for corrupt in range(len(self.samples)):
            path, target = self.samples[(index + corrupt) % len(self.samples)]
            try:
                image = self.loader(path)
            except _IMAGE_ERRORS as error:
                _logger.warning('corrupt image skipped: %s (%s)', path, error)
                if not self.replace_corrupt:
                    return None
                continue
            return self.transform(image) if self.transform else image, target, corrupt
        raise DatasetError(f'no readable image in {self.root}')


def collate_skipping_corrupt(batch: List[Optional[Tuple]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable items of a batch; returns images, targets and the number of corrupt files."""
    items = [item for item in batch if item is not None]
    corrupt = len(batch) - len(items) + sum(item[2] for item in items)
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long), corrupt
    images = torch.stack([item[0] for item in items])
    targets = torch.tensor([item[1] for item in items], dtype=torch.long)
    return images, targets, corrupt


class ShardSampler(Sampler):
    """Every ``num_replicas``-th index from ``rank``: each example evaluated exactly once, none padded."""

    def __init__(self, dataset_size: int, num_replicas: int, rank: int):
        self.indices = range(rank, dataset_size, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_transform(config: CfgNode, is_training: bool):
    if is_training:
        auto_augment = config.AUG.AUTO_AUGMENT if config.AUG.AUTO_AUGMENT.lower() != 'none' else None
        return create_transform(
            config.DATA.IMG_SIZE, is_training=True, scale=tuple(config.AUG.SCALE),
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=auto_augment, interpolation=config.DATA.INTERPOLATION,
            re_prob=config.AUG.REPROB, re_mode=config.AUG.REMODE, re_count=config.AUG.RECOUNT,
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return create_transform(
        config.DATA.IMG_SIZE, is_training=False, interpolation=config.DATA.INTERPOLATION,
        crop_pct=config.TEST.CROP_PCT if config.TEST.CROP else 1.0,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def build_datasets(config: CfgNode) -> Tuple[CheckedImageFolder, CheckedImageFolder]:
    root = config.DATA.DATA_PATH
    if not root:
        raise DatasetError('no data path: pass --data-path or set DATA.DATA_PATH')
    if not os.path.isdir(root):
        raise DatasetError(f'data path {root} not found')
    train_dir, val_dir = os.path.join(root, 'train'), os.path.join(root, 'val')
    train_classes, val_classes = check_split(train_dir), check_split(val_dir)
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise DatasetError(f'train/ and val/ class folders differ in {root}: '
                           f'only in train: {only_train or "none"}; only in val: {only_val or "none"}')
    if len(train_classes) > config.MODEL.NUM_CLASSES:
        raise DatasetError(f'{root} has {len(train_classes)} classes but MODEL.NUM_CLASSES is '
                           f'{config.MODEL.NUM_CLASSES}')
    train = CheckedImageFolder(train_dir, build_transform(config, is_training=True), replace_corrupt=True)
    val = CheckedImageFolder(val_dir, build_transform(config, is_training=False), replace_corrupt=False)
    return train, val


def _loader_options(config: CfgNode) -> dict:
    return dict(batch_size=config.DATA.BATCH_SIZE, num_workers=config.DATA.NUM_WORKERS,
                pin_memory=config.DATA.PIN_MEMORY, collate_fn=collate_skipping_corrupt,
                persistent_workers=config.DATA.NUM_WORKERS > 0)


def build_train_loader(config: CfgNode, train: CheckedImageFolder, world_size: int,
                       rank: int) -> Tuple[DataLoader, DistributedSampler]:
    sampler = DistributedSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=config.SEED)
    if len(sampler) < config.DATA.BATCH_SIZE:
        raise DatasetError(f'{len(train)} training images give each of {world_size} processes fewer than one '
                           f'batch of {config.DATA.BATCH_SIZE}: lower --batch-size')
    return DataLoader(train, sampler=sampler, drop_last=True, **_loader_options(config)), sampler


def build_val_loader(config: CfgNode, val: CheckedImageFolder, world_size: int, rank: int) -> DataLoader:
    return DataLoader(val, sampler=ShardSampler(len(val), world_size, rank), **_loader_options(config))
