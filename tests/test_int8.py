"""INT8 export (``--int8``, classification/int8.py): NNCF's quantization for OpenVINO, ONNX Runtime's for ONNX and
timmx's XNNPACK quantization for ExecuTorch, calibrated on a folder of images, their agreement with float32 on the
folder's held-out images, and the floor below which nothing is written."""
import importlib.util
import re
from pathlib import Path
from typing import Callable

import pytest
import timm
import torch
from timm.utils import reparameterize_model

from classification import export, int8
from classification.predict import preprocessing
from conftest import write_image_folder

# found, not imported: collection stays quick (NNCF takes a second to import)
needs_nncf = pytest.mark.skipif(not all(importlib.util.find_spec(name) for name in ('nncf', 'openvino')),
                                reason='NNCF or OpenVINO is not installed (make setup-extras)')

CLASSES = ['bar', 'disc', 'noise']  # write_image_folder's classes, in ImageFolder's sorted order


def assert_printed_figures_are_the_written_models(printed: str, images: Path, checkpoint: Path,
                                                  int8_top1: Callable[[torch.Tensor], torch.Tensor]):
    """The printed agreement and top-1s, recomputed from the written INT8 model (``int8_top1``: its classes for a
    batch of images) and the float32 model on the same 12 held-out images."""
    found = re.search(r'INT8 vs float32 on 12 held-out images: top-1 agreement ([\d.]+)%; top-1 ([\d.]+)% '
                      r'\(float32 ([\d.]+)%\)', printed)
    assert found, printed
    data = int8.read_calibration_data(images, preprocessing('fat_b0', None, 64), int8.CALIBRATION_SAMPLES, CLASSES, 3)
    model = export.build_model('fat_b0', checkpoint)
    with torch.no_grad():
        expected = model(data.held_out).argmax(-1)
    actual = int8_top1(data.held_out)
    figures = [(actual == expected), (actual == data.held_out_labels), (expected == data.held_out_labels)]
    assert [float(value) for value in found.groups()] == pytest.approx(
        [100 * figure.float().mean().item() for figure in figures], abs=0.05)


def fat_b0_checkpoint(folder: Path) -> Path:
    """FAT-B0 (shallower where a test asks for ``shallow_fat_b0``: the export's INT8 path is under test, and the
    quantized lowering grows with the graph) for write_image_folder's three classes at 64 px, as far as the export
    reads the trainer's checkpoint."""
    torch.manual_seed(0)
    checkpoint = folder / 'fat_b0_64px.pth'
    torch.save(dict(model=timm.create_model('fat_b0', num_classes=3).state_dict(), classes=CLASSES,
                    config='DATA:\n  IMG_SIZE: 64\n'), checkpoint)
    return checkpoint


def test_labels_come_from_class_subfolders_only_where_they_name_the_models_classes(tmp_path):
    files = [tmp_path / name / f'{index}.png' for name in ('disc', 'bar') for index in range(2)]
    assert int8.class_indices(files, tmp_path, ['bar', 'disc'], 2) == (
        {'bar': 0, 'disc': 1}, "labels from the subfolders, by the checkpoint's classes")
    assert int8.class_indices(files, tmp_path, None, 2) == (
        {'bar': 0, 'disc': 1}, 'labels from the subfolders, in sorted order')
    assert int8.class_indices(files, tmp_path, None, 1000) == (None, 'no labels (2 subfolders for a model of 1000 '
                                                                     'classes)')
    assert int8.class_indices(files, tmp_path, ['cat', 'dog'], 2) == (
        None, "no labels (subfolders not among the checkpoint's classes: bar, disc)")
    assert int8.class_indices([tmp_path / 'a.png', tmp_path / 'disc' / 'b.png'], tmp_path, None, 2) == (
        None, 'no labels (the images are not all in one subfolder per class)')


@needs_nncf
def test_too_few_calibration_images_stop_before_tracing(tmp_path, monkeypatch):
    def not_reached(*args, **kwargs):
        raise AssertionError('the export traced the model')

    monkeypatch.setattr(export, 'trace', not_reached)
    images = write_image_folder(tmp_path / 'images', train_per_class=3, val_per_class=0, corrupt=True)
    with pytest.raises(SystemExit) as stop:
        export.main(['--model', 'fat_b0', '--format', 'openvino', '--output', str(tmp_path / 'out' / 'fat_b0.xml'),
                     '--img-size', '64', '--int8', '--calibration-data', str(images / 'train')])
    assert stop.value.code == (f'error: --calibration-data {images / "train"}: 9 readable images (3 skipped); INT8 '
                               'needs at least 50, to calibrate on and to hold out for checking the quantized model')
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
@needs_nncf
def test_int8_export_reports_its_agreement_and_is_written_only_above_the_floor(tmp_path, capsys, monkeypatch,
                                                                             shallow_fat_b0):
    checkpoint = fat_b0_checkpoint(tmp_path)
    images = write_image_folder(tmp_path / 'images', train_per_class=20, val_per_class=0, corrupt=True) / 'train'
    output = tmp_path / 'out' / 'fat_b0_int8.xml'
    export.main(['--model', 'fat_b0', '--checkpoint', str(checkpoint), '--format', 'openvino', '--output',
                 str(output), '--img-size', '64', '--int8', '--calibration-data', str(images), '--min-agreement', '0'])
    printed = capsys.readouterr().out
    assert ('calibration data: 48 images to calibrate on, 12 held out (3 unreadable skipped; labels from the '
            "subfolders, by the checkpoint's classes)") in printed
    assert f'wrote {output} and {output.with_suffix(".bin")} (fat_b0, openvino, INT8, inference form)' in printed
    errors = [float(line.rsplit(' ', 1)[1]) for line in printed.splitlines() if 'float32 vs PyTorch' in line]
    assert len(errors) == 2 and max(errors) <= 1e-4
    assert sorted(path.name for path in output.parent.iterdir()) == ['fat_b0_int8.bin', 'fat_b0_int8.xml']
    assert 'FakeQuantize' in output.read_text()  # quantized, not the float32 model renamed

    run = export.load_runtime(output, 'openvino')
    assert_printed_figures_are_the_written_models(printed, images, checkpoint,
                                                  lambda held_out: torch.from_numpy(run(held_out.numpy())).argmax(-1))

    # below --min-agreement: an error with the figure, and the INT8 model already at the path left as it was (the
    # float32 export and the quantization stand in by copies of it: the floor is under test)
    written = {suffix: output.with_suffix(suffix).read_bytes() for suffix in ('.xml', '.bin')}

    def copy_written(path: Path, *args, **kwargs) -> bool:
        for suffix, content in written.items():
            path.with_suffix(suffix).write_bytes(content)
        return True

    monkeypatch.setattr(export, 'trace', lambda *args, **kwargs: None)
    monkeypatch.setattr(export, 'export', lambda model, path, *args, **kwargs: copy_written(path))
    monkeypatch.setattr(int8, 'quantize', lambda fp32_xml, path, calibration, fmt: copy_written(path))
    monkeypatch.setattr(int8, 'check_held_out', lambda *args: int8.HeldOutResult(12, 0.5, None, None))
    with pytest.raises(SystemExit) as stop:
        export.main(['--model', 'fat_b0', '--checkpoint', str(checkpoint), '--format', 'openvino', '--output',
                     str(output), '--img-size', '64', '--int8', '--calibration-data', str(images), '--no-verify'])
    assert stop.value.code == ('error: the INT8 model agrees with float32 on 50.0% of the held-out images, less '
                               'than --min-agreement 0.9; nothing written')
    assert {suffix: output.with_suffix(suffix).read_bytes() for suffix in written} == written
    assert sorted(path.name for path in output.parent.iterdir()) == ['fat_b0_int8.bin', 'fat_b0_int8.xml']


@pytest.mark.slow
def test_onnx_int8_export_by_onnx_runtimes_quantizer_reports_its_agreement(tmp_path, capsys, monkeypatch,
                                                                           shallow_fat_b0):
    pytest.importorskip('onnxruntime.quantization')
    import onnx

    working_directory = tmp_path / 'cwd'  # ONNX Runtime's shape inference leaves files in it where it fails
    working_directory.mkdir()
    monkeypatch.chdir(working_directory)
    checkpoint = fat_b0_checkpoint(tmp_path)
    images = write_image_folder(tmp_path / 'images', train_per_class=20, val_per_class=0) / 'train'
    output = tmp_path / 'out' / 'fat_b0_int8.onnx'
    export.main(['--model', 'fat_b0', '--checkpoint', str(checkpoint), '--format', 'onnx', '--output', str(output),
                 '--img-size', '64', '--int8', '--calibration-data', str(images), '--min-agreement', '0'])
    printed = capsys.readouterr().out
    assert f'wrote {output} (fat_b0, onnx, opset 18, dynamo exporter, INT8, inference form)' in printed
    errors = [float(line.rsplit(' ', 1)[1]) for line in printed.splitlines() if 'float32 vs PyTorch' in line]
    assert len(errors) == 2 and max(errors) <= 1e-4
    assert [path.name for path in output.parent.iterdir()] == ['fat_b0_int8.onnx']
    assert not any(working_directory.iterdir())
    graph = onnx.load(str(output)).graph
    quantized_weights = [tensor for tensor in graph.initializer if tensor.data_type == onnx.TensorProto.INT8]
    assert len(quantized_weights) > 50  # every convolution's and linear layer's weights, in int8
    # the batch, height and width stay those of the float32 export: any
    assert [dim.dim_param != '' for dim in graph.input[0].type.tensor_type.shape.dim] == [True, False, True, True]

    run = export.load_runtime(output, 'onnx')
    assert_printed_figures_are_the_written_models(printed, images, checkpoint,
                                                  lambda held_out: torch.from_numpy(run(held_out.numpy())).argmax(-1))


@pytest.mark.slow
def test_onnx_quantization_of_a_graph_whose_shapes_onnx_runtime_cannot_infer_symbolically(tmp_path):
    """EdgeNeXt's graph, on which ONNX Runtime's symbolic shape inference fails (an ``Expand``), as the benchmark
    exports it: quantized all the same, and its INT8 logits follow float32's."""
    pytest.importorskip('onnxruntime.quantization')
    import onnx

    model = reparameterize_model(timm.create_model('edgenext_xx_small').eval())
    fp32 = tmp_path / 'edgenext_xx_small.onnx'
    export.export(model, fp32, 'onnx', 64, traced=export.trace(model, 64, 'onnx', batch_size=1))
    images = torch.randn(9, 3, 64, 64)
    written = int8.quantize(fp32, tmp_path / 'edgenext_xx_small_int8.onnx', images[:8], 'onnx')
    assert [node.op_type for node in onnx.load(str(written)).graph.node].count('QuantizeLinear') > 20
    logits = [torch.from_numpy(export.load_runtime(path, 'onnx')(images[8:].numpy())) for path in (fp32, written)]
    assert torch.corrcoef(torch.cat(logits))[0, 1] > 0.9


@pytest.mark.slow
def test_executorch_int8_export_through_timmx_reports_its_agreement(tmp_path, capsys, shallow_fat_b0):
    pytest.importorskip('executorch')
    pytest.importorskip('timmx')
    checkpoint = fat_b0_checkpoint(tmp_path)
    images = write_image_folder(tmp_path / 'images', train_per_class=20, val_per_class=0) / 'train'
    output = tmp_path / 'out' / 'fat_b0_int8.pte'
    export.main(['--model', 'fat_b0', '--checkpoint', str(checkpoint), '--format', 'executorch', '--output',
                 str(output), '--img-size', '64', '--int8', '--calibration-data', str(images), '--min-agreement', '0'])
    printed = capsys.readouterr().out
    assert 'calibration data: 48 images to calibrate on, 12 held out (0 unreadable skipped' in printed
    assert 'fat_b0, executorch through timmx' in printed and 'INT8, inference form, 64x64 images, batch 1' in printed
    assert [path.name for path in output.parent.iterdir()] == ['fat_b0_int8.pte']
    # INT8 weights: about a byte per parameter, where float32 takes four
    parameters = sum(p.numel() for p in timm.create_model('fat_b0', num_classes=3).parameters())
    assert output.stat().st_size < 2 * parameters

    program = export.load_runtime(output, 'executorch')  # one image at a time
    assert_printed_figures_are_the_written_models(
        printed, images, checkpoint, lambda held_out: torch.tensor([program(image[None].numpy()).argmax()
                                                                    for image in held_out]))


def test_executorch_int8_below_the_floor_writes_nothing(tmp_path, monkeypatch):
    """The floor of the ExecuTorch path, with timmx's quantized export standing in by a file."""
    pytest.importorskip('executorch')
    pytest.importorskip('timmx')
    checkpoint = fat_b0_checkpoint(tmp_path)
    images = write_image_folder(tmp_path / 'images', train_per_class=20, val_per_class=0) / 'train'
    output = tmp_path / 'out' / 'fat_b0_int8.pte'
    output.parent.mkdir()
    output.write_bytes(b'the INT8 program written before')
    staged = []

    def export_with_timmx(model, name, path, fmt, img_size, calibration):
        assert (name, fmt, img_size, model.training) == ('fat_b0', 'executorch', 64, False)
        assert calibration.shape == (48, 3, 64, 64)
        path.write_bytes(b'a new INT8 program')
        staged.append(path)

    monkeypatch.setattr(export, 'export_with_timmx', export_with_timmx)
    monkeypatch.setattr(int8, 'check_held_out', lambda model, path, fmt, data: int8.HeldOutResult(12, 0.5, None, None))
    with pytest.raises(SystemExit) as stop:
        export.main(['--model', 'fat_b0', '--checkpoint', str(checkpoint), '--format', 'executorch', '--output',
                     str(output), '--img-size', '64', '--int8', '--calibration-data', str(images)])
    assert stop.value.code == ('error: the INT8 model agrees with float32 on 50.0% of the held-out images, less '
                               'than --min-agreement 0.9; nothing written')
    assert len(staged) == 1 and not staged[0].exists()
    assert [path.name for path in output.parent.iterdir()] == ['fat_b0_int8.pte']
    assert output.read_bytes() == b'the INT8 program written before'
