"""Seeing inside FASA: the maps are the layer's own computation, the hooks leave the model's output as it is, and
the picture puts the query where it was asked for."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw

from classification.fat import FASA
from classification.visualize import HEADER, QUERY_COLOR, fasa_layers, main, visualize

pytest.importorskip('matplotlib', reason='matplotlib is not installed (make setup-extras)')

STRIDES = {1: 4, 2: 8, 3: 16, 4: 32}


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('fat_b0').eval()


def test_hooks_leave_the_output_and_the_maps_are_the_layers_own(model):
    image = torch.randn(3, 96, 128)
    with torch.no_grad():
        expected = model(image[None])
    _, logits, rows = visualize(model, image, (40, 70), stages=(1, 2, 3, 4))
    assert torch.equal(logits, expected)
    assert all(not layer._forward_hooks for layer in model.modules() if isinstance(layer, FASA))
    inputs = {}
    layers = fasa_layers(model, (1, 2, 3, 4))
    handles = [layer.register_forward_pre_hook(lambda m, args, s=stage: inputs.__setitem__(s, args[0]))
               for stage, layer in layers.items()]
    with torch.no_grad():
        model(image[None])
    for handle in handles:
        handle.remove()
    for stage, maps in rows.items():
        layer, x = layers[stage], inputs[stage]
        height, width = 96 // STRIDES[stage], 128 // STRIDES[stage]
        assert x.shape[-2:] == (height, width)
        assert maps['local'].shape == maps['gate'].shape == (height, width)  # the stage's resolution
        with torch.no_grad():
            torch.testing.assert_close(maps['output'], layer(x), rtol=1e-4, atol=1e-5)  # what the layer computes
            # the query's attention, written out: softmax over the keys of q . k / sqrt(head_dim)
            q = layer.q(x)[0].reshape(layer.num_heads, layer.head_dim, height * width)
            keys = layer.kv_downsample(x)
            k = layer.kv(keys)[0].reshape(2, layer.num_heads, layer.head_dim, -1)[0]
        row, column = maps['query']
        assert (row, column) == (int((40 + 0.5) / 96 * height), int((70 + 0.5) / 128 * width))
        logits_of_query = torch.einsum('hd,hdk->hk', q[:, :, row * width + column], k) / layer.head_dim ** 0.5
        attention = maps['attention'].reshape(layer.num_heads, -1)
        assert maps['attention'].shape[-2:] == keys.shape[-2:]
        torch.testing.assert_close(attention, logits_of_query.softmax(dim=-1), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(attention.sum(dim=-1), torch.ones(layer.num_heads))


def test_the_query_is_drawn_on_the_bright_object_where_it_was_placed(tmp_path, capsys):
    source = tmp_path / 'bright.png'
    picture = Image.new('RGB', (224, 224), (30, 30, 40))
    ImageDraw.Draw(picture).ellipse((150, 40, 210, 100), fill=(250, 240, 200))  # centred on row 70, column 180
    picture.save(source)
    output = tmp_path / 'fasa.png'
    # resized to 256 and centre-cropped to 224 (evaluation's preprocessing), the object is centred at row 64, column
    # 190 of the input, 34 pixels across
    main([str(source), '--model', 'fat_b0', '--output', str(output), '--query', '76', '190', '--stages', '2', '4',
          '--heads', 'each'])
    assert 'wrote' in capsys.readouterr().out
    drawn = np.asarray(Image.open(output).convert('RGB'))
    heads = max(layer.num_heads for layer in fasa_layers(timm.create_model('fat_b0'), (2, 4)).values())
    assert drawn.shape == (HEADER + 2 * 224, (3 + heads) * 224, 3)  # image, local, gate and a panel per head
    for index in range(2):
        top = HEADER + index * 224
        assert tuple(drawn[top + 76, 190]) == QUERY_COLOR  # the marker, where the query was placed
        assert drawn[top + 76, 190 + 6].min() > 180  # beside it, the bright object
        assert drawn[top + 76, 40].max() < 80  # the dark background, away from it


@pytest.mark.parametrize('argv, message', [
    (['--model', 'fat_b0_swin'], 'stage 1 mixes its tokens with ShiftedWindowAttention, not FASA'),
    (['--model', 'lvt_cls'], "argument --model: invalid choice: 'lvt_cls'"),  # LVT has no FASA
    (['--model', 'fat_b0', '--stages', '5'], 'stage 5: the model has stages 1-4'),
    (['--model', 'fat_b0', '--query', '300', '10'], '--query 300 10 is outside the 224x224 input'),
])
def test_what_cannot_be_drawn_is_named(argv, message, tmp_path, capsys):
    source = tmp_path / 'image.png'
    Image.new('RGB', (64, 64)).save(source)
    with pytest.raises(SystemExit) as stop:
        main([str(source), '--output', str(tmp_path / 'out.png'), *argv])
    assert message in str(stop.value.code) + capsys.readouterr().err
    assert not (tmp_path / 'out.png').exists()
