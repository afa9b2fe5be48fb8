"""LVT: the authors' model (golden data), timm's interface, token labelling through the trainer."""
import argparse
import json
import logging
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

from classification.checkpoint_io import UnsafeCheckpointError, load_checkpoint_file
from classification.config import ConfigError, load_config
from classification.data import CropFlipWithBox, build_datasets
from classification.lvt import _swap_box, checkpoint_filter_fn
from classification.model_table import count_flops, count_params
from classification.token_labelling import TokenLabelLoss, dense_targets
from classification.train import parse_args, run
from conftest import (REPO_ROOT, RunsShellCommand, assert_channels_last_autocast_trains,
                      assert_reported_accuracy_matches, run_ok, write_image_folder)

LVT_CONFIG = str(REPO_ROOT / 'configs' / 'classification' / 'lvt_cls.yaml')
WIDTHS = [64, 64, 160, 256]


def lvt_reference(reference_dir: Path) -> Path:
    return reference_dir / 'lvt'


def authors_model(reference_dir: Path, name: str, **kwargs):
    overlay = dict(file=str(lvt_reference(reference_dir) / f'{name}_official_format.pth'), custom_load=True)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize('name', ['lvt', 'lvt_cls'])
@pytest.mark.parametrize('size', ['224x224', '256x320'])
def test_reproduces_official_outputs_in_float64(reference_dir, name, size):
    model = authors_model(reference_dir, name).double().eval()
    golden = torch.load(lvt_reference(reference_dir) / f'{name}_io_float64.pt', weights_only=True)
    with torch.no_grad():
        output = model(golden[f'input_{size}'])
    assert output.shape == golden[f'output_{size}'].shape
    assert relative_error(output, golden[f'output_{size}']) < 1e-6


@pytest.mark.parametrize('name', ['lvt', 'lvt_cls'])
def test_official_state_dict_maps_onto_the_model(reference_dir, name):
    shapes = json.loads((lvt_reference(reference_dir) / 'lvt_official_state_dict_shapes.json').read_text())[name]
    model = timm.create_model(name)
    official = {key: torch.full(shape, float(i)) for i, (key, shape) in enumerate(shapes.items())}
    mapped = checkpoint_filter_fn(official, model)
    assert len(mapped) == len(official) == len(model.state_dict())
    model.load_state_dict(mapped, strict=True)
    assert sorted(float(v.flatten()[0]) for v in model.state_dict().values()) == \
        sorted(float(i) for i in range(len(shapes)))


def test_parameters_and_flops():
    lvt, lvt_cls = timm.create_model('lvt'), timm.create_model('lvt_cls')
    assert round(count_params(lvt) / 1e6, 2) == 3.69
    assert round(count_params(lvt_cls) / 1e6, 2) == 5.52
    backbone = timm.create_model('lvt', num_classes=0)
    assert round((count_params(backbone) - 2 * 256) / 1e6, 2) == 3.43  # without the final LayerNorm
    assert count_flops(lvt_cls) / 1e9 == pytest.approx(0.90, abs=0.01)  # the paper's 0.9 G


def test_drop_path_and_num_classes_take_effect():
    model = timm.create_model('lvt_cls', num_classes=10, drop_path_rate=0.1)
    assert model.stages[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model.head.out_features == model.aux_head.out_features == 10
    assert timm.create_model('lvt_cls').stages[-1].blocks[-1].drop_path1.__class__ is torch.nn.Identity


def test_authors_training_arguments_are_read_as_plain_data(reference_dir, tmp_path):
    """Real checkpoints of the authors' timm trainer carry ``args`` (an argparse.Namespace) and ``optimizer``."""
    checkpoint = load_checkpoint_file(lvt_reference(reference_dir) / 'lvt_cls_official_format.pth')
    path = tmp_path / 'lvt_cls_with_args.pth'
    args = argparse.Namespace(model='lvt_cls', lr=1.6e-3, token_label=True, token_label_size=7)
    torch.save(dict(checkpoint, args=args, optimizer={'state': {}, 'param_groups': [{'lr': 1e-5}]}, version=2),
               path)
    model = timm.create_model('lvt_cls', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=True))
    torch.testing.assert_close(model.cls_token, checkpoint['state_dict']['cls_token'])
    assert load_checkpoint_file(path)['args'] == vars(args)


def test_malicious_authors_format_checkpoint_is_refused(reference_dir, tmp_path):
    checkpoint = load_checkpoint_file(lvt_reference(reference_dir) / 'lvt_official_format.pth')
    marker = tmp_path / 'payload_ran'
    path = tmp_path / 'lvt_malicious.pth'
    torch.save(dict(checkpoint, args=argparse.Namespace(hook=RunsShellCommand(f'touch {marker}'))), path)
    with pytest.raises(UnsafeCheckpointError, match='system'):
        timm.create_model('lvt', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=True))
    assert not marker.exists()


@pytest.mark.parametrize('height,width', [(224, 224), (97, 131), (33, 65)])
def test_features_only_pyramid_at_any_size(height, width):
    model = timm.create_model('lvt_cls', features_only=True, out_indices=(0, 1, 2, 3)).eval()
    assert model.feature_info.channels() == WIDTHS
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        features = model(torch.randn(1, 3, height, width))
    for feature, channels, stride in zip(features, WIDTHS, (4, 8, 16, 32)):
        assert feature.shape == (1, channels, math.ceil(height / stride), math.ceil(width / stride))


def test_timm_interface():
    model = timm.create_model('lvt_cls', num_classes=10, in_chans=1).eval()
    images = torch.randn(2, 1, 64, 96)
    features = model.forward_features(images)
    assert features.shape == (2, 2, 3, 256) and model.output_fmt == 'NHWC'
    assert model.forward_head(features, pre_logits=True).shape == (2, 256)
    assert model(images).shape == (2, 10)
    model.reset_classifier(0)
    assert model(images).shape == (2, 256)
    model.reset_classifier(0, '')
    assert model(images).shape == (2, 2, 3, 256)
    cfg = timm.create_model('lvt').pretrained_cfg
    assert (cfg['crop_pct'], cfg['interpolation'], cfg['mean'], cfg['std']) == \
        (0.96, 'bicubic', timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD)
    model = timm.create_model('lvt_cls').train()
    model.set_grad_checkpointing()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_channels_last_autocast_forward_backward(dtype):
    assert_channels_last_autocast_trains('lvt_cls', dtype)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """One graph, no graph break, equal to eager (aot_eager, as FAT's test in test_model.py says why)."""
    model = timm.create_model('lvt_cls').eval()
    images = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-4)


def test_mix_token_swaps_a_box_and_back():
    x = torch.arange(2 * 4 * 4, dtype=torch.float).reshape(2, 4, 4, 1)
    mixed = _swap_box(x, (1, 0, 3, 2))
    assert torch.equal(mixed[0, 1:3, 0:2], x[1, 1:3, 0:2]) and torch.equal(mixed[1, 1:3, 0:2], x[0, 1:3, 0:2])
    assert torch.equal(mixed[:, 0], x[:, 0]) and torch.equal(_swap_box(mixed, (1, 0, 3, 2)), x)

    model = timm.create_model('lvt_cls', num_classes=5, return_dense=True, mix_token=True).train()
    plain = timm.create_model('lvt_cls', num_classes=5, return_dense=True).train()
    plain.load_state_dict(model.state_dict())
    same = torch.randn(1, 3, 64, 64).expand(2, -1, -1, -1)  # a sample mixed with itself is unchanged
    torch.manual_seed(3)
    cls_logits, patch_logits, box = model(same)
    x0, y0, x1, y1 = box
    assert 0 <= x0 <= x1 <= 2 and 0 <= y0 <= y1 <= 2
    expected_cls, expected_patches, no_box = plain(same)
    assert no_box == (0, 0, 0, 0) and patch_logits.shape == (2, 2, 2, 5)
    torch.testing.assert_close(cls_logits, expected_cls)
    torch.testing.assert_close(patch_logits, expected_patches)
    model.eval()
    assert model(same).shape == (2, 5)  # evaluation predicts as without token labelling


def test_mix_token_mixes_inside_a_box_of_the_token_grid():
    """With a box that is neither empty nor whole: the class token sees each image with the box's stem features
    taken from the batch-flipped image; each patch token's logits go back to the image whose features it saw."""
    model = timm.create_model('lvt_cls', num_classes=5, return_dense=True, mix_token=True).train()
    plain = timm.create_model('lvt_cls', num_classes=5, return_dense=True).train()
    plain.load_state_dict(model.state_dict())
    images = torch.randn(3, 3, 128, 128)  # a 4 x 4 token grid, stride 32; the stem's features at stride 4
    for seed in range(20):
        torch.manual_seed(seed)
        cls_logits, patch_logits, (x0, y0, x1, y1) = model(images)
        if 0 < (x1 - x0) * (y1 - y0) < 16:
            break
    assert 0 < (x1 - x0) * (y1 - y0) < 16

    def mix_stem_features(module, inputs, features):  # (B, H, W, C), the box by hand, 8 stem places per token
        mixed = features.clone()
        mixed[:, 8 * x0:8 * x1, 8 * y0:8 * y1] = features[[2, 1, 0], 8 * x0:8 * x1, 8 * y0:8 * y1]
        return mixed
    plain.stem.register_forward_hook(mix_stem_features)
    expected_cls, expected_patches, _ = plain(images)
    torch.testing.assert_close(cls_logits, expected_cls)
    back = expected_patches.clone()
    back[:, x0:x1, y0:y1] = expected_patches[[2, 1, 0], x0:x1, y0:y1]
    torch.testing.assert_close(patch_logits, back)
    assert not torch.allclose(patch_logits[0, x0:x1, y0:y1], expected_patches[0, x0:x1, y0:y1])


def gradient_image(width: int, height: int) -> Image.Image:
    """Red grows with x, green with y: every pixel says where it is."""
    x = torch.arange(width)[None, :].expand(height, -1) * 255 // (width - 1)
    y = torch.arange(height)[:, None].expand(-1, width) * 255 // (height - 1)
    return Image.fromarray(torch.stack([x, y, torch.zeros_like(x)], -1).to(torch.uint8).numpy())


def test_crop_and_flip_report_where_the_crop_lies():
    image = gradient_image(24, 24)
    whole = CropFlipWithBox(transforms.Compose([
        RandomResizedCropAndInterpolation(24, scale=(1., 1.), ratio=(1., 1.), interpolation='bicubic'),
        transforms.RandomHorizontalFlip(p=1.)]))
    cropped, box, flipped = whole(image)
    assert flipped and box.tolist() == [0., 0., 1., 1.]
    pixels, mirrored = np.asarray(cropped), np.asarray(image)[:, ::-1]
    assert (pixels == mirrored).all()  # the whole image at its own size, mirrored

    # a random crop: the reported box, cut out and resized by hand, is the crop
    random_crop = CropFlipWithBox(transforms.Compose([
        RandomResizedCropAndInterpolation(12, scale=(0.1, 0.5), interpolation='bilinear'),
        transforms.RandomHorizontalFlip(p=0.5)]))
    image = gradient_image(40, 30)
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        random.seed(seed)
        cropped, box, flipped = random_crop(image)
        left, top, right, bottom = (box * torch.tensor([40, 30, 40, 30])).round().int().tolist()
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30 and (right - left) * (bottom - top) < 0.51 * 1200
        expected = image.crop((left, top, right, bottom)).resize((12, 12), Image.BILINEAR)
        if flipped:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        assert np.abs(np.asarray(cropped).astype(int) - np.asarray(expected).astype(int)).max() <= 1
        seen.add(bool(flipped))
    assert seen == {False, True}


def test_token_label_items_carry_their_score_map_and_crop(tmp_path):
    data = write_image_folder(tmp_path / 'data', 2, 1)
    score_maps = write_score_maps(data, tmp_path / 'score_maps', 3)
    config = load_config(LVT_CONFIG, ['MODEL.NUM_CLASSES', '3', 'DATA.IMG_SIZE', '32', 'AUG.AUTO_AUGMENT', 'none',
                                      'AUG.REPROB', '0.', 'AUG.COLOR_JITTER', '0.'],
                         **{'DATA.DATA_PATH': str(data), 'TOKEN_LABEL.DATA': str(score_maps)})
    train, _ = build_datasets(config)
    for index, path in enumerate(train.reader.filenames(absolute=True)):
        label = train.classes.index(Path(path).parent.name)
        torch.manual_seed(index)
        random.seed(index)
        image, (target, score_map, box, flipped), corrupt = train[index]
        folder, name = Path(path).parent.name, Path(path).stem
        assert target == label and corrupt == 0 and image.shape == (3, 32, 32)
        assert torch.equal(score_map, torch.load(score_maps / folder / f'{name}.pt').float())
        # the crop the box reports, by hand, is the image (normalised) the item holds
        left, top, right, bottom = (box * 40).round().int().tolist()
        expected = Image.open(path).convert('RGB').crop((left, top, right, bottom)).resize((32, 32), Image.BICUBIC)
        if flipped:
            expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
        expected = transforms.functional.normalize(transforms.functional.to_tensor(expected),
                                                   IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        assert (image - expected).abs().max() < 0.05


def test_dense_targets_follow_the_crop_and_the_flip():
    """A score map whose left half says class 0 and right half class 1."""
    score_map = torch.zeros(2, 1, 4, 8)
    score_map[0] = 10.
    score_map[1, :, :, 4:] = 1
    crops = torch.tensor([[0., 0., 1., 1.], [0., 0., 1., 1.], [0.5, 0., 1., 1.]])
    flipped = torch.tensor([False, True, False])
    targets = dense_targets(torch.tensor([0, 0, 1]), score_map.expand(3, -1, -1, -1, -1), crops, flipped,
                            grid=(2, 2), num_classes=3)
    assert targets.shape == (3, 3, 2 + 4)
    tokens = targets[:, :, 2:].argmax(dim=1)
    assert tokens[0].tolist() == [0, 1, 0, 1] and tokens[1].tolist() == [1, 0, 1, 0] and tokens[2].tolist() == [1] * 4
    torch.testing.assert_close(targets[:, :, 2:].sum(dim=1), torch.ones(3, 4))
    assert targets[2, 1, 1] > 0.9  # the class token's target: the right half is all class 1
    assert targets[:, :, 0].argmax(dim=1).tolist() == [0, 0, 1]


def test_token_label_loss_weights():
    cls_logits, patch_logits = torch.randn(2, 3), torch.randn(2, 2, 2, 3)
    labels = torch.tensor([0, 2])
    loss = TokenLabelLoss(3, cls_weight=1.0, dense_weight=0.5)((cls_logits, patch_logits, (0, 0, 0, 0)), labels)
    expected = torch.nn.functional.cross_entropy(cls_logits, labels) + 0.5 * torch.nn.functional.cross_entropy(
        patch_logits.flatten(1, 2).transpose(1, 2), labels[:, None].expand(2, 4))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize('with_score_maps', [False, True])
@pytest.mark.parametrize('box', [(0, 0, 0, 0), (1, 0, 3, 2)])
def test_token_label_loss_equals_lv_vits(with_score_maps, box):
    """The loss equals that of LV-ViT's ``tlt`` package (which no run imports any more), with and without score
    maps, without and with a MixToken box (4 of the 12 tokens mixed)."""
    tlt_loss = pytest.importorskip('tlt.loss')
    torch.manual_seed(0)
    cls_logits, patch_logits = torch.randn(4, 5), torch.randn(4, 3, 4, 5)
    labels = torch.tensor([0, 2, 4, 1])
    loss = TokenLabelLoss(5, cls_weight=1.0, dense_weight=0.5, smoothing=0.1)
    if with_score_maps:
        score_maps = torch.cat([torch.rand(4, 1, 2, 6, 6) * 5, torch.randint(0, 5, (4, 1, 2, 6, 6)).float()], 1)
        targets = (labels, score_maps, torch.tensor([[0., 0., 1., 1.], [.25, 0., 1., .5], [0., .5, .5, 1.],
                                                      [.1, .2, .9, .8]]), torch.tensor([False, True, False, True]))
        reference = dense_targets(*targets, grid=(3, 4), num_classes=5, smoothing=0.1)
    else:
        targets = labels
        reference = torch.full((4, 5), 0.1 / 5).scatter_(1, labels[:, None], 1 - 0.1 + 0.1 / 5)
    expected = tlt_loss.TokenLabelCrossEntropy(dense_weight=0.5, cls_weight=1.0, mixup_active=False, classes=5)(
        (cls_logits, patch_logits.flatten(1, 2), box), reference)
    torch.testing.assert_close(loss((cls_logits, patch_logits, box), targets), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # a process of its own
def test_no_run_imports_tlt():
    code = 'import sys, classification.train; assert "tlt" not in sys.modules, "tlt was imported"'
    run_ok([sys.executable, '-c', code])


def test_config_checks():
    with pytest.raises(ConfigError, match='needs a model with per-token predictions'):
        load_config(LVT_CONFIG, ['MODEL.NAME', 'fat_b0'])
    with pytest.raises(ConfigError, match='set AUG.MIXUP and AUG.CUTMIX to 0'):
        load_config(LVT_CONFIG, ['AUG.MIXUP', '0.8'])
    config = load_config(LVT_CONFIG)
    assert (config.TRAIN.EPOCHS, config.TRAIN.COOLDOWN_EPOCHS, config.TRAIN.CLIP_GRAD) == (300, 10, 0.0)
    assert config.TRAIN.BASE_LR * 1024 / 512 == pytest.approx(1.6e-3)


def write_score_maps(data: Path, root: Path, classes: int) -> Path:
    """LV-ViT-format score maps for every training image: top-2 of ``classes`` classes on a 5x5 grid."""
    generator = torch.Generator().manual_seed(0)
    for image in sorted((data / 'train').glob('*/*.png')):
        scores = torch.rand(2, 5, 5, generator=generator) * 5
        indices = torch.stack([torch.randperm(classes, generator=generator)[:2] for _ in range(25)], 1)
        folder = root / image.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(torch.stack([scores, indices.reshape(2, 5, 5).float()]).half(), folder / f'{image.stem}.pt')
    return root


@pytest.mark.slow
@pytest.mark.parametrize('with_score_maps', [True, False])
def test_token_labelling_trains_through_the_trainer(tmp_path, with_score_maps):
    """The recipe's config (MixToken on) for 2 epochs and 1 of cool-down, 3 steps each."""
    data = write_image_folder(tmp_path / 'data', 4, 1)
    score_maps = ['--token-label-data', str(write_score_maps(data, tmp_path / 'score_maps', 3))] \
        if with_score_maps else []
    run(parse_args(['--cfg', LVT_CONFIG, '--data-path', str(data), '--output', str(tmp_path / 'output'),
                    '--batch-size', '4', *score_maps, '--opts', 'DATA.IMG_SIZE', '64', 'DATA.NUM_WORKERS', '0',
                    'MODEL.NUM_CLASSES', '3', 'TRAIN.EPOCHS', '2', 'TRAIN.WARMUP_EPOCHS', '1',
                    'TRAIN.COOLDOWN_EPOCHS', '1', 'PRINT_FREQ', '1']))
    log = (tmp_path / 'output' / 'log.txt').read_text()
    assert ('with the score maps of' in log) == with_score_maps
    assert ('the patch tokens learn their image\'s label' in log) == (not with_score_maps)
    summary = json.loads((tmp_path / 'output' / 'summary.json').read_text())
    assert summary['epochs'] == 3  # 2 of the schedule and 1 of cool-down
    assert all(math.isfinite(entry['train_loss']) for entry in summary['history'])
    steps = re.findall(r'epoch 3/3 step \d+/3 .* lr ([\d.e+-]+)', log)
    assert steps and all(float(lr) == pytest.approx(5e-6 * 4 / 512, rel=1e-3) for lr in steps)  # cool-down: MIN_LR


def test_missing_score_maps_are_named(tmp_path):
    data = write_image_folder(tmp_path / 'data', 2, 1)
    score_maps = write_score_maps(data, tmp_path / 'score_maps', 3)
    (score_maps / 'bar' / '1.pt').unlink()
    config = load_config(LVT_CONFIG, ['MODEL.NUM_CLASSES', '3'], **{'DATA.DATA_PATH': str(data),
                                                                    'TOKEN_LABEL.DATA': str(score_maps)})
    with pytest.raises(ValueError, match=r'1 of 6 training images have no score map .*bar/1\.png'):
        build_datasets(config)


def test_corrupt_score_maps_are_skipped_and_counted(tmp_path, caplog):
    data = write_image_folder(tmp_path / 'data', 2, 1)
    score_maps = write_score_maps(data, tmp_path / 'score_maps', 3)
    (score_maps / 'bar' / '1.pt').write_bytes((score_maps / 'bar' / '1.pt').read_bytes()[:100])  # cut short
    torch.save(torch.zeros(3, 4), score_maps / 'noise' / '0.pt')  # not (2, k, H, W)
    config = load_config(LVT_CONFIG, ['MODEL.NUM_CLASSES', '3', 'DATA.IMG_SIZE', '32'],
                         **{'DATA.DATA_PATH': str(data), 'TOKEN_LABEL.DATA': str(score_maps)})
    train, _ = build_datasets(config)
    with caplog.at_level(logging.WARNING):
        items = [train[i] for i in range(len(train))]
    # classes bar, disc, noise: bar/1 is replaced by disc/0, noise/0 by noise/1
    assert [item[2] for item in items] == [0, 1, 0, 0, 1, 0]
    assert [item[1][0] for item in items] == [0, 1, 1, 1, 2, 2]
    assert f'corrupt sample skipped: {data}/train/bar/1.png: its score map {score_maps}/bar/1.pt is unreadable' \
        in caplog.text
    assert f'{score_maps}/noise/0.pt is not a tensor of shape (2, k, H, W) (top-k scores, then their class indices)' \
        ' but (3, 4)' in caplog.text


@pytest.mark.slow
def test_eval_of_authors_checkpoint(tmp_path, reference_dir):
    data = write_image_folder(tmp_path / 'data', 2, 4)
    checkpoint = lvt_reference(reference_dir) / 'lvt_cls_official_format.pth'
    run(parse_args(['--cfg', LVT_CONFIG, '--data-path', str(data), '--output', str(tmp_path / 'eval'), '--eval',
                    '--resume', str(checkpoint), '--opts', 'DATA.IMG_SIZE', '64', 'DATA.NUM_WORKERS', '0']))

    model = authors_model(reference_dir, 'lvt_cls').eval()
    _, val = build_datasets(load_config(LVT_CONFIG, ['DATA.IMG_SIZE', '64'], **{'DATA.DATA_PATH': str(data)}))
    assert_reported_accuracy_matches((tmp_path / 'eval' / 'eval_log.txt').read_text(), model, val)
