"""ImageNet-style data through timm's dataset factory (``timm.data.create_dataset``): class folders, a tar of class
folders per split, WebDataset shards or a Hugging Face dataset (DATA.DATASET, named as timm names them); timm's
transforms, distributed sampling, and the dense score maps of token labelling.

timm's readers list and read the samples. Images are decoded here, so that a corrupt or unreadable image (or
token-label score map) never stops training: it is logged with its name and skipped, and each epoch counts what it
skipped. In training the next readable sample takes its place, so every batch keeps its size (which DDP, SyncBN,
Mixup and torch.compile rely on); in evaluation it is left out, so accuracy counts real images only. timm's
WebDataset reader decodes its samples itself and logs and skips what it cannot read; those skips are counted too.

Evaluation needs the validation split alone. In training, each sample's augmentation is seeded from the run's
seed, the epoch and the sample's place (its index; in WebDataset shards, its reader and its position in the
reader's stream), so that it is the same whatever the loader's workers did before (a resumed run repeats an
uninterrupted one).
"""
import contextlib
import json
import logging
import multiprocessing
import numbers
import os
import random
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS
from yacs.config import CfgNode

from .config import dataset_layout

_logger = logging.getLogger(__name__)

SCORE_MAP_SUFFIX = '.pt'
# the files in which timm's WebDataset reader finds the description of the shards (splits, files, sample counts)
WDS_INFO_FILES = ('_info.json', 'info.json')


class DatasetError(ValueError):
    """The dataset does not have the expected layout."""


class CorruptSampleError(Exception):
    """A training sample's file (image or score map) that cannot be read: it is skipped like a corrupt image."""


def _checked_label(target: Any, num_classes: int, sample: str) -> int:
    if isinstance(target, numbers.Integral) and 0 <= target < num_classes:
        return int(target)
    raise DatasetError(f'{sample}: label {target!r} is not a class index below MODEL.NUM_CLASSES ({num_classes})')


class CheckedImages(Dataset):
    """A split of a map-style dataset of timm's (class folders, a tar of class folders, a Hugging Face dataset),
    whose images are decoded here: a corrupt or unreadable one is logged with its name and skipped.

    Items are ``(image, target, corrupt)``: ``corrupt`` counts the unreadable images skipped to produce the item.
    With ``replace_corrupt`` the following readable image takes a corrupt one's place; without, the item is None
    (see ``collate_skipping_corrupt``).

    Args:
        dataset: what ``timm.data.create_dataset`` made of the split; its reader lists and reads the samples.
        layout: 'folder', 'tar' or 'hfds' (how a sample is named in messages).
        location: the split's folder, tar file, or Hugging Face name and split.
        classes: the class names by label (None where the dataset has none).
        relabel: this trainer's label for each of timm's (None: timm's labels).
        num_classes: labels must be below it (MODEL.NUM_CLASSES).
    """

    def __init__(self, dataset: Dataset, layout: str, location: str, classes: Optional[List[str]], num_classes: int,
                 transform=None, replace_corrupt: bool = True, relabel: Optional[List[int]] = None):
        self.reader = dataset.reader
        self.layout = layout
        self.location = location
        self.classes = classes
        self.num_classes = num_classes
        self.transform = transform
        self.replace_corrupt = replace_corrupt
        self.relabel = relabel

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def num_samples(self) -> int:
        return len(self)

    def sample_name(self, index: int) -> str:
        """The sample's path (of its file, or in its tar), or its place in a Hugging Face dataset."""
        if self.layout == 'folder':
            return self.reader.filename(index, absolute=True)
        if self.layout == 'tar':
            return f'{self.location}/{self.reader.filename(index)}'
        path = self.reader.filename(index)
        return f'{self.location}[{index}]' + (f' ({path})' if path else '')

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, Any, int]]:
        for corrupt in range(len(self)):
            sample = (index + corrupt) % len(self)
            try:
                # decoding an arbitrary file fails in many ways besides OSError (EOFError, struct.error, ... from
                # PIL's format plugins): each means the file is unreadable
                file, target = self.reader[sample]
                with file:
                    image = Image.open(file).convert('RGB')
            except Exception as error:
                _logger.warning('corrupt image skipped: %s (%s: %s)', self.sample_name(sample), type(error).__name__,
                                error)
            else:
                target = self.relabel[target] if self.relabel is not None else target
                label = _checked_label(target, self.num_classes, self.sample_name(sample))
                try:
                    return (*self.prepare(sample, image, label), corrupt)
                except CorruptSampleError as error:
                    _logger.warning('corrupt sample skipped: %s', error)
            if not self.replace_corrupt:
                return None
        raise DatasetError(f'no readable image in {self.location}')

    def prepare(self, index: int, image, label: int) -> Tuple[Any, Any]:
        """The item of a readable image: the transformed image and its label."""
        return self.transform(image) if self.transform else image, label


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


class TokenLabelImages(CheckedImages):
    """Training images with their dense score maps for token labelling, in LV-ViT's format: one tensor file
    ``SCORE_MAPS/<class folder>/<image name without extension>.pt`` per image, of shape (2, k, H, W): the top-k scores
    of a teacher at each of H x W places of the whole image, then their class indices. Items are ``(image, (label,
    score map, crop box, flipped), corrupt)``: the random resized crop and the flip of timm's training transform are
    reported with the image (``CropFlipWithBox``), so that the targets follow them (``token_labelling``).
    RandAugment's geometric operations (shear, translate, rotate) move the image, not its score map (LV-ViT's ``tlt``
    moves both). Score maps are found by each image's class folder and name, which the folder and tar layouts have.

    Args:
        score_maps: the folder of score maps, with the same class folders.
        primary, secondary, final: timm's training transform in its three parts (``create_transform(...,
            separate=True)``): crop and flip, augmentation, tensor conversion.
        The others: ``CheckedImages``'s.
    """

    def __init__(self, dataset: Dataset, layout: str, location: str, classes: List[str], num_classes: int,
                 score_maps: str, primary: transforms.Compose, secondary: transforms.Compose,
                 final: transforms.Compose, relabel: Optional[List[int]] = None):
        super().__init__(dataset, layout, location, classes, num_classes, relabel=relabel)
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
        missing = [index for index, path in enumerate(self.reader.filenames(absolute=True))
                   if self.score_map_path(path) not in listed]
        if missing:
            raise DatasetError(f'{len(missing)} of {len(self)} training images have no score map in {score_maps}, '
                               f'first {self.sample_name(missing[0])} (expected '
                               f'{self.score_map_path(self.reader.filename(missing[0], absolute=True))})')

    def score_map_path(self, image_path: str) -> str:
        """The score map of an image, from the path of its file or its name in a tar: ``<class folder>/<name>``."""
        class_folder = os.path.basename(os.path.dirname(image_path))
        name = os.path.splitext(os.path.basename(image_path))[0]
        return os.path.join(self.score_maps, class_folder, name + SCORE_MAP_SUFFIX)

    def prepare(self, index: int, image, label: int):
        score_map_path = self.score_map_path(self.reader.filename(index, absolute=True))
        try:
            score_map = torch.load(score_map_path, map_location='cpu', weights_only=True)
        except Exception as error:  # a truncated or foreign file fails in torch.load's zip or pickle reader
            raise CorruptSampleError(f'{self.sample_name(index)}: its score map {score_map_path} is unreadable '
                                     f'({type(error).__name__}: {" ".join(str(error).split())})') from None
        if not isinstance(score_map, torch.Tensor) or score_map.dim() != 4 or score_map.shape[0] != 2:
            found = tuple(score_map.shape) if isinstance(score_map, torch.Tensor) else type(score_map).__name__
            raise CorruptSampleError(f'{self.sample_name(index)}: its score map {score_map_path} is not a tensor of '
                                     f'shape (2, k, H, W) (top-k scores, then their class indices) but {found}')
        image, box, flipped = self.crop_flip(image)
        return self.augment(image), (label, score_map.float(), box, flipped)


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


@contextlib.contextmanager
def seeded_random_state(*entropy: int):
    """Seed Python's, NumPy's and PyTorch's (CPU) global random generators from ``entropy`` for the ``with``
    block, then restore them: the augmentation of a sample becomes a function of ``entropy`` alone, whichever
    process or worker computes it and whatever ran there before. The CPU generator alone: ``torch.manual_seed``
    would also reseed every CUDA generator, leaving the training process's (with ``DATA.NUM_WORKERS 0``) a
    function of the last sample's key."""
    python, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed32, seed64 = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    random.seed(int(seed64))
    np.random.seed(int(seed32) % 2 ** 32)
    torch.default_generator.manual_seed(int(seed64))
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


def _seed_of(*entropy: int) -> int:
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


class _Skips(logging.Handler):
    """Counts the samples that timm's WebDataset reader skips in this process: it logs one warning for each sample it
    cannot decode and each shard it cannot read (its ``log_and_continue`` handler), skips it and goes on. Its other
    warnings (a missing info file, say) skip nothing."""
    SKIP_MESSAGE = 'Handling webdataset error'  # how log_and_continue's warning begins

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord):
        if record.getMessage().startswith(self.SKIP_MESSAGE):
            self.count += 1


_WEBDATASET_SKIPS = _Skips()
logging.getLogger('timm.data.readers.reader_wds').addHandler(_WEBDATASET_SKIPS)


class _WdsReader:
    """timm's WebDataset reader (``timm.data.readers.reader_wds.ReaderWds``) through the parts of it that are not
    its public interface, here and nowhere else: checked when a split is opened, so that a timm that changed them
    stops with a message naming them rather than failing in a loader worker."""
    INTERNALS = ('_lazy_init', 'worker_seed', 'global_worker_id', 'ds', 'split_info', 'dist_num_replicas',
                 'num_samples')

    def __init__(self, reader: Any, location: str):
        missing = [name for name in self.INTERNALS if not hasattr(reader, name)]
        if missing:
            raise DatasetError(
                f"{location}: timm {timm.__version__}'s WebDataset reader ({type(reader).__name__}) has no "
                f"{', '.join(missing)}, which reading shards here relies on: install the timm of requirements.txt")
        self._reader = reader

    @property
    def num_samples(self) -> int:
        return self._reader.num_samples

    @property
    def shard_names(self) -> Sequence[str]:
        """The split's shard files, relative to its folder (or URLs)."""
        return self._reader.split_info.filenames

    @property
    def num_shards(self) -> int:
        return len(self.shard_names)

    @property
    def num_replicas(self) -> int:
        """The number of processes, as the reader sees torch.distributed."""
        return self._reader.dist_num_replicas

    @property
    def reader_id(self) -> int:
        """Which of all processes' loader workers this reader is (known once started)."""
        return self._reader.global_worker_id

    def start(self, *entropy: int):
        """Build the reader's pipeline in this process (which learns which reader it is and deals it its shards);
        with ``entropy``, rebuild it with its sample shuffle seeded from ``entropy`` and the reader."""
        self._reader._lazy_init()
        if entropy:
            self._reader.worker_seed = _seed_of(*entropy, self.reader_id)
            self._reader._lazy_init()

    def __iter__(self):
        """The shuffled ``(image, target)`` of a training reader."""
        return iter(self._reader)

    def samples(self) -> Iterator[Dict]:
        """The decoded samples of this reader's shards, in order, each once."""
        return iter(self._reader.ds)


class _Shards(IterableDataset):
    """A split of WebDataset shards, read by timm's reader (``timm.data.create_dataset('wds/...')``), which deals
    the shards out to the readers: one per loader worker of each process (one per process without workers). Items
    are ``(image, label, corrupt)``, as ``CheckedImages``'s. The shards hold labels, not class names."""

    classes = None

    def __init__(self, dataset: IterableDataset, reader: _WdsReader, location: str, num_classes: int, transform):
        self.dataset = dataset
        self.reader = reader
        self.location = location
        self.num_classes = num_classes
        self.transform = transform
        self.num_samples = self.reader.num_samples
        self.num_shards = self.reader.num_shards

    def _label(self, target: Any, position: int) -> int:
        return _checked_label(target, self.num_classes,
                              f'{self.location}: sample {position} of reader {self.reader.reader_id}')


class TrainingShards(_Shards):
    """The training split of WebDataset shards. Each epoch timm's reader shuffles the shard list (from SEED and the
    epoch), deals the shards out to the readers, shuffles each reader's samples in a buffer, and ends each reader's
    stream after the same count: the split's samples over the readers, rounded up to whole batches (a reader whose
    shards hold fewer starts them over, one whose shards hold more leaves the rest for another epoch). Every process
    thus takes the same number of batches, without a sampler, and an epoch has the split's count (rounded up).

    The buffer shuffle is seeded from (SEED, epoch, reader), each sample's augmentation from (SEED, epoch, reader,
    position in the reader's stream): an epoch's batches are a function of the seed, the epoch and the number of
    readers, so that a run resumed with as many processes and loader workers repeats an uninterrupted one.
    """

    def __init__(self, dataset: IterableDataset, reader: _WdsReader, location: str, num_classes: int, transform,
                 seed: int, num_workers: int):
        super().__init__(dataset, reader, location, num_classes, transform)
        self.seed = seed
        self.epoch = multiprocessing.Value('i', 0)  # shared with the loader's persistent workers
        dataset.set_loader_cfg(num_workers=num_workers)
        world_size = self.reader.num_replicas
        self.num_readers = world_size * max(1, num_workers)
        if self.num_shards < self.num_readers:
            raise DatasetError(f'{location} has {self.num_shards} shards for {self.num_readers} readers ({world_size} '
                               f'process(es) x {max(1, num_workers)} loader worker(s)): each reader needs a shard of '
                               f'its own; lower DATA.NUM_WORKERS or write more shards')
        dealt = f'{self.num_shards} shards over {self.num_readers} readers ({world_size} process(es) x ' \
                f'{max(1, num_workers)} loader worker(s))'
        _logger.info('%s: %d training samples in %s; each reader takes %d samples per epoch', location,
                     self.num_samples, dealt, len(self) // max(1, num_workers))
        if self.num_shards % self.num_readers:
            _logger.warning('%s: %s: readers with fewer shards repeat samples and those with more leave some out '
                            'each epoch; a multiple of %d shards of equal size would not', location, dealt,
                            self.num_readers)

    def set_epoch(self, epoch: int):
        self.epoch.value = epoch
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        """Samples per epoch of this process (timm's count per reader, times its readers)."""
        return len(self.dataset)

    def __iter__(self):
        epoch, reader = self.epoch.value, self.reader
        # timm builds a reader's pipeline once per worker process, and its sample shuffle then draws on from one
        # generator epoch after epoch (so that a resumed run would see other orders): it is rebuilt each epoch, the
        # shuffle seeded from (SEED, epoch, reader).
        reader.start(self.seed, epoch)
        skipped = _WEBDATASET_SKIPS.count
        for position, (image, target) in enumerate(reader):
            label = self._label(target, position)
            with seeded_random_state(self.seed, epoch, reader.reader_id, position):
                image = self.transform(image)
            corrupt, skipped = _WEBDATASET_SKIPS.count - skipped, _WEBDATASET_SKIPS.count
            yield image, label, corrupt


class ValidationShards(_Shards):
    """A validation split of WebDataset shards, each reader's shards read once and in order, so that every sample
    is evaluated exactly once over all processes and workers (timm's own iteration, under DDP, gives each reader
    the same count by repeating or leaving out samples). A sample that the reader skips is an item None."""

    def __iter__(self):
        reader = self.reader
        reader.start()
        skipped = _WEBDATASET_SKIPS.count
        for position, sample in enumerate(reader.samples()):
            yield from [None] * (_WEBDATASET_SKIPS.count - skipped)
            skipped = _WEBDATASET_SKIPS.count
            yield self.transform(sample['image']), self._label(sample['target'], position), 0
        yield from [None] * (_WEBDATASET_SKIPS.count - skipped)


def split_name(config: CfgNode, training: bool) -> str:
    """DATA.TRAIN_SPLIT or DATA.VAL_SPLIT, or their layout's default: 'train'; 'val' for folders and tars,
    'validation' for WebDataset shards and Hugging Face datasets."""
    name = config.DATA.TRAIN_SPLIT if training else config.DATA.VAL_SPLIT
    if name:
        return name
    if training:
        return 'train'
    return 'validation' if dataset_layout(config.DATA.DATASET) in ('wds', 'hfds') else 'val'


def _data_root(config: CfgNode) -> str:
    root = config.DATA.DATA_PATH
    if not root:
        raise DatasetError('no data path: pass --data-path or set DATA.DATA_PATH')
    if not os.path.isdir(root):
        raise DatasetError(f'data path {root} not found')
    return root


def _what_else(root: str, split: str) -> str:
    """What the data path holds of another layout, for the message about a split that it does not hold."""
    found = []
    if os.path.isdir(os.path.join(root, split)):
        found.append(f'{split}/, a folder: --dataset folder')
    if os.path.isfile(os.path.join(root, f'{split}.tar')):
        found.append(f'{split}.tar: --dataset tar')
    if any(os.path.isfile(os.path.join(root, name)) for name in WDS_INFO_FILES):
        found.append('the _info.json of WebDataset shards: --dataset wds/<name>')
    return f' (it holds {"; ".join(found)})' if found else ''


def _timm_dataset(name: str, what: str, **options) -> Dataset:
    """``timm.data.create_dataset``, with what its readers raise (assertions, RuntimeErrors) in one line."""
    try:
        return create_dataset(name, **options)
    except Exception as error:
        raise DatasetError(f'{what}: {type(error).__name__}: {" ".join(str(error).split()) or "unreadable"}') from None


def _relabel(timm_labels: Dict[str, int], classes: List[str]) -> Optional[List[int]]:
    """This trainer's label for each of timm's, which orders names naturally ('c2' before 'c10') and
    case-insensitively; this trainer, like torchvision's ImageFolder (and the authors' FAT pipeline), sorts them as
    strings. For ImageNet's class folders both orders agree."""
    ours = {name: label for label, name in enumerate(classes)}
    relabel = [ours[name] for name in sorted(timm_labels, key=timm_labels.get)]
    return None if relabel == list(range(len(relabel))) else relabel


def _folder_split(config: CfgNode, split: str) -> Tuple[Dataset, str, List[str], Optional[List[int]]]:
    root = _data_root(config)
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DatasetError(f'{folder} not found: the data path must hold {split}/, a folder of class folders'
                           f'{_what_else(root, split)}')
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DatasetError(f'{folder} has no class folders')
    # timm's folder reader, with torchvision's image extensions (those this trainer has always read)
    dataset = _timm_dataset('', folder, root=folder, split=split, search_split=False,
                            input_key=';'.join(IMG_EXTENSIONS))
    found = dataset.reader.class_to_idx  # the names of the folders that hold images
    empty = [name for name in classes if name not in found]
    if empty:
        raise DatasetError(f'class folder {os.path.join(folder, empty[0])} has no images '
                           f'(extensions: {", ".join(IMG_EXTENSIONS)})')
    elsewhere = sorted(set(found) - set(classes))
    if elsewhere:
        raise DatasetError(f'{folder} holds images outside its class folders, in '
                           f'{", ".join(repr(name) if name else "itself" for name in elsewhere[:3])}: timm\'s reader '
                           f'labels an image by the folder that holds it, so each image must lie directly in its '
                           f'class folder')
    return dataset, folder, classes, _relabel(found, classes)


def _tar_split(config: CfgNode, split: str) -> Tuple[Dataset, str, List[str], Optional[List[int]]]:
    root = _data_root(config)
    path = os.path.join(root, f'{split}.tar')
    if not os.path.isfile(path):
        raise DatasetError(f'{path} not found: the tar layout needs {split}.tar, a tar of class folders '
                           f'(<class>/<image>), in the data path{_what_else(root, split)}')
    dataset = _timm_dataset('', path, root=path, split=split)  # on a .tar, timm's factory reads the tar
    found = dataset.reader.class_name_to_idx
    if '' in found:
        raise DatasetError(f'{path} holds images outside class folders: each image must be <class>/<image>')
    classes = sorted(found)
    return dataset, path, classes, _relabel(found, classes)


def _hfds_split(config: CfgNode, split: str) -> Tuple[Dataset, str, Optional[List[str]], None]:
    name = config.DATA.DATASET
    location = f'{name}[{split}]'
    path = name.partition('/')[2]
    if path.startswith(('/', '.')) and not os.path.isdir(path):  # a local dataset's folder, not a name on the Hub
        raise DatasetError(f'{path} not found: {name} names a local Hugging Face dataset by its folder')
    dataset = _timm_dataset(name, location, root=config.DATA.DATA_PATH or None, split=split)
    found = dataset.reader.class_to_idx  # the names of its label's ClassLabel feature, if it has one
    return dataset, location, sorted(found, key=found.get) if found else None, None


def _wds_split(config: CfgNode, split: str, is_training: bool) -> Tuple[Dataset, _WdsReader, str]:
    root = _data_root(config)
    location = f'{root} ({config.DATA.DATASET}, split {split!r})'
    if '.tar' not in split and '..' not in split:  # a split's name, rather than timm's shard pattern
        info_files = [name for name in WDS_INFO_FILES if os.path.isfile(os.path.join(root, name))]
        if not info_files:
            raise DatasetError(
                f"{root} has no _info.json, timm's description of WebDataset shards (their splits, shard files and "
                f"sample counts): write one (python -m classification.pack_dataset does), or give the split as a "
                f"shard pattern with its sample count, e.g. DATA.TRAIN_SPLIT 'train-{{000000..000099}}.tar|128116'"
                f"{_what_else(root, split)}")
        info_path = os.path.join(root, info_files[0])
        try:
            with open(info_path) as f:
                splits = json.load(f).get('splits', {})
        except (OSError, ValueError, AttributeError) as error:
            raise DatasetError(f'{info_path} is not a readable JSON mapping: {error}') from None
        if split not in splits:
            raise DatasetError(f'{info_path} has no split {split!r} (it has: {", ".join(splits) or "none"}): set '
                               f'DATA.{"TRAIN" if is_training else "VAL"}_SPLIT')
    dataset = _timm_dataset(config.DATA.DATASET, location, root=root, split=split, is_training=is_training,
                            batch_size=config.DATA.BATCH_SIZE, seed=config.SEED)
    reader = _WdsReader(dataset.reader, location)
    shards = reader.shard_names
    missing = [name for name in shards if '://' not in name and not name.startswith('pipe:') and
               not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise DatasetError(f'{location}: {len(missing)} of its {len(shards)} shards not found, first '
                           f'{os.path.join(root, missing[0])}')
    return dataset, reader, location


def _map_split(config: CfgNode, layout: str, split: str):
    if layout == 'folder':
        return _folder_split(config, split)
    if layout == 'tar':
        return _tar_split(config, split)
    return _hfds_split(config, split)


def _check_num_classes(config: CfgNode, dataset: Union[CheckedImages, _Shards]):
    if dataset.classes is not None and len(dataset.classes) > config.MODEL.NUM_CLASSES:
        raise DatasetError(f'{dataset.location} has {len(dataset.classes)} classes but MODEL.NUM_CLASSES is '
                           f'{config.MODEL.NUM_CLASSES}')


def build_train_dataset(config: CfgNode) -> Union[CheckedImages, TrainingShards]:
    """The training split (DATA.TRAIN_SPLIT) of DATA.DATASET, with the recipe's augmentation."""
    layout = dataset_layout(config.DATA.DATASET)
    split = split_name(config, training=True)
    if config.TOKEN_LABEL.DATA and layout not in ('folder', 'tar'):
        raise DatasetError(f'token labelling\'s score maps (TOKEN_LABEL.DATA) are found by class folder and image '
                           f'name, which the folder and tar layouts have and {config.DATA.DATASET!r} does not: use '
                           f'one of those, or token labelling without score maps')
    if layout == 'wds':
        train = TrainingShards(*_wds_split(config, split, is_training=True), config.MODEL.NUM_CLASSES,
                               build_transform(config, is_training=True), config.SEED, config.DATA.NUM_WORKERS)
    else:
        dataset, location, classes, relabel = _map_split(config, layout, split)
        if config.TOKEN_LABEL.DATA:
            train = TokenLabelImages(dataset, layout, location, classes, config.MODEL.NUM_CLASSES,
                                     config.TOKEN_LABEL.DATA, *build_transform(config, is_training=True, separate=True),
                                     relabel=relabel)
        else:
            train = CheckedImages(dataset, layout, location, classes, config.MODEL.NUM_CLASSES,
                                  build_transform(config, is_training=True), relabel=relabel)
    _check_num_classes(config, train)
    return train


def build_val_dataset(config: CfgNode) -> Union[CheckedImages, ValidationShards]:
    """The validation split (DATA.VAL_SPLIT) alone, what evaluation needs."""
    layout = dataset_layout(config.DATA.DATASET)
    split = split_name(config, training=False)
    transform = build_transform(config, is_training=False)
    if layout == 'wds':
        val = ValidationShards(*_wds_split(config, split, is_training=False), config.MODEL.NUM_CLASSES, transform)
    else:
        dataset, location, classes, relabel = _map_split(config, layout, split)
        val = CheckedImages(dataset, layout, location, classes, config.MODEL.NUM_CLASSES, transform,
                            replace_corrupt=False, relabel=relabel)
    _check_num_classes(config, val)
    return val


def build_datasets(config: CfgNode):
    """The training and validation splits, checked to hold the same classes where they name them."""
    train, val = build_train_dataset(config), build_val_dataset(config)
    if train.classes is not None and val.classes is not None and train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DatasetError(f'the classes of {train.location} and {val.location} differ: only in train: '
                           f'{only_train or "none"}; only in val: {only_val or "none"}' +
                           ('' if only_train or only_val else ' (the same names, in another order)'))
    return train, val


def describe(dataset: Union[CheckedImages, _Shards]) -> str:
    """How many samples (and classes) a split has, and where it is, for the log."""
    kind = 'images' if isinstance(dataset, CheckedImages) else 'samples'
    classes = f' in {len(dataset.classes)} classes' if dataset.classes is not None else ''
    return f'{dataset.num_samples} {kind}{classes} ({dataset.location})'


def _loader_options(config: CfgNode) -> dict:
    # the loader's own generator draws its workers' base seed, which would otherwise come from (and advance) the
    # global generator whenever an iterator is created: once per run with persistent workers, so that a resumed
    # run's training would draw other dropout and Mixup values than an uninterrupted one
    return dict(num_workers=config.DATA.NUM_WORKERS, pin_memory=config.DATA.PIN_MEMORY,
                collate_fn=collate_skipping_corrupt, persistent_workers=config.DATA.NUM_WORKERS > 0,
                generator=torch.Generator().manual_seed(config.SEED))


def build_train_loader(config: CfgNode, train: Union[CheckedImages, TrainingShards], world_size: int,
                       rank: int) -> Tuple[DataLoader, Union[EpochSampler, TrainingShards]]:
    """The training loader, and what to call ``set_epoch`` on before each epoch: its sampler, or for WebDataset
    shards (dealt out to the processes by timm's reader, without a sampler) the dataset. Every sample's augmentation
    is seeded from the seed, the epoch and the sample's place: see ``SeededSamples`` and ``TrainingShards``."""
    if isinstance(train, TrainingShards):
        return DataLoader(train, batch_size=config.DATA.BATCH_SIZE, drop_last=True, **_loader_options(config)), train
    sampler = EpochSampler(train, num_replicas=world_size, rank=rank, shuffle=True, seed=config.SEED)
    if len(sampler) < config.DATA.BATCH_SIZE:
        raise DatasetError(f'{len(train)} training images give each of {world_size} processes fewer than one '
                           f'batch of {config.DATA.BATCH_SIZE}: lower --batch-size')
    return DataLoader(SeededSamples(train, config.SEED), sampler=sampler, batch_size=config.DATA.BATCH_SIZE,
                      drop_last=True, **_loader_options(config)), sampler


def build_val_loader(config: CfgNode, val: Union[CheckedImages, ValidationShards], world_size: int,
                     rank: int) -> DataLoader:
    """Each validation sample once over all processes, none padded."""
    batch_size = config.DATA.VAL_BATCH_SIZE or config.DATA.BATCH_SIZE
    if isinstance(val, ValidationShards):
        return DataLoader(val, batch_size=batch_size, **_loader_options(config))
    return DataLoader(val, sampler=ShardSampler(len(val), world_size, rank), batch_size=batch_size,
                      **_loader_options(config))
