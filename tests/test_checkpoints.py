import argparse
import logging
import pickle

import pytest
import safetensors.torch
import timm
import torch

from classification.checkpoint_io import (CheckpointError, UnsafeCheckpointError, best_weights, load_checkpoint_file,
                                          load_weights)
from classification.config import load_config
from classification.train import build_model
from conftest import REPO_ROOT, RunsShellCommand

# the forms of timm's ``pretrained`` that the README documents for this project's models, and timm's own loader
DOCUMENTED_OVERLAYS = ['file', 'file+custom_load']


def create(variant='fat_b0', path=None, overlay='file', **kwargs):
    """timm.create_model with pretrained weights from ``path``, through one of DOCUMENTED_OVERLAYS or, with
    ``overlay='timm'``, through timm's own loader (``custom_load=False``)."""
    options = {'file': {}, 'file+custom_load': dict(custom_load=True), 'timm': dict(custom_load=False)}[overlay]
    return timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), **options),
                             **kwargs)


def logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


def b0_with_its_own_weights(seed: int, num_classes: int = 10) -> torch.nn.Module:
    """A FAT-B0 whose every weight, the classifier included, differs from a freshly created one's (which timm would
    leave in place of weights it did not load)."""
    torch.manual_seed(seed)
    model = timm.create_model('fat_b0', num_classes=num_classes).train()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model(torch.randn(4, 3, 64, 64))  # non-trivial BatchNorm statistics
    return model.eval()


@pytest.fixture(scope='module')
def trained_b0():
    return b0_with_its_own_weights(seed=1)


@pytest.mark.parametrize('fmt', ['state_dict.pth', 'training_checkpoint.pth', 'weights.safetensors'])
@pytest.mark.parametrize('overlay', DOCUMENTED_OVERLAYS)
def test_round_trip_through_timm(tmp_path, trained_b0, fmt, overlay):
    path = tmp_path / fmt
    state_dict = trained_b0.state_dict()
    if fmt == 'weights.safetensors':
        safetensors.torch.save_file(state_dict, str(path))
    elif fmt == 'training_checkpoint.pth':
        torch.save({'model': state_dict, 'epoch': 3, 'config': {'MODEL': {'NAME': 'fat_b0'}}}, path)
    else:
        torch.save(state_dict, path)
    loaded = create(path=path, overlay=overlay, num_classes=10)
    images = torch.randn(2, 3, 72, 72)
    torch.testing.assert_close(logits(loaded, images), logits(trained_b0, images), rtol=0, atol=0)


@pytest.fixture(scope='module')
def trained_and_ema():
    """The trained weights and, distinguishable from them in every tensor, their EMA: 10 classes each."""
    return b0_with_its_own_weights(seed=1), b0_with_its_own_weights(seed=2)


def write_checkpoint(path, trained, ema, layout: str):
    """A checkpoint of ``layout``: this trainer's, recording which weights scored higher ('trainer, EMA best' /
    'trainer, model best'), or a timm trainer's with EMA weights (the LVT authors')."""
    if layout.startswith('trainer'):
        scores = dict(epoch=3, metric='acc1', model=61.0, model_ema=62.5)
        if layout == 'trainer, model best':
            scores.update(model=63.0)
        torch.save(dict(model=trained.state_dict(), model_ema=ema.state_dict(), scores=scores, epoch=2,
                        max_accuracy=max(scores['model'], scores['model_ema']), optimizer={}), path)
    else:
        torch.save(dict(state_dict=trained.state_dict(), state_dict_ema=ema.state_dict(), epoch=2, arch='fat_b0',
                        optimizer={}, args=argparse.Namespace(model_ema=True)), path)
    return path


def loaded_by(path, route: str) -> torch.nn.Module:
    """FAT-B0 with 10 classes, loaded from ``path`` through one of the project's documented loading routes."""
    if route in DOCUMENTED_OVERLAYS:
        return create(path=path, overlay=route, num_classes=10)
    if route == 'load_weights':
        return load_weights(timm.create_model('fat_b0', num_classes=10), path, head='drop')
    if route == 'MODEL.PRETRAINED':
        return build_model(load_config(str(REPO_ROOT / 'configs' / 'classification' / 'fat_b0.yaml'),
                                       ['MODEL.PRETRAINED', str(path), 'MODEL.NUM_CLASSES', '10']))
    from classification.export import build_model as export_model
    return export_model('fat_b0', path, deploy=False)


@pytest.mark.parametrize('route', [*DOCUMENTED_OVERLAYS, 'load_weights', 'MODEL.PRETRAINED', 'export'])
@pytest.mark.parametrize('layout, winner', [('trainer, EMA best', 'ema'), ('trainer, model best', 'model'),
                                            ('timm trainer with EMA', 'ema')])
def test_every_loader_takes_the_weights_the_checkpoint_calls_best(tmp_path, trained_and_ema, caplog, route, layout,
                                                                   winner):
    trained, ema = trained_and_ema
    path = write_checkpoint(tmp_path / 'checkpoint.pth', trained, ema, layout)
    with caplog.at_level(logging.INFO):
        model = loaded_by(path, route)
    images = torch.randn(2, 3, 64, 64)
    expected = ema if winner == 'ema' else trained
    torch.testing.assert_close(logits(model, images), logits(expected, images), rtol=0, atol=0)
    key = {'trainer, EMA best': 'model_ema', 'trainer, model best': 'model', 'timm trainer with EMA': 'state_dict_ema'}
    assert f"loaded {path}: the {'EMA' if winner == 'ema' else 'trained'} weights, '{key[layout]}'" in caplog.text


def test_the_openmmlab_backbone_takes_the_best_weights(tmp_path, trained_and_ema):
    pytest.importorskip('mmengine', reason='MMEngine is not installed (make setup-dense)')
    from openmmlab.backbone import FATBackbone

    trained, ema = trained_and_ema
    path = write_checkpoint(tmp_path / 'checkpoint.pth', trained, ema, 'trainer, EMA best')
    backbone = FATBackbone('fat_b0', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    backbone.init_weights()
    for key, value in backbone.model.state_dict().items():
        assert torch.equal(value, ema.state_dict()[key]), key


def test_which_weights_a_checkpoint_calls_best(trained_and_ema):
    weights = trained_and_ema[0].state_dict()
    assert best_weights(weights) == (None, 'a state dict')
    assert best_weights(dict(model=weights, epoch=1))[0] == 'model'
    assert best_weights(dict(model=weights, model_ema=None))[0] == 'model'  # a run without EMA
    # this trainer's checkpoints before they recorded both scores: the winner of a best epoch
    assert best_weights(dict(model=weights, model_ema=weights, best=dict(weights='ema', value=1.)))[0] == 'model_ema'
    tie = dict(model=weights, model_ema=weights, scores=dict(model=50., model_ema=50.))
    assert best_weights(tie)[0] == 'model'
    # nothing says the EMA scored higher (DeiT's checkpoints, say): the trained weights
    assert best_weights(dict(model=weights, model_ema=weights))[0] == 'model'
    assert best_weights(dict(state_dict=weights, state_dict_ema=weights))[0] == 'state_dict_ema'


def test_official_format_reads_as_plain_data(reference_dir):
    checkpoint = load_checkpoint_file(reference_dir / 'fat_b0_official_format.pth')
    assert set(checkpoint) == {'model', 'epoch', 'max_accuracy', 'config'}
    assert type(checkpoint['config']) is dict and checkpoint['config']['MODEL']['NAME'] == 'FAT_B0'


def test_official_format_with_new_classifier_keeps_body(reference_dir):
    model = create(path=reference_dir / 'fat_b0_official_format.pth', num_classes=10)
    official = load_checkpoint_file(reference_dir / 'fat_b0_official_format.pth')['model']
    torch.testing.assert_close(model.stem.conv1.conv.weight, official['patch_embed.conv1.conv.0.weight'])
    torch.testing.assert_close(model.norm_pre.bias, official['norm.bias'])
    assert model.get_classifier().weight.shape == (10, 256)


def test_official_format_loads_through_every_documented_form(reference_dir):
    path = reference_dir / 'fat_b0_official_format.pth'
    images = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(logits(create(path=path, overlay='file'), images),
                               logits(create(path=path, overlay='file+custom_load'), images), rtol=0, atol=0)
    # timm's own loader, which nothing documents, refuses the authors' pickled config
    with pytest.raises(RuntimeError, match='weights_only'):
        create(path=path, overlay='timm')


def test_wrong_variant_is_named(reference_dir, tmp_path, trained_b0):
    with pytest.raises(ValueError, match='another variant'):
        create('fat_b1', path=reference_dir / 'fat_b0_official_format.pth')
    torch.save(trained_b0.state_dict(), tmp_path / 'b0.pth')
    for overlay in (*DOCUMENTED_OVERLAYS, 'timm'):
        with pytest.raises(ValueError, match=r'another variant.*stem\.conv1\.conv\.weight'):
            create('fat_b1', path=tmp_path / 'b0.pth', overlay=overlay, num_classes=10)
    torch.save(timm.create_model('fat_b3').state_dict(), tmp_path / 'b3.pth')
    with pytest.raises(ValueError, match='another variant'):
        create('fat_b2', path=tmp_path / 'b3.pth')


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('not a checkpoint')
    with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
        load_checkpoint_file(path)
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_checkpoint_file(tmp_path / 'missing.pth')


@pytest.mark.parametrize('overlay', [*DOCUMENTED_OVERLAYS, 'timm'])
def test_malicious_checkpoint_is_refused_without_side_effect(tmp_path, trained_b0, overlay):
    marker = tmp_path / 'payload_ran'
    path = tmp_path / 'malicious.pth'
    torch.save({'model': trained_b0.state_dict(), 'config': RunsShellCommand(f'touch {marker}')}, path)
    with pytest.raises((pickle.UnpicklingError, RuntimeError)) as refusal:
        create(path=path, overlay=overlay, num_classes=10)
    assert 'system' in str(refusal.value)
    if overlay != 'timm':
        assert isinstance(refusal.value, UnsafeCheckpointError)
    assert not marker.exists()


def test_head_policies(tmp_path, trained_b0):
    path = tmp_path / 'b0_10_classes.pth'
    torch.save({'model': trained_b0.state_dict(), 'epoch': 1}, path)
    body = {k: v for k, v in trained_b0.state_dict().items() if not k.startswith('head.')}

    with pytest.raises(CheckpointError, match='the checkpoint classifies 10 classes, the model 5'):
        load_weights(timm.create_model('fat_b0', num_classes=5), path, head='fail')

    model = timm.create_model('fat_b0', num_classes=5)
    fresh_head = model.get_classifier().weight.clone()
    load_weights(model, path, head='drop')
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    assert torch.equal(model.get_classifier().weight, fresh_head)

    model = load_weights(timm.create_model('fat_b0', num_classes=5), path, head='keep')
    assert model.num_classes == 10
    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(logits(model, images), logits(trained_b0, images), rtol=0, atol=0)

    # a classifier that fits loads under every policy
    for head in ('keep', 'drop', 'fail'):
        model = load_weights(timm.create_model('fat_b0', num_classes=10), path, head=head)
        torch.testing.assert_close(logits(model, images), logits(trained_b0, images), rtol=0, atol=0)


def test_training_arguments_read_as_plain_data(tmp_path, trained_b0):
    """timm-trainer checkpoints (the LVT authors') carry their arguments as an argparse.Namespace."""
    path = tmp_path / 'timm_trainer.pth'
    arguments = argparse.Namespace(model='fat_b0', lr=1.6e-3, sched='cosine', mean=None, crop_pct=(0.875, 0.96))
    torch.save({'state_dict': trained_b0.state_dict(), 'args': arguments, 'epoch': 299, 'arch': 'fat_b0'}, path)
    checkpoint = load_checkpoint_file(path)
    assert type(checkpoint['args']) is dict and checkpoint['args'] == vars(arguments)
    model = load_weights(timm.create_model('fat_b0', num_classes=10), checkpoint, head='fail')
    assert torch.equal(model.get_classifier().weight, trained_b0.get_classifier().weight)

    marker = tmp_path / 'payload_ran'
    arguments.hook = RunsShellCommand(f'touch {marker}')
    torch.save({'state_dict': trained_b0.state_dict(), 'args': arguments}, path)
    with pytest.raises(UnsafeCheckpointError, match='system'):
        load_checkpoint_file(path)
    assert not marker.exists()
