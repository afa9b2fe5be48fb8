import argparse
import csv
import functools
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, AugmentOp, RandAugment
from torch.utils.data import DistributedSampler

from classification.checkpoint_io import load_checkpoint_file
from classification.config import get_defaults, load_config
from classification.data import DeviceNormalize, EpochSampler, SeededSamples, build_datasets, build_transform
from classification.train import (Distributed, Trainer, build_model, build_scheduler, main, parse_args, run,
                                  scaled_learning_rates)
from conftest import REPO_ROOT, assert_reported_accuracy_matches, run_ok, write_image_folder

B0_CONFIG = str(REPO_ROOT / 'configs' / 'classification' / 'fat_b0.yaml')
# a small, fast run of the full recipe (RandAugment, Mixup/CutMix, random erasing, label smoothing, EMA)
TINY = ['DATA.IMG_SIZE', '32', 'DATA.NUM_WORKERS', '0', 'DATA.PIN_MEMORY', 'False', 'MODEL.NUM_CLASSES', '3',
        'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.EMA.ENABLED', 'True', 'PRINT_FREQ', '1']


def train_command(data: Path, output: Path, *opts: str, nproc: int = 1, script: Optional[Path] = None):
    """The trainer's command line (through ``script``, a file that ends by calling ``train.main``, if given)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc)]
    launcher += [str(script)] if script else ['-m', 'classification.train']
    return launcher + ['--cfg', B0_CONFIG, '--data-path', str(data), '--output', str(output), '--opts', *TINY, *opts]


# Run as a script, the trainer saves each rank's weights and EMA weights as it builds them and when it is done:
# rank<R>_start.pth, rank<R>_end.pth in its output folder.
WEIGHTS_PER_RANK = f"""
import os, sys
import torch
sys.path.insert(0, {str(REPO_ROOT)!r})
from classification import train

def save_weights(trainer, moment):
    weights = dict(model=trainer.model.state_dict(), ema=trainer.ema.module.state_dict())
    torch.save(weights, os.path.join(trainer.config.OUTPUT, f'rank{{trainer.distributed.rank}}_{{moment}}.pth'))

build, fit = train.Trainer.__init__, train.Trainer.fit
def build_and_save(self, *args):
    build(self, *args)
    save_weights(self, 'start')
def fit_and_save(self):
    summary = fit(self)
    save_weights(self, 'end')
    return summary
train.Trainer.__init__, train.Trainer.fit = build_and_save, fit_and_save
train.main(sys.argv[1:])
"""


def train_in_process(command) -> str:
    """The run of a ``train_command`` (without a launcher or script), in this process: its log."""
    args = parse_args(command[command.index('classification.train') + 1:])
    run(args)
    return (Path(args.output) / 'log.txt').read_text()


def exit_message(*argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    return str(stop.value.code)


# ---- recipe ---------------------------------------------------------------------------------------------------


def test_recipe_defaults():
    config = load_config(B0_CONFIG)
    assert (config.TRAIN.EPOCHS, config.TRAIN.WARMUP_EPOCHS) == (300, 20)
    assert config.TRAIN.OPTIMIZER.NAME == 'adamw' and tuple(config.TRAIN.OPTIMIZER.BETAS) == (0.9, 0.999)
    assert (config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR, config.TRAIN.MIN_LR) == (5e-4, 5e-7, 5e-6)
    assert (config.TRAIN.WEIGHT_DECAY, config.TRAIN.CLIP_GRAD, config.MODEL.LABEL_SMOOTHING) == (0.05, 5.0, 0.1)
    assert (config.AUG.MIXUP, config.AUG.CUTMIX, config.AUG.MIXUP_SWITCH_PROB) == (0.8, 1.0, 0.5)
    transform = build_transform(config, is_training=True)
    train = repr(transform)
    assert 'RandomResizedCropAndInterpolation(size=(224, 224)' in train and 'bicubic' in train
    # rand-m9-mstd0.5-inc1: 2 ops an image, uniformly from the increasing set, at magnitude 9 with std 0.5
    randaugment, = [t for t in transform.transforms if isinstance(t, RandAugment)]
    assert randaugment.num_layers == 2 and randaugment.choice_weights is None
    assert [op.name for op in randaugment.ops] == list(_RAND_INCREASING_TRANSFORMS)
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in randaugment.ops} == {(9, 0.5, 0.5)}
    assert re.search(r'RandomErasing\(p=0.25, mode=pixel', train)
    # like the authors' (timm's) pipeline, colour jitter applies only when RandAugment is off
    assert 'ColorJitter' not in train
    no_randaugment = load_config(B0_CONFIG, ['AUG.AUTO_AUGMENT', 'none'])
    assert 'ColorJitter(brightness=(0.6, 1.4)' in repr(build_transform(no_randaugment, is_training=True))
    test = repr(build_transform(config, is_training=False))
    assert 'Resize(size=256' in test and 'CenterCrop(size=(224, 224))' in test


def test_recipe_randaugment_ops_run_at_full_magnitude():
    # 'inc1' RandAugment posterizes down to 0 bits, which Pillow 13 rejects: requirements.txt pins Pillow 12
    image = Image.new('RGB', (32, 32), (200, 100, 50))
    for name in _RAND_INCREASING_TRANSFORMS:
        assert AugmentOp(name, prob=1.0, magnitude=10, hparams=dict(img_mean=(124, 116, 104)))(image).size == (32, 32)


def test_variant_configs_differ_only_in_model():
    defaults = get_defaults()
    for path in sorted((REPO_ROOT / 'configs' / 'classification').glob('fat_*.yaml')):
        config = load_config(str(path))
        assert config.MODEL.NAME == path.stem and config.MODEL.NAME in timm.list_models('fat_*')
        for section in ('DATA', 'TRAIN', 'AUG', 'TEST'):
            assert config[section] == defaults[section], (path, section)


def test_drop_path_defaults_to_the_registered_models_rate():
    def final_drop_path(config_path=B0_CONFIG, *opts):
        return build_model(load_config(config_path, opts)).stages[-1].blocks[-1].drop_path2.drop_prob

    assert final_drop_path(str(REPO_ROOT / 'configs' / 'classification' / 'fat_b3.yaml')) == pytest.approx(0.15)
    assert final_drop_path() == pytest.approx(0.05)
    assert final_drop_path(B0_CONFIG, 'MODEL.DROP_PATH_RATE', '0.2') == pytest.approx(0.2)


@pytest.mark.parametrize('world_size,per_gpu_batch', [(4, 128), (8, 128)])
def test_learning_rate_schedule_at_key_epochs(world_size, per_gpu_batch):
    config = load_config(B0_CONFIG, ['DATA.BATCH_SIZE', str(per_gpu_batch)])
    scale = world_size * per_gpu_batch / 512
    steps_per_epoch = 10
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=5e-4 * scale)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch, world_size)

    def lr_at(epoch):
        scheduler.step_update(int(epoch * steps_per_epoch))
        return optimizer.param_groups[0]['lr']

    assert lr_at(0) == pytest.approx(5e-7 * scale)
    assert lr_at(10) == pytest.approx((5e-7 + (5e-4 - 5e-7) / 2) * scale)
    assert lr_at(20) == pytest.approx(5e-4 * scale)
    assert lr_at(160) == pytest.approx((5e-4 + 5e-6) / 2 * scale)
    assert lr_at(300) == pytest.approx(5e-6 * scale)


# ---- bad input ------------------------------------------------------------------------------------------------


def test_malformed_config_files_are_one_line(tmp_path):
    malformed = tmp_path / 'malformed.yaml'
    malformed.write_text('MODEL:\n  NAME: fat_b0\n TRAIN: [\n')
    message = exit_message('--cfg', str(malformed))
    assert message.startswith(f'error: {malformed} is not valid YAML: ') and '\n' not in message
    for content, kind in (('- MODEL\n- TRAIN\n', 'list'), ('fat_b0\n', 'str')):
        malformed.write_text(content)
        assert exit_message('--cfg', str(malformed)) == (
            f'error: {malformed}: a config file holds a mapping of keys (MODEL:, TRAIN:, ...), this one a {kind}')


def test_a_config_not_found_here_is_taken_from_the_packaged_configs(tmp_path, monkeypatch, capsys):
    """Run from another folder, a config given by its path under configs/ (with or without that prefix) is the
    packaged one, and the command says so; a local file of that path wins; a path found nowhere is left for the
    not-found error."""
    from classification.commands import find_config

    monkeypatch.chdir(tmp_path)
    for given in ('configs/classification/fat_b0.yaml', 'classification/fat_b0.yaml'):
        assert find_config(given) == B0_CONFIG
        assert capsys.readouterr().err == f'{given} is not a file here: using the packaged config {B0_CONFIG}\n'
    (tmp_path / 'classification').mkdir()
    (tmp_path / 'classification' / 'fat_b0.yaml').write_text('MODEL:\n  NAME: fat_b1\n')
    assert find_config('classification/fat_b0.yaml') == 'classification/fat_b0.yaml'
    assert parse_args(['--cfg', 'classification/fat_b0.yaml']).cfg == 'classification/fat_b0.yaml'
    assert find_config('classification/fat_b9.yaml') == 'classification/fat_b9.yaml'
    assert capsys.readouterr().err == ''
    assert 'config file not found: classification/fat_b9.yaml' in exit_message('--cfg', 'classification/fat_b9.yaml')


@pytest.mark.slow  # runs a process of its own: left out of the fast tier
def test_trainer_benchmark_runs_this_copys_trainer_and_config(tmp_path):
    """Both runs start from the folder that holds this code's package, the trainer by its module name and the
    packaged config (in the checkout: classification.train, configs/; installed: fat_vit.classification.train,
    fat_vit/configs/), timm's script with this code's models registered."""
    from classification import trainer_benchmark

    args = argparse.Namespace(model='fat_b0', batch_size=4, img_size=32, workers=0, epochs=2,
                              timm_train_script=tmp_path / 'train.py')
    command = trainer_benchmark.our_command(args, tmp_path / 'data', tmp_path / 'ours')
    assert command[1:3] == ['-m', 'classification.train'] and command[command.index('--cfg') + 1] == B0_CONFIG
    assert trainer_benchmark.IMPORT_ROOT == REPO_ROOT
    launcher = trainer_benchmark.timm_command(args, tmp_path / 'data', tmp_path / 'timm')[2]
    assert launcher.startswith('import runpy, sys, classification; ')
    result = subprocess.run([sys.executable, *command[1:3], '--help'], cwd=trainer_benchmark.IMPORT_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith('usage: python -m classification.train ')


def test_config_errors_name_the_key(tmp_path):
    assert 'TRAIN.EPOCH' in exit_message('--cfg', B0_CONFIG, '--opts', 'TRAIN.EPOCH', '2')
    assert 'DATA.IMG_SIZE' in exit_message('--cfg', B0_CONFIG, '--opts', 'DATA.IMG_SIZE', 'large')
    bad = tmp_path / 'bad.yaml'
    bad.write_text('MODEL:\n  NAME: fat_b0\n  DEPTH: 3\n')
    assert 'MODEL.DEPTH' in exit_message('--cfg', str(bad))
    assert 'not found' in exit_message('--cfg', str(tmp_path / 'missing.yaml'))
    assert 'MODEL.NAME' in exit_message('--cfg', B0_CONFIG, '--opts', 'MODEL.NAME', 'resnet50')
    assert 'KEY VALUE pairs' in exit_message('--cfg', B0_CONFIG, '--opts', 'TRAIN.EPOCHS')


def test_data_errors_are_one_line(tmp_path):
    common = ['--cfg', B0_CONFIG, '--output', str(tmp_path / 'out'), '--opts', *TINY]
    assert 'not found' in exit_message('--data-path', str(tmp_path / 'nowhere'), *common)

    data = write_image_folder(tmp_path / 'data', 2, 1)
    empty = data / 'train' / 'disc'
    for image in empty.iterdir():
        image.unlink()
    assert f'class folder {empty} has no images' in exit_message('--data-path', str(data), *common)

    mismatched = write_image_folder(tmp_path / 'mismatch', 2, 1)
    (mismatched / 'val' / 'bar').rename(mismatched / 'val' / 'rod')
    message = exit_message('--data-path', str(mismatched), *common)
    assert 'differ' in message and "only in train: ['bar']" in message and "only in val: ['rod']" in message


def unreadable_images(folder: Path):
    """Image files (PIL reads a file's format from its content, whatever its extension) on which PIL's decoders
    fail with errors other than OSError: a QOI image cut inside its header (IndexError) and a DDS image with
    unknown pixel-format flags (NotImplementedError)."""
    image = Image.new('RGB', (8, 8), (255, 0, 0))
    qoi, dds = io.BytesIO(), io.BytesIO()
    image.save(qoi, 'QOI')
    image.save(dds, 'DDS')
    dds = bytearray(dds.getvalue())
    dds[80:84] = (0x40000000).to_bytes(4, 'little')
    (folder / 'cut.png').write_bytes(qoi.getvalue()[:13])
    (folder / 'odd.png').write_bytes(bytes(dds))
    return folder / 'cut.png', folder / 'odd.png'


def test_any_decoding_error_skips_the_image(tmp_path, caplog):
    data = write_image_folder(tmp_path / 'data', 2, 1)
    errors = []
    for path in unreadable_images(data / 'train' / 'disc'):
        with pytest.raises(Exception) as error:
            Image.open(path).convert('RGB')
        errors.append(type(error.value))
    assert errors == [IndexError, NotImplementedError]
    train, _ = build_datasets(load_config(B0_CONFIG, TINY, **{'DATA.DATA_PATH': str(data)}))
    assert len(train) == 8
    with caplog.at_level(logging.WARNING):
        items = [train[i] for i in range(len(train))]
    # the item of cut.png skips it and odd.png, the one after it; the item of odd.png skips odd.png
    assert [item[2] for item in items] == [0, 0, 0, 0, 2, 1, 0, 0]  # classes bar, disc, noise
    assert all(item[0].shape == (3, 32, 32) for item in items)
    assert 'cut.png (IndexError: ' in caplog.text and 'odd.png (NotImplementedError: ' in caplog.text


@pytest.mark.parametrize('print_freq, where', [(1, 'step 1/3'), (3, 'steps 1-3/3')])
def test_non_finite_loss_stops_with_the_step_range(tmp_path, monkeypatch, print_freq, where):
    """The loss is read once per PRINT_FREQ steps: the stop names the steps since the last read. The TensorBoard
    writer is closed (flushed) on the way out."""
    from torch.utils.tensorboard import SummaryWriter

    closed = []
    close = SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, 'close', lambda writer: (closed.append(writer.log_dir), close(writer)))
    data = write_image_folder(tmp_path / 'data', 4, 1)
    weights = timm.create_model('fat_b0', num_classes=3).state_dict()
    weights['head.fc.weight'].fill_(float('nan'))
    torch.save(weights, tmp_path / 'nan.pth')
    message = exit_message('--cfg', B0_CONFIG, '--data-path', str(data), '--output', str(tmp_path / 'out'),
                           '--batch-size', '4', '--opts', *TINY, 'MODEL.PRETRAINED', str(tmp_path / 'nan.pth'),
                           'PRINT_FREQ', str(print_freq))
    assert message == f'error: non-finite loss at epoch 1, {where}: stopping'
    assert closed == [str(tmp_path / 'out' / 'tensorboard')]


def test_training_loop_reads_the_device_once_per_report(tmp_path, monkeypatch):
    """No per-step host synchronisation in the trainer: its code reads a tensor's value once per PRINT_FREQ steps
    (6 steps, 2 reports), never per step. (What libraries read inside a step, such as the CPU optimizer's step
    counters, is theirs.)"""
    data = write_image_folder(tmp_path / 'data', 4, 1)
    config = load_config(B0_CONFIG, [*TINY, 'PRINT_FREQ', '3', 'DATA.BATCH_SIZE', '2'],
                         **{'DATA.DATA_PATH': str(data), 'OUTPUT': str(tmp_path / 'out')})
    trainer = Trainer(config, Distributed())
    trainer.train_loader = list(trainer.train_loader)  # loaded beforehand: the data pipeline's own reads don't count
    ours = str(REPO_ROOT / 'classification')
    reads = []
    for method in ('item', 'tolist', '__float__', '__int__', '__bool__'):
        original = getattr(torch.Tensor, method)

        def counted(tensor, *args, original=original, method=method):
            if sys._getframe(1).f_code.co_filename.startswith(ours):
                reads.append(method)
            return original(tensor, *args)
        monkeypatch.setattr(torch.Tensor, method, counted)
    trainer.train_one_epoch(0)
    monkeypatch.undo()
    assert trainer.steps_per_epoch == 6 and reads == ['tolist', 'tolist']


# ---- training, evaluation, resuming ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_with_corrupt_images_then_eval(tmp_path):
    data = write_image_folder(tmp_path / 'data', 6, 3, corrupt=True)
    output = tmp_path / 'ddp'
    script = tmp_path / 'train_saving_weights_per_rank.py'
    script.write_text(WEIGHTS_PER_RANK)
    run_ok(train_command(data, output, 'TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', '4', 'PRINT_FREQ', '2', nproc=2,
                         script=script))

    # every rank's EMA starts from the weights every rank trains (rank 0's, broadcast by DDP), and stays equal to
    # the others': BatchNorm statistics included, which on the CPU (no SyncBatchNorm) are rank 0's from each
    # evaluation on
    for moment in ('start', 'end'):
        ranks = [load_checkpoint_file(output / f'rank{rank}_{moment}.pth') for rank in (0, 1)]
        for key, value in ranks[0]['ema'].items():
            assert torch.equal(value, ranks[1]['ema'][key]), (moment, key)
            assert torch.equal(ranks[0]['model'][key], ranks[1]['model'][key]), (moment, key)
    start, end = (load_checkpoint_file(output / f'rank0_{moment}.pth') for moment in ('start', 'end'))
    assert all(torch.equal(value, start['model'][key]) for key, value in start['ema'].items())
    assert not torch.equal(end['ema']['head.fc.weight'], start['ema']['head.fc.weight'])
    assert torch.equal(load_checkpoint_file(output / 'latest.pth')['model_ema']['head.fc.weight'],
                       end['ema']['head.fc.weight'])

    summary = json.loads((output / 'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['global_batch'] == 8
    assert [entry['epoch'] for entry in summary['history']] == [1, 2]
    assert all(math.isfinite(entry['train_loss']) for entry in summary['history'])
    assert summary['final']['images'] == 9  # the 3 corrupt validation files are left out
    log = (output / 'log.txt').read_text()
    assert 'corrupt image skipped' in log and 'broken.png' in log
    assert re.search(r'epoch 2: \d+ corrupt image\(s\) skipped', log)
    # each process has 21 / 2 images, 2 batches of 4: one report per 2 batches, with the interval's averages
    assert len(re.findall(r'epoch 2/2 step 2/2  loss [\d.]+  lr [\d.e-]+  grad norm [\d.]+  [\d.]+ img/s  '
                          r'data [\d.]+ s  compute [\d.]+ s per batch', log)) == 1
    # summary.json holds that last interval's averages (what make gpu-check reads), and no resumed checkpoint
    last = summary['history'][-1]['last_interval']
    assert f"epoch 2/2 step 2/2  loss {last['loss']:.4f}  lr {last['lr']:.3e}  grad norm {last['grad_norm']:.3f}  " \
        f"{last['images_per_second']:.1f} img/s  data {last['data_seconds']:.3f} s" in log
    assert summary['resumed_from'] is None
    assert {'latest.pth', 'best.pth', 'ckpt_epoch_1.pth', 'ckpt_epoch_2.pth', 'config.yaml', 'summary.csv'} <= \
        set(os.listdir(output))
    assert load_config(str(output / 'config.yaml')).DATA.BATCH_SIZE == 4
    rows = list(csv.DictReader((output / 'summary.csv').open()))
    assert [row['epoch'] for row in rows] == ['1', '2'] and float(rows[1]['eval_acc1']) == summary['final']['acc1']
    scalars = EventAccumulator(str(output / 'tensorboard')).Reload()
    assert [event.step for event in scalars.Scalars('train/loss')] == [2, 4]  # optimizer steps
    assert [event.step for event in scalars.Scalars('val/acc1')] == [2, 4]

    # --eval of this trainer's checkpoint reports what the checkpoint's own logits give, on 2 processes as on 1 (in
    # this process)
    for nproc in (1, 2):
        evaluation = tmp_path / f'eval_{nproc}'
        command = train_command(data, evaluation, nproc=nproc)
        command[command.index('--opts'):command.index('--opts')] = ['--eval', '--resume', str(output / 'latest.pth')]
        if nproc == 1:
            run(parse_args(command[3:]))
        else:
            run_ok(command)
        log = (evaluation / 'eval_log.txt').read_text()
        accuracy = re.search(r'on 9 images: acc@1 ([\d.]+) %', log)
        assert accuracy and float(accuracy.group(1)) == pytest.approx(summary['final']['acc1'], abs=0.01)
        assert float(accuracy.group(1)) == pytest.approx(top1_of_checkpoint(output / 'latest.pth', data), abs=0.01)
        ema_accuracy = re.search(r"\(EMA 'model_ema' acc@1 ([\d.]+) %", log)
        assert ema_accuracy and float(ema_accuracy.group(1)) == pytest.approx(summary['final']['ema_acc1'], abs=0.01)
        assert 'the weights the checkpoint calls best, which every loader takes: the ' in log
        assert not (evaluation / 'log.txt').exists()


def top1_of_checkpoint(checkpoint: Path, data: Path) -> float:
    """The top-1 accuracy (%) of a trainer checkpoint on the readable validation images, from per-sample logits."""
    config = load_config(B0_CONFIG, TINY, **{'DATA.DATA_PATH': str(data)})
    model = build_model(config)
    model.load_state_dict(load_checkpoint_file(checkpoint)['model'])
    _, val = build_datasets(config)
    items = [val[i] for i in range(len(val))]
    readable = [item for item in items if item is not None]
    with torch.no_grad():
        predictions = model.eval()(torch.stack([item[0] for item in readable])).argmax(1)
    return 100 * (predictions == torch.tensor([item[1] for item in readable])).float().mean().item()


@pytest.mark.slow
def test_eval_of_authors_checkpoint(tmp_path, reference_dir):
    data = write_image_folder(tmp_path / 'data', 2, 4)
    checkpoint = reference_dir / 'fat_b0_official_format.pth'
    opts = [*TINY, 'MODEL.NUM_CLASSES', '1000', 'DATA.IMG_SIZE', '64']
    run(parse_args(['--cfg', B0_CONFIG, '--data-path', str(data), '--output', str(tmp_path / 'eval'), '--eval',
                    '--resume', str(checkpoint), '--opts', *opts]))

    model = timm.create_model('fat_b0', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(checkpoint), custom_load=True)).eval()
    _, val = build_datasets(load_config(B0_CONFIG, opts, **{'DATA.DATA_PATH': str(data)}))
    assert_reported_accuracy_matches((tmp_path / 'eval' / 'eval_log.txt').read_text(), model, val)


# Run as a script, the trainer records, before each batch's forward pass, how many gradient buckets DDP has
# all-reduced so far (rank<R>_syncs.json in its output folder).
SYNCS_PER_BATCH = f"""
import json, os, sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from classification import train

build = train.Trainer.__init__
def build_and_count(self, *args):
    build(self, *args)
    reduced, before_batches = [0], []
    def counting_allreduce(state, bucket):
        reduced[0] += 1
        return allreduce_hook(state, bucket)
    self.train_model.register_comm_hook(None, counting_allreduce)
    criterion = self.criterion
    def recording_criterion(*inputs):
        before_batches.append(reduced[0])
        return criterion(*inputs)
    self.criterion = recording_criterion
    self.before_batches = before_batches
fit = train.Trainer.fit
def fit_and_save(self):
    summary = fit(self)
    with open(os.path.join(self.config.OUTPUT, f'rank{{self.distributed.rank}}_syncs.json'), 'w') as f:
        json.dump(self.before_batches, f)
    return summary
train.Trainer.__init__, train.Trainer.fit = build_and_count, fit_and_save
train.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_gradient_accumulation_under_ddp_syncs_once_per_step(tmp_path):
    """TRAIN.ACCUMULATION_STEPS 2 on 2 processes: DDP all-reduces the gradients on the second batch of each step
    only (no_sync on the first), and the processes' weights stay equal."""
    data = write_image_folder(tmp_path / 'data', 4, 1)
    script = tmp_path / 'train_counting_syncs.py'
    script.write_text(SYNCS_PER_BATCH)
    output = tmp_path / 'run'
    run_ok(train_command(data, output, 'TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', '2', 'TRAIN.ACCUMULATION_STEPS', '2',
                         'PRINT_FREQ', '2', nproc=2, script=script))
    for rank in (0, 1):
        before_batches = json.loads((output / f'rank{rank}_syncs.json').read_text())
        buckets = before_batches[2]
        assert buckets > 0 and before_batches == [0, 0, buckets, buckets]  # 2 batches of 2 per step, 1 step of 4
    summary = json.loads((output / 'summary.json').read_text())
    assert summary['global_batch'] == 8 and [entry['epoch'] for entry in summary['history']] == [1, 2]


def b0_predicting(label: int, seed: int) -> torch.nn.Module:
    """A FAT-B0 for 3 classes that predicts ``label`` for every image."""
    torch.manual_seed(seed)
    model = timm.create_model('fat_b0', num_classes=3)
    with torch.no_grad():
        model.get_classifier().bias[label] = 1e4
    return model.eval()


def foreign_checkpoint(path: Path, trained: torch.nn.Module, ema: torch.nn.Module) -> Path:
    """A checkpoint of timm's trainer, as the LVT authors' (with an optimizer, EMA weights, no best accuracy)."""
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    trained(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.save(dict(epoch=5, arch='fat_b0', state_dict=trained.state_dict(), state_dict_ema=ema.state_dict(),
                    optimizer=optimizer.state_dict(), version=2, args=argparse.Namespace(model_ema=True)), path)
    return path


@pytest.mark.parametrize('layout', ['this trainer', 'timm trainer'])
def test_eval_needs_only_the_validation_split_and_reports_the_best_weights(tmp_path, layout):
    data = write_image_folder(tmp_path / 'data', 1, 4)
    shutil.rmtree(data / 'train')
    for image in ('2.png', '3.png'):
        (data / 'val' / 'noise' / image).unlink()  # 4, 4 and 2 images: each class gives another accuracy
    classes = sorted(path.name for path in (data / 'val').iterdir())
    trained, ema = b0_predicting(classes.index('disc'), seed=1), b0_predicting(classes.index('noise'), seed=2)
    checkpoint = tmp_path / 'checkpoint.pth'
    if layout == 'this trainer':
        torch.save(dict(model=trained.state_dict(), model_ema=ema.state_dict(), epoch=0, max_accuracy=40.,
                        scores=dict(epoch=1, metric='acc1', model=40., model_ema=20.)), checkpoint)
    else:
        foreign_checkpoint(checkpoint, trained, ema)
    output = tmp_path / 'eval'
    result = run(parse_args(['--cfg', B0_CONFIG, '--data-path', str(data), '--output', str(output), '--eval',
                             '--resume', str(checkpoint), '--opts', *TINY]))
    assert (result['images'], result['acc1'], result['ema_acc1']) == (10, 40., 20.)
    log = (output / 'eval_log.txt').read_text()
    assert f'{checkpoint} on 10 images: acc@1 40.00 %  acc@5 100.00 %  (EMA ' in log
    best = 'model' if layout == 'this trainer' else 'state_dict_ema'
    assert result['best_weights'] == best
    assert f"the weights the checkpoint calls best, which every loader takes: the " \
           f"{'trained' if best == 'model' else 'EMA'} weights, {best!r}" in log
    assert f"data: validation 10 images in 3 classes ({data / 'val'})" in log
    assert not (output / 'log.txt').exists()


@pytest.mark.slow
def test_a_foreign_checkpoint_resumes_as_weights_and_ema_weights(tmp_path, monkeypatch):
    """The LVT authors' timm-trainer checkpoint (optimizer, EMA, no best accuracy): its weights and EMA weights
    continue, with a new optimizer and schedule; the EMA continues from theirs (it does not restart at step 1),
    by the configured decay."""
    data = write_image_folder(tmp_path / 'data', 4, 1)
    checkpoint = foreign_checkpoint(tmp_path / 'lvt_authors.pth', b0_predicting(0, seed=1), b0_predicting(1, seed=2))
    expected = dict(load_checkpoint_file(checkpoint)['state_dict_ema'])
    step = Trainer.optimizer_step

    def step_and_follow(trainer, global_step):
        norm = step(trainer, global_step)
        for name, value in trainer.model.named_parameters():
            expected[name] = 0.5 * expected[name] + 0.5 * value.detach()
        return norm
    monkeypatch.setattr(Trainer, 'optimizer_step', step_and_follow)
    output = tmp_path / 'out'
    summary = run(parse_args(['--cfg', B0_CONFIG, '--data-path', str(data), '--output', str(output), '--resume',
                              str(checkpoint), '--opts', *TINY, 'TRAIN.EMA.DECAY', '0.5', 'DATA.BATCH_SIZE', '4',
                              'TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0']))
    log = (output / 'log.txt').read_text()
    assert f"{checkpoint} holds another trainer's checkpoint: its weights and EMA weights are loaded, and training " \
           'starts at epoch 1 with a new optimizer and schedule' in log
    assert [entry['epoch'] for entry in summary['history']] == [1]
    ema = load_checkpoint_file(output / 'latest.pth')['model_ema']
    for name, value in timm.create_model('fat_b0', num_classes=3).named_parameters():
        torch.testing.assert_close(ema[name], expected[name], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_the_ema_follows_the_trained_weights_by_its_decay(tmp_path):
    """From its first step (where timm's EMA takes the weights as they are) on, each step moves the EMA by
    1 - decay of the way to the trained weights."""
    data = write_image_folder(tmp_path / 'data', 4, 1)
    config = load_config(B0_CONFIG, [*TINY, 'TRAIN.EMA.DECAY', '0.5', 'DATA.BATCH_SIZE', '4'],
                         **{'DATA.DATA_PATH': str(data), 'OUTPUT': str(tmp_path / 'out')})
    trainer = Trainer(config, Distributed())
    trained = []
    step = trainer.optimizer_step

    def step_and_record(global_step):
        norm = step(global_step)
        trained.append({name: value.clone() for name, value in trainer.model.named_parameters()})
        return norm
    trainer.optimizer_step = step_and_record
    trainer.train_one_epoch(0)
    assert len(trained) == 3
    expected = trained[0]
    for weights in trained[1:]:
        expected = {name: 0.5 * expected[name] + 0.5 * value for name, value in weights.items()}
    ema = dict(trainer.ema.module.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(ema[name], value, rtol=1e-6, atol=1e-7)
    assert not torch.equal(ema['head.fc.weight'], trained[-1]['head.fc.weight'])


def killed_at_step(command, step: int):
    """``command`` (a ``python -m classification.train`` command) run to SIGKILL itself right after optimizer
    step ``step``: a crash at a chosen point, whatever the machine's speed."""
    module = command.index('classification.train')
    launcher = ('import os, signal, sys\n'
                'from classification import train\n'
                'step = train.Trainer.optimizer_step\n'
                'def killing_step(self, global_step):\n'
                '    norm = step(self, global_step)\n'
                f'    if global_step == {step}:\n'
                '        os.kill(os.getpid(), signal.SIGKILL)\n'
                '    return norm\n'
                'train.Trainer.optimizer_step = killing_step\n'
                'train.main(sys.argv[1:])')
    result = subprocess.run([sys.executable, '-c', launcher, *command[module + 1:]], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp('tiny') / 'data', 4, 1)


def first_epoch(data: Path, output: Path, *opts: str, watch=None) -> dict:
    """The first epoch of the full recipe (3 steps of batch 4) from seed 0, in this process: each step's gradient
    norm, and what ``watch(trainer)`` (called before training) returns."""
    config = load_config(B0_CONFIG, [*TINY, 'DATA.BATCH_SIZE', '4', *opts],
                         **{'DATA.DATA_PATH': str(data), 'OUTPUT': str(output)})
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    trainer = Trainer(config, Distributed())
    watched = watch(trainer) if watch else None
    step = trainer.optimizer_step
    grad_norms = []

    def step_and_record(global_step):
        grad_norms.append(step(global_step).item())
        return grad_norms[-1]
    trainer.optimizer_step = step_and_record
    stats = trainer.train_one_epoch(0)
    return dict(trainer=trainer, loss=stats['loss'], grad_norms=grad_norms, watched=watched)


def count_block_calls(trainer) -> list:
    calls = []
    # a pre-hook: the recomputation stops once it has what the backward pass needs, before forward hooks run
    trainer.model.stages[-1].blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


@pytest.fixture(scope='module')
def plain_first_epoch(tiny_data, tmp_path_factory):
    return first_epoch(tiny_data, tmp_path_factory.mktemp('plain'), watch=count_block_calls)


@pytest.mark.slow
@pytest.mark.parametrize('switch', ['TRAIN.USE_CHECKPOINT', 'TRAIN.CHANNELS_LAST'])
def test_memory_switches_train_as_without_them(tiny_data, plain_first_epoch, tmp_path, switch):
    """Gradient checkpointing recomputes each block in the backward pass, channels-last runs the convolutions on
    channels-last weights and batches: the losses and gradients are those of a run without them."""
    run = first_epoch(tiny_data, tmp_path, switch, 'True', watch=count_block_calls)
    assert len(plain_first_epoch['watched']) == 3
    if switch == 'TRAIN.USE_CHECKPOINT':
        assert len(run['watched']) == 2 * 3  # forward, and again in the backward pass
    else:
        assert run['trainer'].model.stem.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert run['loss'] == pytest.approx(plain_first_epoch['loss'], rel=1e-5)
    assert run['grad_norms'] == pytest.approx(plain_first_epoch['grad_norms'], rel=1e-4)


@pytest.mark.slow
def test_sgd_steps_with_nesterov_momentum(tiny_data, tmp_path):
    """SGD's first step, by hand: the momentum buffer is the (clipped) gradient plus weight decay, and Nesterov's
    update is (1 + momentum) times it; norms and biases have no weight decay."""
    def watch_first_step(trainer):
        optimizer = trainer.optimizer
        seen = {}
        step = optimizer.step

        def step_and_watch(*args, **kwargs):
            if not seen:
                for name in ('stem.conv1.conv.weight', 'head.fc.bias'):
                    parameter = trainer.model.get_parameter(name)
                    seen[name] = (parameter.detach().clone(), parameter.grad.clone(), optimizer.param_groups[0]['lr'])
                step(*args, **kwargs)
                for name in list(seen):
                    seen[name] += (trainer.model.get_parameter(name).detach().clone(),)
                return None
            return step(*args, **kwargs)
        optimizer.step = step_and_watch
        return seen
    run = first_epoch(tiny_data, tmp_path, 'TRAIN.OPTIMIZER.NAME', 'sgd', 'TRAIN.BASE_LR', '50.',
                      'TRAIN.WARMUP_EPOCHS', '0', watch=watch_first_step)
    optimizer = run['trainer'].optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(group['nesterov'] and group['momentum'] == 0.9 for group in optimizer.param_groups)
    for name, weight_decay in (('stem.conv1.conv.weight', 0.05), ('head.fc.bias', 0.)):
        before, grad, lr, after = run['watched'][name]
        direction = grad + weight_decay * before
        torch.testing.assert_close(after, before - lr * 1.9 * direction, rtol=1e-5, atol=1e-7)
        assert (after - before).abs().max() > 1e-3
    assert all(math.isfinite(norm) for norm in run['grad_norms'])


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data, plain_first_epoch, tmp_path, monkeypatch):
    """TRAIN.COMPILE trains through torch.compile's graphs (TorchDynamo and AOTAutograd; without Inductor's code
    generation, which takes minutes on 2 cores and is checked on the models by test_model's compile test)."""
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='aot_eager'))
    run = first_epoch(tiny_data, tmp_path, 'TRAIN.COMPILE', 'True')
    assert isinstance(run['trainer'].train_model, torch._dynamo.eval_frame.OptimizedModule)
    assert run['loss'] == pytest.approx(plain_first_epoch['loss'], rel=1e-4)
    assert run['grad_norms'] == pytest.approx(plain_first_epoch['grad_norms'], rel=1e-3)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    """Killed in its second epoch, after the first epoch's checkpoint, and restarted, a run ends with the weights
    of an uninterrupted one, bit for bit: with 2 persistent loader workers, whose augmentation is seeded per sample
    from the epoch, the full recipe (RandAugment, random erasing, Mixup/CutMix, drop path) and an EMA. The killed run
    has a process of its own; the others run in this one."""
    data = write_image_folder(tmp_path / 'data', 8, 2)
    opts = ['TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', '4', 'DATA.NUM_WORKERS', '2']
    train_in_process(train_command(data, tmp_path / 'uninterrupted', *opts))

    output = tmp_path / 'interrupted'
    killed_at_step(train_command(data, output, *opts), step=6 + 3)  # 6 steps per epoch: the 3rd of epoch 2
    log = (output / 'log.txt').read_text()
    assert 'epoch 2/2 step 2/6' in log and 'epoch 2/2 step 3/6' not in log
    assert [row['epoch'] for row in csv.DictReader((output / 'summary.csv').open())] == ['1']

    resumed_log = train_in_process(train_command(data, output, *opts))[len(log):]
    assert 'auto-resume' in resumed_log and 'epoch 1 done' in resumed_log
    assert 'not restored' not in resumed_log and 'rebuilt' not in resumed_log
    summary = json.loads((output / 'summary.json').read_text())
    reference = json.loads((tmp_path / 'uninterrupted' / 'summary.json').read_text())
    assert [entry['epoch'] for entry in summary['history']] == [1, 2]
    assert [e['train_loss'] for e in summary['history']] == [e['train_loss'] for e in reference['history']]
    assert summary['resumed_from'] == dict(checkpoint=str(output / 'latest.pth'), epochs_done=1)
    assert [row['epoch'] for row in csv.DictReader((output / 'summary.csv').open())] == ['1', '2']
    resumed = load_checkpoint_file(output / 'latest.pth')
    uninterrupted = load_checkpoint_file(tmp_path / 'uninterrupted' / 'latest.pth')
    for weights in ('model', 'model_ema'):
        for key, value in uninterrupted[weights].items():
            assert torch.equal(resumed[weights][key], value), (weights, key)


# the 1-epoch run's config (3 steps of batch 4, no EMA), beside TINY's
ONE_EPOCH = ['TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0', 'DATA.BATCH_SIZE', '4', 'TRAIN.EMA.ENABLED', 'False']


@pytest.fixture(scope='module')
def one_epoch_run(tmp_path_factory):
    """A finished 1-epoch run without EMA (3 steps of batch 4): the checkpoint the resume cases start from."""
    root = tmp_path_factory.mktemp('one_epoch')
    data = write_image_folder(root / 'data', 4, 1)
    train_in_process(train_command(data, root / 'run', *ONE_EPOCH))
    return dict(data=data, checkpoint=root / 'run' / 'latest.pth')


def continue_command(one_epoch_run, output: Path, *opts: str, weights_only=False, allow_config_change=False):
    """The command that continues the 1-epoch run into a 2-epoch one in ``output``, with ``opts`` changing its
    config (auto-resuming from a copy of its checkpoint, or with --resume of its weights)."""
    output.mkdir()
    checkpoint = load_checkpoint_file(one_epoch_run['checkpoint'])
    if weights_only:
        torch.save(checkpoint['model'], output / 'weights.pth')
    else:
        shutil.copy(one_epoch_run['checkpoint'], output / 'latest.pth')
    command = train_command(one_epoch_run['data'], output, *ONE_EPOCH, 'TRAIN.EPOCHS', '2', *opts)
    flags = (['--resume', str(output / 'weights.pth')] if weights_only else []) + \
        (['--allow-config-change'] if allow_config_change else [])
    command[command.index('--opts'):command.index('--opts')] = flags
    return command


def continue_run(one_epoch_run, output: Path, *opts: str, **options) -> str:
    """Run ``continue_command`` in this process; its log."""
    return train_in_process(continue_command(one_epoch_run, output, *opts, **options))


@pytest.mark.slow
@pytest.mark.parametrize('weights_only', [False, True], ids=['trainer checkpoint without EMA', 'weights only'])
def test_resume_with_ema_starts_the_ema_from_the_resumed_weights(one_epoch_run, tmp_path, weights_only):
    # turning the EMA on changes the recipe: a resumed run needs --allow-config-change (weights alone start a new one)
    log = continue_run(one_epoch_run, tmp_path / 'run', 'TRAIN.EMA.ENABLED', 'True', weights_only=weights_only,
                       allow_config_change=not weights_only)
    assert 'holds no EMA weights: the EMA starts from its weights' in log
    if not weights_only:
        assert "continuing with the new values (--allow-config-change): TRAIN.EMA.ENABLED False -> True" in log
    resumed = load_checkpoint_file(one_epoch_run['checkpoint'])['model']
    ema = load_checkpoint_file(tmp_path / 'run' / 'latest.pth')['model_ema']
    fresh = timm.create_model('fat_b0', num_classes=3).state_dict()
    for key in ('stem.conv1.conv.weight', 'head.fc.weight'):
        # a 0.9998 average over 3 steps has barely left the weights it started from
        assert (ema[key] - resumed[key]).abs().max() < 0.01 * (fresh[key] - resumed[key]).abs().max()


@pytest.mark.slow
def test_resume_on_another_validation_split_starts_a_new_best(one_epoch_run, tmp_path):
    """DATA.VAL_SPLIT may change on resume, but best.pth never compares accuracies measured on two splits: the
    best starts anew, with a warning."""
    log = continue_run(one_epoch_run, tmp_path / 'run', 'DATA.VAL_SPLIT', 'train')
    assert "scored its best on the validation split 'val', this run validates on 'train': the best checkpoint " \
           "starts anew from this run's scores" in log
    latest = load_checkpoint_file(tmp_path / 'run' / 'latest.pth')
    assert latest['epoch'] == 1 and latest['max_accuracy'] == latest['history'][-1]['acc1']  # epoch 2's, on 'train'

    assert 'validation split' not in continue_run(one_epoch_run, tmp_path / 'same', 'DATA.VAL_SPLIT', 'val')


@pytest.mark.slow
def test_resume_with_another_batch_rebuilds_the_schedule(one_epoch_run, tmp_path):
    log = continue_run(one_epoch_run, tmp_path / 'run', 'DATA.BATCH_SIZE', '2')
    assert re.search(r'was trained with a global batch of 4, 3 steps per epoch; this run has 2, 6: the learning-rate '
                     r'schedule is rebuilt for this run from epoch 2', log)
    assert 'another config' not in log
    config = load_config(B0_CONFIG, [*TINY, *ONE_EPOCH, 'TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', '2'])
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=scaled_learning_rates(config, world_size=1)['lr'])
    scheduler = build_scheduler(config, optimizer, steps_per_epoch=6, world_size=1)
    reported = [float(lr) for lr in re.findall(r'epoch 2/2 step \d/6  loss [\d.]+  lr ([\d.e-]+)', log)]
    expected = []
    for step in range(7, 13):  # the rate after each optimizer step of epoch 2, for batch 2
        scheduler.step_update(step)
        expected.append(scheduler.optimizer.param_groups[0]['lr'])
    assert reported == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_resume_in_fp16_from_a_bf16_run(one_epoch_run, tmp_path):
    """CPU autocast runs fp16 with a GradScaler, whose state a bf16 (or float32) run does not have."""
    log = continue_run(one_epoch_run, tmp_path / 'run', 'AMP', 'fp16')
    assert 'has no fp16 loss-scale state (trained in bf16 or float32): the GradScaler starts afresh' in log
    assert re.search(r'epoch 2/2 step 3/3 .* loss scale \d+', log)


@pytest.mark.slow
def test_a_finished_run_stops_at_once_and_writes_nothing(one_epoch_run, tmp_path, capsys):
    output = one_epoch_run['checkpoint'].parent
    before = {path: (path.stat().st_mtime_ns, path.stat().st_size) for path in output.rglob('*')}
    command = train_command(one_epoch_run['data'], output, *ONE_EPOCH, 'PRINT_FREQ', '5', 'DATA.NUM_WORKERS', '1')
    assert run(parse_args(command[3:])) is None  # with what may change on resume
    printed = capsys.readouterr().out
    assert f'{output / "latest.pth"}: all 1 epochs are done, nothing to train' in printed
    assert 'data:' not in printed  # not even the data was read
    assert {path: (path.stat().st_mtime_ns, path.stat().st_size) for path in output.rglob('*')} == before


@pytest.mark.slow
def test_resume_with_another_recipe_stops_naming_the_keys(one_epoch_run, tmp_path):
    """The same output folder with another recipe is another run: it stops before anything is written, unless
    the user asks to continue with the new values."""
    command = continue_command(one_epoch_run, tmp_path / 'run', 'AUG.MIXUP', '0.5', 'TRAIN.BASE_LR', '1e-3')
    before = sorted(path.name for path in (tmp_path / 'run').iterdir())
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
    assert result.stderr.startswith(f'error: {tmp_path / "run" / "latest.pth"} is a run with another config: '
                                    'AUG.MIXUP 0.8 -> 0.5; TRAIN.BASE_LR 0.0005 -> 0.001. Start a new run')
    assert '--allow-config-change' in result.stderr
    assert sorted(path.name for path in (tmp_path / 'run').iterdir()) == before

    # --resume of another run's checkpoint is held to the same rule (in this process from here on)
    command = train_command(one_epoch_run['data'], tmp_path / 'new', *ONE_EPOCH, 'TRAIN.EPOCHS', '2', 'SEED', '1')
    command[command.index('--opts'):command.index('--opts')] = ['--resume', str(one_epoch_run['checkpoint'])]
    assert 'another config: SEED 0 -> 1' in exit_message(*command[3:])

    log = train_in_process(command[:command.index('--opts')] + ['--allow-config-change']
                           + command[command.index('--opts'):])
    assert 'continuing with the new values (--allow-config-change): SEED 0 -> 1' in log
    assert 'resuming from' in log and 'epoch 1 done' in log


def test_default_output_folder_is_per_model_and_config(tmp_path, monkeypatch):
    """Runs of different models or config files never share a folder (and so never resume each other), even two
    config files of one name in two folders."""
    configs = sorted((REPO_ROOT / 'configs' / 'classification').rglob('*.yaml'))
    outputs = {path: load_config(str(path)).OUTPUT for path in configs}
    assert outputs[REPO_ROOT / 'configs' / 'classification' / 'fat_b0.yaml'] == os.path.join('output', 'fat_b0',
                                                                                             'fat_b0')
    assert outputs[REPO_ROOT / 'configs' / 'classification' / 'ablation' / 'fat_b0_add.yaml'] == os.path.join(
        'output', 'fat_b0_add', 'ablation', 'fat_b0_add')
    assert len(set(outputs.values())) == len(configs)

    for experiment in ('exp1', 'exp2'):
        (tmp_path / 'work' / experiment).mkdir(parents=True)
        shutil.copy(B0_CONFIG, tmp_path / 'work' / experiment / 'fat_b0.yaml')
    monkeypatch.chdir(tmp_path / 'work')
    assert load_config('exp1/fat_b0.yaml').OUTPUT == os.path.join('output', 'fat_b0', 'exp1', 'fat_b0')
    assert load_config(str(tmp_path / 'work' / 'exp2' / 'fat_b0.yaml')).OUTPUT == os.path.join('output', 'fat_b0',
                                                                                               'exp2', 'fat_b0')
    monkeypatch.chdir(tmp_path / 'work' / 'exp1')
    assert load_config('../exp2/fat_b0.yaml').OUTPUT == os.path.join(
        'output', 'fat_b0', *(tmp_path / 'work' / 'exp2' / 'fat_b0').parts[1:])
    assert load_config(B0_CONFIG, ['OUTPUT', 'mine']).OUTPUT == 'mine'
    assert load_config(B0_CONFIG, ['MODEL.NAME', 'fat_b1']).OUTPUT == os.path.join('output', 'fat_b1', 'fat_b0')


@pytest.mark.slow
def test_checkpoints_are_bounded_and_linked(tmp_path, monkeypatch):
    """4 epochs keep the newest 2 periodic checkpoints; best and periodic files are links to latest.pth, not copies.
    Normalisation and random erasing on the device, validation at another batch size."""
    from timm.data.random_erasing import RandomErasing

    normalised, erased = [], []
    normalise, erase = DeviceNormalize.__call__, RandomErasing.__call__

    def recorded_normalise(self, images, training):
        normalised.append((images.dtype, len(images), training))
        return normalise(self, images, training)

    def recorded_erase(self, images):
        erased.append(images.dtype)
        return erase(self, images)

    monkeypatch.setattr(DeviceNormalize, '__call__', recorded_normalise)
    monkeypatch.setattr(RandomErasing, '__call__', recorded_erase)
    data = write_image_folder(tmp_path / 'data', 4, 2)
    output = tmp_path / 'run'
    log = train_in_process(train_command(data, output, 'TRAIN.EPOCHS', '4', 'DATA.BATCH_SIZE', '4',
                                         'TRAIN.KEEP_CHECKPOINTS', '2', 'DATA.DEVICE_NORMALIZE', 'True',
                                         'DATA.VAL_BATCH_SIZE', '5'))
    assert sorted(path.name for path in output.glob('ckpt_epoch_*.pth')) == ['ckpt_epoch_3.pth', 'ckpt_epoch_4.pth']
    assert 'removed ckpt_epoch_1.pth' in log and 'removed ckpt_epoch_2.pth' in log
    assert (output / 'ckpt_epoch_4.pth').stat().st_ino == (output / 'latest.pth').stat().st_ino
    best = load_checkpoint_file(output / 'best.pth')
    summary = json.loads((output / 'summary.json').read_text())
    assert best['best']['weights'] in ('model', 'ema') and best['best']['value'] == summary['max_accuracy']
    assert best['best']['epoch'] == best['epoch'] + 1
    # every batch reached the device as uint8: 3 training batches of 4 an epoch, each erased there (float), and
    # the 6 validation images in batches of 5 and 1
    assert {dtype for dtype, _, _ in normalised} == {torch.uint8}
    assert [size for _, size, training in normalised if training] == [4] * 12
    assert erased == [torch.float32] * 12
    assert {size for _, size, training in normalised if not training} == {5, 1}


def test_normalisation_on_the_device_equals_the_workers():
    config = load_config(B0_CONFIG, [*TINY, 'DATA.IMG_SIZE', '40'])
    on_device = load_config(B0_CONFIG, [*TINY, 'DATA.IMG_SIZE', '40', 'DATA.DEVICE_NORMALIZE', 'True'])
    image = Image.fromarray(torch.randint(0, 256, (48, 56, 3), dtype=torch.uint8).numpy())
    expected = build_transform(config, is_training=False)(image)
    uint8 = torch.as_tensor(build_transform(on_device, is_training=False)(image))
    assert uint8.dtype == torch.uint8
    normalised = DeviceNormalize(on_device, torch.device('cpu'))(uint8[None], training=False)[0]
    torch.testing.assert_close(normalised, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_throughput_command(tmp_path, monkeypatch):
    """--throughput times 30 forward passes of one batch after 50 of warm-up: on a clock that advances 0.1 s per
    pass of the model, a batch of 2 makes 2 / 0.1 = 20 img/s."""
    import classification.train as train_module
    from classification.fat import FAT

    batches = []
    counting = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: batches.append(inputs[0].shape) if isinstance(module, FAT) else None)
    monkeypatch.setattr(train_module, 'time', argparse.Namespace(perf_counter=lambda: 0.1 * len(batches)))
    try:
        result = run(parse_args(['--cfg', B0_CONFIG, '--throughput', '--batch-size', '2', '--output', str(tmp_path),
                                 '--opts', 'DATA.IMG_SIZE', '32']))
    finally:
        counting.remove()
    assert batches == [(2, 3, 32, 32)] * 80
    assert result['throughput'] == pytest.approx(20)
    log = (tmp_path / 'throughput_log.txt').read_text()
    assert 'throughput fat_b0: 20.0 img/s (batch 2, 32 px, cpu, AMP off)' in log
    assert not (tmp_path / 'log.txt').exists()  # a training run's log is the training run's


class AugmentedImage(torch.utils.data.Dataset):
    """One image, augmented by the recipe's training transform, at every index."""

    def __init__(self, config):
        self.image = Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy())
        self.transform = build_transform(config, is_training=True)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.transform(self.image)


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    """Whichever process or worker loads a training sample, and whatever it loaded before, the sample's random
    crop, flip, RandAugment and erasing come from (SEED, epoch, index); the caller's random state is untouched."""
    samples = SeededSamples(AugmentedImage(load_config(B0_CONFIG, TINY)), seed=0)
    first = samples[(3, 2)]
    torch.rand(5), random.random(), np.random.rand()  # other draws in between change nothing
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    assert torch.equal(samples[(3, 2)], first)
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()
    assert not torch.equal(samples[(4, 2)], first) and not torch.equal(samples[(3, 1)], first)
    assert not torch.equal(SeededSamples(samples.dataset, seed=1)[(3, 2)], first)

    sampler, plain = (cls(range(6), num_replicas=2, rank=1, shuffle=True, seed=0) for cls in (EpochSampler,
                                                                                                DistributedSampler))
    sampler.set_epoch(7)
    plain.set_epoch(7)
    assert list(sampler) == [(7, index) for index in plain]
