"""ADE20K semantic segmentation with FAT on MMSegmentation: the configs and the entry points."""
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('mmseg', reason='MMSegmentation is not installed (make setup-dense)')

import cv2  # OpenCV comes with the OpenMMLab stack
import torch
from mmengine.config import Config
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

from conftest import (REPO_ROOT, TRAINING_SEED, build_and_check_model, cli_exit, fat_configs, metrics_of_test_run,
                      read_json_lines, run_entry_point, with_zeroed_weights)
from openmmlab import cli
from openmmlab.backbone import FATBackbone
from openmmlab.checkpoints import load_from_local_restricted

pytestmark = pytest.mark.slow  # training and evaluation pipelines of OpenMMLab

SEGMENTATION_CONFIGS = fat_configs('segmentation')
CONFIG = REPO_ROOT / 'configs' / 'segmentation' / 'fpn_fat-b0_8xb2-80k_ade20k-512x512.py'


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


# iterations and AdamW learning rate that overfit the 6 training images (measured: 50 mIoU on them after 60); all
# pixels taken for the wall, the most frequent class, would score about 28
OVERFIT_ITERS, OVERFIT_LR, MIOU_FLOOR = 60, 1e-3, 40


def train_options(root: Path, checkpoint: Path, max_iters: int) -> list:
    """--cfg-options for the tiny dataset: 64x64 crops, batch 2, no validation, the overfitting learning rate."""
    dataset = 'train_dataloader.dataset'
    return [f'{dataset}.data_root={root}', f'{dataset}.pipeline.2.scale=(256,64)',
            f'{dataset}.pipeline.3.crop_size=(64,64)', 'model.data_preprocessor.size=(64,64)',
            'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
            'train_dataloader.persistent_workers=False', 'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
            f'train_cfg.max_iters={max_iters}', f'optim_wrapper.optimizer.lr={OVERFIT_LR}',
            f'randomness.seed={TRAINING_SEED}',
            'default_hooks.logger.interval=10', f'default_hooks.checkpoint.interval={OVERFIT_ITERS // 2}',
            f'model.backbone.init_cfg.checkpoint={checkpoint}']


@pytest.fixture(scope='module')
def trained_segmentor(tmp_path_factory, tiny_ade20k, classification_trainer_checkpoint):
    """Semantic FPN-FAT-B0 trained through ``python -m segmentation.train``: half the iterations from the
    classification trainer's checkpoint, then ``--resume`` from the Runner's checkpoint for the rest."""
    work_dir = tmp_path_factory.mktemp('segmentor') / 'work_dir'
    # the first run in a process of its own (the command as users run it), the second in this one
    logs = [run_entry_point('segmentation.train', CONFIG, '--work-dir', work_dir, *resume, '--cfg-options',
                            *train_options(tiny_ade20k, classification_trainer_checkpoint, max_iters=max_iters),
                            process=not resume)
            for resume, max_iters in (([], OVERFIT_ITERS // 2), (['--resume'], OVERFIT_ITERS))]
    return dict(work_dir=work_dir, logs=logs)


def test_training_resumes_from_the_runners_checkpoint(trained_segmentor):
    """The Runner's checkpoint (optimizer, schedulers, logging state) loads through the restricted loader: the
    second run goes on from iteration 30, its poly schedule decaying on from where the first left it (restarted, its
    iteration 40 would have the rate of iteration 10), and AdamW's state counts the first run's steps."""
    assert f'resumed epoch: 0, iter: {OVERFIT_ITERS // 2}' in trained_segmentor['logs'][1]
    work_dir = trained_segmentor['work_dir']
    first_run, second_run = (read_json_lines(path) for path in sorted(work_dir.glob('*/vis_data/scalars.json')))
    assert {10, 20, 30} <= {entry['iter'] for entry in first_run} and max(entry['iter'] for entry in first_run) == 30
    assert [entry['iter'] for entry in second_run] == [40, 50, 60]
    assert all(math.isfinite(entry['loss']) for entry in first_run + second_run)
    rates = [entry['lr'] for entry in first_run + second_run]
    assert all(earlier > later for earlier, later in zip(rates, rates[1:]))
    optimizer = load_from_local_restricted(str(work_dir / f'iter_{OVERFIT_ITERS}.pth'))['optimizer']
    assert {int(state['step']) for state in optimizer['state'].values()} == {OVERFIT_ITERS}


def test_training_logs_to_tensorboard(trained_segmentor):
    """Each run writes TensorBoard events beside its JSON lines (the configs' TensorboardVisBackend): the same
    losses and learning rates at the same iterations."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for scalars in sorted(trained_segmentor['work_dir'].glob('*/vis_data/scalars.json')):
        logged = read_json_lines(scalars)
        events = EventAccumulator(str(scalars.parent)).Reload()
        for name in ('loss', 'lr'):
            written = events.Scalars(name)
            assert [event.step for event in written] == [entry['step'] for entry in logged]
            assert [event.value for event in written] == pytest.approx([entry[name] for entry in logged], rel=1e-6)


def test_backbone_initialises_from_the_runners_checkpoint(trained_segmentor):
    """A segmentor's checkpoint, as the Runner writes it (with its logging state), gives a backbone its weights,
    output norms included."""
    path = trained_segmentor['work_dir'] / f'iter_{OVERFIT_ITERS}.pth'
    backbone = FATBackbone('fat_b0', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    backbone.init_weights()
    saved = load_from_local_restricted(str(path))['state_dict']
    assert 'message_hub' in load_from_local_restricted(str(path))
    assert not torch.equal(backbone.norm0.weight, torch.ones_like(backbone.norm0.weight))  # trained, not fresh
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, saved[f'backbone.{key}'], rtol=0, atol=0)


def metrics_of_checkpoint(config: Path, checkpoint: Path, tiny_ade20k: Path, work_dir: Path,
                          process: bool = False) -> dict:
    """The metrics of ``python -m segmentation.test`` on the tiny dataset's training images."""
    options = [f'test_dataloader.dataset.data_root={tiny_ade20k}',
               'test_dataloader.dataset.data_prefix.img_path=images/training',
               'test_dataloader.dataset.data_prefix.seg_map_path=annotations/training',
               'test_dataloader.dataset.pipeline.1.scale=(256,64)', 'test_dataloader.num_workers=0',
               'test_dataloader.persistent_workers=False']
    return metrics_of_test_run('segmentation.test', config, checkpoint, work_dir, *options, process=process)


def test_evaluation_of_the_overfit_segmentor_reaches_a_floor(trained_segmentor, tiny_ade20k,
                                                             classification_trainer_checkpoint, tmp_path):
    """Tested on the images it was trained on, a working pipeline scores well above a segmentor that learned
    nothing (or whose evaluation is broken). Seeds 0, 1, 2 (2-core AMD EPYC, AVX2): mIoU 60.1, 58.0, 61.7. The run
    started from the classification trainer's checkpoint."""
    assert f'loaded pretrained weights from {classification_trainer_checkpoint}' in trained_segmentor['logs'][0]
    metrics = metrics_of_checkpoint(CONFIG, trained_segmentor['work_dir'] / f'iter_{OVERFIT_ITERS}.pth', tiny_ade20k,
                                    tmp_path, process=True)  # the command in a process of its own, once
    assert MIOU_FLOOR <= metrics['mIoU'] <= 100 and 0 <= metrics['aAcc'] <= 100


def test_the_floor_fails_a_segmentor_with_a_broken_head(trained_segmentor, tiny_ade20k, tmp_path):
    """Its classifier zeroed, the segmentor calls every pixel the first class (the wall): below the floor."""
    broken = with_zeroed_weights(trained_segmentor['work_dir'] / f'iter_{OVERFIT_ITERS}.pth',
                                 ('decode_head.conv_seg.',), tmp_path / 'broken.pth')
    assert metrics_of_checkpoint(CONFIG, broken, tiny_ade20k, tmp_path / 'test')['mIoU'] < MIOU_FLOOR


def test_training_reports_a_missing_dataset(tmp_path, capsys):
    error = cli_exit(cli.train, CONFIG, '--cfg-options', f'train_dataloader.dataset.data_root={tmp_path}/ade')
    assert error.code == 2
    assert f'train_dataloader.dataset.data_root: {tmp_path}/ade' in capsys.readouterr().err


def assert_finite_loss_on_a_random_image(model):
    """One 72x100 image with random labels of the 150 classes gives the built segmentor a finite training loss."""
    labels = torch.randint(0, 150, (1, 72, 100))
    sample = SegDataSample(gt_sem_seg=PixelData(data=labels), metainfo=dict(img_shape=(72, 100), ori_shape=(72, 100)))
    data = model.data_preprocessor(dict(inputs=[torch.randint(0, 256, (3, 72, 100), dtype=torch.uint8)],
                                        data_samples=[sample]))
    with torch.no_grad():
        losses = model(**data, mode='loss')
    total_loss, _ = model.parse_losses(losses)
    assert torch.isfinite(total_loss)


# the FAT authors' drop path rates for ADE20K (their segmentation configs FAT_b0.py ... FAT_b3.py)
AUTHORS_DROP_PATH = {'fat_b0': 0.05, 'fat_b1': 0.0, 'fat_b2': 0.1, 'fat_b3': 0.12}


@pytest.mark.parametrize('config', SEGMENTATION_CONFIGS, ids=lambda path: path.stem)
def test_config_follows_the_authors_recipe_builds_and_computes_finite_losses(config):
    cfg = Config.fromfile(config)
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, weight_decay=1e-4)
    assert cfg.train_cfg.max_iters == 80000 and cfg.train_dataloader.batch_size * 8 == 16
    assert [(s.type, s.power, s.eta_min, s.end) for s in cfg.param_scheduler] == [('PolyLR', 0.9, 1e-6, 80000)]
    crop = [t.crop_size for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomCrop']
    assert crop == [(512, 512)] and cfg.model.data_preprocessor.size == (512, 512)
    assert [t.scale for t in cfg.test_dataloader.dataset.pipeline if t.type == 'Resize'] == [(2048, 512)]
    assert cfg.model.test_cfg.mode == 'whole' and cfg.model.decode_head.norm_cfg.type == 'SyncBN'
    assert 'sync_bn' not in cfg  # the backbone's BatchNorms are each GPU's, as in the authors' training
    model = build_and_check_model(cfg, config, MODELS)
    arch = cfg.model.backbone.arch
    last_block_drop_path = getattr(model.backbone.model.stages[-1].blocks[-1].drop_path2, 'drop_prob', 0.0)
    assert last_block_drop_path == pytest.approx(AUTHORS_DROP_PATH.get(arch, AUTHORS_DROP_PATH['fat_b0']))
    assert model.backbone.model.pyramid == 'dense'
    assert all(isinstance(getattr(model.backbone, name), torch.nn.GroupNorm) for name in model.backbone.norm_names)
    assert_finite_loss_on_a_random_image(model)


SEGFORMER_CONFIG = REPO_ROOT / 'configs' / 'segmentation' / 'segformer_lvt_8xb2-160k_ade20k-512x512.py'
# iterations at a constant learning rate for SegFormer-LVT to fit the 6 training images (measured: 87.6 mIoU on them);
# all pixels taken for the wall would score about 28
SEGFORMER_ITERS = 40


def test_segformer_config_follows_the_authors_setting_builds_and_computes_finite_losses():
    cfg = Config.fromfile(SEGFORMER_CONFIG)
    head = cfg.model.decode_head
    assert cfg.model.backbone.type == 'LVT' and head.type == 'SegformerHead'
    assert (list(head.in_index), head.channels, head.dropout_ratio, head.num_classes) == ([0, 1, 2, 3], 256, 0.1, 150)
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == dict(
        pos_block=dict(decay_mult=0.), norm=dict(decay_mult=0.), head=dict(lr_mult=10.))
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.start_factor, warmup.begin, warmup.end) == ('LinearLR', 1e-6, 0, 1500)
    assert (poly.type, poly.power, poly.eta_min, poly.begin, poly.end) == ('PolyLR', 1.0, 0.0, 1500, 160000)
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size * 8 == 16
    train = {t.type: t for t in cfg.train_dataloader.dataset.pipeline}
    assert train['LoadAnnotations'].reduce_zero_label and 'RandomFlip' in train and 'PhotoMetricDistortion' in train
    assert (train['RandomResize'].scale, train['RandomResize'].ratio_range) == ((2048, 512), (0.5, 2.0))
    assert (train['RandomCrop'].crop_size, train['RandomCrop'].cat_max_ratio) == ((512, 512), 0.75)
    assert [t.scale for t in cfg.test_dataloader.dataset.pipeline if t.type == 'Resize'] == [(2048, 512)]
    model = build_and_check_model(cfg, SEGFORMER_CONFIG, MODELS)
    assert_finite_loss_on_a_random_image(model)


def test_segformer_lvt_trains_and_its_test_reports_miou(tiny_ade20k, lvt_classification_checkpoint, tmp_path):
    """A few iterations at a constant learning rate (the recipe's warm-up would keep it near 0) from an LVT
    classifier's weights, then the test command on the training images: well above a segmentor that learned
    nothing. Seeds 0, 1, 2 (2-core AMD EPYC, AVX2): mIoU 87.0, 70.8, 75.4."""
    config = tmp_path / 'tiny_segformer.py'
    config.write_text(f"_base_ = '{SEGFORMER_CONFIG}'\nparam_scheduler = []\n")
    work_dir = tmp_path / 'work_dir'
    log = run_entry_point('segmentation.train', config, '--work-dir', work_dir, '--cfg-options',
                          *train_options(tiny_ade20k, lvt_classification_checkpoint, max_iters=SEGFORMER_ITERS),
                          f'default_hooks.checkpoint.interval={SEGFORMER_ITERS}')
    assert f'loaded pretrained weights from {lvt_classification_checkpoint}' in log
    metrics = metrics_of_checkpoint(config, work_dir / f'iter_{SEGFORMER_ITERS}.pth', tiny_ade20k, tmp_path / 'test')
    assert MIOU_FLOOR <= metrics['mIoU'] <= 100
