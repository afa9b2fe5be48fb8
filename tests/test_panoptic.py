"""COCO panoptic segmentation with LVT on MMDetection: Panoptic FPN's config, training and PQ evaluation."""
import json
import math
import time
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('mmdet', reason='MMDetection is not installed (make setup-dense)')

import cv2  # OpenCV comes with the OpenMMLab stack
import mmengine.runner.loops
import torch
from mmengine.config import Config
from mmdet.registry import MODELS
from mmdet.testing import demo_mm_inputs

from conftest import (REPO_ROOT, TRAINING_SEED, build_and_check_model, metrics_of_test_run, read_json_lines,
                      run_entry_point, with_zeroed_weights)

pytestmark = pytest.mark.slow  # training and evaluation pipelines of OpenMMLab

CONFIG = REPO_ROOT / 'configs' / 'detection' / 'panoptic-fpn_lvt_fpn_ms-3x_coco.py'
WIDTH, HEIGHT = 128, 96
# two thing categories drawn on one stuff category covering the rest of each image
CATEGORIES = [dict(id=1, name='disc', isthing=1, supercategory='shape'),
              dict(id=2, name='box', isthing=1, supercategory='shape'),
              dict(id=3, name='wall', isthing=0, supercategory='background')]


def _segment(segment_id: int, category_id: int, mask: np.ndarray) -> dict:
    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
    return dict(id=segment_id, category_id=category_id, iscrowd=0, bbox=bbox, area=int(mask.sum()))


@pytest.fixture(scope='module')
def tiny_coco_panoptic(tmp_path_factory) -> Path:
    """COCO panoptic layout (``annotations/panoptic_{split}2017.json`` and its PNG folder, ``{split}2017/`` images):
    8 train and 2 val images of 128x96, each a wall (stuff) with 1-2 discs or boxes (things)."""
    root = tmp_path_factory.mktemp('coco_panoptic')
    rng = np.random.default_rng(0)
    for split, count in (('train', 8), ('val', 2)):
        for folder in (root / f'{split}2017', root / 'annotations' / f'panoptic_{split}2017'):
            folder.mkdir(parents=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image = np.clip(rng.normal(90, 8, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
            ids = np.full((HEIGHT, WIDTH), 1, np.int64)  # segment 1: the wall
            segments = []
            for segment_id in range(2, 2 + int(rng.integers(1, 3))):
                category = CATEGORIES[int(rng.integers(0, 2))]
                radius = int(rng.integers(12, 22))
                cx, cy = int(rng.integers(radius, WIDTH - radius)), int(rng.integers(radius, HEIGHT - radius))
                mask = np.zeros((HEIGHT, WIDTH), np.uint8)
                if category['name'] == 'disc':
                    cv2.circle(mask, (cx, cy), radius, 1, -1)
                else:
                    cv2.rectangle(mask, (cx - radius, cy - radius * 2 // 3), (cx + radius, cy + radius * 2 // 3), 1, -1)
                mask = mask.astype(bool) & (ids == 1)  # a later shape must not cover an earlier one
                image[mask] = (40, 200, 240) if category['name'] == 'disc' else (220, 120, 30)
                ids[mask] = segment_id
                segments.append(_segment(segment_id, category['id'], mask))
            segments.insert(0, _segment(1, 3, ids == 1))
            name = f'{image_id:012d}'
            cv2.imwrite(str(root / f'{split}2017' / f'{name}.jpg'), image)
            # panoptic PNG: segment id = R + 256 G + 256^2 B (written as BGR)
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 256 ** 2], -1).astype(np.uint8)
            cv2.imwrite(str(root / 'annotations' / f'panoptic_{split}2017' / f'{name}.png'), rgb[..., ::-1])
            images.append(dict(id=image_id, file_name=f'{name}.jpg', width=WIDTH, height=HEIGHT))
            annotations.append(dict(image_id=image_id, file_name=f'{name}.png', segments_info=segments))
        (root / 'annotations' / f'panoptic_{split}2017.json').write_text(json.dumps(
            dict(info={}, licenses=[], images=images, annotations=annotations, categories=CATEGORIES)))
    return root


# The config's rate (AdamW 3e-4) is for 64 images a step. At 2 images a step on 8 images, the backbone and the FPN,
# trained at that rate, scaled their features some 40-fold in 100 iterations (FPN output RMS 1.8 to 67), faster than the
# RPN's regression of its few positive anchors could follow: its loss rose fourfold, every proposal missed its object,
# and almost no thing was found (PQ^th 0 to 2 at rates from 1e-4 to 2e-3, with clipping or a warm-up). Here the two
# train at a tenth of the rate, as when fine-tuning pretrained features, and the RPN samples 32 anchors an image instead
# of 256 since each image holds 1-2 objects. Measured after 100 iterations, on the training images, with seeds 0 and 1:
# PQ^th 36.8 and 39.1 (SQ^th 76.3, 73.3), PQ^st 93.8 and 97.1; the RPN's classification loss falls to a twelfth, its
# regression loss to under a half, the masks' to a third. With its classifiers and mask predictor zeroed, the detector
# finds no thing (PQ^th 0). Untrained (1 iteration at lr 1e-9): SQ^st 54.4, since its semantic head already calls most
# pixels wall; the wall's segmentation quality (its IoU with the truth, averaged over the images) tells the two apart.
TRAIN_ITERS, TRAIN_LR, PQ_THING_FLOOR, SQ_STUFF_FLOOR = 100, 3e-4, 20, 75
# the losses that fall below half (the RPN's regression loss only falls: its rise was the failure above); the RoI
# head's are measured on proposals that change as the RPN learns (more of them are positive, so its box loss rises),
# and PQ^th tests it
FALLING_LOSSES = ('loss', 'loss_rpn_cls', 'loss_mask', 'loss_seg')
# a broken thing branch: the RPN's and the RoI head's classifiers and the mask predictor zeroed
BROKEN_HEADS = ('rpn_head.rpn_cls.', 'roi_head.bbox_head.fc_cls.', 'roi_head.mask_head.conv_logits.')


def tiny_config(directory: Path, root: Path, checkpoint: Path) -> Path:
    """The Panoptic FPN-LVT config on the tiny dataset: its 2 thing and 1 stuff categories, 128x96 images, few
    proposals and RoIs, a constant learning rate (a tenth of it for the backbone and the FPN) that fits the training
    images in a few iterations."""
    path = directory / 'tiny_panoptic.py'
    path.write_text(f"""_base_ = '{CONFIG}'
data_root = '{root}/'
metainfo = dict(classes=('disc', 'box', 'wall'), thing_classes=('disc', 'box'), stuff_classes=('wall',))
model = dict(
    backbone=dict(init_cfg=dict(checkpoint='{checkpoint}')),
    roi_head=dict(bbox_head=dict(num_classes=2), mask_head=dict(num_classes=2)),
    semantic_head=dict(num_things_classes=2, num_stuff_classes=1),
    panoptic_fusion_head=dict(num_things_classes=2, num_stuff_classes=1),
    train_cfg=dict(rpn=dict(sampler=dict(num=32)), rpn_proposal=dict(nms_pre=200, max_per_img=100),
                   rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=100), panoptic=dict(stuff_area_limit=64)))
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/panoptic_train2017.json',
                 data_prefix=dict(img='train2017/', seg='annotations/panoptic_train2017/'),
                 pipeline=[dict(type='LoadImageFromFile'),
                           dict(type='LoadPanopticAnnotations', with_bbox=True, with_mask=True, with_seg=True),
                           dict(type='Resize', scale=({WIDTH}, {HEIGHT}), keep_ratio=True),
                           dict(type='RandomFlip', prob=0.5), dict(type='PackDetInputs')]))
test_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/panoptic_train2017.json',
                 data_prefix=dict(img='train2017/', seg='annotations/panoptic_train2017/'),
                 pipeline=[dict(type='LoadImageFromFile'), dict(type='Resize', scale=({WIDTH}, {HEIGHT}), keep_ratio=True),
                           dict(type='LoadPanopticAnnotations'),
                           dict(type='PackDetInputs',
                                meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]))
test_evaluator = dict(ann_file=data_root + 'annotations/panoptic_train2017.json',
                      seg_prefix=data_root + 'annotations/panoptic_train2017/', nproc=1)
val_dataloader = val_cfg = val_evaluator = None
optim_wrapper = dict(optimizer=dict(lr={TRAIN_LR}),
                     paramwise_cfg=dict(custom_keys=dict(backbone=dict(lr_mult=0.1), neck=dict(lr_mult=0.1))))
param_scheduler = []
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={TRAIN_ITERS})
default_hooks = dict(checkpoint=dict(by_epoch=False, interval={TRAIN_ITERS}), logger=dict(interval=10))
randomness = dict(seed={TRAINING_SEED})
""")
    return path


@pytest.fixture(scope='module')
def trained_panoptic(tmp_path_factory, tiny_coco_panoptic, lvt_classification_checkpoint):
    directory = tmp_path_factory.mktemp('panoptic')
    config = tiny_config(directory, tiny_coco_panoptic, lvt_classification_checkpoint)
    work_dir = directory / 'work_dir'
    # MMEngine's iteration loop sleeps 2 s each time it restarts a finite data loader, against a deadlock of its
    # workers (24 restarts here, 48 s); this loader has no workers. InfiniteSampler, which avoids the restarts, would
    # draw the batches in another order than the one whose floors were measured.
    without_pause = types.SimpleNamespace(**{**vars(time), 'sleep': lambda seconds: None})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mmengine.runner.loops, 'time', without_pause)
        log = run_entry_point('detection.train', config, '--work-dir', work_dir)
    return dict(config=config, work_dir=work_dir, log=log, checkpoint=work_dir / f'iter_{TRAIN_ITERS}.pth')


def test_panoptic_fpn_trains_from_a_classification_checkpoint(trained_panoptic, lvt_classification_checkpoint):
    assert f'loaded pretrained weights from {lvt_classification_checkpoint}' in trained_panoptic['log']
    scalars = read_json_lines(next(trained_panoptic['work_dir'].glob('*/vis_data/scalars.json')))
    assert all(math.isfinite(entry['loss']) for entry in scalars)
    for loss in FALLING_LOSSES:  # a head without gradients, or diverging, stays above half
        assert scalars[-1][loss] < scalars[0][loss] / 2, (loss, scalars[0][loss], scalars[-1][loss])
    assert scalars[-1]['loss_rpn_bbox'] < scalars[0]['loss_rpn_bbox']
    assert trained_panoptic['checkpoint'].is_file()


def test_the_test_command_reports_panoptic_quality(trained_panoptic, tmp_path):
    """PQ, SQ and RQ over all, thing and stuff categories: the things are found and segmented, and the wall's
    segmentation quality is well above the untrained model's. Seeds 0, 1, 2 (2-core AMD EPYC, AVX2): PQ^th 41.8,
    35.0, 48.0; SQ^st 96.5, 95.7, 95.7."""
    metrics = metrics_of_test_run('detection.test', trained_panoptic['config'], trained_panoptic['checkpoint'],
                                  tmp_path, process=True)
    for kind in ('', '_th', '_st'):
        for name in ('PQ', 'SQ', 'RQ'):
            assert 0 <= metrics[f'coco_panoptic/{name}{kind}'] <= 100
    assert metrics['coco_panoptic/PQ_th'] >= PQ_THING_FLOOR
    assert metrics['coco_panoptic/SQ_st'] >= SQ_STUFF_FLOOR


def test_the_thing_floor_fails_a_model_with_broken_thing_heads(trained_panoptic, tmp_path):
    broken = with_zeroed_weights(trained_panoptic['checkpoint'], BROKEN_HEADS, tmp_path / 'broken.pth')
    metrics = metrics_of_test_run('detection.test', trained_panoptic['config'], broken, tmp_path / 'test')
    assert metrics['coco_panoptic/PQ_th'] < PQ_THING_FLOOR
    assert metrics['coco_panoptic/SQ_st'] >= SQ_STUFF_FLOOR  # the stuff branch is intact


def test_config_follows_the_authors_setting_builds_and_computes_finite_losses():
    cfg = Config.fromfile(CONFIG)
    assert cfg.model.type == 'PanopticFPN' and cfg.model.backbone.type == 'LVT'
    assert (cfg.model.neck.out_channels, cfg.model.neck.num_outs) == (96, 5)
    assert cfg.model.rpn_head.feat_channels == 96 and cfg.model.roi_head.bbox_head.fc_out_channels == 160
    mask_head = cfg.model.roi_head.mask_head
    assert (mask_head.num_convs, mask_head.conv_out_channels) == (4, 96)
    semantic = cfg.model.semantic_head
    assert (semantic.in_channels, semantic.inner_channels, semantic.norm_cfg.num_groups) == (96, 48, 12)
    assert (semantic.num_things_classes, semantic.num_stuff_classes, semantic.loss_seg.loss_weight) == (80, 53, 0.5)
    assert cfg.optim_wrapper.optimizer == dict(type='AdamW', lr=3e-4, weight_decay=1e-4)
    assert cfg.train_dataloader.batch_size * 8 == cfg.auto_scale_lr.base_batch_size == 64
    assert cfg.train_cfg.max_epochs == 36 and cfg.param_scheduler[-1].milestones == [24, 33]
    resize = [t for t in cfg.train_dataloader.dataset.pipeline if t.type == 'RandomResize']
    assert [t.scale for t in resize] == [[(1333, 640), (1333, 800)]]
    assert cfg.test_evaluator.type == 'CocoPanopticMetric'
    model = build_and_check_model(cfg, CONFIG, MODELS)

    data = demo_mm_inputs(batch_size=1, image_shapes=[(3, 96, 128)], num_items=[2], num_classes=80, with_mask=True,
                          with_semantic=True)
    with torch.no_grad():
        losses = model(**model.data_preprocessor(data, training=True), mode='loss')
    total_loss, _ = model.parse_losses(losses)
    assert torch.isfinite(total_loss)


def test_panoptic_api_imports_beside_opencv():
    """panopticapi-lite declares numpy<2, which opencv-python 5 cannot run with: it is installed without its
    dependencies, and both must import."""
    from mmdet.evaluation.metrics import coco_panoptic_metric
    import panopticapi.evaluation  # noqa: F401

    assert coco_panoptic_metric.panopticapi is not None
    assert int(np.__version__.split('.')[0]) >= 2 and cv2.imdecode(
        cv2.imencode('.png', np.zeros((2, 2), np.uint8))[1], cv2.IMREAD_UNCHANGED).shape == (2, 2)
