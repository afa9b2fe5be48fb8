"""INT8 models (``python -m classification.export ... --int8``): NNCF's post-training quantization of the float32
OpenVINO IR, ONNX Runtime's static quantization of the float32 ONNX model, or timmx's XNNPACK quantization for
ExecuTorch (``export.export_with_timmx``), calibrated on images of a folder in the model's evaluation preprocessing,
and checked by their top-1 agreement with the float32 model on the folder's other images.

The folder is read as the predict command reads one (recursively, every image file; unreadable files are skipped
and counted), in an order shuffled with a fixed seed and only as far as needed: the calibration set
(``--calibration-samples``, at most four fifths of the images read), then the held-out set (the rest, at most
``MAX_HELD_OUT``). Where the folder has a subfolder per class (an ImageFolder, as the trainer reads one) whose names
are the checkpoint's classes (or, without recorded classes, as many as the model's), the held-out top-1 of both
models is reported too.
"""
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from . import dependencies

CALIBRATION_SAMPLES = 300  # NNCF's default subset size
MIN_IMAGES = 50  # so that at least 10 are held out
MAX_HELD_OUT = 1000  # the images read beyond the calibration set (a folder is read only as far as needed)
# The INT8 model's least top-1 agreement with float32 on the held-out images for the export to be written. The demo's
# FAT-B0 measured 0.965-0.975 over NNCF's presets and model types on its 200 validation images, 0.987 (OpenVINO) and
# 0.997 (ExecuTorch) on 700 held-out training images (README, INT8); 0.9 leaves room for a harder dataset and fails a
# broken quantization.
MIN_AGREEMENT = 0.9
# preset 'mixed' (symmetric weights, asymmetric activations) with model type 'transformer' (NNCF's scheme for
# attention models, SmoothQuant included): the best agreement measured, and not slower than 'performance' (README)
PRESET = 'mixed'
# who quantizes each format's float32 file (ExecuTorch's INT8 program is quantized from the PyTorch model, by timmx)
QUANTIZERS = {'openvino': 'NNCF', 'onnx': 'ONNX Runtime'}


class QuantizationError(RuntimeError):
    """The calibration folder cannot serve; the message says why."""


@dataclass
class HeldOutResult:
    images: int
    agreement: float  # fraction of held-out images whose INT8 top-1 class is float32's
    fp32_top1: Optional[float]  # held-out accuracy where the folder has labels
    int8_top1: Optional[float]


@dataclass
class CalibrationData:
    calibration: torch.Tensor
    held_out: torch.Tensor
    held_out_labels: Optional[torch.Tensor]
    skipped: int
    labels_from: str  # where the labels came from, or why there are none


def require(fmt: str):
    """Import what INT8 needs in ``fmt`` (OpenVINO: NNCF; ONNX: ONNX Runtime's quantizer; ExecuTorch: timmx,
    torchao), or raise MissingDependency naming what installs it."""
    for module in {'openvino': ('openvino', 'nncf'), 'onnx': ('onnx', 'onnxruntime.quantization'),
                   'executorch': ('executorch', 'torchao', 'timmx')}[fmt]:
        dependencies.require(module, 'deploy', '--int8')


def class_indices(files: Sequence[Path], folder: Path, classes: Optional[Sequence[str]],
                  num_classes: int) -> Tuple[Optional[Dict[str, int]], str]:
    """The label of each class subfolder of ``folder`` (by the checkpoint's ``classes``, else in sorted order, as
    an ImageFolder's), given every image file found in it; None where it has none, and why."""
    parents = {file.parent for file in files}
    if any(parent.parent != folder for parent in parents):
        return None, 'no labels (the images are not all in one subfolder per class)'
    names = sorted(parent.name for parent in parents)
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            return None, f'no labels (subfolders not among the checkpoint\'s classes: {", ".join(unknown[:3])})'
        return {name: position for position, name in enumerate(classes)}, \
            'labels from the subfolders, by the checkpoint\'s classes'
    if len(names) != num_classes:
        return None, f'no labels ({len(names)} subfolders for a model of {num_classes} classes)'
    return {name: position for position, name in enumerate(names)}, 'labels from the subfolders, in sorted order'


def read_calibration_data(folder: Path, transform: Callable[[Image.Image], torch.Tensor], samples: int,
                          classes: Optional[Sequence[str]], num_classes: int) -> CalibrationData:
    """The folder's readable images, preprocessed, split into the calibration and held-out sets."""
    from .predict import _load, image_files

    files = [Path(name) for name in image_files([str(folder)])]
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0)).tolist()
    images, kept, tried = [], [], 0
    for file in (files[index] for index in order):
        if len(kept) == samples + MAX_HELD_OUT:
            break
        tried += 1
        image, _ = _load(str(file), transform)
        if image is not None:
            images.append(image)
            kept.append(file)
    skipped = tried - len(kept)
    if len(kept) < MIN_IMAGES:
        raise QuantizationError(
            f'--calibration-data {folder}: {len(kept)} readable images ({skipped} skipped); INT8 needs at least '
            f'{MIN_IMAGES}, to calibrate on and to hold out for checking the quantized model')
    indices, labels_from = class_indices(files, folder, classes, num_classes)
    count = min(samples, len(kept) * 4 // 5)
    stacked = torch.stack(images)
    held_out_labels = None if indices is None else torch.tensor([indices[file.parent.name] for file in kept[count:]])
    return CalibrationData(stacked[:count], stacked[count:], held_out_labels, skipped, labels_from)


def quantize(fp32_path: Path, output_path: Path, calibration: torch.Tensor, fmt: str, batch_size: int = 1) -> Path:
    """Write the INT8 quantization of the float32 model ``fp32_path`` in ``fmt`` (``QUANTIZERS``), whose input is a
    batch of ``batch_size`` images, to ``output_path`` (float32 where not quantized), and return ``output_path``."""
    batches = [batch.numpy() for batch in calibration.split(batch_size) if len(batch) == batch_size]
    if fmt == 'onnx':
        return _quantize_onnx(fp32_path, output_path, batches)
    import nncf
    import openvino

    model = openvino.Core().read_model(str(fp32_path))
    quantized = nncf.quantize(model, nncf.Dataset(batches), preset=nncf.QuantizationPreset(PRESET),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches))
    openvino.save_model(quantized, str(output_path), compress_to_fp16=False)
    return output_path


def _quantize_onnx(fp32_onnx: Path, output_onnx: Path, batches: Sequence[np.ndarray]) -> Path:
    """ONNX Runtime's static quantization, as its documentation sets it for CPUs: the model pre-processed (ONNX's
    shape inference, the graph optimized), then quantize-dequantize pairs around each operation, per channel,
    activations in uint8 and weights in int8, which ONNX Runtime's CPU kernels fuse into integer operations
    (``QLinearConv``...). ONNX Runtime's symbolic shape inference is skipped: it fails on EdgeNeXt's ``Expand``
    (leaving files in the working directory), and FAT-B0's quantized graph was the same without it. NNCF's ONNX
    quantization was measured beside this one: its pairs stayed around float kernels, and FAT-B0 ran at 2.2-2.6x
    float32's latency."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    input_name = onnx.load(str(fp32_onnx), load_external_data=False).graph.input[0].name

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.remaining = iter(batches)

        def get_next(self):
            batch = next(self.remaining, None)
            return None if batch is None else {input_name: batch}

    scalar_warnings = _ScalarConstantWarnings()
    logging.getLogger().addFilter(scalar_warnings)
    try:
        with tempfile.TemporaryDirectory(dir=output_onnx.parent, prefix='.quantizing.') as folder:
            preprocessed = Path(folder) / fp32_onnx.name
            quant_pre_process(str(fp32_onnx), str(preprocessed), skip_symbolic_shape=True)
            quantize_static(str(preprocessed), str(output_onnx), Batches(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().removeFilter(scalar_warnings)
    return output_onnx


class _ScalarConstantWarnings(logging.Filter):
    """Drops ONNX Runtime's warning for each one-element constant (a product's factor) that it cannot quantize per
    channel: it quantizes it per tensor, as it should, and FAT-B0 has 26 of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return 'is out-of-range for weight' not in record.getMessage()


def _top1(run: Callable[[np.ndarray], np.ndarray], images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    return torch.cat([torch.from_numpy(np.asarray(run(batch.numpy()))).argmax(-1)
                      for batch in images.split(batch_size)])


def check_held_out(model: torch.nn.Module, path: Path, fmt: str, data: CalibrationData) -> HeldOutResult:
    """The INT8 model at ``path`` (in ``fmt``) against the float32 PyTorch model (and both against the labels) on
    held-out data, by top-1 class."""
    from .export import load_runtime

    with torch.no_grad():
        expected = torch.cat([model(batch).argmax(-1) for batch in data.held_out.split(32)])
    # ExecuTorch's INT8 program takes one image at a time
    actual = _top1(load_runtime(path, fmt), data.held_out, batch_size=1 if fmt == 'executorch' else 32)
    labels = data.held_out_labels

    def top1(predicted: torch.Tensor) -> Optional[float]:
        return None if labels is None else (predicted == labels).float().mean().item()
    return HeldOutResult(len(actual), (actual == expected).float().mean().item(), top1(expected), top1(actual))
