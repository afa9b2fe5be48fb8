"""Publishing a trained checkpoint the timm way: the folder timm's save_for_hf writes, which timm's local-dir:
loader, the exporter and prediction take."""
import json

import pytest
import timm
import torch

from classification import export
from classification.checkpoint_io import load_checkpoint_file
from classification.predict import main as predict
from classification.publish import main


@pytest.fixture(scope='module')
def published(classification_trainer_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp('published') / 'fat_b0-tiny'
    main(['--checkpoint', str(classification_trainer_checkpoint), '--output', str(folder)])
    return folder


def test_timm_loads_the_published_weights_exactly(published, classification_trainer_checkpoint):
    assert sorted(path.name for path in published.iterdir()) == ['README.md', 'config.json', 'config.yaml',
                                                                  'model.safetensors']
    config = json.loads((published / 'config.json').read_text())
    assert (config['architecture'], config['num_classes'], config['label_names']) == ('fat_b0', 3,
                                                                                       ['bar', 'disc', 'noise'])
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]  # the run's evaluation size
    loaded = timm.create_model(f'local-dir:{published}', pretrained=True).eval()
    trained = export.build_model('fat_b0', classification_trainer_checkpoint, deploy=False)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), trained(images))
        # the exporter (and every loader of the project) takes the folder in place of the checkpoint
        assert torch.equal(export.build_model('fat_b0', published, deploy=False)(images), trained(images))


def test_the_model_card_states_accuracy_command_config_and_license(published, classification_trainer_checkpoint):
    card = (published / 'README.md').read_text()
    checkpoint = load_checkpoint_file(classification_trainer_checkpoint)
    assert card.startswith('---\nlicense: apache-2.0\nlibrary_name: timm\n')
    assert f"acc@1 {checkpoint['scores']['model']:.2f} % on the validation split `val`" in card
    assert 'python -m classification.train --cfg config.yaml --data-path DATA' in card
    assert checkpoint['config'].rstrip() in card
    assert (published / 'config.yaml').read_text() == checkpoint['config']


def test_prediction_takes_the_published_folder(published, classification_trainer_checkpoint, tmp_path, capsys):
    val = classification_trainer_checkpoint.parent.parent / 'data' / 'val'
    outputs = []
    for checkpoint in (classification_trainer_checkpoint, published):
        outputs.append(tmp_path / f'{len(outputs)}.json')
        predict([str(val), '--model', 'fat_b0', '--checkpoint', str(checkpoint), '--output', str(outputs[-1])])
    assert json.loads(outputs[0].read_text()) == json.loads(outputs[1].read_text())


def test_a_folder_that_is_not_empty_or_not_published_is_refused(published, classification_trainer_checkpoint,
                                                                 tmp_path):
    with pytest.raises(SystemExit, match=f'error: {published} exists and is not an empty folder'):
        main(['--checkpoint', str(classification_trainer_checkpoint), '--output', str(published)])
    with pytest.raises(FileNotFoundError, match='is a folder without config.json and model.safetensors'):
        load_checkpoint_file(tmp_path)
    state_dict = tmp_path / 'weights.pth'
    torch.save(timm.create_model('fat_b0', num_classes=3).state_dict(), state_dict)
    with pytest.raises(SystemExit, match='records no model name .*: pass --model'):
        main(['--checkpoint', str(state_dict), '--output', str(tmp_path / 'out')])
