"""COCO detection with FAT on MMDetection: the configs, the entry points."""
from pathlib import Path

import pytest

pytest.importorskip('mmdet', reason='MMDetection is not installed (make setup-dense)')

import torch
from mmengine.config import Config
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs

from conftest import (REPO_ROOT, TINY_COCO_SIZE, TRAINING_SEED, build_and_check_model, cli_exit, fat_configs,
                      metrics_of_test_run, read_json_lines, run_entry_point, with_zeroed_weights, write_tiny_coco)
from openmmlab import cli

pytestmark = pytest.mark.slow  # training and evaluation pipelines of OpenMMLab

DETECTION_CONFIGS = fat_configs('detection')


@pytest.fixture(scope='module')
def tiny_coco(tmp_path_factory) -> Path:
    return write_tiny_coco(tmp_path_factory.mktemp('coco'))


# How each detector, at TINY_WIDTH, overfits the 8 training images (4 iterations an epoch): epochs, AdamW's learning
# rate, the share of it that the backbone and the FPN take, and how many anchors a training image gives the RPN
# (MMDetection's 256 would be almost all negatives with 1-2 objects an image). A detector that learns nothing scores 0.
# Mask R-CNN trained its backbone and FPN at the full 2e-3 for 25 epochs before: box mAP 0.41 on one CPU, 0.06 on
# another with the same seed; at a tenth of the rate for them (as the panoptic test found) and 35 epochs it clears the
# floor twice over. RetinaNet's narrow heads need 5e-4 (2e-4 gave 0.34 at seed 0, 1e-3 gave 0.25).
OVERFIT = {'retinanet': dict(epochs=40, lr=5e-4, backbone_lr_mult=1.0, rpn_samples=None),
           'mask-rcnn': dict(epochs=35, lr=2e-3, backbone_lr_mult=0.1, rpn_samples=32)}
MAP_FLOOR = 0.3
# the width of the FPN and the heads (MMDetection's 256 spends most of a CPU step in the mask head and the FPN): what is
# tested is the pipeline around FAT's backbone, at any width
TINY_WIDTH = 64
METRIC_KINDS = {'retinanet': ('bbox',), 'mask-rcnn': ('bbox', 'segm')}  # the COCO metrics each detector reports


def tiny_config(directory: Path, detector: str) -> Path:
    """The FAT-B0 config for the tiny dataset's two categories, with a narrow FPN and heads and few proposals and RoIs
    to be quick on CPU and a schedule that overfits the training images. Every box is kept (score threshold 0), so that pycocotools has
    results to evaluate even from an untrained detector."""
    recipe, width = OVERFIT[detector], TINY_WIDTH
    if detector == 'retinanet':
        heads = (f"neck=dict(out_channels={width}),\n"
                 f"    bbox_head=dict(num_classes=2, in_channels={width}, feat_channels={width}),\n"
                 "    test_cfg=dict(score_thr=0.0)")
    else:
        heads = (f"neck=dict(out_channels={width}), rpn_head=dict(in_channels={width}, feat_channels={width}),\n"
                 f"    roi_head=dict(bbox_roi_extractor=dict(out_channels={width}),\n"
                 f"                  bbox_head=dict(num_classes=2, in_channels={width}, fc_out_channels=256),\n"
                 f"                  mask_roi_extractor=dict(out_channels={width}),\n"
                 f"                  mask_head=dict(num_classes=2, in_channels={width}, conv_out_channels={width})),\n"
                 f"    train_cfg=dict(rpn=dict(sampler=dict(num={recipe['rpn_samples']})),\n"
                 "                   rpn_proposal=dict(nms_pre=200, max_per_img=100),\n"
                 "                   rcnn=dict(sampler=dict(num=64))),\n"
                 "    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100),\n"
                 "                  rcnn=dict(score_thr=0.0, max_per_img=20))")
    mult = recipe['backbone_lr_mult']
    path = directory / f'tiny_{detector}.py'
    path.write_text(f"""_base_ = '{REPO_ROOT}/configs/detection/{detector}_fat-b0_fpn_1x_coco.py'
metainfo = dict(classes=('disc', 'box'))
train_dataloader = dict(dataset=dict(metainfo=metainfo), num_workers=0, persistent_workers=False)
test_dataloader = dict(dataset=dict(metainfo=metainfo), num_workers=0, persistent_workers=False)
val_dataloader = val_cfg = val_evaluator = None
model = dict(
    {heads})
optim_wrapper = dict(optimizer=dict(lr={recipe['lr']}),
                     paramwise_cfg=dict(custom_keys=dict(backbone=dict(lr_mult={mult}), neck=dict(lr_mult={mult}))))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20)]
train_cfg = dict(max_epochs={recipe['epochs']})
default_hooks = dict(checkpoint=dict(interval={recipe['epochs']}), logger=dict(interval=4))
randomness = dict(seed={TRAINING_SEED})
""")
    return path


def dataset_options(root: Path, stage: str, split: str) -> list:
    """The --cfg-options that point a COCO config at the tiny dataset, at 128x96."""
    width, height = TINY_COCO_SIZE
    dataset = f'{stage}_dataloader.dataset'
    resize = 2 if stage == 'train' else 1
    options = [f'{dataset}.data_root={root}/', f'{dataset}.ann_file=annotations/instances_{split}.json',
               f'{dataset}.data_prefix.img={split}/', f'{dataset}.pipeline.{resize}.scale=({width},{height})']
    if stage == 'test':
        options.append(f'test_evaluator.ann_file={root}/annotations/instances_{split}.json')
    return options


@pytest.fixture(scope='module', params=['retinanet', 'mask-rcnn'])
def trained_detector(request, tmp_path_factory, tiny_coco, classification_trainer_checkpoint):
    """A FAT-B0 detector trained through ``python -m detection.train`` until it overfits the tiny training set, its
    backbone initialised from the classification trainer's checkpoint."""
    directory = tmp_path_factory.mktemp(request.param)
    config = tiny_config(directory, request.param)
    work_dir = directory / 'work_dir'
    log = run_entry_point(
        'detection.train', config, '--work-dir', work_dir, '--cfg-options',
        *dataset_options(tiny_coco, 'train', 'train'),
        f'model.backbone.init_cfg.checkpoint={classification_trainer_checkpoint}',
        process=request.param == 'retinanet')  # the command in a process of its own, once
    epochs = OVERFIT[request.param]['epochs']
    return dict(detector=request.param, config=config, work_dir=work_dir, log=log,
                checkpoint=work_dir / f'epoch_{epochs}.pth', epochs=epochs)


def metrics_of_checkpoint(trained_detector: dict, tiny_coco: Path, checkpoint: Path, work_dir: Path) -> dict:
    """The metrics of ``python -m detection.test`` for a checkpoint of the trained detector, on its training images."""
    return metrics_of_test_run('detection.test', trained_detector['config'], checkpoint, work_dir,
                               *dataset_options(tiny_coco, 'test', 'train'))


def test_evaluation_of_the_overfit_detector_reaches_a_floor(trained_detector, tiny_coco,
                                                            classification_trainer_checkpoint, tmp_path):
    """Tested on the images it was trained on, a working pipeline scores well; one that learns nothing, or whose
    evaluation is broken, scores near 0. Seeds 0, 1, 2 (2-core AMD EPYC, AVX2): RetinaNet box mAP 0.44, 0.42, 0.39;
    Mask R-CNN box 0.78, 0.63, 0.66 and mask 0.80, 0.65, 0.73. The run started from the classification trainer's
    checkpoint."""
    assert f'loaded pretrained weights from {classification_trainer_checkpoint}' in trained_detector['log']
    metrics = metrics_of_checkpoint(trained_detector, tiny_coco, trained_detector['checkpoint'], tmp_path)
    for kind in METRIC_KINDS[trained_detector['detector']]:
        for name in ('mAP_50', 'mAP_75', 'mAP_s', 'mAP_m', 'mAP_l'):
            assert -1 <= metrics[f'coco/{kind}_{name}'] <= 1  # pycocotools gives -1 where no object is that size
        assert MAP_FLOOR <= metrics[f'coco/{kind}_mAP'] <= 1


# what a broken detector looks like to the floor: its classifiers zeroed (every box scored alike, so that the
# detections are no better than arbitrary ones) and, for Mask R-CNN, its mask predictor zeroed (empty masks)
BROKEN_HEADS = {'retinanet': ('bbox_head.retina_cls.',),
                'mask-rcnn': ('rpn_head.rpn_cls.', 'roi_head.bbox_head.fc_cls.', 'roi_head.mask_head.conv_logits.')}


def test_the_floor_fails_a_detector_with_broken_heads(trained_detector, tiny_coco, tmp_path):
    broken = with_zeroed_weights(trained_detector['checkpoint'], BROKEN_HEADS[trained_detector['detector']],
                                 tmp_path / 'broken.pth')
    metrics = metrics_of_checkpoint(trained_detector, tiny_coco, broken, tmp_path / 'test')
    for kind in METRIC_KINDS[trained_detector['detector']]:
        assert metrics[f'coco/{kind}_mAP'] < MAP_FLOOR


def test_training_resumes_its_learning_rate_schedule(tiny_coco, classification_trainer_checkpoint, tmp_path):
    """``--resume`` restores the Runner's state through the restricted loader, the step schedule's included: a run
    stopped after 2 of 4 epochs continues at the learning rate of epoch 3 (x0.1 after epoch 2, x0.01 after 3), where
    a schedule started afresh would be back at the base rate. (The schedule states its end: MMEngine otherwise ends
    it at the max_epochs of the run that built it, here the first run's 2.)"""
    config = tiny_config(tmp_path, 'retinanet')
    base_lr = OVERFIT['retinanet']['lr']
    with config.open('a') as schedule:
        schedule.write("param_scheduler = [dict(type='MultiStepLR', by_epoch=True, begin=0, end=4, milestones=[2, 3], "
                       "gamma=0.1)]\n"
                       "default_hooks = dict(checkpoint=dict(interval=1), logger=dict(interval=4))\n")
    work_dir = tmp_path / 'work_dir'
    options = [*dataset_options(tiny_coco, 'train', 'train'),
               f'model.backbone.init_cfg.checkpoint={classification_trainer_checkpoint}']
    run_entry_point('detection.train', config, '--work-dir', work_dir, '--cfg-options', *options,
                    'train_cfg.max_epochs=2')
    log = run_entry_point('detection.train', config, '--work-dir', work_dir, '--resume', '--cfg-options', *options,
                          'train_cfg.max_epochs=4')
    assert 'resumed epoch: 2, iter: 8' in log
    resumed = read_json_lines(max(work_dir.glob('*/vis_data/scalars.json')))
    assert [entry['epoch'] for entry in resumed] == [3, 4]
    assert [entry['lr'] for entry in resumed] == pytest.approx([base_lr * 0.1, base_lr * 0.01])


def test_test_refuses_a_checkpoint_of_another_model(trained_detector, tiny_coco, tmp_path):
    other = 'retinanet' if trained_detector['detector'] == 'mask-rcnn' else 'mask-rcnn'
    checkpoint = trained_detector['checkpoint']
    error = cli_exit(cli.test, tiny_config(tmp_path, other), checkpoint, '--work-dir',
                     tmp_path / 'work_dir', '--cfg-options', *dataset_options(tiny_coco, 'test', 'val'))
    assert 'does not fit the model of' in str(error)


def test_training_refuses_a_backbone_checkpoint_of_another_variant(tiny_coco, classification_trainer_checkpoint,
                                                                   tmp_path):
    error = cli_exit(cli.train, tiny_config(tmp_path, 'retinanet'), '--work-dir', tmp_path / 'work_dir',
                     '--cfg-options', *dataset_options(tiny_coco, 'train', 'train'),
                     'model.backbone.arch=fat_b1', 'model.neck.in_channels=[48,96,192,384]',
                     f'model.backbone.init_cfg.checkpoint={classification_trainer_checkpoint}')
    message = str(error)
    assert f'pretrained checkpoint {classification_trainer_checkpoint} does not fit the FATBackbone fat_b1' in message
    assert 'another variant' in message


def test_training_reports_a_missing_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the config's relative data/coco/ does not exist
    config = REPO_ROOT / 'configs' / 'detection' / 'retinanet_fat-b0_fpn_1x_coco.py'
    error = cli_exit(cli.train, config, '--cfg-options', f'train_dataloader.dataset.data_root={tmp_path}/missing/')
    assert error.code == 2
    message = capsys.readouterr().err
    assert f'train_dataloader.dataset.data_root: {tmp_path}/missing/' in message
    assert 'val_dataloader.dataset.data_root: data/coco/' in message  # the config's default, not overridden


def test_training_names_an_unknown_backbone_argument(tiny_coco, tmp_path, capsys):
    error = cli_exit(cli.train, tiny_config(tmp_path, 'retinanet'), '--work-dir', tmp_path / 'work_dir',
                     '--cfg-options', *dataset_options(tiny_coco, 'train', 'train'), 'model.backbone.frozen_stage=1')
    assert error.code == 2
    message = capsys.readouterr().err
    assert "model.backbone: unexpected keyword argument 'frozen_stage'" in message
    assert 'FAT takes arch, out_indices, frozen_stages' in message


def test_an_upstream_component_error_keeps_its_traceback(tiny_coco, tmp_path):
    # not this project's error: a bug or a typo in MMDetection's part of the config is not hidden
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_argument'"):
        cli.train('pytest', '', [str(tiny_config(tmp_path, 'retinanet')), '--work-dir', str(tmp_path / 'work_dir'),
                                 '--cfg-options', *dataset_options(tiny_coco, 'train', 'train'),
                                 'model.bbox_head.no_such_argument=1'])


@pytest.mark.parametrize('config', DETECTION_CONFIGS, ids=lambda path: path.stem)
def test_config_follows_the_protocol_builds_and_computes_finite_losses(config):
    cfg = Config.fromfile(config)
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=1e-4, weight_decay=1e-4)
    assert cfg.train_cfg.max_epochs == 12 and cfg.param_scheduler[-1].milestones == [8, 11]
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 16
    for pipeline in (cfg.train_dataloader.dataset.pipeline, cfg.test_dataloader.dataset.pipeline):
        assert [(t.scale, t.keep_ratio) for t in pipeline if t.type == 'Resize'] == [((1333, 800), True)]
    assert cfg.model.backbone.type == 'FAT' and cfg.model.backbone.norm_eval
    model = build_and_check_model(cfg, config, MODELS)

    data = demo_mm_inputs(batch_size=1, image_shapes=[(3, 96, 128)], num_items=[2], num_classes=80, with_mask=True)
    with torch.no_grad():
        losses = model(**model.data_preprocessor(data, training=True), mode='loss')
    total_loss, _ = model.parse_losses(losses)
    assert torch.isfinite(total_loss)


