import argparse
import pickle

import pytest
import safetensors.torch
import timm
import torch

from classification.checkpoint_io import CheckpointError, UnsafeCheckpointError, load_checkpoint_file, load_weights
from conftest import RunsShellCommand


def create(variant='fat_b0', path=None, custom_load=False, **kwargs):
    overlay = dict(file=str(path), custom_load=custom_load)
    return timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


@pytest.fixture(scope='module')
def trained_b0():
    torch.manual_seed(0)
    model = timm.create_model('fat_b0', num_classes=10).train()
    model(torch.randn(4, 3, 64, 64))  # non-trivial BatchNorm statistics
    return model.eval()


@pytest.mark.parametrize('fmt', ['state_dict.pth', 'training_checkpoint.pth', 'weights.safetensors'])
@pytest.mark.parametrize('custom_load', [False, True])
def test_round_trip_through_timm(tmp_path, trained_b0, fmt, custom_load):
    path = tmp_path / fmt
    state_dict = trained_b0.state_dict()
    if fmt == 'weights.safetensors':
        safetensors.torch.save_file(state_dict, str(path))
    elif fmt == 'training_checkpoint.pth':
        torch.save({'model': state_dict, 'epoch': 3, 'config': {'MODEL': {'NAME': 'fat_b0'}}}, path)
    else:
        torch.save(state_dict, path)
    loaded = create(path=path, custom_load=custom_load, num_classes=10)
    images = torch.randn(2, 3, 72, 72)
    torch.testing.assert_close(logits(loaded, images), logits(trained_b0, images), rtol=0, atol=0)


def test_official_format_reads_as_plain_data(reference_dir):
    checkpoint = load_checkpoint_file(reference_dir / 'fat_b0_official_format.pth')
    assert set(checkpoint) == {'model', 'epoch', 'max_accuracy', 'config'}
    assert type(checkpoint['config']) is dict and checkpoint['config']['MODEL']['NAME'] == 'FAT_B0'


def test_official_format_with_new_classifier_keeps_body(reference_dir):
    model = create(path=reference_dir / 'fat_b0_official_format.pth', custom_load=True, num_classes=10)
    official = load_checkpoint_file(reference_dir / 'fat_b0_official_format.pth')['model']
    torch.testing.assert_close(model.stem.conv1.conv.weight, official['patch_embed.conv1.conv.0.weight'])
    torch.testing.assert_close(model.norm_pre.bias, official['norm.bias'])
    assert model.get_classifier().weight.shape == (10, 256)


def test_official_format_needs_custom_load(reference_dir):
    with pytest.raises(RuntimeError, match='weights_only'):
        create(path=reference_dir / 'fat_b0_official_format.pth')


def test_wrong_variant_is_named(reference_dir, tmp_path, trained_b0):
    with pytest.raises(ValueError, match='another variant'):
        create('fat_b1', path=reference_dir / 'fat_b0_official_format.pth', custom_load=True)
    torch.save(trained_b0.state_dict(), tmp_path / 'b0.pth')
    for custom_load in (False, True):
        with pytest.raises(ValueError, match=r'another variant.*stem\.conv1\.conv\.weight'):
            create('fat_b1', path=tmp_path / 'b0.pth', custom_load=custom_load, num_classes=10)
    torch.save(timm.create_model('fat_b3').state_dict(), tmp_path / 'b3.pth')
    with pytest.raises(ValueError, match='another variant'):
        create('fat_b2', path=tmp_path / 'b3.pth', custom_load=True)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('not a checkpoint')
    with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
        load_checkpoint_file(path)
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_checkpoint_file(tmp_path / 'missing.pth')


@pytest.mark.parametrize('custom_load', [False, True])
def test_malicious_checkpoint_is_refused_without_side_effect(tmp_path, trained_b0, custom_load):
    marker = tmp_path / 'payload_ran'
    path = tmp_path / 'malicious.pth'
    torch.save({'model': trained_b0.state_dict(), 'config': RunsShellCommand(f'touch {marker}')}, path)
    with pytest.raises((pickle.UnpicklingError, RuntimeError)) as refusal:
        create(path=path, custom_load=custom_load, num_classes=10)
    assert 'system' in str(refusal.value)
    if custom_load:
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
