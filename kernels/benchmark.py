"""Time the extension's depthwise convolution against PyTorch's two paths at FAT's large-kernel layers.

For the 7x7 and 9x9 depthwise convolutions of FAT-B0 and FAT-B2 (stages 3 and 4 at 224x224; ``--kernel-sizes``
takes 3 and 5 too), batch 1 and 128, float16 and bfloat16, it times forward and forward+backward of

* ``nchw``: ``F.conv2d`` on contiguous NCHW tensors, PyTorch's default layout (cuDNN on a GPU);
* ``channels_last``: ``F.conv2d`` on channels-last input and weight (cuDNN's NHWC kernels), the layout FAT runs in;
* ``extension``: ``kernels.dwconv2d``, the in-tree CUDA kernels (NCHW), when the extension is built;

prints each one's time, the ratios (PyTorch's time / the extension's: above 1, the extension is faster), the
relative difference of each forward from the NCHW one, and the memory bandwidth each achieves, counting the bytes
a convolution has to move at the least (each activation read or written once), against the bandwidth of a plain
device-to-device copy measured in the same run (``--peak-gbs`` replaces it). Ends with the geometric-mean ratios
at the largest batch, per dtype: what decides FAT_CUDA_DWCONV's default (kernels/README.md).

    python -m kernels.benchmark [--batch-sizes 1 128] [--dtypes float16 bfloat16] [--kernel-sizes 7 9]
        [--models fat_b0 fat_b2] [--peak-gbs GB/s] [--json results.json] [--device cuda|cpu]

``--device cpu`` times the two PyTorch paths on the CPU (host clock): a rehearsal of the harness, not a measurement
of the extension, which runs on CUDA tensors only.
"""
import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import kernels

# (channels, height, width, kernel size) of the depthwise convolutions of each stage at 224x224
STAGE_SHAPES: Dict[str, List[Tuple[int, int, int, int]]] = {
    'fat_b0': [(32, 56, 56, 3), (80, 28, 28, 5), (160, 14, 14, 7), (256, 7, 7, 9)],
    'fat_b2': [(64, 56, 56, 3), (128, 28, 28, 5), (256, 14, 14, 7), (512, 7, 7, 9)],
}
DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float32': torch.float32}
PYTORCH_PATHS = ('nchw', 'channels_last')
COPY_BYTES = {'cuda': 2 ** 30, 'cpu': 2 ** 26}  # each of source and destination


def milliseconds(function: Callable[[], object], device: torch.device, warmup: int, iterations: int,
                 rounds: int) -> float:
    """The median over rounds of the mean time of one call, from back-to-back calls: timed with CUDA events on a
    GPU, with the host clock on the CPU."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(rounds):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                function()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / iterations)
        else:
            start_seconds = time.perf_counter()
            for _ in range(iterations):
                function()
            times.append((time.perf_counter() - start_seconds) * 1e3 / iterations)
    return statistics.median(times)


def driver_peak_gbs(device: torch.device) -> Optional[float]:
    """Double data rate x bus width from the device properties; None where they are not reported (CUDA 13 dropped
    the memory clock from cudaDeviceProp, and the driver's HBM clock may not give the datasheet's rate)."""
    if device.type != 'cuda':
        return None
    properties = torch.cuda.get_device_properties(device)
    clock_khz = getattr(properties, 'memory_clock_rate', 0)
    bus_bits = getattr(properties, 'memory_bus_width', 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def copy_bandwidth_gbs(device: torch.device, args: argparse.Namespace) -> float:
    """GB/s of a large device-to-device copy, counting the bytes read and written: the practical ceiling."""
    count = COPY_BYTES[device.type] // 4
    source = torch.randn(count, device=device)
    destination = torch.empty_like(source)
    taken = milliseconds(lambda: destination.copy_(source), device, args.warmup, args.iterations, args.rounds)
    return 2 * count * 4 / taken / 1e6


def benchmark_shape(batch: int, channels: int, height: int, width: int, kernel_size: int, dtype: torch.dtype,
                    device: torch.device, with_extension: bool, args: argparse.Namespace) -> Dict[str, float]:
    padding = kernel_size // 2
    x = torch.randn(batch, channels, height, width, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(channels, 1, kernel_size, kernel_size, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(channels, device=device, dtype=dtype, requires_grad=True)
    grad_output = torch.randn(batch, channels, height, width, device=device, dtype=dtype)
    channels_last = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in (x, weight)]
    arguments = {
        'nchw': (x, weight, bias),
        'channels_last': (*channels_last, bias),
        'extension': (x, weight, bias),
    }
    gradients = {'nchw': grad_output, 'channels_last': grad_output.contiguous(memory_format=torch.channels_last),
                 'extension': grad_output}
    implementations = {
        'nchw': lambda *a: F.conv2d(*a, padding=padding, groups=channels),
        'channels_last': lambda *a: F.conv2d(*a, padding=padding, groups=channels),
    }
    if with_extension:
        implementations['extension'] = lambda *a: kernels.dwconv2d(*a, padding)

    result = {}
    with torch.no_grad():
        expected = implementations['nchw'](*arguments['nchw']).float()
        scale = max(expected.abs().max().item(), 1e-30)
        for name, convolve in implementations.items():
            if name != 'nchw':
                difference = (convolve(*arguments[name]).float() - expected).abs().max().item()
                result[f'{name}_relative_difference'] = difference / scale
    for name, convolve in implementations.items():
        inputs, grad = arguments[name], gradients[name]

        def forward(convolve=convolve, inputs=inputs):
            with torch.no_grad():
                convolve(*inputs)

        def forward_backward(convolve=convolve, inputs=inputs, grad=grad):
            torch.autograd.grad(convolve(*inputs), inputs, grad)

        result[f'{name}_forward_ms'] = milliseconds(forward, device, args.warmup, args.iterations, args.rounds)
        result[f'{name}_training_ms'] = milliseconds(forward_backward, device, args.warmup, args.iterations,
                                                     args.rounds)
    # the least traffic: forward reads x, writes y; backward reads grad_y and x, writes grad_x
    activation_bytes = x.numel() * x.element_size()
    result['forward_bytes'] = 2 * activation_bytes
    result['training_bytes'] = 5 * activation_bytes
    return result


def geometric_mean(values: List[float]) -> float:
    return math.exp(statistics.fmean(math.log(value) for value in values))


def summarise(rows: List[Dict], batch: int) -> List[Dict]:
    """Per dtype, at ``batch``: the geometric-mean ratio of each PyTorch path's time to the extension's."""
    summary = []
    for dtype in dict.fromkeys(row['dtype'] for row in rows):
        chosen = [row for row in rows
                  if row['dtype'] == dtype and row['batch'] == batch and 'extension_forward_ms' in row]
        if chosen:
            ratios = {f'{path}_over_extension_{phase}': geometric_mean(
                [row[f'{path}_{phase}_ms'] / row[f'extension_{phase}_ms'] for row in chosen])
                for path in PYTORCH_PATHS for phase in ('forward', 'training')}
            summary.append(dict(dtype=dtype, batch=batch, rows=len(chosen), **ratios))
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 128], metavar='N')
    parser.add_argument('--models', nargs='+', default=list(STAGE_SHAPES), choices=list(STAGE_SHAPES))
    parser.add_argument('--kernel-sizes', type=int, nargs='+', default=[7, 9], choices=(3, 5, 7, 9),
                        help='the layers to time, by kernel size (default: 7 9, those FAT_CUDA_DWCONV switches)')
    parser.add_argument('--dtypes', nargs='+', default=['float16', 'bfloat16'], choices=list(DTYPES))
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--iterations', type=int, default=50)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--peak-gbs', type=float,
                        help='the bandwidth the achieved figures are given against, in GB/s (default: measured copy)')
    parser.add_argument('--json', type=Path, metavar='FILE', help='also write every figure to FILE')
    args = parser.parse_args(argv)
    for option in ('iterations', 'rounds'):
        if getattr(args, option) < 1:
            parser.error(f'--{option} must be at least 1')
    if args.warmup < 0 or min(args.batch_sizes) < 1:
        parser.error('--warmup must not be negative and --batch-sizes must be at least 1')
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA GPU is available (--device cpu rehearses the harness on the CPU)')
    with_extension = device.type == 'cuda' and kernels.cuda_extension_available()
    torch.backends.cudnn.benchmark = True
    copy_gbs = copy_bandwidth_gbs(device, args)
    driver_gbs = driver_peak_gbs(device)
    reference_gbs = args.peak_gbs or copy_gbs
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    print(f'{name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; device-to-device copy '
          f'{copy_gbs:.0f} GB/s, driver peak {f"{driver_gbs:.0f} GB/s" if driver_gbs else "not reported"}; '
          f'% of {reference_gbs:.0f} GB/s ({"--peak-gbs" if args.peak_gbs else "the copy"})')
    if device.type == 'cuda' and not with_extension:
        print(f'the extension is not built ({kernels.ops.EXTENSION_ERROR}): PyTorch\'s paths only')
    paths = PYTORCH_PATHS + (('extension',) if with_extension else ())
    print('times in ms; ratio: PyTorch time / extension time (> 1: the extension is faster); GB/s: least bytes / time; '
          'diff: max |path - nchw| / max |nchw| of the forward')
    header = f"{'model':7} {'batch':>5} {'C,H,W,k':>12} {'dtype':>8} | " + ' | '.join(
        f"{phase}: " + ' '.join(f'{path:>13}' for path in paths) for phase in ('fwd', 'fwd+bwd'))
    print(header)
    print('-' * len(header))

    def cell(row, path, phase):
        milliseconds_taken = row[f'{path}_{phase}_ms']
        gbs = row[f'{phase}_bytes'] / milliseconds_taken / 1e6
        ratio = ''
        if with_extension and path != 'extension':
            ratio = f" {milliseconds_taken / row[f'extension_{phase}_ms']:4.2f}x"
        return f'{milliseconds_taken:7.4f} {100 * gbs / reference_gbs:3.0f}%{ratio}'

    rows = []
    for batch in args.batch_sizes:
        for model in args.models:
            for channels, height, width, kernel_size in STAGE_SHAPES[model]:
                if kernel_size not in args.kernel_sizes:
                    continue
                for dtype_name in args.dtypes:
                    row = dict(model=model, batch=batch, channels=channels, height=height, width=width,
                               kernel_size=kernel_size, dtype=dtype_name)
                    row.update(benchmark_shape(batch, channels, height, width, kernel_size, DTYPES[dtype_name],
                                               device, with_extension, args))
                    for phase in ('forward', 'training'):
                        for path in paths:
                            row[f'{path}_{phase}_gbs'] = row[f'{phase}_bytes'] / row[f'{path}_{phase}_ms'] / 1e6
                    rows.append(row)
                    differences = ' '.join(f"{row[f'{path}_relative_difference']:.0e}" for path in paths[1:])
                    print(f"{model:7} {batch:5} {f'{channels},{height},{width},{kernel_size}':>12} {dtype_name:>8} | "
                          + ' | '.join(' '.join(cell(row, path, phase) for path in paths)
                                       for phase in ('forward', 'training')) + f' | diff {differences}')
    summary = summarise(rows, max(args.batch_sizes))
    for entry in summary:
        print(f"batch {entry['batch']}, {entry['dtype']}, {entry['rows']} layers: geometric-mean ratio over the "
              f"extension: channels-last forward {entry['channels_last_over_extension_forward']:.2f}, "
              f"forward+backward {entry['channels_last_over_extension_training']:.2f}; NCHW forward "
              f"{entry['nchw_over_extension_forward']:.2f}, forward+backward "
              f"{entry['nchw_over_extension_training']:.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            device=name, torch=torch.__version__, cudnn=torch.backends.cudnn.version(), copy_gbs=copy_gbs,
            driver_peak_gbs=driver_gbs, reference_gbs=reference_gbs, extension=with_extension,
            extension_error=None if with_extension else
            kernels.ops.EXTENSION_ERROR or 'the extension runs on CUDA tensors only',
            settings=dict(warmup=args.warmup, iterations=args.iterations, rounds=args.rounds),
            rows=rows, summary=summary), indent=2) + '\n')


if __name__ == '__main__':
    main()
