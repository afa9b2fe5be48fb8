"""The inference (deploy) form reached through timm.utils.reparameterize_model, the exporter (ONNX, OpenVINO,
ExecuTorch), the benchmark."""
import io
import json
import re
import statistics
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.utils import reparameterize_model

from classification import benchmark, export, fat, graph_forms, int8, lvt
from classification.fat import PointwiseConv, ResidualDepthwiseConv
from classification.registry import model_names
from conftest import SHALLOW_FAT_B0_DEPTHS, SHALLOW_MODELS, randomize_norms, run_ok, skip_without_runtime


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def deploy_error(model: torch.nn.Module, images: torch.Tensor) -> float:
    deployed = reparameterize_model(model)
    channels_last = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(images)
        errors = [relative_error(deployed(images), expected),
                  relative_error(deployed.to(memory_format=torch.channels_last)(channels_last), expected)]
    return max(errors)


@pytest.mark.parametrize('variant', model_names('fat'))
def test_deploy_form_equals_training_form(variant):
    model = randomize_norms(timm.create_model(variant))
    assert deploy_error(model, torch.randn(2, 3, 64, 96)) <= 1e-5


def test_deploy_form_equals_training_form_for_b0_at_224():
    model = randomize_norms(timm.create_model('fat_b0'))
    assert deploy_error(model, torch.randn(1, 3, 224, 224)) <= 1e-5


def test_deploy_form_of_authors_checkpoint_reproduces_their_logits(reference_dir):
    overlay = dict(file=str(reference_dir / 'fat_b0_official_format.pth'), custom_load=True)
    model = timm.create_model('fat_b0', pretrained=True, pretrained_cfg_overlay=overlay)
    model = reparameterize_model(model.double().eval())
    golden = torch.load(reference_dir / 'fat_b0_io_float64.pt', weights_only=True)
    with torch.no_grad():
        logits = model(golden['input_224x224'])
    assert relative_error(logits, golden['logits_224x224']) < 1e-10


def test_reparameterize_model_folds_every_batchnorm_and_residual():
    model = timm.create_model('fat_b1').eval()
    keys = list(model.state_dict())
    deployed = reparameterize_model(model)
    foldable = (torch.nn.BatchNorm2d, PointwiseConv, ResidualDepthwiseConv)
    assert not any(isinstance(m, foldable) for m in deployed.modules())
    # the training form is left as it was
    assert list(model.state_dict()) == keys
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize('name', ['fat_b0', 'fat_b0_cat'])
def test_reparameterize_model_folds_a_model_in_training_mode(name):
    """As timm's own reparameterizable models do (timmx fuses before eval()): the same inference form, the running
    statistics folded, the batch's statistics never used."""
    model = randomize_norms(timm.create_model(name, depths=SHALLOW_FAT_B0_DEPTHS))
    from_training_mode = reparameterize_model(model.train()).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in from_training_mode.modules())
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert relative_error(from_training_mode(images), model.eval()(images)) <= 1e-5


def test_reparameterize_model_is_idempotent():
    model = randomize_norms(timm.create_model('fat_b0'))
    once = reparameterize_model(model)
    twice = reparameterize_model(once)
    assert str(twice) == str(once)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twice(images), once(images), rtol=0, atol=0)


def test_training_and_deploy_forms_script():
    model = randomize_norms(timm.create_model('fat_b0'))
    images = torch.randn(1, 3, 64, 64)
    for form in (model, reparameterize_model(model)):
        with torch.no_grad():
            assert relative_error(torch.jit.script(form)(images), form(images)) <= 1e-6


def test_deploy_form_keeps_channels_last_and_features():
    model = timm.create_model('fat_b0', features_only=True, out_indices=(0, 1, 2, 3))
    model = randomize_norms(model)
    deployed = reparameterize_model(model).to(memory_format=torch.channels_last)
    images = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        expected = model(images)
        features = deployed(images.contiguous(memory_format=torch.channels_last))
    for feature, reference in zip(features, expected):
        assert feature.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(feature, reference) <= 1e-5


@pytest.mark.slow  # traces as the exporters do: left out of the fast tier with the exports
def test_exported_graphs_take_the_runtime_friendly_attention_and_overlap_add():
    """What torch.export and torch.jit.trace (the TorchScript ONNX exporter's tracer) record: FASA's attention as
    ``fat.deployment_attention`` and RASA's as ``graph_forms.batched_attention`` (3-d matrix products, each softmax
    over the last dimension: what ExecuTorch's XNNPACK delegate takes whole), CSA's overlap-add by transposed
    convolution, each equal to the eager path to float rounding."""
    q, k, v = torch.randn(2, 80, 10, 7), torch.randn(2, 80, 3, 3), torch.randn(2, 80, 3, 3)
    heads = [tensor.reshape(2, 5, 16, -1).transpose(-1, -2) for tensor in (q, k, v)]
    reference = F.scaled_dot_product_attention(*heads)
    assert relative_error(graph_forms.batched_attention(*heads), reference) <= 1e-6
    reference = reference.transpose(-1, -2).reshape(10, 16, 70)
    assert relative_error(fat.deployment_attention(q, k, v, num_heads=5), reference) <= 1e-6
    windows = torch.randn(2, 4, 9, 7, 6)
    torch.testing.assert_close(lvt.overlap_add_transposed_conv(windows, 13, 11, 3, 2),
                               lvt.overlap_add(windows, 13, 11, 3, 2))
    def exported_graph(name: str) -> torch.fx.Graph:
        model = reparameterize_model(timm.create_model(name).eval())
        return export.trace(model, 64, 'onnx', batch_size=1).program.graph

    graph = exported_graph('fat_b0')
    softmaxes = [node for node in graph.nodes if 'softmax' in str(node.target)]
    assert len(softmaxes) == 12  # one per FASA
    assert all(node.args[1] in (-1, node.args[0].meta['val'].dim() - 1) for node in softmaxes)
    assert 'aten.bmm' in str(graph)
    assert 'aten.matmul' not in str(graph) and 'scaled_dot_product_attention' not in str(graph)
    graph = str(exported_graph('lvt'))
    assert 'aten.conv_transpose2d' in graph and 'aten.slice_scatter' not in graph
    assert 'aten.bmm' in graph and 'aten.matmul' not in graph and 'scaled_dot_product_attention' not in graph
    for name, present, absent in (('fat_b0', 'aten::bmm', 'aten::scaled_dot_product_attention'),
                                  ('lvt', 'aten::eye', 'aten::add_')):  # the one-hot kernel, no in-place additions
        model = reparameterize_model(timm.create_model(name).eval())
        with torch.no_grad():
            kinds = {node.kind() for node in torch.jit.trace(model, torch.randn(1, 3, 64, 64)).inlined_graph.nodes()}
        assert present in kinds and absent not in kinds


@pytest.mark.parametrize('kernel_size', [3, 5, 7, 9, 11])
def test_depthwise_conv_in_bands_equals_the_convolution(kernel_size):
    """XNNPACK's form of a depthwise convolution (``graph_forms.depthwise_conv_in_bands``), on a map whose height and
    width differ and are below the kernel's, with and without bias, in float64."""
    x = torch.randn(2, 6, 5, 12, dtype=torch.float64)
    weight, bias = torch.randn(6, 1, kernel_size, kernel_size, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    for b in (bias, None):
        expected = F.conv2d(x, weight, b, padding=kernel_size // 2, groups=6)
        torch.testing.assert_close(graph_forms.depthwise_conv_in_bands(x, weight, b), expected, rtol=1e-12,
                                   atol=1e-12)


def test_group_norm_in_xnnpack_ops_equals_the_group_norm():
    """XNNPACK's form of the one-group GroupNorm (``graph_forms.group_norm1_in_xnnpack_ops``), on a map of mean and
    scale far from 0 and 1 whose height and width differ, in float64; and the module's eager forward is timm's."""
    x = 3 + 5 * torch.randn(2, 6, 5, 12, dtype=torch.float64)
    weight, bias = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(graph_forms.group_norm1_in_xnnpack_ops(x, weight, bias, 1e-5),
                               F.group_norm(x, 1, weight, bias, 1e-5), rtol=1e-12, atol=1e-12)
    norm = randomize_norms(fat.OneGroupNorm(6).double())
    torch.testing.assert_close(norm(x), F.group_norm(x, 1, norm.weight, norm.bias, norm.eps), rtol=0, atol=0)


def test_executorch_graph_takes_xnnpacks_forms_of_large_depthwise_kernels_and_group_norms():
    """The graph that the exporter records for ExecuTorch convolves FAT's 7x7 and 9x9 depthwise kernels in bands of at
    most 25 taps, each a slice of the kernel (folded into a constant before lowering), and normalises without a group
    norm, which XNNPACK lacks; the graph for ONNX Runtime and OpenVINO, which run whole kernels faster and have a group
    norm, keeps both."""
    model = reparameterize_model(timm.create_model('fat_b0', **SHALLOW_MODELS['fat_b0']).eval())

    def depthwise_taps_and_group_norms(fmt: str) -> tuple:
        graph = export.trace(model, 64, fmt, batch_size=1).program.graph
        convolutions = [node for node in graph.nodes if node.target == torch.ops.aten.conv2d.default]
        taps = sorted({node.args[1].meta['val'].shape[2:].numel() for node in convolutions
                       if len(node.args) > 6 and node.args[6] > 1})
        return taps, sum(node.target == torch.ops.aten.group_norm.default for node in graph.nodes)

    whole, group_norms = depthwise_taps_and_group_norms('onnx')
    assert {49, 81} <= set(whole) and group_norms == 1 + 2 * sum(SHALLOW_FAT_B0_DEPTHS) + 1  # stem, blocks, head
    in_bands, group_norms = depthwise_taps_and_group_norms('executorch')
    assert max(in_bands) <= graph_forms.XNNPACK_DEPTHWISE_TAPS and {21, 18} <= set(in_bands) and group_norms == 0
    assert not graph_forms._recording_for_xnnpack


# The shallow models (conftest.SHALLOW_MODELS) in every format; ExecuTorch's lowering, the slowest step (this
# FAT-B0's bounded dynamic program: 93 s on one core), runs for FAT-B0 here; the other two lower, static, in
# tests/test_timmx.py.
EXPORTS = [(name, fmt) for name in SHALLOW_MODELS for fmt in export.FORMATS if fmt != 'executorch' or name == 'fat_b0']


@pytest.fixture(scope='module')
def traced_models():
    """Each exported model (norms randomised, inference form) and its traces, made once per model and bounds."""
    cache = {}

    def get(name: str, fmt: str):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = (reparameterize_model(randomize_norms(timm.create_model(name, **SHALLOW_MODELS[name]))),
                           {})
        model, traces = cache[name]
        bounded = fmt == 'executorch'
        if bounded not in traces:
            traces[bounded] = export.trace(model, 64, fmt)
        return model, traces[bounded]
    return get


@pytest.mark.slow
@pytest.mark.parametrize('name, fmt', EXPORTS)
def test_export_runs_in_its_runtime_like_pytorch(name, fmt, traced_models, tmp_path, monkeypatch):
    skip_without_runtime(fmt)
    model, traced = traced_models(name, fmt)
    output = tmp_path / f'{name}{export.FORMATS[fmt]}'
    lowered, lower_to_xnnpack = [], export.lower_to_xnnpack

    def lower_and_keep(traced):
        lowered.append(lower_to_xnnpack(traced))
        return lowered[-1]
    monkeypatch.setattr(export, 'lower_to_xnnpack', lower_and_keep)
    dynamic_size = export.export(model, output, fmt, img_size=64, traced=traced)
    if fmt == 'executorch':  # every convolution and norm in XNNPACK: none left to ExecuTorch's portable kernels
        graph = lowered[0].exported_program().graph
        assert not [node for node in graph.nodes if re.search('convolution|group_norm', str(node.target))]
        assert any('executorch_call_delegate' in str(node.target) for node in graph.nodes)
    assert dynamic_size == (name != 'lvt_cls')
    expected_files = {output.name} | ({output.with_suffix('.bin').name} if fmt == 'openvino' else set())
    assert {path.name for path in tmp_path.iterdir()} == expected_files  # no temporary left, ONNX weights inside
    if fmt == 'onnx':
        import onnx

        dims = onnx.load(str(output)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param != '' for d in dims] == [True, False, dynamic_size, dynamic_size]
    shapes = export.verify_shapes(64, dynamic_size)
    if dynamic_size:
        assert shapes[1][0] > 1 and shapes[1][2] % 32 and shapes[1][3] % 32
    errors = export.verify(model, output, fmt, shapes)
    assert max(errors) <= 1e-4, errors


@pytest.mark.slow
def test_export_command_to_a_new_folder_twice(tmp_path, capsys, shallow_fat_b0):
    """The second run, static (``--batch-size 2``), replaces the first's files: a model of any batch and size, then
    one of batches of two 64-pixel images only, each checked against PyTorch at the shapes it takes."""
    skip_without_runtime('openvino')
    import openvino

    output = tmp_path / 'new' / 'folder' / 'fat_b0.xml'
    signal_stack = export.signal_stack()
    for static, form in (([], ''), (['--batch-size', '2'], ', static: batches of 2 64x64 images')):
        export.main(['--model', 'fat_b0', '--format', 'openvino', '--output', str(output), '--img-size', '64',
                     *static])
        printed = capsys.readouterr().out
        written = f'wrote {output} and {output.with_suffix(".bin")} (fat_b0, openvino, inference form{form})'
        assert written in printed
        checks = re.findall(r'vs PyTorch, input (\(.*\)): relative error (\S+)', printed)
        expected_shapes = ['(2, 3, 64, 64)'] if static else ['(1, 3, 64, 64)', '(3, 3, 56, 48)']
        assert [shape for shape, _ in checks] == expected_shapes
        assert max(float(error) for _, error in checks) <= 1e-4
        assert sorted(path.name for path in output.parent.iterdir()) == ['fat_b0.bin', 'fat_b0.xml']
        shape = openvino.Core().read_model(str(output)).inputs[0].get_partial_shape()
        assert shape.is_static == bool(static) and (not static or shape.to_shape() == [2, 3, 64, 64])
    assert export.signal_stack() == signal_stack  # OpenVINO's left none of its own (OpenVINOModel)


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.slow
def test_export_command_with_the_torchscript_onnx_exporter(tmp_path, monkeypatch):
    """On a terminal, the command shows which of its steps it is in (a bar of its 3 steps, with the elapsed time)."""
    skip_without_runtime('onnx')
    monkeypatch.setattr(sys, 'stdout', Terminal())
    export.main(['--model', 'fat_b0', '--format', 'onnx', '--output', str(tmp_path / 'fat_b0.onnx'),
                 '--exporter', 'torchscript', '--opset', '17', '--img-size', '64'])
    printed = sys.stdout.getvalue()
    for step, description in enumerate(('tracing', 'converting', 'checking against PyTorch')):
        assert re.search(rf'onnx: {description}: +\d+%\|.*\| {step}/3 \[', printed), printed
    assert 'opset 17, torchscript exporter, inference form' in printed
    errors = [float(line.rsplit(' ', 1)[1]) for line in printed.splitlines() if 'relative error' in line]
    assert len(errors) == 2 and max(errors) <= 1e-4
    import onnx

    assert onnx.load(str(tmp_path / 'fat_b0.onnx')).opset_import[0].version == 17


def test_export_of_a_checkpoint_with_another_classifier(tmp_path):
    source = timm.create_model('fat_b0', num_classes=7)
    torch.save(source.state_dict(), tmp_path / 'fat_b0_7.pth')
    model = export.build_model('fat_b0', tmp_path / 'fat_b0_7.pth')
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(model(images), source.eval()(images)) <= 1e-5


def test_export_names_a_checkpoint_of_another_variant(tmp_path, monkeypatch):
    """The checkpoint is checked against the model before any format's code runs (one test for the three formats:
    none of them is reached), and nothing is written."""
    def not_reached(*args, **kwargs):
        raise AssertionError('the export traced the model')

    monkeypatch.setattr(export, 'trace', not_reached)
    torch.save(timm.create_model('fat_b1').state_dict(), tmp_path / 'fat_b1.pth')
    with pytest.raises(SystemExit) as stop:
        export.main(['--model', 'fat_b0', '--checkpoint', str(tmp_path / 'fat_b1.pth'), '--format', 'openvino',
                     '--output', str(tmp_path / 'fat_b0.xml')])
    assert str(stop.value.code).startswith(f'error: {tmp_path / "fat_b1.pth"}: checkpoint does not fit fat_b0 '
                                           '(is it of another variant?)')
    assert sorted(path.name for path in tmp_path.iterdir()) == ['fat_b1.pth']


@pytest.mark.parametrize('argv, message', [
    (['--format', 'tflite', '--output', 'x.tflite'], "argument --format: invalid choice: 'tflite'"),
    (['--format', 'openvino', '--output', 'x.onnx'], '--output of --format openvino must end in .xml'),
    (['--format', 'onnx', '--output', 'x.onnx', '--opset', '17'], 'needs opset >= 18'),
    (['--format', 'executorch', '--output', 'x.pte', '--opset', '18'], '--opset and --exporter apply to --format onnx'),
    (['--format', 'onnx', '--output', 'x.onnx', '--img-size', '16'], 'the image size must be at least 33'),
    (['--format', 'onnx', '--output', 'x.onnx', '--checkpoint', 'missing.pth'], '--checkpoint missing.pth: no such'),
    (['--format', 'torch-export', '--output', 'x.pt2', '--int8', '--calibration-data', '.'],
     '--int8 is implemented for --format onnx, openvino, executorch'),
    (['--format', 'openvino', '--output', 'x.xml', '--int8'], '--int8 needs --calibration-data DIR'),
    (['--format', 'openvino', '--output', 'x.xml', '--int8', '--calibration-data', 'missing'],
     '--calibration-data missing: no such folder'),
    (['--format', 'openvino', '--output', 'x.xml', '--calibration-data', '.'], '--calibration-data applies to --int8'),
    (['--format', 'openvino', '--output', 'x.xml', '--int8', '--calibration-data', '.', '--min-agreement', '1.5'],
     '--min-agreement within [0, 1]'),
    (['--format', 'executorch', '--output', 'x.pte', '--int8', '--calibration-data', '.', '--training-form'],
     '--int8 for executorch goes through timmx, which exports the inference form'),
    (['--format', 'coreml', '--output', 'x.onnx'], '--output of --format coreml must end in .mlpackage'),
    (['--format', 'torch-export', '--output', 'x.pt2', '--training-form'],
     '--format torch-export goes through timmx, which exports the inference form'),
    (['--format', 'openvino', '--output', 'x.xml', '--batch-size', '0'], '--batch-size must be at least 1'),
    (['--format', 'torch-export', '--output', 'x.pt2', '--batch-size', '1'],
     '--batch-size applies to --format onnx, openvino, executorch (ONNX: the dynamo exporter)'),
    (['--format', 'onnx', '--output', 'x.onnx', '--exporter', 'torchscript', '--batch-size', '1'],
     '--batch-size applies to --format onnx, openvino, executorch (ONNX: the dynamo exporter)'),
    (['--format', 'executorch', '--output', 'x.pte', '--batch-size', '1', '--int8', '--calibration-data', '.'],
     "--batch-size applies to float32 exports: --int8 keeps the float32 export's shapes"),
])
def test_export_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        export.main(['--model', 'fat_b0', *argv])
    assert message in capsys.readouterr().err


# OpenVINO's models that fail on the way (a benchmark block, a verify) and are freed later, in the order they were
# compiled (one of them compiled in a worker thread), then a signal that Python handles; run with faulthandler's
# alternate signal stack installed, as pytest runs. With argv[2] 'strict', through a stand-in for OpenVINO's CPU
# plugin that gives each compiled model a signal stack of its own and, when the model is freed, reinstalls the stack
# it found whatever is installed then, and unmaps its own. (OpenVINO 2026.4 reinstalls it only while its own is
# installed, measured.) The models are one of timm's test models: OpenVINO's models are under test, which converts it
# in a fraction of FAT's time.
OPENVINO_FAILURE_PATHS = """
import ctypes, os, signal, sys, threading, types
from pathlib import Path
import numpy as np
import timm, torch
from classification import benchmark, export

folder, plugin = Path(sys.argv[1]), sys.argv[2]
if plugin == 'strict':
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 4
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    SIZE = 1 << 16

    class Compiled:
        def __init__(self):
            self.found = export.signal_stack()
            self.stack = libc.mmap(None, SIZE, 3, 0x22, -1, 0)  # read and write, private and anonymous
            export._sigaltstack(export._SignalStack(self.stack, 0, SIZE))

        def create_infer_request(self):
            return self

        def infer(self, inputs):
            return [np.zeros((len(inputs[0]), 1000), np.float32)]

        def __del__(self, exiting=sys.is_finalizing):
            if exiting():  # freed as the interpreter exits: its globals may be gone
                return
            address, flags, size = self.found
            export._sigaltstack(export._SignalStack(address, flags & ~1, size))
            libc.munmap(self.stack, SIZE)

    sys.modules['openvino'] = types.SimpleNamespace(
        Core=lambda: types.SimpleNamespace(compile_model=lambda *args: Compiled()))
    export.trace = lambda *args, **kwargs: None
    export.export = lambda *args, **kwargs: True

handled = []
signal.signal(signal.SIGUSR1, lambda *_: handled.append(True))
stack = export.signal_stack()
models = {name: timm.create_model('test_resnet', num_classes=classes,
                                  pretrained_cfg_overlay=dict(input_size=(3, 64, 64))).eval()
          for name, classes in (('first', 1000), ('second', 7))}
failures = []


def timing_that_fails(runners, batch_size, input_sizes, *args):
    for name, run in runners.items():  # each model runs once, then the timing fails
        run(torch.randn(batch_size, 3, input_sizes[name], input_sizes[name]).numpy())
    raise RuntimeError('timing failed')


benchmark.measure_runtime_interleaved = timing_that_fails
try:  # a benchmark block that fails with both its models alive: its traceback keeps them
    benchmark.time_backend('openvino', benchmark.parse_args(['--latency-rounds', '0', '--throughput-batch-sizes', '2']),
                           models, torch.device('cpu'), None, {}, folder=folder)
except RuntimeError as error:
    failures.append(error)
static = export.trace(models['first'], 64, 'openvino', batch_size=1)  # converts in a third of a dynamic one's time
export.export(models['first'], folder / 'first.xml', 'openvino', 64, traced=static)
try:  # a verify that fails (a model of another classifier): its traceback keeps the loaded model
    export.verify(models['second'], folder / 'first.xml', 'openvino', [(1, 3, 64, 64)])
except RuntimeError as error:
    failures.append(error)
print(*(str(error).splitlines()[0] for error in failures), sep='\\n')
loaded = []  # a model compiled in a worker thread, freed in this one
worker = threading.Thread(target=lambda: loaded.append(export.load_runtime(folder / 'first.xml', 'openvino')))
worker.start()
worker.join()
loaded.clear()
failures.clear()  # the models are freed in the order they were compiled
os.kill(os.getpid(), signal.SIGUSR1)
print('handled', len(handled), 'stack kept', export.signal_stack() == stack, flush=True)
freed_at_exit = export.load_runtime(folder / 'first.xml', 'openvino')  # while the interpreter clears the modules
"""


def run_openvino_failure_paths(folder, plugin: str) -> list:
    if export.signal_stack() is None:
        pytest.skip('the alternate signal stack is read on Linux only')
    command = [sys.executable, '-X', 'faulthandler', '-c', OPENVINO_FAILURE_PATHS, str(folder), plugin]
    result = run_ok(command)
    assert 'Exception ignored' not in result.stderr, result.stderr  # no error from a model freed at exit
    return result.stdout.splitlines()[-3:]


@pytest.mark.slow  # runs a process of its own: left out of the fast tier
def test_models_of_a_strict_plugin_freed_after_failures_leave_a_valid_signal_stack(tmp_path):
    """Freed out of a failed benchmark block, the models of a plugin that reinstalls the stack each found crashed
    the next handled signal while the protection was the block's (kept_signal_stack around it): the second model
    had found the first one's stack. Each model now restores the stack after its compile and around its release."""
    assert run_openvino_failure_paths(tmp_path, 'strict') == [
        'timing failed', 'openvino gave logits of shape (1, 1000) for input (1, 3, 64, 64), PyTorch (1, 7)',
        'handled 1 stack kept True']


@pytest.mark.slow
def test_openvino_models_freed_after_failures_leave_a_valid_signal_stack(tmp_path):
    """The same failure paths through OpenVINO itself."""
    skip_without_runtime('openvino')
    assert run_openvino_failure_paths(tmp_path, 'openvino') == [
        'timing failed', 'openvino gave logits of shape (1, 1000) for input (1, 3, 64, 64), PyTorch (1, 7)',
        'handled 1 stack kept True']


@pytest.mark.slow
def test_benchmark_times_each_runtime_in_its_own_block(tmp_path, capsys, monkeypatch, shallow_fat_b0):
    """authors, OpenVINO float32 and OpenVINO INT8, each a block; the INT8 block runs NNCF's quantized programs."""
    skip_without_runtime('openvino')
    pytest.importorskip('nncf')
    import openvino

    quantized_ops, nncf_quantize = [], int8.quantize

    def quantize(fp32_xml, output_xml, calibration, fmt, batch_size):
        written = nncf_quantize(fp32_xml, output_xml, calibration, fmt, batch_size=batch_size)
        ops = openvino.Core().read_model(str(written)).get_ops()
        quantized_ops.append((batch_size, sum(op.get_type_name() == 'FakeQuantize' for op in ops)))
        return written
    monkeypatch.setattr(int8, 'quantize', quantize)
    exported, convert = [], export.export
    monkeypatch.setattr(export, 'export', lambda model, path, *args, **kwargs: exported.append(path.name) or convert(
        model, path, *args, **kwargs))
    signal_stack = export.signal_stack()
    benchmark.main(['--models', 'fat_b0', 'edgenext_x_small', '--backend', 'authors', 'openvino',
                    '--precision', 'fp32', 'int8', '--warmup', '1', '--latency-rounds', '3',
                    '--throughput-batch-sizes', '2', '--throughput-warmup', '0', '--throughput-rounds', '1', '--no-flops',
                    '--output-dir', str(tmp_path), '--plot'])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / 'benchmark.json').read_text())
    assert [(row['backend'], row['precision'], row['model']) for row in result['rows']] == [
        (block, precision, model) for block, precision in (('authors', 'fp32'), ('openvino', 'fp32'),
                                                           ('openvino-int8', 'int8'))
        for model in ('fat_b0', 'edgenext_x_small')]
    # each model at batch 1 and 2, quantized (the scales of NNCF's FakeQuantize nodes, which OpenVINO runs in INT8)
    assert [batch for batch, _ in quantized_ops] == [1, 2, 1, 2] and all(count > 50 for _, count in quantized_ops)
    # the INT8 block quantizes the files that the float32 block converted
    assert exported == ['fat_b0_b1.xml', 'fat_b0_b2.xml', 'edgenext_x_small_b1.xml', 'edgenext_x_small_b2.xml']
    assert result['settings']['blocks'] == ['authors', 'openvino', 'openvino-int8']
    assert 'openvino-int8:' in printed and 'latency openvino-int8 fat_b0 / authors fat_b0' in printed
    assert (tmp_path / 'accuracy_vs_latency.png').read_bytes().startswith(b'\x89PNG')
    assert result['machine']['openvino']
    # two OpenVINO models at once left a freed signal stack installed before their stack was restored: a crash at
    # the next signal that Python handles (Ctrl-C; the data loader's SIGCHLD)
    assert export.signal_stack() == signal_stack
    rounds = result['seconds_per_round']['openvino']
    assert [len(rounds['latency_ms'][model]) for model in ('fat_b0', 'edgenext_x_small')] == [3, 3]
    assert len(rounds['throughput_b2']['fat_b0']) == 1
    peer = result['rows'][3]
    assert peer['latency_ms_x_fat'] == pytest.approx(statistics.median(
        a / b for a, b in zip(rounds['latency_ms']['edgenext_x_small'], rounds['latency_ms']['fat_b0'])))
    versus_authors, int8_versus_authors = [c for c in result['comparisons'] if 'versus_backend' in c]
    assert (versus_authors['backend'], versus_authors['versus_backend']) == ('openvino', 'authors')
    assert (int8_versus_authors['backend'], int8_versus_authors['versus_backend']) == ('openvino-int8', 'authors')
    assert versus_authors['latency_ratio'] == pytest.approx(
        statistics.median(rounds['latency_ms']['fat_b0'])
        / statistics.median(result['seconds_per_round']['authors']['latency_ms']['fat_b0']))
    assert 'latency openvino fat_b0 / authors fat_b0' in printed and 'openvino:' in printed


@pytest.mark.slow
def test_benchmark_int8_blocks_of_onnxruntime_and_executorch(tmp_path, capsys, monkeypatch):
    """ONNX Runtime's INT8 block runs the float32 files quantized (its fused integer operations), ExecuTorch's the
    programs that timmx quantized from the training form, at each batch size. One of timm's test models, the quickest
    of them to quantize and lower (test_resnet: 12 s a program here, test_efficientnet 19 s): the blocks are under
    test (tests/test_int8.py quantizes FAT-B0 in each runtime)."""
    for fmt in ('onnx', 'executorch'):
        skip_without_runtime(fmt)
    pytest.importorskip('onnxruntime.quantization')
    pytest.importorskip('timmx')
    import onnx

    quantized, onnx_quantize = [], int8.quantize

    def quantize(fp32_path, output_path, calibration, fmt, batch_size):
        written = onnx_quantize(fp32_path, output_path, calibration, fmt, batch_size=batch_size)
        ops = [node.op_type for node in onnx.load(str(written)).graph.node]
        quantized.append((fmt, fp32_path.name, batch_size, ops.count('QuantizeLinear') > 5, 'Conv' in ops))
        return written
    monkeypatch.setattr(int8, 'quantize', quantize)
    lowered, timmx_export = [], export.export_with_timmx

    def export_with_timmx(model, name, path, fmt, img_size, calibration, batch_size):
        lowered.append((name, path.name, img_size, tuple(calibration.shape), batch_size))
        return timmx_export(model, name, path, fmt, img_size, calibration, batch_size=batch_size)
    monkeypatch.setattr(export, 'export_with_timmx', export_with_timmx)
    benchmark.main(['--models', 'test_resnet', '--backend', 'onnxruntime', 'executorch', '--precision', 'int8',
                    '--warmup', '1', '--latency-rounds', '2', '--throughput-batch-sizes', '2', '--throughput-warmup',
                    '0', '--throughput-rounds', '1', '--no-flops', '--output-dir', str(tmp_path)])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / 'benchmark.json').read_text())
    assert result['settings']['blocks'] == ['onnxruntime-int8', 'executorch-int8']
    assert [(row['backend'], row['precision'], row['model']) for row in result['rows']] == [
        ('onnxruntime-int8', 'int8', 'test_resnet'), ('executorch-int8', 'int8', 'test_resnet')]
    assert all(row['latency_ms'] > 0 and row['throughput_b2'] > 0 for row in result['rows'])
    assert 'left out' not in printed
    # quantize-dequantize pairs around the float32 file's operations, at each batch size
    assert quantized == [('onnx', f'test_resnet_b{batch}.onnx', batch, True, True) for batch in (1, 2)]
    # timmx built the model by name from the training form's weights and quantized it on 32 random images
    assert lowered == [('test_resnet', f'test_resnet_b{batch}_int8.pte', 160, (32, 3, 160, 160), batch)
                       for batch in (1, 2)]


@pytest.mark.slow
def test_benchmark_tiny_run_writes_table_csv_and_json(tmp_path, capsys):
    benchmark.main(['--models', 'fat_b0', 'edgenext_x_small', '--warmup', '1', '--latency-rounds', '2',
                    '--throughput-batch-sizes', '2', '--throughput-warmup', '0', '--throughput-rounds', '1',
                    '--train-batch-size', '2',
                    '--compare', 'fat_b0:edgenext_x_small', '--output-dir', str(tmp_path), '--plot'])
    printed = capsys.readouterr().out
    assert 'latency fat_b0 / edgenext_x_small' in printed
    result = json.loads((tmp_path / 'benchmark.json').read_text())
    fat, peer = result['rows']
    assert (fat['model'], fat['input_size'], peer['input_size']) == ('fat_b0', 224, 256)
    assert fat['gflops'] == pytest.approx(0.76, abs=0.01) and fat['top1'] == 77.6
    assert peer['vs'] == 'fat_b0'
    # the peer's latency ratio: the median over rounds of the two models' times in the same round
    rounds = result['seconds_per_round']['torch']['latency_ms']
    per_round = [peer_time / fat_time for peer_time, fat_time in zip(rounds['edgenext_x_small'], rounds['fat_b0'])]
    assert len(per_round) == 2 and peer['latency_ms_x_fat'] == pytest.approx(statistics.median(per_round))
    assert fat['latency_ms'] == pytest.approx(1e3 * statistics.median(rounds['fat_b0']))
    # one throughput round: the paired ratio is the ratio of the two throughputs
    assert peer['throughput_b2_x_fat'] == pytest.approx(peer['throughput_b2'] / fat['throughput_b2'])
    assert fat['train_b2'] > 0 and peer['train_b2_x_fat'] == pytest.approx(peer['train_b2'] / fat['train_b2'])
    assert 'training b2 (img/s)' in printed
    comparison = result['comparisons'][0]
    low, high = comparison['latency_ratio_quartiles']
    assert (comparison['model'], comparison['versus']) == ('fat_b0', 'edgenext_x_small')
    assert 0 < low <= comparison['latency_ratio'] <= high
    assert result['machine']['threads'] == 2 and result['settings']['deploy']
    csv_lines = (tmp_path / 'benchmark.csv').read_text().splitlines()
    assert csv_lines[0].startswith('model,input_size,params_m,gflops,top1,latency_ms,throughput_b2,train_b2')
    assert len(csv_lines) == 3
    assert (tmp_path / 'accuracy_vs_throughput.png').read_bytes().startswith(b'\x89PNG')
    assert (tmp_path / 'accuracy_vs_latency.png').read_bytes().startswith(b'\x89PNG')


@pytest.mark.parametrize('argv, message', [
    (['--models', 'fat_b0', 'no_such_model'], 'unknown timm model(s): no_such_model'),
    (['--train-batch-size', '1'], '--train-batch-size must be at least 2'),
    (['--backend', 'tensorrt'], "argument --backend: invalid choice: 'tensorrt'"),
    (['--backend', 'openvino', 'openvino'], '--backend lists a backend twice'),
    (['--compare-backends', 'openvino:fat_b0'], '--compare-backends takes pairs BACKEND/MODEL:BACKEND/MODEL'),
    (['--precision', 'int8'], '--precision int8 is timed in the runtimes: add --backend onnxruntime or openvino or '
                              'executorch'),
    (['--precision', 'fp32', 'fp32'], '--precision lists a precision twice'),
    (['--precision', 'fp16'], "argument --precision: invalid choice: 'fp16'"),
])
def test_benchmark_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(argv)
    assert message in capsys.readouterr().err


def test_benchmark_blocks_are_each_backend_at_each_precision_it_runs():
    assert [block.name for block in benchmark.blocks(['authors', 'onnxruntime', 'openvino'], ['fp32', 'int8'])] == [
        'authors', 'onnxruntime', 'onnxruntime-int8', 'openvino', 'openvino-int8']
    assert [block.name for block in benchmark.blocks(['openvino'], ['int8'])] == ['openvino-int8']


@pytest.mark.parametrize('flags, described', [
    ('fpu avx avx2 fma', 'AMD EPYC (AVX2; no AVX-512, VNNI, AMX, bf16)'),
    ('avx2 avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16', 'AMD EPYC (AVX2, AVX-512, VNNI, AMX, bf16)'),
    ('avx2 avx_vnni', 'AMD EPYC (AVX2, VNNI; no AVX-512, AMX, bf16)'),
    ('neon asimd', 'AMD EPYC (no AVX2, AVX-512, VNNI, AMX, bf16)'),
])
def test_benchmark_states_the_cpus_instruction_set(flags, described):
    features = benchmark.cpu_features(f'processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n')
    assert benchmark.describe_cpu(dict(cpu='AMD EPYC', cpu_features=features)) == described
    assert benchmark.describe_cpu(dict(cpu='M2', cpu_features=benchmark.cpu_features('no flags here'))) == \
        'M2 (instruction set not read)'
