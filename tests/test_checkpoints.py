import os
import pickle

import pytest
import safetensors.torch
import timm
import torch

from classification.checkpoint_io import UnsafeCheckpointError, load_checkpoint_file


class _RunsShellCommand:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


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
    torch.save({'model': trained_b0.state_dict(), 'config': _RunsShellCommand(f'touch {marker}')}, path)
    with pytest.raises((pickle.UnpicklingError, RuntimeError)) as refusal:
        create(path=path, custom_load=custom_load, num_classes=10)
    assert 'system' in str(refusal.value)
    if custom_load:
        assert isinstance(refusal.value, UnsafeCheckpointError)
    assert not marker.exists()
