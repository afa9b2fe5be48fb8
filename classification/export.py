"""Export a classifier of this repository for a deployment runtime, and check it against PyTorch.

    python -m classification.export --model fat_b0 [--checkpoint PATH] --format onnx|openvino|executorch
        --output PATH [--img-size N] [--batch-size N] [--training-form] [--no-verify]
        [--opset 18] [--exporter dynamo|torchscript]        (ONNX only)
        [--int8 --calibration-data DIR [--calibration-samples 300] [--min-agreement 0.9]]    (all three)
    python -m classification.export --model fat_b0 [--checkpoint PATH] --format torch-export|coreml|litert|tensorrt
        --output PATH [--img-size N] [--no-verify]                                          (through timmx)

The model (its inference form, ``timm.utils.reparameterize_model``, unless ``--training-form``) is traced once by
``torch.export`` with a dynamic batch, height and width (from 33 pixels); each format converts that one program:

* ``onnx``: one ``.onnx`` file (weights included), opset 18, through ``torch.onnx.export``; checked in onnxruntime.
  ``--exporter torchscript --opset 17`` uses the legacy TorchScript exporter instead.
* ``openvino``: OpenVINO IR, ``PATH`` (``.xml``) and its float32 weights beside it (``.bin``; not compressed to
  float16, which moves FAT-B0's logits by 8e-4); checked in OpenVINO's CPU plugin at float32 precision.
* ``executorch``: one ``.pte`` program lowered to XNNPACK, ExecuTorch's CPU backend, for a batch of 1 to
  ``MAX_EXECUTORCH_BATCH`` and sizes up to ``MAX_EXECUTORCH_SIZE_FACTOR`` times the example's (ExecuTorch plans its
  memory for the largest input); checked in ExecuTorch's runtime. Its program is traced apart, in the forms that
  XNNPACK runs well (``graph_forms.recording_for_xnnpack``: FAT's 7x7 and 9x9 depthwise convolutions in bands).

A model whose graph depends on the input size (the window partitions of some ablation models, LVT's overlapping
windows) is exported for the example's size, with a dynamic batch, and the command says so. ``--batch-size N``
traces a static program instead, for batches of N images of the example's size, which a runtime may plan and run
faster (FAT-B0's ExecuTorch program at 224 pixels: 17.5 ms static, 24.6 ms dynamic, where XNNPACK leaves the bands'
slices out; docs/benchmarks.md); the check then runs that shape.

Without ``--checkpoint`` the weights are freshly initialised; with one (any format the project reads, loaded by
``checkpoint_io.load_weights``), the model takes its classifier's number of classes, and a checkpoint of another
model is refused. The graph takes ``images`` (batch x 3 x height x width, float32) and gives ``logits``.

After writing, the command runs the exported model in its runtime on two random inputs, one at the example size
and one of another batch whose height and width are not multiples of 32, and compares with PyTorch (relative
error: max |difference| / max |PyTorch output|); it exits non-zero if an error exceeds ``VERIFY_TOLERANCE``.
Files are written under a temporary name and renamed when complete, so a failed export leaves no partial file and
an export to an existing path replaces it.

``TIMMX_FORMATS`` are written by timmx (timm's exporter) from the model and weights loaded here, at the example's
size; the command checks torch.export's archive against PyTorch as above, timmx the others where their runtime runs.

``--int8`` writes an INT8 model instead, calibrated on images of ``--calibration-data`` (``classification.int8``):
for OpenVINO, NNCF's post-training quantization of the float32 export, after its check; for ONNX, ONNX Runtime's
static quantization of it, likewise; for ExecuTorch, timmx's XNNPACK quantization (PyTorch's PT2E static
quantization, per channel) at the example's size and batch 1. The command prints the INT8 model's top-1 agreement
with float32 on held-out images of the folder (and both models' top-1 there where the folder has a subfolder per
class), and writes it only if the agreement reaches ``--min-agreement``.
"""
import argparse
import contextlib
import ctypes
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
from timm.utils import reparameterize_model

from . import dependencies, graph_forms, int8
from .checkpoint_io import CheckpointError, UnsafeCheckpointError, load_checkpoint_file, load_weights
from .commands import program_name, progress
from .registry import model_names

VERIFY_TOLERANCE = 1e-4
MIN_OPSET = {'dynamo': 18, 'torchscript': 17}
MAX_EXECUTORCH_BATCH = 8
MAX_EXECUTORCH_SIZE_FACTOR = 2  # an ExecuTorch program takes heights and widths up to twice the example's


FORMATS = {'onnx': '.onnx', 'openvino': '.xml', 'executorch': '.pte'}  # the file each writes
# the formats that timmx, timm's maintained exporter (tests/test_timmx.py), writes for this command, from the model
# and weights it loads: at the example's height and width, which its ONNX, OpenVINO and ExecuTorch exports also fix
# (so that those three stay this module's, with any height and width). torch.export's takes any batch.
TIMMX_FORMATS = {'torch-export': '.pt2', 'coreml': '.mlpackage', 'litert': '.tflite', 'tensorrt': '.engine'}
SUFFIXES = {**FORMATS, **TIMMX_FORMATS}
RUNTIME_NAMES = {'onnx': 'ONNX Runtime', 'openvino': 'OpenVINO', 'executorch': 'ExecuTorch'}
INT8_FORMATS = ('onnx', 'openvino', 'executorch')  # --int8: int8.QUANTIZERS, timmx (XNNPACK) for ExecuTorch


def written_suffixes(fmt: str) -> List[str]:
    """The suffixes of the files that an export in ``fmt`` writes: ``FORMATS[fmt]``, and OpenVINO's weights."""
    return [FORMATS[fmt]] + (['.bin'] if fmt == 'openvino' else [])


class RuntimeMissing(RuntimeError):
    """The package of a runtime is not installed."""


class UnreadableExport(RuntimeError):
    """A file that its runtime cannot load (not an export, truncated, of another format)."""


def require(fmt: str):
    """Import the packages a format needs, or raise RuntimeMissing naming them."""
    if fmt in TIMMX_FORMATS:
        try:
            dependencies.require('timmx', 'deploy', f'--format {fmt}')
        except dependencies.MissingDependency as error:
            raise RuntimeMissing(str(error)) from None
        from timmx.export import create_builtin_registry

        status = create_builtin_registry().get(fmt).check_dependencies()
        if not status.available:
            raise RuntimeMissing(f'--format {fmt} needs {", ".join(status.missing_packages)}, which timmx converts '
                                 f'with: {status.install_hint}')
        return
    modules = {'onnx': ('onnx', 'onnxscript', 'onnxruntime'), 'openvino': ('openvino',),
               'executorch': ('executorch.exir', 'executorch.runtime')}[fmt]
    for module in modules:
        try:
            dependencies.require(module, 'deploy', f'--format {fmt}')
        except dependencies.MissingDependency as error:
            raise RuntimeMissing(str(error)) from None


class _SignalStack(ctypes.Structure):
    """Linux's ``stack_t``."""
    _fields_ = [('ss_sp', ctypes.c_void_p), ('ss_flags', ctypes.c_int), ('ss_size', ctypes.c_size_t)]


def _sigaltstack(new: Optional[_SignalStack] = None) -> _SignalStack:
    """libc's ``sigaltstack``: installs ``new`` if given; the stack that was installed before."""
    old = _SignalStack()
    if ctypes.CDLL(None, use_errno=True).sigaltstack(new and ctypes.byref(new), ctypes.byref(old)) != 0:
        raise OSError(ctypes.get_errno(), 'sigaltstack')
    return old


def signal_stack() -> Optional[Tuple[Optional[int], int, int]]:
    """The calling thread's alternate signal stack (address, flags, size); None where it is not read (not Linux)."""
    if not sys.platform.startswith('linux'):
        return None
    stack = _sigaltstack()
    return stack.ss_sp, stack.ss_flags, stack.ss_size


@contextlib.contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Restore the calling thread's alternate signal stack on exit, however the block ends."""
    saved = signal_stack()
    try:
        yield
    finally:
        if saved is not None and signal_stack() != saved:
            address, flags, size = saved
            _sigaltstack(_SignalStack(address, flags & ~1, size))  # SS_ONSTACK is a state, not a setting


class OpenVINOModel:
    """A model compiled by OpenVINO's CPU plugin, as a function of a float32 NCHW array to its first output, that
    leaves the thread's alternate signal stack as it found it when it is compiled and whenever it is freed.

    The plugin (2026.4) installs a signal stack of its own with each compiled model and, when the model is freed
    while that stack is installed, reinstalls the stack it found: a second model compiled over the first's stack
    and freed after it reinstalls the first's freed stack, and the next signal that Python handles on it (Ctrl-C,
    the SIGCHLD of PyTorch's data loader workers) kills the process without a trace. Each model restores the
    thread's stack after its compile, so that every model finds the thread's own, and restores the stack of the
    thread that releases it around its release (``__del__``: on whichever path and in whichever thread the last
    reference goes, a traceback that kept it alive included), so that it holds whatever the plugin does on
    release."""

    def __init__(self, path: Path, config: Dict[str, object]):
        import openvino

        with kept_signal_stack():
            self._compiled = openvino.Core().compile_model(str(path), 'CPU', config)
            self._request = self._compiled.create_infer_request()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._request.infer([images])[0]

    def __del__(self, interpreter_exiting: Callable[[], bool] = sys.is_finalizing):
        if interpreter_exiting():
            return  # this module's globals may be gone, and no signal is handled on this thread's stack again
        with kept_signal_stack():
            self.__dict__.clear()


def build_model(name: str, checkpoint: Optional[Path] = None, deploy: bool = True) -> torch.nn.Module:
    """Model ``name`` in eval mode with the weights of ``checkpoint`` (any format the project reads, its
    classifier kept whatever its size), in its inference form if ``deploy``."""
    model = timm.create_model(name)
    if checkpoint is not None:
        load_weights(model, checkpoint, head='keep')
    model.eval()
    return reparameterize_model(model) if deploy else model


def check_opset(exporter: str, opset: int):
    if exporter not in MIN_OPSET:
        raise ValueError(f'exporter must be one of {", ".join(MIN_OPSET)}, got {exporter!r}')
    if opset < MIN_OPSET[exporter]:
        raise ValueError(f'the {exporter} exporter needs opset >= {MIN_OPSET[exporter]}, got {opset}'
                         + (' (the torchscript exporter writes opset 17)' if exporter == 'dynamo' else ''))


@contextlib.contextmanager
def _replacing(output: Path, suffixes: Sequence[str]) -> Iterator[Path]:
    """A temporary path beside ``output`` to write to; on success the files (or folders: a Core ML package) of
    ``suffixes`` written there replace ``output``'s (``output`` with each suffix), on failure they are removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f'.{output.stem}.') as folder:
        staged = Path(folder) / output.name
        yield staged
        for suffix in suffixes:
            if output.with_suffix(suffix).is_dir():
                shutil.rmtree(output.with_suffix(suffix))
            os.replace(staged.with_suffix(suffix), output.with_suffix(suffix))


def _example(img_size: int) -> torch.Tensor:
    # batch 2: an example batch of 1 would let tracers treat the batch size as a constant
    return torch.randn(2, 3, img_size, img_size)


class Traced(NamedTuple):
    program: torch.export.ExportedProgram
    dynamic_size: bool  # the program takes any height and width (within its bounds), not only the example's


def graph_form(fmt: str) -> str:
    """Which graph ``trace`` records for ``fmt``: ExecuTorch's takes the forms of its XNNPACK delegate
    (``graph_forms.recording_for_xnnpack``), every other format converts the same program."""
    return 'xnnpack' if fmt == 'executorch' else 'portable'


def trace(model: torch.nn.Module, img_size: int, fmt: str, batch_size: Optional[int] = None) -> Traced:
    """``model`` as one ``torch.export`` program, which every format of its ``graph_form`` converts: dynamic batch,
    height and width (bounded for ExecuTorch, which plans its memory for the largest input). A model whose graph
    depends on the input size (a window partition fixed at trace time, say) keeps its batch dynamic and the
    example's size. With ``batch_size``, the program takes that batch of ``img_size`` images only (the benchmark's
    static graphs, ``--batch-size``)."""
    with graph_forms.recording_for_xnnpack(graph_form(fmt) == 'xnnpack'):
        return _trace(model, img_size, fmt, batch_size)


def _trace(model: torch.nn.Module, img_size: int, fmt: str, batch_size: Optional[int]) -> Traced:
    if batch_size is not None:
        with torch.no_grad():
            return Traced(torch.export.export(model, (torch.randn(batch_size, 3, img_size, img_size),)), False)
    bounded = fmt == 'executorch'
    batch = torch.export.Dim('batch', min=1, max=MAX_EXECUTORCH_BATCH if bounded else None)
    # from 33 pixels: the model's stride-32 map then has more than one position, which the trace assumes
    size = dict(min=33, max=MAX_EXECUTORCH_SIZE_FACTOR * img_size if bounded else None)
    height, width = torch.export.Dim('height', **size), torch.export.Dim('width', **size)
    example = (_example(img_size),)
    with torch.no_grad():
        try:
            return Traced(torch.export.export(model, example, dynamic_shapes=({0: batch, 2: height, 3: width},)),
                          True)
        except torch._dynamo.exc.UserError as error:
            if error.error_type != torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION:
                raise
        return Traced(torch.export.export(model, example, dynamic_shapes=({0: batch},)), False)


def export_onnx(model: torch.nn.Module, traced: Traced, output: Path, img_size: int, opset: int = 18,
                exporter: str = 'dynamo'):
    check_opset(exporter, opset)
    with _replacing(output, ['.onnx']) as staged, torch.no_grad(), warnings.catch_warnings():
        if exporter == 'dynamo':
            torch.onnx.export(traced.program, f=str(staged), input_names=['images'], output_names=['logits'],
                              opset_version=opset, dynamo=True, external_data=False, verbose=False)
            return
        from timm.utils.onnx import onnx_export

        # the torchscript exporter is deprecated; its tracer warns about the input checks of
        # torch.nn.functional, which hold for every traced shape
        warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'torch\.onnx|timm\.utils\.onnx')
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning, module='torch.nn.functional')
        onnx_export(model, str(staged), example_input=_example(img_size), opset=opset,
                    dynamic_size=traced.dynamic_size, use_dynamo=False, input_names=['images'],
                    output_names=['logits'])


def static_input_shape(traced: Traced) -> Optional[Tuple[int, ...]]:
    """The shape of the program's input where every dimension is fixed (a trace with ``batch_size``), else None."""
    name = traced.program.graph_signature.user_inputs[0]
    shape = next(node for node in traced.program.graph.nodes if node.name == name).meta['val'].shape
    return tuple(shape) if all(isinstance(size, int) for size in shape) else None


def export_openvino(traced: Traced, output: Path):
    import openvino

    # OpenVINO converts a program of static shapes into a model of dynamic ones ([?,3,?,?]) unless given the shape
    shape = static_input_shape(traced)
    converted = openvino.convert_model(traced.program, **(dict(input=[shape]) if shape else {}))
    converted.inputs[0].get_tensor().set_names({'images'})
    converted.outputs[0].get_tensor().set_names({'logits'})
    with _replacing(output, written_suffixes('openvino')) as staged:
        openvino.save_model(converted, staged.with_suffix('.xml'), compress_to_fp16=False)


def lower_to_xnnpack(traced: Traced):
    """``traced`` lowered to ExecuTorch's XNNPACK delegate: its ``ExecutorchProgramManager``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    # the weights that XNNPACK's forms compute from the parameters (a kernel's bands), as constants: its partitioner
    # delegates only the convolutions of constant weights. The pass leaves them requiring gradients, as the
    # parameters do; detached, since what autograd then computes from them during lowering is a tensor that the
    # partitioner's copy of each partition cannot copy.
    program = constant_prop_pass(traced.program)
    for name, constant in program.constants.items():
        if isinstance(constant, torch.Tensor):
            program.constants[name] = constant.detach()
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()


def export_executorch(traced: Traced, output: Path):
    lowered = lower_to_xnnpack(traced)
    with _replacing(output, ['.pte']) as staged:
        staged.write_bytes(lowered.buffer)


def export_with_timmx(model: torch.nn.Module, name: str, output: Path, fmt: str, img_size: int,
                      calibration: Optional[torch.Tensor] = None, batch_size: int = 1):
    """Write ``model`` (registered as ``name``, in its training form: timmx folds it) in the timmx format ``fmt``
    to ``output`` for ``img_size`` images, through a state dict that timm's loader reads; a failed export leaves
    nothing, a successful one replaces ``output``. With ``calibration`` (preprocessed images; ExecuTorch): INT8,
    statically quantized for XNNPACK on those images, for batches of ``batch_size``, unchecked (the caller checks
    it)."""
    import timmx

    with _replacing(output, [output.suffix]) as staged:
        weights = staged.with_name('weights.pth')  # removed with the staging folder
        torch.save(model.state_dict(), weights)
        options = dict(dynamic_batch=True, batch_size=2) if fmt == 'torch-export' else {}
        if calibration is not None:
            images = staged.with_name('calibration.pt')
            torch.save(calibration, images)
            options.update(mode='int8', calibration_data=images, batch_size=batch_size, verify=False)
        # INT8 for XNNPACK in XNNPACK's forms: PT2E's conversion folds the weights they compute into constants, as
        # lower_to_xnnpack does for float32
        with graph_forms.recording_for_xnnpack(calibration is not None and graph_form(fmt) == 'xnnpack'):
            timmx.export_model(fmt, name, checkpoint=weights, num_classes=model.num_classes,
                               input_size=(3, img_size, img_size), output=staged, **options)


def check_size(img_size: int):
    """Raise ValueError if the example size is too small for a dynamic-size trace."""
    if img_size < 33:
        raise ValueError('the image size must be at least 33 (the model downsamples by 32)')


def export(model: torch.nn.Module, output: Path, fmt: str, img_size: int = 224, opset: int = 18,
           exporter: str = 'dynamo', traced: Optional[Traced] = None) -> bool:
    """Write ``model`` in format ``fmt`` to ``output`` (which takes the format's suffix), converting ``traced`` if
    given (``trace(model, img_size, fmt)``'s result), else tracing it; whether the export takes any height and
    width (False: only ``img_size``)."""
    if fmt not in FORMATS:
        raise ValueError(f'format must be one of {", ".join(FORMATS)}, got {fmt!r}')
    if output.suffix != FORMATS[fmt]:
        raise ValueError(f'the {fmt} output must end in {FORMATS[fmt]}, got {output}')
    check_size(img_size)
    require(fmt)
    traced = traced or trace(model, img_size, fmt)
    if fmt == 'onnx':
        export_onnx(model, traced, output, img_size, opset, exporter)
    elif fmt == 'openvino':
        export_openvino(traced, output)
    else:
        export_executorch(traced, output)
    return traced.dynamic_size


def load_runtime(path: Path, fmt: str, threads: Optional[int] = None) -> Callable[[np.ndarray], np.ndarray]:
    """The exported model at ``path`` in its runtime, as a function of a float32 NCHW array to the logits.
    ``threads``: the runtime's CPU threads (its default if None). Raises UnreadableExport if the runtime cannot
    load the file."""
    require(fmt)
    try:
        return _load_runtime(path, fmt, threads)
    except Exception as error:  # each runtime raises its own types
        raise UnreadableExport(f'{RUNTIME_NAMES.get(fmt, fmt)} cannot load {path}: {runtime_problem(error)}') \
            from error


def runtime_problem(error: Exception) -> str:
    """What a runtime's exception says in its last line, which names the problem (ONNX Runtime, OpenVINO and
    ExecuTorch put the call's context in the lines before it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _load_runtime(path: Path, fmt: str, threads: Optional[int]) -> Callable[[np.ndarray], np.ndarray]:
    if fmt == 'onnx':
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda images: session.run(None, {name: images})[0]
    if fmt == 'torch-export':
        program = torch.export.load(str(path)).module()

        def run_program(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return program(torch.from_numpy(images)).numpy()
        return run_program
    if fmt == 'openvino':
        config = {'INFERENCE_PRECISION_HINT': 'f32', 'PERFORMANCE_HINT': 'LATENCY'}
        if threads:
            config['INFERENCE_NUM_THREADS'] = threads
        return OpenVINOModel(path, config)
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    if threads:
        _unsafe_reset_threadpool(threads)  # XNNPACK's thread pool, shared by every program of the process
    method = Runtime.get().load_program(path).load_method('forward')
    return lambda images: method.execute([torch.from_numpy(images)])[0].numpy()


class InputShape(NamedTuple):
    fixed: Tuple[Optional[int], ...]  # each dimension's size where the file fixes it, else None
    max_batch: Optional[int]  # the largest batch of a bounded dynamic batch (ExecuTorch), else None


def input_shape(path: Path, fmt: str) -> InputShape:
    """The input shape of the exported model at ``path`` (ONNX, OpenVINO or ExecuTorch). An ExecuTorch program's
    dimensions are all fixed, or all dynamic within the bounds it was planned for."""
    require(fmt)
    if fmt == 'onnx':
        import onnx

        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        return InputShape(tuple(dim.dim_value if dim.HasField('dim_value') else None for dim in dims), None)
    if fmt == 'openvino':
        import openvino

        shape = openvino.Core().read_model(str(path)).inputs[0].get_partial_shape()
        return InputShape(tuple(dim.get_length() if dim.is_static else None for dim in shape), None)
    if fmt != 'executorch':
        raise ValueError(f'input_shape reads onnx, openvino or executorch files, got {fmt!r}')
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import TensorShapeDynamism

    plans = deserialize_pte_binary(path.read_bytes()).program.execution_plan
    plan = next(plan for plan in plans if plan.name == 'forward')
    tensor = plan.values[plan.inputs[0]].val
    if tensor.shape_dynamism == TensorShapeDynamism.STATIC:
        return InputShape(tuple(tensor.sizes), None)
    return InputShape((None,) * len(tensor.sizes), tensor.sizes[0])


def verify(model: torch.nn.Module, path: Path, fmt: str, shapes: Sequence[Tuple[int, int, int, int]]) -> List[float]:
    """Relative error of the runtime's outputs against ``model``'s for a random input of each shape."""
    errors = []
    run = load_runtime(path, fmt)
    for shape in shapes:
        images = torch.randn(*shape)
        with torch.no_grad():
            expected = model(images)
        actual = torch.from_numpy(np.asarray(run(images.numpy())))
        if actual.shape != expected.shape:
            raise RuntimeError(f'{fmt} gave logits of shape {tuple(actual.shape)} for input {shape}, '
                               f'PyTorch {tuple(expected.shape)}')
        errors.append(((actual - expected).abs().max() / expected.abs().max()).item())
    return errors


def verify_shapes(img_size: int, dynamic_size: bool,
                  batch_size: Optional[int] = None) -> List[Tuple[int, int, int, int]]:
    """The inputs a check runs: one image at the example size, and three more, at a nearby size whose height and
    width are not multiples of 32 if the export takes any size (smaller, unless the example is small); for a static
    program (``batch_size``), its one shape."""
    if batch_size is not None:
        return [(batch_size, 3, img_size, img_size)]
    if not dynamic_size:
        return [(1, 3, img_size, img_size), (3, 3, img_size, img_size)]
    step = -1 if img_size >= 64 else 1

    def off_32(size: int) -> int:
        return size if size % 32 else size + 4 * step

    return [(1, 3, img_size, img_size), (3, 3, off_32(img_size + 8 * step), off_32(img_size + 16 * step))]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=program_name(__spec__.name), description=__doc__.splitlines()[0])
    names = model_names(ablations=True)
    parser.add_argument('--model', required=True, choices=names, metavar='NAME', help=f'one of {", ".join(names)}')
    parser.add_argument('--checkpoint', type=Path, help='weights to export (the authors\' or this project\'s, or '
                                                        'a folder of classification.publish)')
    parser.add_argument('--format', required=True, choices=tuple(SUFFIXES), dest='fmt',
                        help=f'{", ".join(FORMATS)}; through timmx: {", ".join(TIMMX_FORMATS)}')
    parser.add_argument('--output', type=Path, required=True,
                        help='the file to write: ' + ', '.join(f'{suffix} ({fmt})' for fmt, suffix in SUFFIXES.items())
                             + '; OpenVINO\'s .bin beside its .xml')
    parser.add_argument('--img-size', type=int,
                        help='size of the example input (default: the model\'s, pretrained_cfg input_size)')
    parser.add_argument('--batch-size', type=int, metavar='N',
                        help='a static program: batches of N images of --img-size only, which a runtime may plan and '
                             'run faster (default: any batch, height and width; --format onnx, openvino, executorch)')
    parser.add_argument('--training-form', action='store_true',
                        help='export the model as built, without folding it into its inference form')
    parser.add_argument('--no-verify', action='store_true', help='skip running the export in its runtime')
    parser.add_argument('--opset', type=int, help='ONNX opset (default: 18 for dynamo, 17 for torchscript)')
    parser.add_argument('--exporter', choices=tuple(MIN_OPSET), help='ONNX exporter (default: dynamo)')
    parser.add_argument('--int8', action='store_true',
                        help='quantize to INT8, calibrated on --calibration-data (OpenVINO: NNCF; ONNX: ONNX '
                             'Runtime\'s quantizer; ExecuTorch: XNNPACK through timmx)')
    parser.add_argument('--calibration-data', type=Path, metavar='DIR',
                        help='images for --int8, read as the model evaluates (a subfolder per class: top-1 too)')
    parser.add_argument('--calibration-samples', type=int, default=int8.CALIBRATION_SAMPLES, metavar='N',
                        help=f'images to calibrate on, the rest held out (default: {int8.CALIBRATION_SAMPLES}, at '
                             f'most four fifths of the images read; up to {int8.MAX_HELD_OUT} more are held out)')
    parser.add_argument('--min-agreement', type=float, default=int8.MIN_AGREEMENT, metavar='F',
                        help='the least top-1 agreement of INT8 with float32 on the held-out images for the INT8 '
                             f'model to be written (default: {int8.MIN_AGREEMENT})')
    args = parser.parse_args(argv)
    if args.batch_size is not None:
        if args.batch_size < 1:
            parser.error('--batch-size must be at least 1')
        if args.fmt not in FORMATS or args.exporter == 'torchscript':
            parser.error(f'--batch-size applies to --format {", ".join(FORMATS)} (ONNX: the dynamo exporter)')
        if args.int8:
            parser.error('--batch-size applies to float32 exports: --int8 keeps the float32 export\'s shapes '
                         '(ExecuTorch\'s INT8 program takes one image)')
    if args.int8:
        if args.fmt not in INT8_FORMATS:
            parser.error(f'--int8 is implemented for --format {", ".join(INT8_FORMATS)}')
        if args.calibration_data is None:
            parser.error('--int8 needs --calibration-data DIR, a folder of images to calibrate on')
        if not args.calibration_data.is_dir():
            parser.error(f'--calibration-data {args.calibration_data}: no such folder')
        if args.calibration_samples < 1 or not 0 <= args.min_agreement <= 1:
            parser.error('--calibration-samples must be at least 1, --min-agreement within [0, 1]')
        if args.fmt == 'executorch' and args.training_form:
            parser.error('--int8 for executorch goes through timmx, which exports the inference form')
        try:
            int8.require(args.fmt)
        except dependencies.MissingDependency as error:
            parser.error(str(error))
    elif args.calibration_data is not None:
        parser.error('--calibration-data applies to --int8 only')
    if args.fmt != 'onnx' and (args.opset is not None or args.exporter is not None):
        parser.error('--opset and --exporter apply to --format onnx only')
    args.exporter = args.exporter or 'dynamo'
    args.opset = args.opset if args.opset is not None else MIN_OPSET[args.exporter]
    if args.output.suffix != SUFFIXES[args.fmt]:
        parser.error(f'--output of --format {args.fmt} must end in {SUFFIXES[args.fmt]}, got {args.output}')
    if args.output.is_dir() and args.fmt != 'coreml':
        parser.error(f'--output {args.output} is a directory')
    if args.fmt in TIMMX_FORMATS and args.training_form:
        parser.error(f'--format {args.fmt} goes through timmx, which exports the inference form')
    if args.checkpoint is not None and not args.checkpoint.exists():
        parser.error(f'--checkpoint {args.checkpoint}: no such file or folder')
    if args.img_size is None:
        args.img_size = timm.get_pretrained_cfg(args.model).input_size[-1]
    try:
        check_opset(args.exporter, args.opset)
        check_size(args.img_size)
        require(args.fmt)
    except (ValueError, RuntimeMissing) as error:
        parser.error(str(error))
    return args


def main(argv: Optional[Sequence[str]] = None):
    args = parse_args(argv)
    logging.basicConfig(format='%(message)s')
    logging.getLogger(load_weights.__module__).setLevel(logging.INFO)  # its line naming the weights it took
    through_timmx = args.fmt in TIMMX_FORMATS or (args.int8 and args.fmt == 'executorch')
    try:  # timmx folds the model itself, from the training form's weights
        model = build_model(args.model, args.checkpoint, deploy=not (args.training_form or through_timmx))
    except (CheckpointError, UnsafeCheckpointError) as error:
        sys.exit(f'error: {error}')
    calibration = None
    if args.int8:
        from .predict import preprocessing  # predict imports this module

        try:
            checkpoint = load_checkpoint_file(args.checkpoint) if args.checkpoint else None
            checkpoint = checkpoint if isinstance(checkpoint, dict) else None
            transform = preprocessing(args.model, checkpoint, args.img_size)
            calibration = int8.read_calibration_data(args.calibration_data, transform, args.calibration_samples,
                                                     checkpoint and checkpoint.get('classes'),
                                                     model.num_classes)
        except (CheckpointError, UnsafeCheckpointError, int8.QuantizationError) as error:
            sys.exit(f'error: {error}')
        print(f'calibration data: {len(calibration.calibration)} images to calibrate on, '
              f'{len(calibration.held_out)} held out ({calibration.skipped} unreadable skipped; '
              f'{calibration.labels_from})')
    if through_timmx:
        main_through_timmx(args, model, calibration)
        return
    steps = progress(total=(2 if args.no_verify else 3) + 2 * args.int8, desc=f'{args.fmt}: tracing')
    traced = trace(model, args.img_size, args.fmt, batch_size=args.batch_size)
    steps.update()
    steps.set_description(f'{args.fmt}: ' + ('lowering to XNNPACK' if args.fmt == 'executorch' else 'converting'))
    with contextlib.ExitStack() as stack:
        written_to = args.output
        if args.int8:  # the float32 model goes to a temporary folder, the INT8 one to --output
            args.output.parent.mkdir(parents=True, exist_ok=True)
            folder = stack.enter_context(tempfile.TemporaryDirectory(dir=args.output.parent,
                                                                     prefix=f'.{args.output.stem}.fp32.'))
            written_to = Path(folder) / args.output.name
        dynamic_size = export(model, written_to, args.fmt, args.img_size, args.opset, args.exporter, traced=traced)
        steps.update()
        if not args.no_verify:
            shapes = verify_shapes(args.img_size, dynamic_size, args.batch_size)
            steps.set_description(f'{args.fmt}: checking against PyTorch')
            errors = verify(model, written_to, args.fmt, shapes)
            steps.update()
        if args.int8:
            if not args.no_verify and max(errors) > VERIFY_TOLERANCE:
                report_errors(args.fmt, f'{args.fmt} float32', shapes, errors)  # exits: nothing is quantized
            quantize_and_check(args, model, written_to, calibration, steps)
    steps.close()
    written = [args.output.with_suffix(suffix) for suffix in written_suffixes(args.fmt)]
    details = f', opset {args.opset}, {args.exporter} exporter' if args.fmt == 'onnx' else ''
    static = f', static: batches of {args.batch_size} {args.img_size}x{args.img_size} images' if args.batch_size else ''
    print(f'wrote {" and ".join(map(str, written))} ({args.model}, {args.fmt}{details}'
          f'{", INT8" if args.int8 else ""}, {"training" if args.training_form else "inference"} form{static})')
    if not dynamic_size and not args.batch_size:
        print(f'note: the graph of {args.model} depends on the input size, so the export takes '
              f'{args.img_size}x{args.img_size} images only (any batch)')
    if args.no_verify:
        return
    report_errors(args.fmt, f'{args.fmt}{" float32" if args.int8 else ""}', shapes, errors)


def main_through_timmx(args: argparse.Namespace, model: torch.nn.Module,
                       calibration: Optional['int8.CalibrationData'] = None):
    import timmx

    try:
        if calibration is None:
            export_with_timmx(model, args.model, args.output, args.fmt, args.img_size)
        else:
            quantize_through_timmx(args, model, calibration)
    except timmx.TimmxError as error:
        sys.exit(f'error: timmx: {error}')
    print(f'wrote {args.output} ({args.model}, {args.fmt} through timmx {timmx.__version__}'
          f'{", INT8" if calibration is not None else ""}, inference form, {args.img_size}x{args.img_size} images'
          f'{", any batch" if args.fmt == "torch-export" else ", batch 1"})')
    if args.no_verify or args.fmt != 'torch-export':
        return  # timmx compared the others with PyTorch where their runtime runs
    shapes = verify_shapes(args.img_size, dynamic_size=False)
    report_errors(args.fmt, args.fmt, shapes, verify(model, args.output, args.fmt, shapes))


def report_errors(fmt: str, label: str, shapes: Sequence[Tuple[int, int, int, int]], errors: Sequence[float]):
    """Print each check's relative error; exit non-zero if one exceeds ``VERIFY_TOLERANCE``."""
    for shape, error in zip(shapes, errors):
        print(f'{label} vs PyTorch, input {shape}: relative error {error:.2e}')
    if max(errors) > VERIFY_TOLERANCE:
        sys.exit(f'error: {fmt} differs from PyTorch by {max(errors):.2e} relative, more than {VERIFY_TOLERANCE:g}')


def quantize_and_check(args: argparse.Namespace, model: torch.nn.Module, fp32_path: Path,
                       calibration: 'int8.CalibrationData', steps):
    """Quantize the float32 export ``fp32_path`` into ``args.output`` where its held-out agreement with float32
    reaches ``args.min_agreement``; exit with the figures otherwise, writing nothing."""
    steps.set_description(f'{args.fmt}: quantizing to INT8 ({int8.QUANTIZERS[args.fmt]})')
    suffix = FORMATS[args.fmt]
    with _replacing(args.output, written_suffixes(args.fmt)) as staged:
        int8.quantize(fp32_path, staged.with_suffix(suffix), calibration.calibration, args.fmt)
        steps.update()
        steps.set_description(f'{args.fmt}: checking INT8 against float32')
        check_agreement(args, int8.check_held_out(model, staged.with_suffix(suffix), args.fmt, calibration))
        steps.update()


def quantize_through_timmx(args: argparse.Namespace, model: torch.nn.Module, calibration: 'int8.CalibrationData'):
    """``quantize_and_check`` for ExecuTorch: timmx quantizes and lowers the model at ``args.img_size``, batch 1."""
    steps = progress(total=2, desc=f'{args.fmt}: quantizing to INT8 and lowering to XNNPACK (timmx)')
    with _replacing(args.output, ['.pte']) as staged:
        export_with_timmx(model, args.model, staged, args.fmt, args.img_size, calibration.calibration)
        steps.update()
        steps.set_description(f'{args.fmt}: checking INT8 against float32')
        check_agreement(args, int8.check_held_out(model, staged, args.fmt, calibration))
        steps.update()
    steps.close()


def check_agreement(args: argparse.Namespace, result: 'int8.HeldOutResult'):
    """Print the INT8 model's held-out figures; exit, writing nothing, below ``--min-agreement``."""
    accuracy = '' if result.fp32_top1 is None else f'; top-1 {result.int8_top1:.1%} (float32 {result.fp32_top1:.1%})'
    print(f'INT8 vs float32 on {result.images} held-out images: top-1 agreement {result.agreement:.1%}{accuracy}')
    if result.agreement < args.min_agreement:
        sys.exit(f'error: the INT8 model agrees with float32 on {result.agreement:.1%} of the held-out images, '
                 f'less than --min-agreement {args.min_agreement:g}; nothing written')


if __name__ == '__main__':
    main()
