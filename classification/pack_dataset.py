"""Pack a dataset of class folders (``train/`` and ``val/``, the trainer's folder layout) into the archives that the
trainer reads through timm's dataset factory: a tar of class folders per split (``--dataset tar``), or WebDataset
shards with timm's ``_info.json`` (``--dataset wds/<name>``).

    python -m classification.pack_dataset /data/imagenet /data/imagenet-wds --format wds --shard-size 1250
    python -m classification.pack_dataset /data/imagenet /data/imagenet-tar --format tar

Images are copied byte for byte (JPEG, PNG and WebP; an image of another format is stored as PNG), so that a
corrupt image stays corrupt and the trainer skips and counts it. A sample's label is its class folder's place in
the sorted class folders, as in the folder layout, so that a checkpoint's classes are the same in every layout.
The training split's samples are shuffled (from ``--seed``) before they are written into shards: shards of one
class each would leave the reader's shuffle buffer one class at a time. Shards named ``<split>-NNNNNN.tar`` are
listed in ``_info.json`` under the split's name, ``val`` under ``validation`` (timm's and Hugging Face's name, the
trainer's default for shards).

Every file is written under a ``.partial`` name and moved into place once all of them are complete: a pack that fails
leaves nothing behind, and one that is killed leaves only ``.partial`` files, which the next run overwrites.
"""
import argparse
import contextlib
import io
import json
import os
import random
import sys
import tarfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from .commands import program_name, progress

# the image formats that timm's readers take as they are: the keys of WebDataset samples (timm's reader looks for
# 'jpg', 'png', 'webp') and the extensions of tar members (timm's tar reader lists .jpg, .jpeg and .png)
_WDS_KEYS = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}
_TAR_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# the names of the splits in _info.json, where timm's and Hugging Face's differ from the folder layout's
_WDS_SPLIT_NAMES = {'val': 'validation'}


class PackError(ValueError):
    """A source or destination that cannot be packed."""


class _Staging:
    """Where a pack writes its files: ``path(final)`` names the ``.partial`` file to write in place of ``final``."""

    def __init__(self):
        self.moves: List[Tuple[str, str]] = []

    def path(self, final: str) -> str:
        self.moves.append((final + '.partial', final))
        return self.moves[-1][0]


@contextlib.contextmanager
def _staged() -> Iterator[_Staging]:
    """Move every file staged in the block into place when it succeeds; remove them when it fails."""
    staging = _Staging()
    try:
        yield staging
    except BaseException:
        for partial, _ in staging.moves:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
        raise
    for partial, final in staging.moves:
        os.replace(partial, final)


def _refuse_existing(paths: Sequence[str]):
    for path in paths:
        if os.path.exists(path):
            raise PackError(f'{path} exists: pack into an empty folder')


def shard_filenames(split: str, num_samples: int, shard_size: int) -> List[str]:
    return [f'{split}-{index:06d}.tar' for index in range(-(-num_samples // shard_size))]


def list_split(folder: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """The class folders of a split and its ``(image path, label)`` samples, in order (class, then file name)."""
    if not os.path.isdir(folder):
        raise PackError(f'{folder} not found: the source must hold a folder of class folders per split')
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    samples = []
    for label, name in enumerate(classes):
        class_folder = os.path.join(folder, name)
        samples += [(os.path.join(class_folder, file), label) for file in sorted(os.listdir(class_folder))
                    if os.path.splitext(file)[1].lower() in IMG_EXTENSIONS]
    if not samples:
        raise PackError(f'{folder} has no images in class folders')
    return classes, samples


def _as_png(path: str) -> bytes:
    try:
        with Image.open(path) as image:
            encoded = io.BytesIO()
            image.save(encoded, 'PNG')
            return encoded.getvalue()
    except Exception:  # unreadable: stored as it is, for the trainer to skip and count like any corrupt image
        with open(path, 'rb') as f:
            return f.read()


def _image(path: str, formats: Sequence[str]) -> Tuple[str, bytes]:
    """The image's extension and bytes: as they are in one of ``formats``, else as PNG."""
    extension = os.path.splitext(path)[1].lower()
    if extension in formats:
        with open(path, 'rb') as f:
            return extension, f.read()
    return '.png', _as_png(path)


def pack_tar(classes: List[str], samples: List[Tuple[str, int]], path: str):
    """Write a split's ``samples`` (``list_split``'s) as the tar ``path`` of ``<class>/<image>`` members."""
    with tarfile.open(path, 'w') as tar:
        for image_path, label in progress(samples, desc=os.path.basename(path).removesuffix('.partial')):
            extension, data = _image(image_path, _TAR_EXTENSIONS)
            stem = os.path.splitext(os.path.basename(image_path))[0]
            member = tarfile.TarInfo(f'{classes[label]}/{stem}{extension}')
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def pack_shards(samples: List[Tuple[str, int]], destination: str, split: str, shard_size: int,
                shuffle_seed: Optional[int], staging: _Staging) -> Dict:
    """Write a split's ``samples`` (``list_split``'s) as WebDataset shards ``<split>-NNNNNN.tar`` of ``shard_size``
    samples (an image and its label, ``cls``) into ``destination`` (through ``staging``), shuffled from
    ``shuffle_seed`` unless it is None; the split's entry in timm's ``_info.json``."""
    import webdataset

    samples = list(samples)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(samples)
    filenames = shard_filenames(split, len(samples), shard_size)
    shard_lengths = []
    with progress(total=len(samples), desc=f'{split} shards') as bar:
        for start, filename in zip(range(0, len(samples), shard_size), filenames):
            shard = samples[start:start + shard_size]
            with webdataset.TarWriter(staging.path(os.path.join(destination, filename))) as writer:
                for position, (image_path, label) in enumerate(shard, start):
                    extension, data = _image(image_path, tuple(_WDS_KEYS))
                    writer.write({'__key__': f'{split}-{position:08d}', _WDS_KEYS[extension]: data, 'cls': label})
                    bar.update()
            shard_lengths.append(len(shard))
    return dict(name=split, num_samples=len(samples), filenames=filenames, shard_lengths=shard_lengths)


def pack(source: str, destination: str, archive: str, splits: Sequence[str] = ('train', 'val'),
         shard_size: int = 1000, seed: int = 0, train_split: str = 'train') -> Dict[str, int]:
    """Pack each of ``splits`` of ``source`` into ``destination`` as ``archive`` ('tar' or 'wds'); the number of
    images per split."""
    if archive not in ('tar', 'wds'):
        raise PackError(f"the archive format is 'tar' or 'wds', got {archive!r}")
    if shard_size < 1:
        raise PackError(f'--shard-size must be at least 1, got {shard_size}')
    listed = {split: list_split(os.path.join(source, split)) for split in splits}
    classes = listed[splits[0]][0]
    for split, (split_classes, _) in listed.items():
        if split_classes != classes:
            raise PackError(f'the class folders of {os.path.join(source, splits[0])} and {os.path.join(source, split)} '
                            f'differ: a label would name another class in each')
    os.makedirs(destination, exist_ok=True)
    counts = {split: len(samples) for split, (_, samples) in listed.items()}
    if archive == 'tar':
        paths = {split: os.path.join(destination, f'{split}.tar') for split in splits}
        _refuse_existing(list(paths.values()))
        with _staged() as staging:
            for split in splits:
                pack_tar(classes, listed[split][1], staging.path(paths[split]))
        return counts
    names = {split: _WDS_SPLIT_NAMES.get(split, split) for split in splits}
    _refuse_existing([os.path.join(destination, filename) for split in splits
                      for filename in shard_filenames(names[split], counts[split], shard_size)])
    info_path = os.path.join(destination, '_info.json')
    info = dict(name=os.path.basename(os.path.abspath(destination)), splits={})
    if os.path.isfile(info_path):  # splits packed before, by another call
        with open(info_path) as f:
            info = json.load(f)
    with _staged() as staging:
        for split in splits:
            info['splits'][names[split]] = pack_shards(listed[split][1], destination, names[split], shard_size,
                                                       seed if split == train_split else None, staging)
        with open(staging.path(info_path), 'w') as f:  # moved last: it lists the shards, now in place
            json.dump(info, f, indent=1)
    return counts


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog=program_name(__spec__.name), description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source', help='a folder with a folder of class folders per split (train/, val/)')
    parser.add_argument('destination', help='the folder to write the tars or shards into')
    parser.add_argument('--format', choices=('tar', 'wds'), required=True,
                        help="'tar': <split>.tar per split; 'wds': WebDataset shards and _info.json")
    parser.add_argument('--splits', nargs='+', default=['train', 'val'], help='the split folders (train val)')
    parser.add_argument('--train-split', default='train', help='the split whose shards are shuffled (train)')
    parser.add_argument('--shard-size', type=int, default=1000, help='samples per WebDataset shard (1000)')
    parser.add_argument('--seed', type=int, default=0, help="the training split's shuffle (0)")
    args = parser.parse_args(argv)
    try:
        counts = pack(args.source, args.destination, args.format, args.splits, args.shard_size, args.seed,
                      args.train_split)
    except (PackError, OSError) as error:
        sys.exit(f'error: {error}')
    print(f'{args.destination}: ' + ', '.join(f'{split} {count} images' for split, count in counts.items()))


if __name__ == '__main__':
    main()
