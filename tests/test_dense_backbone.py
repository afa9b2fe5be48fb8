"""FAT's dense-prediction backbone as the authors built it (their segmentation code): the pyramid taken inside the
stride-2 blocks, a GroupNorm on each feature, their weights in every form they come in, and parity with their code."""
import logging
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

pytest.importorskip('mmengine', reason='MMEngine is not installed (make setup-dense)')

from mmengine.config import Config
from mmengine.logging import MMLogger

from conftest import REPO_ROOT
from openmmlab.backbone import FATBackbone, PretrainedCheckpointError

SEMANTIC_FPN_B0 = REPO_ROOT / 'configs' / 'segmentation' / 'fpn_fat-b0_8xb2-80k_ade20k-512x512.py'
SIZES = ('224x224', '200x264')


@pytest.fixture(scope='module')
def seg_reference(reference_dir) -> Path:
    return reference_dir / 'seg'


@pytest.fixture(scope='module')
def authors_io(seg_reference) -> dict:
    return torch.load(seg_reference / 'fat_b0_seg_backbone_io_float64.pt', weights_only=True)


@pytest.fixture(scope='module')
def authors_weights(seg_reference) -> dict:
    return torch.load(seg_reference / 'fat_b0_seg_backbone_official.pth', weights_only=True)


def semantic_fpn_backbone(checkpoint: Path) -> FATBackbone:
    """The backbone of our FAT-B0 Semantic FPN config, initialised from ``checkpoint``, in float64 eval mode."""
    from mmseg.registry import MODELS

    import segmentation  # noqa: F401  (registers the backbones)

    backbone_cfg = Config.fromfile(SEMANTIC_FPN_B0).model.backbone
    backbone_cfg.init_cfg.checkpoint = str(checkpoint)
    backbone = MODELS.build(backbone_cfg)
    backbone.init_weights()
    return backbone.double().eval()


def assert_reproduces_the_authors_outputs(backbone: FATBackbone, authors_io: dict):
    for size in SIZES:
        with torch.no_grad():
            outputs = backbone(authors_io[f'input_{size}'])
        assert len(outputs) == 4
        for level, output in enumerate(outputs):
            expected = authors_io[f'output{level}_{size}']
            assert output.shape == expected.shape
            relative_error = ((output - expected).norm() / expected.norm()).item()
            assert relative_error < 1e-6, f'level {level} at {size}: relative error {relative_error:.2e}'


@contextmanager
def mmengine_log():
    """The lines MMEngine's current logger writes meanwhile."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_semantic_fpn_backbone_reproduces_the_authors_segmentation_backbone(seg_reference, authors_io):
    backbone = semantic_fpn_backbone(seg_reference / 'fat_b0_seg_backbone_official.pth')
    assert backbone.model.pyramid == 'dense' and backbone.norm_names == ['norm0', 'norm1', 'norm2', 'norm3']
    assert_reproduces_the_authors_outputs(backbone, authors_io)


def test_authors_segmentor_checkpoint_loads(authors_weights, authors_io, tmp_path):
    """Their weights inside an MMSegmentation 0.x segmentor's checkpoint: ``backbone.``-prefixed beside the neck's
    and the head's, with the ``meta`` and optimizer state MMCV 1.x saves."""
    state_dict = {f'backbone.{key}': value for key, value in authors_weights.items()}
    state_dict.update({'neck.lateral_convs.0.conv.weight': torch.zeros(256, 32, 1, 1),
                       'decode_head.conv_seg.weight': torch.zeros(150, 128, 1, 1),
                       'decode_head.conv_seg.bias': torch.zeros(150)})
    meta = dict(mmseg_version='0.30.0', config='model = dict(...)', CLASSES=('wall', 'building'),
                PALETTE=[[120, 120, 120], [180, 120, 120]], iter=80000, epoch=10)
    torch.save(dict(meta=meta, state_dict=state_dict, optimizer=dict(state={}, param_groups=[dict(lr=1e-6)])),
               tmp_path / 'iter_80000.pth')
    assert_reproduces_the_authors_outputs(semantic_fpn_backbone(tmp_path / 'iter_80000.pth'), authors_io)


def test_own_segmentor_checkpoint_loads(seg_reference, tmp_path):
    from mmseg.registry import MODELS

    import segmentation  # noqa: F401

    model_cfg = Config.fromfile(SEMANTIC_FPN_B0).model
    model_cfg.backbone.init_cfg.checkpoint = str(seg_reference / 'fat_b0_seg_backbone_official.pth')
    segmentor = MODELS.build(model_cfg)
    segmentor.backbone.init_weights()
    for norm in segmentor.backbone.norm_names:  # weights that a fresh norm does not have
        torch.nn.init.normal_(getattr(segmentor.backbone, norm).weight)
    torch.save(dict(meta=dict(iter=10), state_dict=segmentor.state_dict()), tmp_path / 'iter_10.pth')

    backbone = semantic_fpn_backbone(tmp_path / 'iter_10.pth')
    expected = segmentor.backbone.double().state_dict()
    assert backbone.state_dict().keys() == expected.keys()
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


def test_imagenet_checkpoint_loads_with_fresh_output_norms(reference_dir, authors_io):
    """An ImageNet checkpoint (the authors' training format) gives everything but the output norms, which start
    as an identity GroupNorm, and the log says so."""
    path = reference_dir / 'fat_b0_official_format.pth'
    with mmengine_log() as log:
        backbone = semantic_fpn_backbone(path)
    assert any(f'loaded pretrained weights from {path}' in line for line in log)
    assert any('output norms norm0, norm1, norm2, norm3 start freshly initialised' in line for line in log)
    for name in backbone.norm_names:
        norm = getattr(backbone, name)
        assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == 1
        assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and not norm.bias.any()

    classifier = timm.create_model('fat_b0', pyramid='dense', pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(path), custom_load=True)).double().eval()
    images = authors_io['input_200x264']
    with torch.no_grad():
        expected = classifier.forward_intermediates(images, intermediates_only=True)
        features = backbone(images)
    for feature, tap in zip(features, expected):
        torch.testing.assert_close(feature, F.group_norm(tap, 1), rtol=1e-12, atol=1e-12)


def test_checkpoint_of_another_variant_is_refused(seg_reference, tmp_path):
    with pytest.raises(PretrainedCheckpointError, match='fat_b1.*another variant'):
        FATBackbone('fat_b1', init_cfg=dict(type='Pretrained', checkpoint=str(
            seg_reference / 'fat_b0_seg_backbone_official.pth'))).init_weights()


def test_stage_pyramid_and_no_norms_on_request(seg_reference, authors_io):
    """``pyramid='stages'`` and ``norm_cfg=None`` give back the classification model's pyramid, from the same
    weights; the authors' output norms in the checkpoint are then left unused, with a warning."""
    path = seg_reference / 'fat_b0_seg_backbone_official.pth'
    with mmengine_log() as log:
        backbone = FATBackbone('fat_b0', pyramid='stages', norm_cfg=None,
                               init_cfg=dict(type='Pretrained', checkpoint=str(path)))
        backbone.init_weights()
    assert any('holds output norms norm0, norm1, norm2, norm3, which this backbone does not have' in line
               for line in log)
    backbone = backbone.double().eval()
    classifier = timm.create_model('fat_b0', num_classes=0).double().eval()
    missing, unexpected = classifier.load_state_dict(backbone.model.state_dict(), strict=False)
    assert not unexpected and all(key.startswith('norm_pre.') for key in missing)
    images = authors_io['input_224x224']
    with torch.no_grad():
        features = backbone(images)
        stage_outputs = classifier.forward_intermediates(images, intermediates_only=True)
    for feature, stage_output in zip(features, stage_outputs):
        torch.testing.assert_close(feature, stage_output, rtol=0, atol=0)
    # the dense pyramid differs below stride 32
    for level, output in enumerate(features[:3]):
        assert not torch.allclose(output, authors_io[f'output{level}_224x224'], atol=1e-3)


def test_timm_features_only_gives_the_dense_pyramid():
    """timm users get the same taps with ``pyramid='dense'``, through ``features_only`` and ``forward_intermediates``;
    the weights, ``forward`` and the stride-32 feature are those of the stage pyramid."""
    torch.manual_seed(0)
    dense = timm.create_model('fat_b0', pyramid='dense').eval()
    stages = timm.create_model('fat_b0').eval()
    stages.load_state_dict(dense.state_dict())
    features = timm.create_model('fat_b0', pyramid='dense', features_only=True).eval()
    features.load_state_dict({f'model.{k}': v for k, v in dense.state_dict().items()
                              if not k.startswith(('head.', 'norm_pre.'))})
    images = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        dense_taps = dense.forward_intermediates(images, intermediates_only=True)
        stage_outputs = stages.forward_intermediates(images, intermediates_only=True)
        torch.testing.assert_close(dense(images), stages(images), rtol=0, atol=0)
        for tap, feature in zip(dense_taps, features(images)):
            torch.testing.assert_close(tap, feature, rtol=0, atol=0)
    assert features.feature_info.channels() == [32, 80, 160, 256]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert [tap.shape for tap in dense_taps] == [output.shape for output in stage_outputs]
    torch.testing.assert_close(dense_taps[3], stage_outputs[3], rtol=0, atol=0)
    assert not any(torch.allclose(tap, output) for tap, output in zip(dense_taps[:3], stage_outputs[:3]))
    with pytest.raises(ValueError, match="pyramid must be one of stages, dense, got 'seg'"):
        timm.create_model('fat_b0', pyramid='seg')


def test_pruned_dense_backbone_keeps_what_its_last_level_needs(reference_dir):
    """Levels 0 and 1 only: level 1 is taken inside stage 2's stride-2 block, whose token-mixing half the backbone
    keeps (and nothing more: every parameter it holds gets a gradient), with the authors' weights."""
    path = str(reference_dir / 'fat_b0_official_format.pth')
    full = FATBackbone('fat_b0', init_cfg=dict(type='Pretrained', checkpoint=path))
    pruned = FATBackbone('fat_b0', out_indices=(0, 1), init_cfg=dict(type='Pretrained', checkpoint=path))
    full.init_weights()
    pruned.init_weights()
    assert len(pruned.model.stages) == 3 and len(pruned.model.stages[2].blocks) == 0
    assert not hasattr(pruned.model.stages[2].downsample, 'ffn')
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = full.eval()(images)[:2]
    features = pruned.eval()(images)
    for feature, reference in zip(features, expected):
        torch.testing.assert_close(feature, reference, rtol=0, atol=0)
    sum(feature.sum() for feature in features).backward()
    assert all(parameter.grad is not None for parameter in pruned.parameters())
    with torch.no_grad():
        early = full.model.forward_intermediates(images, indices=[0, 1], stop_early=True, intermediates_only=True)
    for feature, reference in zip(early, full.model.forward_intermediates(images, intermediates_only=True)):
        torch.testing.assert_close(feature, reference, rtol=0, atol=0)


def test_frozen_stages_are_the_authors_stages():
    """With the dense pyramid a stage ends with the stride-2 block that follows it, as in the authors' layout; a
    frozen stage's output norm is frozen with it (MMDetection's Swin freezes norm{i-1} with its stage i)."""
    backbone = FATBackbone('fat_b0', frozen_stages=2).train()
    stages = backbone.model.stages
    frozen = [backbone.model.stem, stages[0].blocks, stages[1].downsample, stages[1].blocks, stages[2].downsample,
              backbone.norm0, backbone.norm1]
    trainable = [stages[2].blocks, stages[3], backbone.norm2, backbone.norm3]
    assert not any(p.requires_grad for module in frozen for p in module.parameters())
    assert not any(m.training for module in frozen for m in module.modules())
    assert all(p.requires_grad for module in trainable for p in module.parameters())
    assert all(m.training for module in trainable for m in module.modules())


def test_a_checkpoint_of_the_other_pyramid_is_refused_naming_both(tmp_path):
    """The backbone saves its pyramid with its weights; MMEngine's load_from and --resume load non-strictly, so a
    detector or segmentor of the other pyramid would otherwise resume silently with features taken elsewhere."""
    from openmmlab.backbone import BackboneConfigError

    stages = FATBackbone('fat_b0', pyramid='stages')
    dense = FATBackbone('fat_b0')
    message = "holds a FAT backbone trained with pyramid='stages'; this config's has pyramid='dense'"
    with pytest.raises(BackboneConfigError, match=message):
        dense.load_state_dict(stages.state_dict(), strict=False)
    # the same checkpoint given as init_cfg, as a detector's weights
    torch.save(dict(meta={}, state_dict={f'backbone.{k}': v for k, v in stages.state_dict().items()}
                    | {'neck.conv.weight': torch.zeros(1)}), tmp_path / 'detector.pth')
    initialised = FATBackbone('fat_b0', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'detector.pth')))
    with pytest.raises(BackboneConfigError, match=message):
        initialised.init_weights()

    same = FATBackbone('fat_b0')
    same.load_state_dict(dense.state_dict())
    for key, value in dense.state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value, rtol=0, atol=0)


def test_a_checkpoint_that_records_no_pyramid_loads_with_a_warning():
    """Saved before the pyramid was recorded: loaded as this config's pyramid, strictly too, and the log says so."""
    saved = FATBackbone('fat_b0').state_dict()
    del saved['pyramid_code']
    with mmengine_log() as log:
        FATBackbone('fat_b0').load_state_dict(saved, strict=True)
    assert any("records no pyramid (saved before it was recorded): its weights are loaded as pyramid='dense'" in line
               for line in log), log
