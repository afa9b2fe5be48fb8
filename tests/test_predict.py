"""Prediction: the top classes of images with their probabilities, named by the classes the trainer recorded, from
PyTorch or from an exported file in its runtime."""
import csv
import json
import re

import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from classification import export
from classification.checkpoint_io import load_checkpoint_file
from classification.predict import main, preprocessing

CLASSES = ['bar', 'disc', 'noise']  # write_image_folder's class folders, sorted: the trainer's labels


def expected_probabilities(checkpoint, files) -> torch.Tensor:
    """The checkpoint's model on the images as its run evaluated them (32 pixels: resized to 32 / 0.875 = 36,
    bicubic, centre-cropped, normalised with ImageNet's statistics), written out here with torchvision."""
    preprocess = transforms.Compose([
        transforms.Resize(36, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(32),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    model = export.build_model('fat_b0', checkpoint)
    images = torch.stack([preprocess(Image.open(path).convert('RGB')) for path in files])
    with torch.no_grad():
        return model(images).softmax(dim=-1)


def test_predictions_name_the_trained_classes_and_skip_what_is_not_an_image(classification_trainer_checkpoint,
                                                                             tmp_path, capsys):
    checkpoint = classification_trainer_checkpoint
    assert load_checkpoint_file(checkpoint)['classes'] == CLASSES  # recorded by the trainer
    val = checkpoint.parent.parent / 'data' / 'val'
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'\x89PNG\r\n\x1a\n not really an image')
    output = tmp_path / 'predictions.json'
    main([str(val), str(broken), str(tmp_path / 'missing.jpg'), '--model', 'fat_b0', '--checkpoint',
          str(checkpoint), '--top-k', '2', '--batch-size', '2', '--output', str(output)])
    printed = capsys.readouterr()
    files = sorted(val.rglob('*.png'))
    assert printed.err.splitlines() == [
        f"skipped {broken}: UnidentifiedImageError: cannot identify image file '{broken}'",
        f"skipped {tmp_path / 'missing.jpg'}: FileNotFoundError: [Errno 2] No such file or directory: "
        f"'{tmp_path / 'missing.jpg'}'"]
    predictions = json.loads(output.read_text())
    assert [prediction['image'] for prediction in predictions] == [str(path) for path in files]
    probabilities = expected_probabilities(checkpoint, files)
    for prediction, expected in zip(predictions, probabilities):
        values, indices = expected.topk(2)
        assert [entry['index'] for entry in prediction['top']] == indices.tolist()
        assert [entry['name'] for entry in prediction['top']] == [CLASSES[i] for i in indices.tolist()]
        assert [entry['probability'] for entry in prediction['top']] == pytest.approx(values.tolist(), abs=1e-6)
        top = prediction['top'][0]
        assert f"{prediction['image']}: {top['name']} ({top['probability']:.1%}); " in printed.out
    assert f'wrote 3 predictions to {output}' in printed.out


def test_imagenet_classes_and_csv_without_a_checkpoint(tmp_path, capsys):
    image = tmp_path / 'image.jpg'
    Image.new('RGB', (300, 200), (200, 30, 30)).save(image)
    output = tmp_path / 'predictions.csv'
    main([str(image), '--model', 'fat_b0', '--top-k', '3', '--output', str(output)])
    rows = list(csv.DictReader(output.open()))
    assert [row['rank'] for row in rows] == ['1', '2', '3'] and {row['image'] for row in rows} == {str(image)}
    from timm.data import ImageNetInfo

    assert [row['name'] for row in rows] == [ImageNetInfo().index_to_description(int(row['index'])) for row in rows]
    assert sorted((float(row['probability']) for row in rows), reverse=True) == [float(row['probability'])
                                                                                 for row in rows]


@pytest.mark.parametrize('argv, message', [
    (['--model', 'fat_b9'], "argument --model: invalid choice: 'fat_b9'"),
    (['--model', 'fat_b0', '--output', 'predictions.txt'], 'write a .csv or a .json file'),
    (['--model', 'fat_b0', '--backend', 'tensorrt', 'model.engine'], 'the runtime is one of onnxruntime, openvino, '
                                                                     "executorch, got 'tensorrt'"),
    (['--model', 'fat_b0', '--backend', 'openvino', 'missing.xml'], '--backend: missing.xml not found'),
])
def test_bad_arguments_are_named(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize('runtime, module, name, suffix', [
    ('onnxruntime', 'onnxruntime', 'ONNX Runtime', '.onnx'), ('openvino', 'openvino', 'OpenVINO', '.xml'),
    ('executorch', 'executorch.runtime', 'ExecuTorch', '.pte')])
def test_a_file_that_is_not_an_export_is_named(runtime, module, name, suffix, tmp_path):
    pytest.importorskip(module, reason=f'{runtime} is not installed (make setup-extras)')
    Image.new('RGB', (40, 40)).save(tmp_path / 'image.png')
    broken = tmp_path / f'model{suffix}'
    broken.write_text('not a model')
    with pytest.raises(SystemExit, match=rf'^error: {name} cannot load {re.escape(str(broken))}: .'):
        main([str(tmp_path / 'image.png'), '--model', 'fat_b0', '--backend', runtime, str(broken)])


class MeanOverPositions(torch.nn.Module):
    def forward(self, images):
        return images.mean((2, 3))


@pytest.mark.parametrize('model, example, message', [
    (torch.nn.Linear(4, 3), torch.randn(2, 4), 'takes a 2-d input; prediction feeds batches of images (N, 3, H, W)'),
    (MeanOverPositions(), torch.randn(1, 3, 32, 48), 'takes 32x48 images; prediction crops square ones')])
def test_a_file_of_another_input_is_named(model, example, message, tmp_path):
    """ONNX files of other exporters, whose input prediction cannot feed."""
    pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (make setup-extras)')
    foreign = tmp_path / 'foreign.onnx'
    torch.onnx.export(model, (example,), str(foreign), dynamo=False)
    Image.new('RGB', (40, 40)).save(tmp_path / 'image.png')
    with pytest.raises(SystemExit, match=f'^error: {re.escape(str(foreign))} {re.escape(message)}$'):
        main([str(tmp_path / 'image.png'), '--model', 'fat_b0', '--backend', 'onnxruntime', str(foreign)])


def test_nothing_readable_is_an_error(tmp_path):
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    with pytest.raises(SystemExit, match=r'error: no image could be read \(1 skipped\)'):
        main([str(tmp_path), '--model', 'fat_b0'])


def write_images(folder, count: int) -> list:
    """``count`` (up to 4) plain-coloured 90x70 PNG images in ``folder``."""
    images = []
    for index, color in enumerate([(250, 20, 20), (20, 250, 20), (20, 20, 250), (128, 128, 128)][:count]):
        images.append(folder / f'{index}.png')
        Image.new('RGB', (90, 70), color).save(images[-1])
    return images


@pytest.mark.slow
def test_an_exported_model_predicts_what_pytorch_does(tmp_path):
    pytest.importorskip('onnxruntime', reason='onnxruntime is not installed (make setup-extras)')
    import timm

    torch.manual_seed(0)
    checkpoint = tmp_path / 'fat_b0_64px.pth'  # what the trainer saves, as far as prediction reads it
    torch.save(dict(model=timm.create_model('fat_b0', num_classes=3).state_dict(), classes=CLASSES,
                    config='DATA:\n  IMG_SIZE: 64\n'), checkpoint)
    exported = tmp_path / 'fat_b0.onnx'  # through the faster of the two exporters: test_deploy covers both
    export.main(['--model', 'fat_b0', '--checkpoint', str(checkpoint), '--format', 'onnx', '--output', str(exported),
                 '--img-size', '64', '--exporter', 'torchscript'])
    images = write_images(tmp_path, 4)
    outputs = {}
    for name, backend in (('torch', []), ('onnx', ['--backend', 'onnxruntime', str(exported)])):
        outputs[name] = tmp_path / f'{name}.json'
        main([*map(str, images), '--model', 'fat_b0', '--checkpoint', str(checkpoint), '--top-k', '3', '--output',
              str(outputs[name]), *backend])
    torch_predictions, onnx_predictions = (json.loads(outputs[name].read_text()) for name in ('torch', 'onnx'))
    assert len(torch_predictions) == len(onnx_predictions) == 4
    for ours, theirs in zip(torch_predictions, onnx_predictions):
        assert [entry['name'] for entry in ours['top']] == [entry['name'] for entry in theirs['top']]
        assert [entry['probability'] for entry in ours['top']] == pytest.approx(
            [entry['probability'] for entry in theirs['top']], abs=1e-5)


def tiny_classifier() -> torch.nn.Module:
    """A classifier of any input size into CLASSES, quick to export to every runtime."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, len(CLASSES))).eval()


def classes_checkpoint(folder, img_size: int):
    """A checkpoint that names CLASSES and records the image size its run evaluated at, as far as prediction reads
    it."""
    checkpoint = folder / 'classes.pth'
    torch.save(dict(classes=CLASSES, config=f'DATA:\n  IMG_SIZE: {img_size}\n'), checkpoint)
    return checkpoint


def probabilities_of(classifier: torch.nn.Module, checkpoint, images, img_size=None) -> torch.Tensor:
    """The classifier's probabilities on the images, preprocessed as prediction does for the checkpoint (at
    ``img_size`` if given)."""
    preprocess = preprocessing('fat_b0', load_checkpoint_file(str(checkpoint)), img_size=img_size)
    with torch.no_grad():
        return classifier(torch.stack([preprocess(Image.open(path).convert('RGB')) for path in images])).softmax(-1)


@pytest.mark.parametrize('runtime, fmt', [('onnxruntime', 'onnx'), ('openvino', 'openvino'),
                                          pytest.param('executorch', 'executorch', marks=pytest.mark.slow)])
def test_a_static_program_predicts_in_its_own_batch_and_size(runtime, fmt, tmp_path, capsys):
    """A program of batches of 2 images of 40 pixels, given 3 images by a checkpoint that evaluated at 32: two
    batches, the last filled up, of images preprocessed to 40 pixels."""
    pytest.importorskip({'onnx': 'onnxruntime', 'openvino': 'openvino', 'executorch': 'executorch.runtime'}[fmt],
                        reason=f'{runtime} is not installed (make setup-extras)')
    classifier = tiny_classifier()
    program = tmp_path / f'static{export.FORMATS[fmt]}'
    export.export(classifier, program, fmt, img_size=40, traced=export.trace(classifier, 40, fmt, batch_size=2))
    assert export.input_shape(program, fmt) == ((2, 3, 40, 40), None)
    checkpoint = classes_checkpoint(tmp_path, 32)
    images = write_images(tmp_path, 3)
    output = tmp_path / 'predictions.json'
    main([*map(str, images), '--model', 'fat_b0', '--checkpoint', str(checkpoint), '--top-k', '3', '--output',
          str(output), '--backend', runtime, str(program)])
    assert f'{program} fixes its input: predicting in batches of 2 image(s) of 40x40 pixels' in capsys.readouterr().err
    predictions = json.loads(output.read_text())
    assert [prediction['image'] for prediction in predictions] == list(map(str, images))
    for prediction, probabilities in zip(predictions, probabilities_of(classifier, checkpoint, images, img_size=40)):
        top = probabilities.topk(3)
        assert [entry['name'] for entry in prediction['top']] == [CLASSES[index] for index in top.indices]
        assert [entry['probability'] for entry in prediction['top']] == pytest.approx(top.values.tolist(), abs=1e-5)


@pytest.mark.slow
def test_an_executorch_program_of_a_smaller_batch_bound_predicts_in_batches_within_it(tmp_path):
    """A program that ExecuTorch planned for batches of at most 2 (the exporter's bound is 8), given 3 images: two
    batches within the bound, predicting what the classifier does."""
    pytest.importorskip('executorch.runtime', reason='executorch is not installed (make setup-extras)')
    classifier = tiny_classifier()
    with torch.no_grad():
        traced = export.Traced(torch.export.export(classifier, (torch.randn(2, 3, 32, 32),), dynamic_shapes=(
            {0: torch.export.Dim('batch', min=1, max=2)},)), False)
    program = tmp_path / 'batch_up_to_2.pte'
    export.export_executorch(traced, program)
    assert export.input_shape(program, 'executorch') == ((None,) * 4, 2)
    checkpoint = classes_checkpoint(tmp_path, 32)
    images = write_images(tmp_path, 3)
    output = tmp_path / 'predictions.json'
    main([*map(str, images), '--model', 'fat_b0', '--checkpoint', str(checkpoint), '--top-k', '1', '--output',
          str(output), '--backend', 'executorch', str(program)])
    predictions = json.loads(output.read_text())
    assert [prediction['top'][0]['probability'] for prediction in predictions] == pytest.approx(
        probabilities_of(classifier, checkpoint, images).max(dim=-1).values.tolist(), abs=1e-5)


def test_a_batch_that_the_runtime_refuses_stops_in_one_line(tmp_path, monkeypatch):
    """A runtime's own exception (its context, then the problem in the last line) on a batch: that line, the
    batch's shape, and no --output file."""
    def refusing_runtime(path, fmt):
        def run(images):
            raise RuntimeError(f'in {fmt}: method->execute()\ninput of shape {images.shape} is not planned for')
        return run
    monkeypatch.setattr(export, 'load_runtime', refusing_runtime)
    program = tmp_path / 'model.pte'
    program.write_bytes(b'read by the stand-in runtime only')
    monkeypatch.setattr(export, 'input_shape', lambda path, fmt: export.InputShape((None,) * 4, 8))
    images = write_images(tmp_path, 3)
    output = tmp_path / 'predictions.csv'
    with pytest.raises(SystemExit, match=rf'^error: ExecuTorch could not run {re.escape(str(program))} on a batch '
                                         r'of shape \(3, 3, 224, 224\): input of shape \(3, 3, 224, 224\) is not '
                                         rf'planned for; nothing written to {re.escape(str(output))}$'):
        main([*map(str, images), '--model', 'fat_b0', '--output', str(output), '--backend', 'executorch',
              str(program)])
    assert not output.exists()
