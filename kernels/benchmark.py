"""Time the extension's depthwise convolution against cuDNN (F.conv2d) at FAT's stage shapes.

For every stage of FAT-B0 and FAT-B2 at 224x224 (batch 128 by default) and every dtype, prints the forward
and forward+backward times of both, the ratio cuDNN time / extension time (above 1: the extension is
faster), and the memory bandwidth each achieves against the GPU's peak, counting the bytes a convolution
has to move at the least (each activation read or written once). Needs a GPU and the built extension:

    python -m kernels.benchmark [--batch 128] [--dtypes float16 bfloat16] [--peak-gbs GB/s]
"""
import argparse
import math
import statistics
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import kernels

# (channels, height, width, kernel size) of the depthwise convolutions of each stage at 224x224
STAGE_SHAPES: Dict[str, List[Tuple[int, int, int, int]]] = {
    'fat_b0': [(32, 56, 56, 3), (80, 28, 28, 5), (160, 14, 14, 7), (256, 7, 7, 9)],
    'fat_b2': [(64, 56, 56, 3), (128, 28, 28, 5), (256, 14, 14, 7), (512, 7, 7, 9)],
}
DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float32': torch.float32}


def milliseconds(function: Callable[[], object], warmup: int, iterations: int, rounds: int) -> float:
    """The median over rounds of the mean time of one call, from CUDA events around back-to-back calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            function()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iterations)
    return statistics.median(times)


def peak_bandwidth_gbs(device: torch.device) -> float:
    """Double data rate x bus width, from the device properties (0 where the driver does not report them)."""
    properties = torch.cuda.get_device_properties(device)
    return 2 * properties.memory_clock_rate * 1e3 * properties.memory_bus_width / 8 / 1e9


def benchmark_shape(batch, channels, height, width, kernel_size, dtype, args) -> Dict[str, float]:
    padding = kernel_size // 2
    x = torch.randn(batch, channels, height, width, device='cuda', dtype=dtype, requires_grad=True)
    weight = torch.randn(channels, 1, kernel_size, kernel_size, device='cuda', dtype=dtype, requires_grad=True)
    bias = torch.randn(channels, device='cuda', dtype=dtype, requires_grad=True)
    grad_output = torch.randn(batch, channels, height, width, device='cuda', dtype=dtype)
    implementations = {
        'cudnn': lambda *a: F.conv2d(*a, padding=padding, groups=channels),
        'extension': lambda *a: kernels.dwconv2d(*a, padding),
    }
    with torch.no_grad():
        expected = implementations['cudnn'](x, weight, bias).float()
        difference = (implementations['extension'](x, weight, bias).float() - expected).abs().max().item()
    result = {'relative_difference': difference / max(expected.abs().max().item(), 1e-30)}
    activation_bytes = x.numel() * x.element_size()
    for name, convolve in implementations.items():
        def forward():
            with torch.no_grad():
                convolve(x, weight, bias)

        def forward_backward():
            torch.autograd.grad(convolve(x, weight, bias), (x, weight, bias), grad_output)

        result[f'{name}_forward_ms'] = milliseconds(forward, args.warmup, args.iterations, args.rounds)
        result[f'{name}_training_ms'] = milliseconds(forward_backward, args.warmup, args.iterations, args.rounds)
    # the least traffic: forward reads x, writes y; backward reads grad_y, x, writes grad_x
    result['forward_bytes'] = 2 * activation_bytes
    result['training_bytes'] = 5 * activation_bytes
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--models', nargs='+', default=list(STAGE_SHAPES), choices=list(STAGE_SHAPES))
    parser.add_argument('--dtypes', nargs='+', default=['float16', 'bfloat16'], choices=list(DTYPES))
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument('--iterations', type=int, default=50)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--peak-gbs', type=float, help='the GPU memory bandwidth in GB/s (default: from the driver)')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit('the benchmark needs a CUDA GPU')
    if not kernels.cuda_extension_available():
        raise SystemExit(f'the CUDA extension kernels._dwconv_cuda is not built ({kernels.ops.EXTENSION_ERROR})')
    torch.backends.cudnn.benchmark = True
    device = torch.device('cuda')
    peak = args.peak_gbs or peak_bandwidth_gbs(device)
    if args.peak_gbs:
        peak_text = f'{peak:.0f} GB/s (--peak-gbs)'
    else:
        peak_text = f'{peak:.0f} GB/s (from the driver)' if peak else 'not reported by the driver (pass --peak-gbs)'
    print(f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, '
          f'batch {args.batch}, peak bandwidth {peak_text}')
    print('ratio: cuDNN time / extension time (> 1: the extension is faster); GB/s: the least bytes moved / time; '
          'rel diff: max |extension - cuDNN| / max |cuDNN| of the forward')
    header = (f"{'model':8} {'C,H,W,k':>13} {'dtype':>8} | {'forward ms':^21} | {'forward+backward ms':^21} | "
              f"{'forward GB/s (% of peak)':^27} | {'fwd+bwd GB/s (% of peak)':^27} | {'rel diff':>8}")
    times = f"{'cuDNN':>7} {'ext':>7} {'ratio':>5}"
    columns = f"{'':8} {'':>13} {'':>8} | {times} | {times} | {'cuDNN':>13} {'ext':>13} | {'cuDNN':>13} {'ext':>13} |"
    print(header)
    print(columns)
    print('-' * len(header))

    def bandwidth(bytes_moved, milliseconds_taken):
        gbs = bytes_moved / milliseconds_taken / 1e6
        return f"{gbs:6.0f} ({100 * gbs / peak:3.0f}%)" if peak else f"{gbs:6.0f}  (?)   "

    ratios = {}
    for model in args.models:
        for channels, height, width, kernel_size in STAGE_SHAPES[model]:
            for dtype_name in args.dtypes:
                r = benchmark_shape(args.batch, channels, height, width, kernel_size, DTYPES[dtype_name], args)
                forward_ratio = r['cudnn_forward_ms'] / r['extension_forward_ms']
                training_ratio = r['cudnn_training_ms'] / r['extension_training_ms']
                ratios[(model, kernel_size, dtype_name)] = (forward_ratio, training_ratio)
                print(f"{model:8} {f'{channels},{height},{width},{kernel_size}':>13} {dtype_name:>8} | "
                      f"{r['cudnn_forward_ms']:7.4f} {r['extension_forward_ms']:7.4f} {forward_ratio:5.2f} | "
                      f"{r['cudnn_training_ms']:7.4f} {r['extension_training_ms']:7.4f} {training_ratio:5.2f} | "
                      f"{bandwidth(r['forward_bytes'], r['cudnn_forward_ms'])} "
                      f"{bandwidth(r['forward_bytes'], r['extension_forward_ms'])} | "
                      f"{bandwidth(r['training_bytes'], r['cudnn_training_ms'])} "
                      f"{bandwidth(r['training_bytes'], r['extension_training_ms'])} | "
                      f"{r['relative_difference']:8.1e}")
    switched = [ratio for (_, kernel_size, _), ratio in ratios.items() if kernel_size >= 7]
    if switched:
        geometric_mean = [math.exp(statistics.fmean(math.log(r[i]) for r in switched)) for i in (0, 1)]
        print(f'kernels >= 7 (what FAT_CUDA_DWCONV=1 switches): geometric-mean ratio forward {geometric_mean[0]:.2f}, '
              f'forward+backward {geometric_mean[1]:.2f}')


if __name__ == '__main__':
    main()
