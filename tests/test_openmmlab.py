"""The OpenMMLab glue shared by detection and segmentation: the backbone wrapper over the classification models
and MMEngine's checkpoints read by the restricted unpickler. Needs MMEngine and MMCV only."""
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

pytest.importorskip('mmengine', reason='MMEngine is not installed (make setup-dense)')

from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import _load_checkpoint, load_state_dict

from classification.checkpoint_io import UnsafeCheckpointError, load_checkpoint_file
from conftest import REPO_ROOT, RunsShellCommand
from openmmlab.backbone import BackboneConfigError, FATBackbone, LVTBackbone, PretrainedCheckpointError
from openmmlab.checkpoints import use_restricted_loading

# a FAT layout given as arguments, quick to build
TINY_LAYOUT = dict(embed_dims=(16, 32, 48, 64), depths=(2, 2, 2, 1), num_heads=(1, 2, 3, 4))


class _GetsAttribute:
    """Unpickling this calls getattr(HistoryBuffer, 'update'): a method that is no statistic."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, 'update')


def _features(model, images):
    with torch.no_grad():
        return model.eval()(images)


def test_stage_backbone_is_the_classification_pyramid(classification_trainer_checkpoint):
    backbone = FATBackbone('fat_b0', pyramid='stages', norm_cfg=None,
                           init_cfg=dict(type='Pretrained', checkpoint=str(classification_trainer_checkpoint)))
    backbone.init_weights()
    reference = timm.create_model('fat_b0', features_only=True, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(classification_trainer_checkpoint)))
    images = torch.randn(2, 3, 72, 100)
    features = _features(backbone, images)
    assert [f.shape[1] for f in features] == backbone.out_channels == [32, 80, 160, 256]
    assert [f.shape[-2:] for f in features] == [(18, 25), (9, 13), (5, 7), (3, 4)]
    for feature, expected in zip(features, _features(reference, images)):
        torch.testing.assert_close(feature, expected, rtol=0, atol=0)


def test_backbone_loads_the_authors_checkpoint(reference_dir):
    """Their ImageNet checkpoint, into the default backbone (the dense pyramid, with fresh output norms)."""
    path = reference_dir / 'fat_b0_official_format.pth'
    backbone = FATBackbone('fat_b0', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    backbone.init_weights()
    reference = timm.create_model('fat_b0', pyramid='dense', features_only=True, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path), custom_load=True))
    images = torch.randn(1, 3, 64, 64)
    for feature, expected in zip(_features(backbone, images), _features(reference, images)):
        torch.testing.assert_close(feature, torch.nn.functional.group_norm(expected, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(PretrainedCheckpointError, match='fat_b1.*another variant'):
        FATBackbone('fat_b1', init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()


def test_backbone_refuses_checkpoints_it_cannot_use(classification_trainer_checkpoint, tmp_path):
    with pytest.raises(PretrainedCheckpointError, match='fat_b1.*another variant'):
        FATBackbone('fat_b1', init_cfg=dict(type='Pretrained',
                                            checkpoint=str(classification_trainer_checkpoint))).init_weights()
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        FATBackbone('fat_b0', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'missing.pth'))).init_weights()
    marker = tmp_path / 'payload_ran'
    torch.save({'model': {}, 'config': RunsShellCommand(f'touch {marker}')}, tmp_path / 'malicious.pth')
    with pytest.raises(UnsafeCheckpointError, match='system'):
        FATBackbone('fat_b0', init_cfg=dict(type='Pretrained',
                                        checkpoint=str(tmp_path / 'malicious.pth'))).init_weights()
    assert not marker.exists()


def test_backbone_options(classification_trainer_checkpoint):
    backbone = FATBackbone('fat_b0', out_indices=(1, 2), frozen_stages=2, norm_eval=True, drop_path_rate=0.3,
                           pyramid='stages', norm_cfg=dict(type='BN'),
                           init_cfg=dict(type='Pretrained', checkpoint=str(classification_trainer_checkpoint)))
    backbone.init_weights()  # a whole model's checkpoint fits the pruned one
    assert len(backbone.model.stages) == 3 and backbone.out_channels == [80, 160]
    features = backbone.train()(torch.randn(2, 3, 64, 96))
    assert [f.shape[1:] for f in features] == [(80, 8, 12), (160, 4, 6)]
    assert backbone.norm_names == ['norm1', 'norm2'] and not hasattr(backbone, 'norm0')
    assert all(isinstance(getattr(backbone, name), torch.nn.BatchNorm2d) for name in backbone.norm_names)

    frozen = [backbone.model.stem, backbone.model.stages[0], backbone.model.stages[1], backbone.norm1]
    assert not any(p.requires_grad for module in frozen for p in module.parameters())
    assert all(p.requires_grad for module in (backbone.model.stages[2], backbone.norm2) for p in module.parameters())
    assert not any(m.training for module in frozen for m in module.modules())
    batch_norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms and not any(m.training for m in batch_norms)
    assert backbone.model.stages[2].blocks[-1].drop_path2.drop_prob > 0

    assert FATBackbone(TINY_LAYOUT).out_channels == [16, 32, 48, 64]


@pytest.mark.parametrize('arguments, message', [
    (dict(arch='fat_b9'), "FATBackbone: unknown arch 'fat_b9'"),
    (dict(out_indices=(2, 1)), 'out_indices must be increasing'),
    (dict(out_indices=(0, 4)), 'out_indices must be increasing'),
    (dict(frozen_stages=5), 'frozen_stages must be in -1..4'),
    (dict(pyramid='stage'), "pyramid must be one of stages, dense, got 'stage'"),
    (dict(init_cfg=dict(type='Normal')), "init_cfg must be None or dict\\(type='Pretrained'"),
])
def test_backbone_names_bad_arguments(arguments, message):
    with pytest.raises(BackboneConfigError, match=message):
        FATBackbone(**dict(dict(arch=TINY_LAYOUT), **arguments))


def test_a_second_copy_of_the_backbones_is_refused_naming_both():
    """Registering the backbones again, from the same copy of this project, is harmless; another copy's classes
    under the same names (the checkout's packages beside the installed fat_vit) are refused, naming both."""
    from mmengine.registry import Registry

    import openmmlab

    registry = Registry('model', scope='tests')
    openmmlab.register(registry)
    openmmlab.register(registry)
    assert registry.get('FAT') is FATBackbone
    other_copy = type('FATBackbone', (FATBackbone,), {'__module__': 'fat_vit.openmmlab.backbone'})
    other = Registry('model', scope='tests')
    other.register_module('FAT', module=other_copy)
    with pytest.raises(ImportError, match=r'openmmlab.backbone would register FAT in the tests model registry, which '
                                          r'has it already from fat_vit.openmmlab.backbone: two copies of this '
                                          r'project in one process'):
        openmmlab.register(other)


@pytest.mark.parametrize('payload', ['shell', 'getattr'])
def test_runner_checkpoint_loader_refuses_code(tmp_path, payload):
    marker = tmp_path / 'payload_ran'
    smuggled = RunsShellCommand(f'touch {marker}') if payload == 'shell' else _GetsAttribute()
    path = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {'epoch': 1}, 'state_dict': {'w': torch.zeros(1)}, 'message_hub': smuggled}, path)
    with pytest.raises(UnsafeCheckpointError, match='system' if payload == 'shell' else "getattr.*'update'"):
        _load_checkpoint(str(path))  # MMEngine's loading, as for load_from and --resume
    assert not marker.exists()


def test_runner_checkpoint_loader_reads_the_logging_state(tmp_path):
    buffer = HistoryBuffer()
    buffer.update(np.float64(0.5))
    path = tmp_path / 'iter_1.pth'
    torch.save({'message_hub': {'log_scalars': {'loss': buffer}, 'runtime_info': {'iter': np.int64(1)}}}, path)
    checkpoint = _load_checkpoint(str(path))
    assert checkpoint['message_hub']['log_scalars']['loss'].mean() == 0.5
    assert checkpoint['message_hub']['runtime_info']['iter'] == 1


@pytest.fixture(autouse=True, scope='module')
def _restricted_loading():
    use_restricted_loading()


def test_backbone_loads_strictly_into_the_pruned_model(tmp_path):
    """The weights of the stages, norm and classifier the backbone dropped are skipped; any other key that does
    not fit is an error, even one that would land in a dropped part of another model."""
    source = timm.create_model('fat_b0', num_classes=10)
    torch.save(source.state_dict(), tmp_path / 'fat_b0.pth')
    backbone = FATBackbone('fat_b0', out_indices=(0, 1),
                           init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'fat_b0.pth')))
    backbone.init_weights()
    for name, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[name], rtol=0, atol=0)

    extra = dict(source.state_dict(), **{'stages.1.blocks.0.attn.extra': torch.zeros(1)})
    torch.save(extra, tmp_path / 'extra.pth')
    with pytest.raises(PretrainedCheckpointError, match=r'1 unexpected keys, first stages\.1\.blocks\.0\.attn\.extra'):
        FATBackbone('fat_b0', out_indices=(0, 1),
                    init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'extra.pth'))).init_weights()


def test_detector_checkpoints_of_the_former_layouts_load():
    """Detectors and segmentors saved before the wrapper served other models held it as ``backbone.fat``, and the
    norms of its returned features as ``backbone.out_norms.j``."""
    backbone = FATBackbone(TINY_LAYOUT, out_indices=(1, 3), pyramid='stages')
    legacy = {f'backbone.fat.{key}': value + 1 for key, value in backbone.model.state_dict().items()}
    legacy.update({f'backbone.out_norms.{position}.{key}': value + 1 for position, name in enumerate(['norm1', 'norm3'])
                   for key, value in getattr(backbone, name).state_dict().items()})
    holder = torch.nn.Module()
    holder.backbone = backbone
    load_state_dict(holder, legacy, strict=True)
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, legacy[f'backbone.fat.{key}'], rtol=0, atol=0)
    torch.testing.assert_close(backbone.norm3.weight, legacy['backbone.out_norms.1.weight'], rtol=0, atol=0)


@pytest.mark.slow
def test_segmentation_needs_no_mmdetection():
    """An MMSegmentation user without MMDetection: the segmentor builds and runs, and its checkpoints load
    through the restricted loader."""
    pytest.importorskip('mmseg', reason='MMSegmentation is not installed (make setup-dense)')
    script = '''
import sys
sys.modules['mmdet'] = None  # importing MMDetection now fails, as where it is not installed
import torch
from mmengine.config import Config
from mmseg.registry import MODELS
import segmentation
cfg = Config.fromfile('configs/segmentation/fpn_fat-b0_8xb2-80k_ade20k-512x512.py')
model = MODELS.build(cfg.model).eval()
with torch.no_grad():
    print(model(torch.randn(1, 3, 64, 64), mode='tensor').shape)
print('mmdet' in sys.modules and sys.modules['mmdet'] is not None)
'''
    result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split('\n')[:2] == ['torch.Size([1, 150, 16, 16])', 'False']


def test_lvt_backbone_loads_the_authors_classifier_and_downstream_files(reference_dir, tmp_path):
    """The same wrapper serves LVT: from the authors' ImageNet checkpoint, and from their downstream backbone files
    (a bare state dict of ``backbone.{stage}.{0|1}...`` keys)."""
    classifier = reference_dir / 'lvt' / 'lvt_cls_official_format.pth'
    reference = timm.create_model('lvt_cls', features_only=True, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(classifier), custom_load=True))
    downstream = {key: value for key, value in load_checkpoint_file(classifier)['state_dict'].items()
                  if key.startswith('backbone.')}
    torch.save(downstream, tmp_path / 'lvt_backbone.pth')
    images = torch.randn(1, 3, 96, 64)
    expected = _features(reference, images)
    for arch, path in (('lvt_cls', classifier), ('lvt', tmp_path / 'lvt_backbone.pth'),
                       ('lvt_cls', tmp_path / 'lvt_backbone.pth')):
        backbone = LVTBackbone(arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
        backbone.init_weights()
        assert backbone.out_channels == [64, 64, 160, 256]
        for feature, reference_feature in zip(_features(backbone, images), expected):
            torch.testing.assert_close(feature, reference_feature, rtol=0, atol=0)
    with pytest.raises(PretrainedCheckpointError, match='does not fit the LVTBackbone lvt'):
        LVTBackbone('lvt', init_cfg=dict(type='Pretrained',
                                         checkpoint=str(reference_dir / 'fat_b0_official_format.pth'))).init_weights()
