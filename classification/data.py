"""ImageNet-style data: ImageFolder train/ and val/ splits, timm's transforms, distributed sampling, and the dense
score maps of token labelling.

A corrupt or unreadable image (or token-label score map) never stops training: it is logged with its path and
skipped. In training the next readable image of the split takes its place, so every batch keeps its size (which
DDP, SyncBN, Mixup and torch.compile rely on); in evaluation it is left out, so accuracy counts real images only.

Evaluation needs the validation split alone. In training, each sample's augmentation is seeded from the run's
seed, the epoch and the sample's index, so that it is the same whatever the loader's workers did before (a resumed
run repeats an uninterrupted one).
"""
import contextlib
import logging
import os
import random
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from yacs.config import CfgNode

_logger = logging.getLogger(__name__)

SCORE_MAP_SUFFIX = '.pt'


class DatasetError(ValueError):
    """The dataset folder does not have the expected layout."""


class CorruptSampleError(Exception):
    """A training sample's file (image or score map) that cannot be read: it is skipped like a corrupt image."""


class CheckedImageFolder(ImageFolder):
    """ImageFolder that reports and skips corrupt images.

    Items are ``(image, target, corrupt)``: ``corrupt`` counts the unreadable files skipped to produce the
    item. With ``replace_corrupt`` the following readable image takes a corrupt one's place; without, the
    item is None (see ``collate_skipping_corrupt``).
    """

    def __init__(self, root: str, transform=None, replace_corrupt: bool = True):
        if not os.path.isdir(root):
            raise DatasetError(f'{root} not found: the data path must hold train/ and val/ folders of class folders')
        try:
            # the split is listed once, here; an empty class is reported below, in this project's words
            super().__init__(root, transform=transform, allow_empty=True)
        except FileNotFoundError:
            raise DatasetError(f'{root} has no class folders') from None
        empty = sorted(set(range(len(self.classes))) - set(self.targets))
        if empty:
            raise DatasetError(f'class folder {os.path.join(root, self.classes[empty[0]])} has no images '
                               f'(extensions: {", ".join(IMG_EXTENSIONS)})')
        self.replace_corrupt = replace_corrupt

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, Any, int]]:
        for corrupt in range(len(self.samples)):
            path, target = self.samples[(index + corrupt) % len(self.samples)]
            try:
                # decoding an arbitrary file fails in many ways besides OSError (EOFError, struct.error, ... from
                # PIL's format plugins): each means the file is unreadable
                image = self.loader(path)
            except Exception as error:
                _logger.warning('corrupt image skipped: %s (%s: %s)', path, type(error).__name__, error)
            else:
                try:
                    return (*self.prepare(path, image, target), corrupt)
                except CorruptSampleError as error:
                    _logger.warning('corrupt sample skipped: %s', error)
            if not self.replace_corrupt:
                return None
        raise DatasetError(f'no readable image in {self.root}')

    def prepare(self, path: str, image, target: int) -> Tuple[Any, Any]:
        """The item of a readable image: the transformed image and its target."""
        return self.transform(image) if self.transform else image, target


class CropFlipWithBox:
    """The random resized crop and horizontal flip of timm's training transform (its ``primary`` part), which
    also report where the crop lies, (x0, y0, x1, y1) as fractions of the image, and whether it was flipped."""

    def __init__(self, primary: transforms.Compose):
        steps = list(primary.transforms)
        if not steps or not isinstance(steps[0], RandomResizedCropAndInterpolation) or not all(
                isinstance(step, transforms.RandomHorizontalFlip) for step in steps[1:]):
            raise ValueError(f'expected a random resized crop and horizontal flips, got {primary}')
        self.crop = steps[0]
        self.flip_probability = steps[1].p if len(steps) > 1 else 0.

    def __call__(self, image) -> Tuple[object, torch.Tensor, bool]:
        width, height = image.size
        top, left, crop_height, crop_width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        interpolation = self.crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        image = TF.resized_crop(image, top, left, crop_height, crop_width, list(self.crop.size), interpolation)
        flipped = torch.rand(1).item() < self.flip_probability
        if flipped:
            image = TF.hflip(image)
        box = torch.tensor([left / width, top / height, (left + crop_width) / width, (top + crop_height) / height])
        return image, box, flipped


class TokenLabelImageFolder(CheckedImageFolder):
    """Training images with their dense score maps for token labelling, in LV-ViT's format: one tensor file
    ``SCORE_MAPS/<class folder>/<image name without extension>.pt`` per image, of shape (2, k, H, W): the top-k scores
    of a teacher at each of H x W places of the whole image, then their class indices. Items are ``(image, (label,
    score map, crop box, flipped), corrupt)``: the random resized crop and the flip of timm's training transform are
    reported with the image (``CropFlipWithBox``), so that the targets follow them (``token_labelling``).
    RandAugment's geometric operations (shear, translate, rotate) move the image, not its score map (LV-ViT's ``tlt``
    moves both).

    Args:
        root: the split's folder of class folders.
        score_maps: the folder of score maps, with the same class folders.
        primary, secondary, final: timm's training transform in its three parts (``create_transform(...,
            separate=True)``): crop and flip, augmentation, tensor conversion.
    """

    def __init__(self, root: str, score_maps: str, primary: transforms.Compose, secondary: transforms.Compose,
                 final: transforms.Compose):
        super().__init__(root, transform=None, replace_corrupt=True)
        if not os.path.isdir(score_maps):
            raise DatasetError(f'token-label data {score_maps} not found')
        self.score_maps = score_maps
        self.crop_flip = CropFlipWithBox(primary)
        self.augment = transforms.Compose([secondary, final])
        listed = set()  # every score map, each folder listed once
        for class_folder in self.classes:
            folder = os.path.join(score_maps, class_folder)
            if os.path.isdir(folder):
                listed.update(os.path.join(folder, name) for name in os.listdir(folder))
        missing = [path for path, _ in self.samples if self.score_map_path(path) not in listed]
        if missing:
            raise DatasetError(f'{len(missing)} of {len(self.samples)} training images have no score map in '
                               f'{score_maps}, first {missing[0]} (expected {self.score_map_path(missing[0])})')

    def score_map_path(self, image_path: str) -> str:
        class_folder = os.path.basename(os.path.dirname(image_path))
        name = os.path.splitext(os.path.basename(image_path))[0]
        return os.path.join(self.score_maps, class_folder, name + SCORE_MAP_SUFFIX)

    def prepare(self, path: str, image, target: int):
        score_map_path = self.score_map_path(path)
        try:
            score_map = torch.load(score_map_path, map_location='cpu', weights_only=True)
        except Exception as error:  # a truncated or foreign file fails in torch.load's zip or pickle reader
            raise CorruptSampleError(f'{path}: its score map {score_map_path} is unreadable '
                                     f'({type(error).__name__}: {" ".join(str(error).split())})') from None
        if not isinstance(score_map, torch.Tensor) or score_map.dim() != 4 or score_map.shape[0] != 2:
            found = tuple(score_map.shape) if isinstance(score_map, torch.Tensor) else type(score_map).__name__
            raise CorruptSampleError(f'{path}: its score map {score_map_path} is not a tensor of shape (2, k, H, W) '
                                     f'(top-k scores, then their class indices) but {found}')
        image, box, flipped = self.crop_flip(image)
        return self.augment(image), (target, score_map.float(), box, flipped)


def collate_skipping_corrupt(batch: List[Optional[Tuple]]) -> Tuple[torch.Tensor, Any, int]:
    """Stack the readable items of a batch; returns images, targets (stacked as ``default_collate`` does: labels,
    or tuples of tensors) and the number of corrupt files."""
    items = [item for item in batch if item is not None]
    corrupt = len(batch) - len(items) + sum(item[2] for item in items)
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long), corrupt
    images, targets = default_collate([item[:2] for item in items])
    return images, targets, corrupt


class ShardSampler(Sampler):
    """Every ``num_replicas``-th index from ``rank``: each example evaluated exactly once, none padded."""

    def __init__(self, dataset_size: int, num_replicas: int, rank: int):
        self.indices = range(rank, dataset_size, num_replicas)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_transform(config: CfgNode, is_training: bool, separate: bool = False):
    """timm's transform of the recipe; in training with ``separate``, its three parts (crop and flip,
    augmentation, tensor conversion). With DATA.DEVICE_NORMALIZE it ends with uint8 arrays, neither normalised
    nor randomly erased (``DeviceNormalize`` does both on the training device)."""
    on_device = config.DATA.DEVICE_NORMALIZE
    if is_training:
        auto_augment = config.AUG.AUTO_AUGMENT if config.AUG.AUTO_AUGMENT.lower() != 'none' else None
        return create_transform(
            config.DATA.IMG_SIZE, is_training=True, scale=tuple(config.AUG.SCALE),
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=auto_augment, interpolation=config.DATA.INTERPOLATION, use_prefetcher=on_device,
            re_prob=0. if on_device else config.AUG.REPROB, re_mode=config.AUG.REMODE, re_count=config.AUG.RECOUNT,
            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, separate=separate)
    return create_transform(
        config.DATA.IMG_SIZE, is_training=False, interpolation=config.DATA.INTERPOLATION,
        crop_pct=config.TEST.CROP_PCT if config.TEST.CROP else 1.0, use_prefetcher=on_device,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


class DeviceNormalize:
    """What the loader's workers leave to the training device under DATA.DEVICE_NORMALIZE (timm's prefetcher idea):
    uint8 batches made float and normalised, and in training randomly erased."""

    def __init__(self, config: CfgNode, device: torch.device):
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1) * 255
        self.random_erasing = RandomErasing(config.AUG.REPROB, mode=config.AUG.REMODE, max_count=config.AUG.RECOUNT,
                                            device=device) if config.AUG.REPROB > 0 else None

    def __call__(self, images: torch.Tensor, training: bool) -> torch.Tensor:
        images = (images.float() - self.mean) / self.std
        if training and self.random_erasing is not None:
            images = self.random_erasing(images)
        return images


def _split(config: CfgNode, split: str) -> str:
    root = config.DATA.DATA_PATH
    if not root:
        raise DatasetError('no data path: pass --data-path or set DATA.DATA_PATH')
    if not os.path.isdir(root):
        raise DatasetError(f'data path {root} not found')
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DatasetError(f'{folder} not found: the data path must hold {split}/, a folder of class folders')
    return folder


def _check_num_classes(config: CfgNode, dataset: CheckedImageFolder):
    if len(dataset.classes) > config.MODEL.NUM_CLASSES:
        raise DatasetError(f'{dataset.root} has {len(dataset.classes)} classes but MODEL.NUM_CLASSES is '
                           f'{config.MODEL.NUM_CLASSES}')


def build_val_dataset(config: CfgNode) -> CheckedImageFolder:
    """The validation split alone (what evaluation needs): ``val/`` of DATA.DATA_PATH."""
    val = CheckedImageFolder(_split(config, 'val'), build_transform(config, is_training=False),
                             replace_corrupt=False)
    _check_num_classes(config, val)
    return val


def build_datasets(config: CfgNode) -> Tuple[CheckedImageFolder, CheckedImageFolder]:
    """The training and validation splits, checked to hold the same classes."""
    train_dir, val_dir = _split(config, 'train'), _split(config, 'val')
    if config.TOKEN_LABEL.DATA:
        train = TokenLabelImageFolder(train_dir, config.TOKEN_LABEL.DATA,
                                      *build_transform(config, is_training=True, separate=True))
    else:
        train = CheckedImageFolder(train_dir, build_transform(config, is_training=True), replace_corrupt=True)
    val = build_val_dataset(config)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DatasetError(f'train/ and val/ class folders differ in {config.DATA.DATA_PATH}: '
                           f'only in train: {only_train or "none"}; only in val: {only_val or "none"}')
    return train, val


@contextlib.contextmanager
def seeded_random_state(*entropy: int):
    """Seed Python's, NumPy's and PyTorch's (CPU) global random generators from ``entropy`` for the ``with``
    block, then restore them: the augmentation of a sample becomes a function of ``entropy`` alone, whichever
    process or worker computes it and whatever ran there before."""
    python, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed32, seed64 = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    random.seed(int(seed64))
    np.random.seed(int(seed32) % 2 ** 32)
    torch.manual_seed(int(seed64))
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


class EpochSampler(DistributedSampler):
    """torch's distributed shuffling (a permutation from the seed and the epoch, split over the processes),
    yielding ``(epoch, index)``: the key of ``SeededSamples``."""

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


class SeededSamples(Dataset):
    """``dataset`` whose item ``(epoch, index)`` is augmented with random state seeded from (seed, epoch, index).

    A run's augmentation is then fixed by its seed: it does not depend on the loader's workers (their number,
    which worker takes which batch, what they drew before), so a run resumed at an epoch's start sees the images
    an uninterrupted run sees, with persistent workers too.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        epoch, index = key
        with seeded_random_state(self.seed, epoch, index):
            return self.dataset[index]


def _loader_options(config: CfgNode) -> dict:
    # the loader's own generator draws its workers' base seed, which would otherwise come from (and advance) the
    # global generator whenever an iterator is created: once per run with persistent workers, so that a resumed
    # run's training would draw other dropout and Mixup values than an uninterrupted one
    return dict(num_workers=config.DATA.NUM_WORKERS, pin_memory=config.DATA.PIN_MEMORY,
                collate_fn=collate_skipping_corrupt, persistent_workers=config.DATA.NUM_WORKERS > 0,
                generator=torch.Generator().manual_seed(config.SEED))


def build_train_loader(config: CfgNode, train: CheckedImageFolder, world_size: int,
                       rank: int) -> Tuple[DataLoader, DistributedSampler]:
    """The training loader and its sampler (call ``set_epoch`` before each epoch). Every sample's augmentation
    is seeded from (SEED, epoch, index): see ``SeededSamples``."""
    sampler = EpochSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=config.SEED)
    if len(sampler) < config.DATA.BATCH_SIZE:
        raise DatasetError(f'{len(train)} training images give each of {world_size} processes fewer than one '
                           f'batch of {config.DATA.BATCH_SIZE}: lower --batch-size')
    return DataLoader(SeededSamples(train, config.SEED), sampler=sampler, batch_size=config.DATA.BATCH_SIZE,
                      drop_last=True, **_loader_options(config)), sampler


def build_val_loader(config: CfgNode, val: CheckedImageFolder, world_size: int, rank: int) -> DataLoader:
    return DataLoader(val, sampler=ShardSampler(len(val), world_size, rank),
                      batch_size=config.DATA.VAL_BATCH_SIZE or config.DATA.BATCH_SIZE, **_loader_options(config))
