import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, AugmentOp

from classification.checkpoint_io import load_checkpoint_file
from classification.config import get_defaults, load_config
from classification.data import build_datasets, build_transform
from classification.train import build_model, build_scheduler, main
from conftest import write_image_folder

REPO_ROOT = Path(__file__).resolve().parents[1]
B0_CONFIG = str(REPO_ROOT / 'configs' / 'classification' / 'fat_b0.yaml')
# a small, fast run of the full recipe (RandAugment, Mixup/CutMix, random erasing, label smoothing, EMA)
TINY = ['DATA.IMG_SIZE', '32', 'DATA.NUM_WORKERS', '0', 'DATA.PIN_MEMORY', 'False', 'MODEL.NUM_CLASSES', '3',
        'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.EMA.ENABLED', 'True', 'PRINT_FREQ', '1']


def train_command(data: Path, output: Path, *opts: str, nproc: int = 1):
    launcher = [sys.executable, '-m']
    if nproc > 1:
        launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(nproc), '-m']
    return launcher + ['classification.train', '--cfg', B0_CONFIG, '--data-path', str(data), '--output', str(output),
                       '--opts', *TINY, *opts]


def run_ok(command, timeout=600):
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


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
    train = repr(build_transform(config, is_training=True))
    assert 'RandomResizedCropAndInterpolation(size=(224, 224)' in train and 'bicubic' in train
    assert 'rand-m9-mstd0.5-inc1' in train or "RandAugment(n=2, ops=" in train
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


def test_non_finite_loss_stops_with_the_step(tmp_path):
    data = write_image_folder(tmp_path / 'data', 4, 1)
    weights = timm.create_model('fat_b0', num_classes=3).state_dict()
    weights['head.fc.weight'].fill_(float('nan'))
    torch.save(weights, tmp_path / 'nan.pth')
    message = exit_message('--cfg', B0_CONFIG, '--data-path', str(data), '--output', str(tmp_path / 'out'),
                           '--batch-size', '4', '--opts', *TINY, 'MODEL.PRETRAINED', str(tmp_path / 'nan.pth'))
    assert 'non-finite loss' in message and 'epoch 1, step 1/' in message


# ---- training, evaluation, resuming ---------------------------------------------------------------------------


def test_two_process_ddp_with_corrupt_images_then_eval(tmp_path):
    data = write_image_folder(tmp_path / 'data', 6, 3, corrupt=True)
    output = tmp_path / 'ddp'
    run_ok(train_command(data, output, 'TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', '4', nproc=2))
    summary = json.loads((output / 'summary.json').read_text())
    assert summary['world_size'] == 2 and summary['global_batch'] == 8
    assert [entry['epoch'] for entry in summary['history']] == [1, 2]
    assert all(math.isfinite(entry['train_loss']) for entry in summary['history'])
    assert summary['final']['images'] == 9  # the 3 corrupt validation files are left out
    log = (output / 'log.txt').read_text()
    assert 'corrupt image skipped' in log and 'broken.png' in log
    assert re.search(r'epoch 2: \d+ corrupt image\(s\) skipped', log)
    assert {'latest.pth', 'best.pth', 'ckpt_epoch_1.pth', 'ckpt_epoch_2.pth'} <= set(os.listdir(output))
    assert list((output / 'tensorboard').iterdir())

    # this trainer's checkpoint: --eval reproduces the final validation accuracy
    result = run_ok([sys.executable, '-m', 'classification.train', '--cfg', B0_CONFIG, '--data-path', str(data),
                     '--output', str(tmp_path / 'eval'), '--eval', '--resume', str(output / 'latest.pth'),
                     '--opts', *TINY])
    accuracy = re.search(r'on 9 images: acc@1 ([\d.]+) %', result.stdout)
    assert accuracy and float(accuracy.group(1)) == pytest.approx(summary['final']['acc1'], abs=0.01)
    assert 'EMA acc@1' in result.stdout


def test_eval_of_authors_checkpoint(tmp_path, reference_dir):
    data = write_image_folder(tmp_path / 'data', 2, 4)
    checkpoint = reference_dir / 'fat_b0_official_format.pth'
    opts = [*TINY, 'MODEL.NUM_CLASSES', '1000', 'DATA.IMG_SIZE', '64']
    result = run_ok([sys.executable, '-m', 'classification.train', '--cfg', B0_CONFIG, '--data-path', str(data),
                     '--output', str(tmp_path / 'eval'), '--eval', '--resume', str(checkpoint), '--opts', *opts])
    reported = re.search(r'on 12 images: acc@1 ([\d.]+) %  acc@5 ([\d.]+) %', result.stdout)
    assert reported

    model = timm.create_model('fat_b0', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(checkpoint), custom_load=True)).eval()
    _, val = build_datasets(load_config(B0_CONFIG, opts, **{'DATA.DATA_PATH': str(data)}))
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        top5 = model(images).topk(5).indices
    assert float(reported.group(1)) == pytest.approx(100 * (top5[:, 0] == targets).float().mean().item(), abs=0.01)
    assert float(reported.group(2)) == pytest.approx(100 * (top5 == targets[:, None]).any(1).float().mean().item(),
                                                     abs=0.01)


def test_killed_run_resumes_to_the_same_result(tmp_path):
    data = write_image_folder(tmp_path / 'data', 8, 2)
    opts = ['TRAIN.EPOCHS', '2', 'DATA.BATCH_SIZE', '2']
    run_ok(train_command(data, tmp_path / 'uninterrupted', *opts))

    output = tmp_path / 'interrupted'
    process = subprocess.Popen(train_command(data, output, *opts), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    log = output / 'log.txt'
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if log.exists() and 'epoch 2/2 step 4/12' in log.read_text():
            break
        time.sleep(0.2)
    assert process.poll() is None, 'the run ended before it could be killed mid-epoch'
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 'epoch 2/2:' not in log.read_text()  # killed inside epoch 2

    result = run_ok(train_command(data, output, *opts))
    assert 'auto-resume' in result.stdout and 'epoch 1 done' in result.stdout
    summary = json.loads((output / 'summary.json').read_text())
    reference = json.loads((tmp_path / 'uninterrupted' / 'summary.json').read_text())
    assert [entry['epoch'] for entry in summary['history']] == [1, 2]
    assert [e['train_loss'] for e in summary['history']] == pytest.approx([e['train_loss'] for e in reference['history']])
    resumed = load_checkpoint_file(output / 'latest.pth')['model']
    uninterrupted = load_checkpoint_file(tmp_path / 'uninterrupted' / 'latest.pth')['model']
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6)


def test_throughput_command(tmp_path):
    result = run_ok([sys.executable, '-m', 'classification.train', '--cfg', B0_CONFIG, '--throughput',
                     '--batch-size', '2', '--output', str(tmp_path), '--opts', 'DATA.IMG_SIZE', '32'])
    assert re.search(r'throughput fat_b0: [\d.]+ img/s \(batch 2, 32 px, cpu, AMP off\)', result.stdout)
