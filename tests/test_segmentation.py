"""ADE20K semantic segmentation with FAT on MMSegmentation: the configs and the entry points."""
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from conftest import REPO_ROOT, build_and_check_model, cli_exit, read_json_lines, run_entry_point
from openmmlab import cli

SEGMENTATION_CONFIGS = sorted((REPO_ROOT / 'configs' / 'segmentation').glob('*.py'))
CONFIG = REPO_ROOT / 'configs' / 'segmentation' / 'fpn_fat-b0_4xb4-80k_ade20k-512x512.py'


@pytest.fixture(scope='module')
def tiny_ade20k(tmp_path_factory) -> Path:
    """ADE20K layout, 6 training and 3 validation images of 128x96: a wall (class 1) with discs of classes 2 and
    3, and an unlabelled strip (0, ignored once reduce_zero_label shifts the labels)."""
    root = tmp_path_factory.mktemp('ade20k')
    rng = np.random.default_rng(0)
    for split, count in (('training', 6), ('validation', 3)):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'annotations' / split).mkdir(parents=True)
        for index in range(count):
            image = np.full((96, 128, 3), 120, np.uint8)
            label = np.ones((96, 128), np.uint8)
            label[:, :6] = 0
            for _ in range(rng.integers(1, 3)):
                radius, category = int(rng.integers(10, 24)), int(rng.integers(2, 4))
                center = (int(rng.integers(radius, 128 - radius)), int(rng.integers(radius, 96 - radius)))
                cv2.circle(image, center, radius, (30 * category, 200, 255 - 40 * category), -1)
                cv2.circle(label, center, radius, category, -1)
            image = np.clip(image + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
            name = f'ADE_{split[:5]}_{index:08d}'
            cv2.imwrite(str(root / 'images' / split / f'{name}.jpg'), image)
            cv2.imwrite(str(root / 'annotations' / split / f'{name}.png'), label)
    return root


def train_options(root: Path, checkpoint: Path, max_iters: int) -> list:
    """--cfg-options for a few iterations on the tiny dataset: 64x64 crops, batch 2, no validation."""
    dataset = 'train_dataloader.dataset'
    return [f'{dataset}.data_root={root}', f'{dataset}.pipeline.2.scale=(256,64)',
            f'{dataset}.pipeline.3.crop_size=(64,64)', 'model.data_preprocessor.size=(64,64)',
            'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
            'train_dataloader.persistent_workers=False', 'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
            f'train_cfg.max_iters={max_iters}', 'default_hooks.logger.interval=1',
            f'model.backbone.init_cfg.checkpoint={checkpoint}']


@pytest.fixture(scope='module')
def trained_segmentor(tmp_path_factory, tiny_ade20k, classification_trainer_checkpoint):
    """Semantic FPN-FAT-B0 trained through ``python -m segmentation.train``: one iteration from the classification
    trainer's checkpoint, then ``--resume`` from the Runner's checkpoint for a second."""
    work_dir = tmp_path_factory.mktemp('segmentor') / 'work_dir'
    logs = [run_entry_point('segmentation.train', CONFIG, '--work-dir', work_dir, *resume, '--cfg-options',
                            *train_options(tiny_ade20k, classification_trainer_checkpoint, max_iters=max_iters))
            for resume, max_iters in (([], 1), (['--resume'], 2))]
    return dict(work_dir=work_dir, logs=logs)


def test_training_from_a_classification_checkpoint(trained_segmentor, classification_trainer_checkpoint):
    assert f'loaded pretrained weights from {classification_trainer_checkpoint}' in trained_segmentor['logs'][0]
    first_run = min(trained_segmentor['work_dir'].glob('*/vis_data/scalars.json'))
    assert [(entry['iter'], math.isfinite(entry['loss'])) for entry in read_json_lines(first_run)] == [(1, True)]
    assert (trained_segmentor['work_dir'] / 'iter_1.pth').is_file()


def test_training_resumes_from_the_runners_checkpoint(trained_segmentor):
    """The Runner's checkpoint (optimizer, schedulers, logging state) loads through the restricted loader."""
    assert 'resumed epoch: 0, iter: 1' in trained_segmentor['logs'][1]
    second_run = max(trained_segmentor['work_dir'].glob('*/vis_data/scalars.json'))
    assert [(entry['iter'], math.isfinite(entry['loss'])) for entry in read_json_lines(second_run)] == [(2, True)]
    assert (trained_segmentor['work_dir'] / 'iter_2.pth').is_file()


def test_evaluation_reports_miou(trained_segmentor, tiny_ade20k, tmp_path):
    run_entry_point('segmentation.test', CONFIG, trained_segmentor['work_dir'] / 'iter_2.pth', '--work-dir', tmp_path,
                    '--cfg-options', f'test_dataloader.dataset.data_root={tiny_ade20k}',
                    'test_dataloader.dataset.pipeline.1.scale=(256,64)', 'test_dataloader.num_workers=0',
                    'test_dataloader.persistent_workers=False')
    metrics = read_json_lines(next(tmp_path.glob('*/*.json')))[-1]
    for name in ('aAcc', 'mIoU', 'mAcc'):
        assert 0 <= metrics[name] <= 100


def test_training_reports_a_missing_dataset(tmp_path, capsys):
    error = cli_exit(cli.train, CONFIG, '--cfg-options', f'train_dataloader.dataset.data_root={tmp_path}/ade')
    assert error.code == 2
    assert f'train_dataloader.dataset.data_root: {tmp_path}/ade' in capsys.readouterr().err


@pytest.mark.parametrize('config', SEGMENTATION_CONFIGS, ids=lambda path: path.stem)
def test_config_follows_the_protocol_builds_and_computes_finite_losses(config):
    cfg = Config.fromfile(config)
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, weight_decay=1e-4)
    assert cfg.train_cfg.max_iters == 80000 and cfg.train_dataloader.batch_size * 4 == 16
    assert [(s.type, s.power, s.eta_min, s.end) for s in cfg.param_scheduler] == [('PolyLR', 0.9, 0.0, 80000)]
    crop = [t.crop_size for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomCrop']
    assert crop == [(512, 512)] and cfg.model.data_preprocessor.size == (512, 512)
    assert [t.scale for t in cfg.test_dataloader.dataset.pipeline if t.type == 'Resize'] == [(2048, 512)]
    model = build_and_check_model(cfg, config, MODELS)

    labels = torch.randint(0, 150, (1, 72, 100))
    sample = SegDataSample(gt_sem_seg=PixelData(data=labels), metainfo=dict(img_shape=(72, 100), ori_shape=(72, 100)))
    data = model.data_preprocessor(dict(inputs=[torch.randint(0, 256, (3, 72, 100), dtype=torch.uint8)],
                                        data_samples=[sample]))
    with torch.no_grad():
        losses = model(**data, mode='loss')
    total_loss, _ = model.parse_losses(losses)
    assert torch.isfinite(total_loss)
