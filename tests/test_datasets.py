"""The trainer's data layouts, read through timm's dataset factory: class folders, a tar of class folders per split,
WebDataset shards and a (local) Hugging Face dataset hold the same images and give the same samples, checks and
errors; WebDataset shards are dealt out to the readers (processes x loader workers) by timm's reader, each epoch
the same count per reader, in an order fixed by the seed, the epoch and the number of readers."""
import hashlib
import io
import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classification.checkpoint_io import load_checkpoint_file
from classification.config import ConfigError, dataset_layout, load_config
from classification.data import (CheckedImages, DatasetError, SeededSamples, ValidationShards, build_datasets,
                                 build_train_loader, build_val_dataset, build_val_loader, seeded_random_state)
from classification.pack_dataset import PackError, pack
from classification.pack_dataset import main as pack_main
from classification.synthetic_shapes import CLASSES, ensure_synthetic_shapes
from classification.train import parse_args, run
from conftest import REPO_ROOT, run_ok, write_image_folder
from test_train import B0_CONFIG, TINY, exit_message, killed_at_step, train_command

LVT_CONFIG = str(REPO_ROOT / 'configs' / 'classification' / 'lvt_cls.yaml')


def write_hf_dataset(data: Path, root: Path) -> Path:
    """The folder dataset ``data`` as a local Hugging Face dataset (Parquet files with an Image and a ClassLabel
    feature, the Hub's layout), which ``datasets.load_dataset`` reads without a network."""
    import datasets

    classes = sorted(path.name for path in (data / 'train').iterdir())
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=classes))
    for split, name in (('train', 'train'), ('val', 'validation')):
        images = sorted((data / split).glob('*/*.png'))
        rows = dict(image=[dict(bytes=path.read_bytes(), path=f'{path.parent.name}/{path.name}') for path in images],
                    label=[classes.index(path.parent.name) for path in images])
        (root / 'data').mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(root / 'data' / f'{name}-00000-of-00001.parquet')
    return root


@pytest.fixture(scope='module')
def layouts(tmp_path_factory) -> dict:
    """One tiny dataset (12 training and 6 validation images, 3 classes) in every layout, with the options that
    select each: class folders, a tar per split, WebDataset shards of 3 samples, a local Hugging Face dataset."""
    for module in ('webdataset', 'datasets'):
        pytest.importorskip(module, reason=f'{module} is not installed (make setup-extras)')
    root = tmp_path_factory.mktemp('layouts')
    data = write_image_folder(root / 'folder', 4, 2)
    pack(str(data), str(root / 'tar'), 'tar')
    pack(str(data), str(root / 'wds'), 'wds', shard_size=3)
    write_hf_dataset(data, root / 'hf')
    return {'folder': {'DATA.DATA_PATH': str(data)},
            'tar': {'DATA.DATA_PATH': str(root / 'tar'), 'DATA.DATASET': 'tar'},
            'wds': {'DATA.DATA_PATH': str(root / 'wds'), 'DATA.DATASET': 'wds/tiny'},
            'hfds': {'DATA.DATA_PATH': str(root / 'hf_cache'), 'DATA.DATASET': f'hfds/{root / "hf"}'}}


def config_of(options: dict, *opts: str):
    return load_config(B0_CONFIG, [*TINY, 'DATA.BATCH_SIZE', '4', *opts], **options)


def fingerprint(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def pixels(image: Image.Image) -> torch.Tensor:
    """A transform that keeps the image as it is (to tell samples apart)."""
    return torch.as_tensor(np.array(image))


def validation_items(val) -> list:
    """(label, image fingerprint) of every readable validation item, in the loader's order."""
    loader = build_val_loader(config_of({}), val, world_size=1, rank=0)
    return [(int(label), fingerprint(image)) for images, labels, _ in loader for image, label in zip(images, labels)]


# ---- names ----------------------------------------------------------------------------------------------------


def test_a_samples_seed_reaches_the_cpu_generator_alone(monkeypatch):
    """seeded_random_state seeds and then restores the CPU generator, and never touches a CUDA one (on a GPU with
    DATA.NUM_WORKERS 0, drop-path masks and device-side erasing would follow the last sample's key)."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', reseeded.append)
    monkeypatch.setattr(torch.cuda, 'manual_seed', reseeded.append)
    before = torch.get_rng_state()
    draws = []
    for _ in range(2):
        with seeded_random_state(0, 1, 2):
            draws.append(torch.rand(4))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert reseeded == []


def test_the_generated_shapes_are_written_once_whole_and_the_same_for_a_seed(tmp_path):
    """The demo's dataset (and, smaller, the GPU check's rehearsal's): every class in each split, the same images for
    a seed, left alone once complete; a folder that is not a complete copy is refused, not overwritten."""
    ensure_synthetic_shapes(str(tmp_path / 'a'), train_per_class=2, val_per_class=1)
    files = sorted(path.relative_to(tmp_path / 'a') for path in (tmp_path / 'a').rglob('*.png'))
    assert [str(path.parent) for path in files] == sorted(
        f'{split}/{name}' for split, count in (('train', 2), ('val', 1)) for name in CLASSES for _ in range(count))
    ensure_synthetic_shapes(str(tmp_path / 'b'), train_per_class=2, val_per_class=1)
    assert all((tmp_path / 'a' / path).read_bytes() == (tmp_path / 'b' / path).read_bytes() for path in files)
    written = (tmp_path / 'a' / files[0]).stat().st_mtime_ns
    ensure_synthetic_shapes(str(tmp_path / 'a'))  # complete: kept as it is, whatever the counts asked
    assert (tmp_path / 'a' / files[0]).stat().st_mtime_ns == written
    assert len(list((tmp_path / 'a').rglob('*.png'))) == len(files)
    (tmp_path / 'partial' / 'train').mkdir(parents=True)
    with pytest.raises(FileExistsError, match='is not a complete synthetic_shapes dataset'):
        ensure_synthetic_shapes(str(tmp_path / 'partial'))


def test_dataset_names_are_timms():
    assert {name: dataset_layout(name) for name in ('', 'folder', 'imagefolder', 'synthetic_shapes', 'tar', 'wds/in1k',
                                                    'WDS/in1k', 'hfds/timm/mini-imagenet', 'hfds//data/local')} == {
        '': 'folder', 'folder': 'folder', 'imagefolder': 'folder', 'synthetic_shapes': 'folder', 'tar': 'tar',
        'wds/in1k': 'wds', 'WDS/in1k': 'wds', 'hfds/timm/mini-imagenet': 'hfds', 'hfds//data/local': 'hfds'}
    for name in ('wds', 'wds/', 'webdataset', 'torch/cifar10', 'tfds/imagenet2012'):
        with pytest.raises(ConfigError, match=re.escape(f'got {name!r}')):
            dataset_layout(name)
    message = exit_message('--cfg', B0_CONFIG, '--dataset', 'torch/cifar10')
    assert message.startswith("error: DATA.DATASET (--dataset) must be '' or 'folder' (class folders), 'tar'") and \
        message.endswith("got 'torch/cifar10' (torch/ is one of timm's datasets that this trainer does not read)")


# ---- the same images in every layout --------------------------------------------------------------------------


def test_every_layout_holds_the_same_samples(layouts):
    """Validation: the same (label, image) items, in every layout. Training: the tar's item of each (epoch, index) is
    the folder's, augmentation included (the same images in the same order), and the shards and the Hugging Face
    dataset hold the same images under the same labels."""
    reference = validation_items(build_val_dataset(config_of(layouts['folder'])))
    assert len(reference) == 6 and {label for label, _ in reference} == {0, 1, 2}
    for layout in ('tar', 'wds', 'hfds'):
        items = validation_items(build_val_dataset(config_of(layouts[layout])))
        assert items == reference if layout != 'hfds' else sorted(items) == sorted(reference), layout

    folder, _ = build_datasets(config_of(layouts['folder']))
    tar, _ = build_datasets(config_of(layouts['tar']))
    loaders = [build_train_loader(config_of(layouts[name]), dataset, 1, 0)[0] for name, dataset in
               (('folder', folder), ('tar', tar))]
    for batches in zip(*loaders):
        assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])

    def epoch_of_images(layout):
        train, _ = build_datasets(config_of(layouts[layout]))
        train.transform = pixels
        loader, epochs = build_train_loader(config_of(layouts[layout]), train, 1, 0)
        epochs.set_epoch(0)
        return sorted((int(label), fingerprint(image)) for images, labels, _ in loader
                      for image, label in zip(images, labels))
    reference = epoch_of_images('folder')
    assert len(set(reference)) == 12
    for layout in ('wds', 'hfds'):  # 12 samples in 4 shards over 1 reader: an epoch is the split once
        assert epoch_of_images(layout) == reference, layout


def test_class_order_is_the_folder_layouts_in_every_layout(tmp_path):
    """timm orders class names naturally and case-insensitively ('c2' < 'c10'); the trainer, as torchvision's
    ImageFolder and the authors' pipeline, as strings ('B' < 'a', 'c10' < 'c2'): a label means the same class in
    every layout, and in checkpoints trained before."""
    written = ('c2', 'c10', 'B')  # write_image_folder saturates the colour channel of each class's place here
    data = write_image_folder(tmp_path / 'data', 1, 2, classes=written)
    pack(str(data), str(tmp_path / 'tar'), 'tar')
    pack(str(data), str(tmp_path / 'wds'), 'wds')
    expected = ['B', 'c10', 'c2']
    for options in ({'DATA.DATA_PATH': str(data)}, {'DATA.DATA_PATH': str(tmp_path / 'tar'), 'DATA.DATASET': 'tar'},
                    {'DATA.DATA_PATH': str(tmp_path / 'wds'), 'DATA.DATASET': 'wds/x'}):
        val = build_val_dataset(config_of(options))
        assert val.classes in (expected, None)  # shards hold labels only
        val.transform = pixels
        labels_and_channels = {(expected[label], written[int(image.float().mean((0, 1)).argmax())])
                               for images, labels, _ in build_val_loader(config_of(options), val, 1, 0)
                               for image, label in zip(images, labels)}
        assert labels_and_channels == {(name, name) for name in written}, options


# ---- checks and errors ------------------------------------------------------------------------------------------


def data_error(output: Path, options: dict, *opts: str) -> str:
    """The trainer's one-line error for a training run on ``options``' data, with ``opts``."""
    flags = [item for key, flag in (('DATA.DATA_PATH', '--data-path'), ('DATA.DATASET', '--dataset'))
             if key in options for item in (flag, options[key])]
    return exit_message('--cfg', B0_CONFIG, *flags, '--output', str(output), '--opts', *TINY, *opts)


def test_missing_data_is_named_with_what_is_there(tmp_path, layouts):
    wds = Path(layouts['wds']['DATA.DATA_PATH'])
    tar = Path(layouts['tar']['DATA.DATA_PATH'])
    out = tmp_path / 'out'
    assert data_error(out, {'DATA.DATA_PATH': str(tmp_path / 'shards'), 'DATA.DATASET': 'wds/x'}) == \
        f'error: data path {tmp_path / "shards"} not found'
    # the right data with the wrong (or no) --dataset
    assert data_error(out, {'DATA.DATA_PATH': str(tar)}) == \
        f'error: {tar / "train"} not found: the data path must hold train/, a folder of class folders (it holds ' \
        f'train.tar: --dataset tar)'
    assert data_error(out, {'DATA.DATA_PATH': str(wds), 'DATA.DATASET': 'tar'}).startswith(
        f'error: {wds / "train.tar"} not found: the tar layout needs train.tar, a tar of class folders '
        f'(<class>/<image>), in the data path (it holds the _info.json of WebDataset shards: --dataset wds/<name>)')
    # a tar without its validation split: training and evaluation stop; evaluation needs no training split
    only_train = tmp_path / 'only_train'
    only_train.mkdir()
    shutil.copy(tar / 'train.tar', only_train)
    assert data_error(out, {'DATA.DATA_PATH': str(only_train), 'DATA.DATASET': 'tar'}).startswith(
        f'error: {only_train / "val.tar"} not found: the tar layout needs val.tar')
    only_val = tmp_path / 'only_val'
    only_val.mkdir()
    shutil.copy(tar / 'val.tar', only_val)
    assert len(build_val_dataset(config_of({'DATA.DATA_PATH': str(only_val), 'DATA.DATASET': 'tar'}))) == 6

    shards = tmp_path / 'shards'
    shutil.copytree(wds, shards)
    on_shards = {'DATA.DATA_PATH': str(shards), 'DATA.DATASET': 'wds/x'}
    assert data_error(out, on_shards, 'DATA.VAL_SPLIT', 'val') == \
        f"error: {shards / '_info.json'} has no split 'val' (it has: train, validation): set DATA.VAL_SPLIT"
    (shards / 'train-000002.tar').unlink()
    assert data_error(out, on_shards) == \
        f"error: {shards} (wds/x, split 'train'): 1 of its 4 shards not found, first {shards / 'train-000002.tar'}"
    info = json.loads((shards / '_info.json').read_text())
    del info['splits']['train']
    (shards / '_info.json').write_text(json.dumps(info))
    assert data_error(out, on_shards) == \
        f"error: {shards / '_info.json'} has no split 'train' (it has: validation): set DATA.TRAIN_SPLIT"
    assert build_val_dataset(config_of({'DATA.DATA_PATH': str(shards), 'DATA.DATASET': 'wds/x'})).num_samples == 6
    (shards / '_info.json').unlink()
    assert data_error(out, on_shards).startswith(
        f"error: {shards} has no _info.json, timm's description of WebDataset shards")
    # without _info.json, timm's shard pattern with the sample count
    train = build_datasets(config_of({'DATA.DATA_PATH': str(wds), 'DATA.DATASET': 'wds/x', 'DATA.TRAIN_SPLIT':
                                      'train-{000000..000003}.tar|12'}))[0]
    assert (train.num_samples, train.num_shards) == (12, 4)
    assert data_error(out, {'DATA.DATASET': f'hfds/{tmp_path / "hf"}'}) == \
        f'error: {tmp_path / "hf"} not found: hfds/{tmp_path / "hf"} names a local Hugging Face dataset by its folder'


def test_folder_checks(tmp_path):
    data = write_image_folder(tmp_path / 'data', 2, 1)
    out = tmp_path / 'out'
    (data / 'train' / 'bar' / 'nested').mkdir()
    Image.new('RGB', (8, 8)).save(data / 'train' / 'bar' / 'nested' / 'lost.png')
    assert data_error(out, {'DATA.DATA_PATH': str(data)}) == (
        f"error: {data / 'train'} holds images outside its class folders, in 'nested': timm's reader labels an image "
        f"by the folder that holds it, so each image must lie directly in its class folder")
    shutil.rmtree(data / 'train' / 'bar' / 'nested')
    Image.new('RGB', (8, 8)).save(data / 'train' / 'stray.png')
    assert 'holds images outside its class folders, in itself' in data_error(out, {'DATA.DATA_PATH': str(data)})
    (data / 'train' / 'stray.png').unlink()
    (data / 'val' / 'bar' / '0.png').rename(data / 'val' / 'bar' / '0.webp')  # torchvision's extensions are read
    assert len(build_val_dataset(config_of({'DATA.DATA_PATH': str(data)}))) == 3


def test_more_classes_than_the_model_has(tmp_path, layouts):
    """Where the split names its classes, before anything runs; in shards, at the first label out of range (in a
    loader worker too, in one line)."""
    for layout in ('folder', 'tar', 'hfds'):
        with pytest.raises(ValueError, match=r' has 3 classes but MODEL.NUM_CLASSES is 2$'):
            build_datasets(config_of(layouts[layout], 'MODEL.NUM_CLASSES', '2'))
    options = layouts['wds']
    message = exit_message('--cfg', B0_CONFIG, '--data-path', options['DATA.DATA_PATH'], '--dataset',
                           options['DATA.DATASET'], '--output', str(tmp_path / 'out'), '--opts', *TINY,
                           'MODEL.NUM_CLASSES', '2', 'DATA.NUM_WORKERS', '1', 'DATA.BATCH_SIZE', '4')
    assert re.fullmatch(rf"error: {re.escape(options['DATA.DATA_PATH'])} \(wds/tiny, split 'train'\): sample \d+ of "
                        rf"reader 0: label 2 is not a class index below MODEL.NUM_CLASSES \(2\)", message), message


def test_token_labelling_reads_score_maps_by_class_folder_and_name(tmp_path, layouts):
    """The tar layout names its images as the folder layout does; WebDataset shards and Hugging Face datasets do
    not, and say so."""
    from test_lvt import write_score_maps

    data = Path(layouts['folder']['DATA.DATA_PATH'])
    score_maps = write_score_maps(data, tmp_path / 'score_maps', 3)
    opts = ['MODEL.NUM_CLASSES', '3', 'DATA.IMG_SIZE', '32']
    items = {}
    for layout in ('folder', 'tar'):
        train, _ = build_datasets(load_config(LVT_CONFIG, opts, **layouts[layout],
                                              **{'TOKEN_LABEL.DATA': str(score_maps)}))
        items[layout] = [SeededSamples(train, seed=0)[(0, index)] for index in range(len(train))]
    for folder_item, tar_item in zip(items['folder'], items['tar']):
        assert torch.equal(folder_item[0], tar_item[0]) and folder_item[1][0] == tar_item[1][0]
        assert torch.equal(folder_item[1][1], tar_item[1][1])  # the same score map
    for layout in ('wds', 'hfds'):
        with pytest.raises(ValueError, match=r"token labelling's score maps \(TOKEN_LABEL.DATA\) are found by class "
                                             r"folder and image name, which the folder and tar layouts have and "):
            build_datasets(load_config(LVT_CONFIG, opts, **layouts[layout], **{'TOKEN_LABEL.DATA': str(score_maps)}))


def test_pack_refuses_what_it_cannot_pack(tmp_path, capsys):
    data = write_image_folder(tmp_path / 'data', 1, 1)
    (data / 'val' / 'bar').rename(data / 'val' / 'rod')
    with pytest.raises(PackError, match='class folders of .* differ'):
        pack(str(data), str(tmp_path / 'out'), 'wds')
    with pytest.raises(SystemExit, match=f'error: {tmp_path / "none" / "train"} not found'):
        pack_main([str(tmp_path / 'none'), str(tmp_path / 'out'), '--format', 'tar'])
    good = write_image_folder(tmp_path / 'good', 1, 1)
    pack_main([str(good), str(tmp_path / 'tars'), '--format', 'tar'])
    assert capsys.readouterr().out == f'{tmp_path / "tars"}: train 3 images, val 3 images\n'
    with pytest.raises(SystemExit, match='train.tar exists'):
        pack_main([str(good), str(tmp_path / 'tars'), '--format', 'tar'])


@pytest.mark.parametrize('archive', ['tar', 'wds'])
def test_pack_that_fails_leaves_nothing_and_a_rerun_packs(archive, tmp_path, monkeypatch):
    """A pack that fails half-way (the sixth image unreadable) leaves no partial tar, shard or _info.json, so that
    the rerun packs instead of refusing; one that was killed left .partial files, which the rerun overwrites."""
    pytest.importorskip('webdataset', reason='webdataset is not installed (make setup-extras)')
    from classification import pack_dataset

    data = write_image_folder(tmp_path / 'data', 4, 2)
    destination = tmp_path / 'packed'
    read_image, reads = pack_dataset._image, []

    def failing_image(path, formats):
        reads.append(path)
        if len(reads) == 6:
            raise OSError(f'{path}: input/output error')
        return read_image(path, formats)

    monkeypatch.setattr(pack_dataset, '_image', failing_image)
    with pytest.raises(OSError, match='input/output error'):
        pack(str(data), str(destination), archive, shard_size=2)
    assert list(destination.iterdir()) == []
    monkeypatch.undo()
    (destination / ('train.tar.partial' if archive == 'tar' else 'train-000000.tar.partial')).write_bytes(b'killed')
    assert pack(str(data), str(destination), archive, shard_size=2) == {'train': 12, 'val': 6}
    written = sorted(path.name for path in destination.iterdir())
    assert written == (['train.tar', 'val.tar'] if archive == 'tar' else
                       ['_info.json'] + [f'train-{i:06d}.tar' for i in range(6)] +
                       [f'validation-{i:06d}.tar' for i in range(3)])
    config = config_of({'DATA.DATA_PATH': str(destination), 'DATA.DATASET': 'tar' if archive == 'tar' else 'wds/x'})
    assert len(validation_items(build_datasets(config)[1])) == 6


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize('archive', ['tar', 'wds'])
def test_pack_shows_progress_on_a_terminal_only(archive, tmp_path, monkeypatch, capsys):
    pytest.importorskip('webdataset', reason='webdataset is not installed (make setup-extras)')
    data = write_image_folder(tmp_path / 'data', 4, 2)
    pack_main([str(data), str(tmp_path / 'piped'), '--format', archive])
    assert capsys.readouterr().out == f'{tmp_path / "piped"}: train 12 images, val 6 images\n'  # a log: no bar
    terminal = Terminal()
    monkeypatch.setattr(sys, 'stdout', terminal)
    pack_main([str(data), str(tmp_path / 'shown'), '--format', archive, '--shard-size', '4'])
    shown = terminal.getvalue()
    bar = 'train.tar' if archive == 'tar' else 'train shards'
    assert re.search(rf'\r{bar}: +0%\|\s*\| 0/12 \[00:00<\?, \?it/s\]', shown), shown  # count, ETA and rate


# ---- WebDataset shards: corrupt samples, epochs, order ----------------------------------------------------------


@pytest.fixture(scope='module')
def corrupt_shards(tmp_path_factory) -> Path:
    """21 training samples (3 of them corrupt images) in 4 shards; 9 validation samples (3 corrupt) in 2."""
    root = tmp_path_factory.mktemp('corrupt_shards')
    data = write_image_folder(root / 'data', 6, 2, corrupt=True)
    pack(str(data), str(root / 'wds'), 'wds', shard_size=6)
    return root / 'wds'


@pytest.mark.parametrize('workers', [0, 2])
def test_corrupt_samples_in_shards_are_skipped_and_counted(corrupt_shards, workers, caplog):
    config = config_of({'DATA.DATA_PATH': str(corrupt_shards), 'DATA.DATASET': 'wds/x'},
                       'DATA.NUM_WORKERS', str(workers))
    train, val = build_datasets(config)
    with caplog.at_level(logging.WARNING):
        loader, epochs = build_train_loader(config, train, 1, 0)
        epochs.set_epoch(0)
        batches = list(loader)
        evaluated = list(build_val_loader(config, val, 1, 0))
    # each reader takes the split over the readers, rounded up to whole batches of 4 (24, or 2 x 12), readable
    # samples only: every shard is read, some again, and each corrupt sample read is counted
    assert len(loader) == 6 and [len(labels) for _, labels, _ in batches] == [4] * 6
    skipped = sum(corrupt for _, _, corrupt in batches)
    assert skipped >= 3
    assert sum(len(labels) for _, labels, _ in evaluated) == 6 and sum(corrupt for *_, corrupt in evaluated) == 3
    if workers == 0:  # (a worker's log records go to the handlers it inherited: the trainer's log)
        assert caplog.text.count('Handling webdataset error (UnidentifiedImageError') == skipped + 3


def test_only_the_webdataset_readers_skips_are_counted():
    """timm's reader logs a warning per sample it skips (log_and_continue) and others that skip nothing (a missing
    info file): only the first count."""
    pytest.importorskip('webdataset', reason='webdataset is not installed (make setup-extras)')
    from timm.data.readers import reader_wds

    from classification.data import _WEBDATASET_SKIPS

    before = _WEBDATASET_SKIPS.count
    logging.getLogger(reader_wds.__name__).warning('Dataset info file not found at [...]. Falling back to provided '
                                                   'split and size arg.')
    assert _WEBDATASET_SKIPS.count == before
    assert reader_wds.log_and_continue(ValueError('a corrupt sample'))  # timm's own handler: skip and go on
    assert _WEBDATASET_SKIPS.count == before + 1, 'timm changed the warning of log_and_continue (_Skips.SKIP_MESSAGE)'


def test_a_timm_without_the_reader_internals_used_here_is_named(corrupt_shards, monkeypatch):
    """What the shard datasets use of timm's WebDataset reader beyond its public interface is checked when a split is
    opened: a timm that renamed one of them stops with one message naming it and the timm version."""
    import timm
    from timm.data.readers.reader_wds import ReaderWds

    config = config_of({'DATA.DATA_PATH': str(corrupt_shards), 'DATA.DATASET': 'wds/x'})
    build_datasets(config)  # the installed timm has them
    monkeypatch.delattr(ReaderWds, '_lazy_init')
    with pytest.raises(DatasetError, match=rf"timm {re.escape(timm.__version__)}'s WebDataset reader \(ReaderWds\) "
                                           r'has no _lazy_init, which reading shards here relies on'):
        build_datasets(config)


def shard_epochs(options: dict, epochs, *opts: str, transform=None) -> list:
    """The (label, image fingerprint) items of each of ``epochs``, from one loader built for them (persistent
    workers, as in a run), with the recipe's augmentation or ``transform``."""
    config = config_of(options, *opts)
    train, _ = build_datasets(config)
    train.transform = transform or train.transform
    loader, sampler = build_train_loader(config, train, 1, 0)
    result = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        result.append([(int(label), fingerprint(image)) for images, labels, _ in loader
                       for image, label in zip(images, labels)])
    return result


@pytest.mark.parametrize('workers', [0, 2])
def test_an_epoch_of_shards_is_a_function_of_seed_epoch_and_readers(layouts, workers):
    """Epoch 2 read after epochs 0 and 1 is epoch 2 read first, as in a resumed run: the shards' order, the readers'
    shuffle buffers and each sample's augmentation; each epoch is another order. With 4 shards of 3 samples over
    1 or 2 readers, an epoch is the split once."""
    options = layouts['wds']
    opts = ['DATA.NUM_WORKERS', str(workers), 'DATA.BATCH_SIZE', '3']  # each reader's 6 or 12 in whole batches
    continued = shard_epochs(options, [0, 1, 2], *opts)
    assert shard_epochs(options, [2], *opts) == continued[2:]
    assert [len(epoch) for epoch in continued] == [12] * 3
    assert shard_epochs(options | {'SEED': 1}, [0], *opts)[0] != continued[0]
    orders = shard_epochs(options, [0, 1, 2], *opts, transform=pixels)
    assert len({tuple(epoch) for epoch in orders}) == 3  # three orders
    assert all(sorted(epoch) == sorted(orders[0]) and len(set(epoch)) == 12 for epoch in orders)  # of the 12 samples


def test_shards_over_more_readers_than_shards(layouts):
    """Each reader needs a shard of its own; uneven shards over the readers are allowed, with a warning."""
    config = config_of(layouts['wds'], 'DATA.NUM_WORKERS', '5')
    with pytest.raises(ValueError, match=r"has 4 shards for 5 readers \(1 process\(es\) x 5 loader worker\(s\)\): "
                                         r"each reader needs a shard of its own; lower DATA.NUM_WORKERS"):
        build_datasets(config)


def test_hugging_face_dataset_classes(layouts):
    train, val = build_datasets(config_of(layouts['hfds']))
    assert isinstance(train, CheckedImages) and train.classes == val.classes == ['bar', 'disc', 'noise']
    assert (len(train), len(val)) == (12, 6)
    assert isinstance(build_val_dataset(config_of(layouts['wds'])), ValidationShards)


# ---- training from each layout ----------------------------------------------------------------------------------


def run_layout(options: dict, output: Path, *opts: str, evaluate: str = '') -> dict:
    flags = ['--data-path', options['DATA.DATA_PATH'], '--output', str(output)]
    if 'DATA.DATASET' in options:
        flags += ['--dataset', options['DATA.DATASET']]
    if evaluate:
        flags += ['--eval', '--resume', evaluate]
    return run(parse_args(['--cfg', B0_CONFIG, *flags, '--opts', *TINY, 'DATA.BATCH_SIZE', '4', 'TRAIN.EPOCHS', '1',
                           'TRAIN.WARMUP_EPOCHS', '0', *opts]))


@pytest.mark.slow
def test_one_epoch_from_each_layout_then_evaluation_in_each(layouts, tmp_path):
    """One epoch from class folders, a tar, WebDataset shards and a Hugging Face dataset. The tar's and the Hugging
    Face dataset's runs are the folder's, bit for bit (the same images in the same order); the shards' run reads
    the same images in another order. Evaluated in every layout, the shards' checkpoint scores the accuracy that
    its run reported, on the same 6 images."""
    summaries = {layout: run_layout(layouts[layout], tmp_path / layout) for layout in layouts}
    weights = {layout: load_checkpoint_file(tmp_path / layout / 'latest.pth')['model'] for layout in summaries}
    for layout in ('tar', 'hfds'):
        assert all(torch.equal(value, weights[layout][key]) for key, value in weights['folder'].items()), layout
        assert all(summaries[layout]['final'][key] == summaries['folder']['final'][key]
                   for key in ('train_loss', 'val_loss', 'acc1', 'acc5', 'images')), layout
    assert not torch.equal(weights['wds']['head.fc.weight'], weights['folder']['head.fc.weight'])
    # 12 samples over 1 reader, in whole batches of 4: 3 steps, as from the folder
    log = (tmp_path / 'wds' / 'log.txt').read_text()
    assert 'epochs 1-1, 3 steps each' in log and 'each reader takes 12 samples per epoch' in log
    checkpoint = str(tmp_path / 'wds' / 'latest.pth')
    results = {layout: run_layout(layouts[layout], tmp_path / f'eval_{layout}', evaluate=checkpoint)
               for layout in layouts}
    assert {(result['images'], result['acc1'], result['acc5']) for result in results.values()} == {
        (6, summaries['wds']['final']['acc1'], summaries['wds']['final']['acc5'])}
    assert all(math.isclose(result['loss'], results['folder']['loss'], rel_tol=1e-5) for result in results.values())


@pytest.mark.slow
def test_killed_run_from_shards_resumes_to_the_same_result(layouts, tmp_path):
    """As from class folders (test_train's test_killed_run_resumes_to_the_same_result): killed in its second epoch
    and restarted, a run from WebDataset shards with 2 persistent loader workers ends with the weights of an
    uninterrupted one, bit for bit."""
    options = layouts['wds']

    def command(output):
        command = train_command(Path(options['DATA.DATA_PATH']), output, 'TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', '6',
                                'DATA.NUM_WORKERS', '2')
        command[command.index('--opts'):command.index('--opts')] = ['--dataset', options['DATA.DATASET']]
        return command
    run_ok(command(tmp_path / 'uninterrupted'))
    output = tmp_path / 'interrupted'
    killed_at_step(command(output), step=2 + 2)  # 12 samples over 2 readers in batches of 6: 2 steps per epoch
    log = (output / 'log.txt').read_text()
    assert 'epoch 2/2 step 1/2' in log and 'epoch 2/2 step 2/2' not in log
    result = run_ok(command(output))
    assert 'auto-resume' in result.stdout and 'epoch 1 done' in result.stdout
    resumed = load_checkpoint_file(output / 'latest.pth')
    uninterrupted = load_checkpoint_file(tmp_path / 'uninterrupted' / 'latest.pth')
    assert resumed['history'][1]['train_loss'] == uninterrupted['history'][1]['train_loss']
    for weights in ('model', 'model_ema'):
        for key, value in uninterrupted[weights].items():
            assert torch.equal(resumed[weights][key], value), (weights, key)


@pytest.mark.slow
def test_shards_under_ddp(corrupt_shards, tmp_path):
    """2 processes x 1 loader worker: timm's reader deals the 4 training shards out to the 2 readers; both take
    the same number of steps (no sampler), the corrupt samples are counted over both, and evaluation scores each
    readable validation sample exactly once, although its 2 shards hold 6 and 3."""
    output = tmp_path / 'ddp'
    command = train_command(corrupt_shards, output, 'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0',
                            'DATA.BATCH_SIZE', '4', 'DATA.NUM_WORKERS', '1', 'PRINT_FREQ', '3', nproc=2)
    command[command.index('--opts'):command.index('--opts')] = ['--dataset', 'wds/x']
    run_ok(command)
    summary = json.loads((output / 'summary.json').read_text())
    # 21 samples over 2 readers, rounded up to whole batches: 12 each, 3 steps of a global batch of 8
    assert summary['world_size'] == 2 and summary['global_batch'] == 8
    log = (output / 'log.txt').read_text()
    assert 'epochs 1-1, 3 steps each' in log and 'epoch 1/1 step 3/3' in log
    # every shard is read whole at least once (each reader's shards hold at most its 12), some again
    skipped = re.search(r'epoch 1: (\d+) corrupt image\(s\) skipped', log)
    assert skipped and int(skipped.group(1)) >= 3
    assert summary['final']['images'] == 6 and 'evaluation skipped 3 corrupt image(s)' in log
