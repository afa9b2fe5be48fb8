"""kernels/: the depthwise-convolution CUDA extension and its F.conv2d fallback.

Without a GPU: the fallback, the state dict, the log line and the switch; with the extension built, the
ops' registration (schemas, fake and CPU implementations, autograd: torch.library.opcheck), fake CUDA
tensors, and the CUDA kernels' own source run on the CPU emulation of kernels/csrc/emulation. With a GPU
(marker ``gpu``): the kernels against cuDNN.
"""
import ctypes
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels import DepthwiseConv2d, depthwise_conv, ops, use_cuda_dwconv

KERNELS_DIR = Path(kernels.__file__).parent
EMULATION_SOURCE = KERNELS_DIR / 'csrc' / 'emulation' / 'emulated_depthwise_conv.cpp'
EMULATED_KERNEL_SIZES = (3, 5, 7, 9, 31)  # DWCONV_KERNEL_SIZES of emulated_depthwise_conv.cpp

needs_extension = pytest.mark.skipif(not kernels.cuda_extension_available(),
                                     reason=f'kernels._dwconv_cuda is not built ({ops.EXTENSION_ERROR})')
needs_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.cuda_extension_available()),
                               reason='needs a CUDA GPU and kernels._dwconv_cuda built')


def depthwise_pair(channels, kernel_size, stride=1, bias=True, dtype=torch.float32, device='cpu'):
    """An nn.Conv2d and a DepthwiseConv2d with the same parameters."""
    reference = nn.Conv2d(channels, channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=channels,
                          bias=bias, device=device, dtype=dtype)
    module = DepthwiseConv2d(channels, kernel_size, stride=stride, bias=bias, device=device, dtype=dtype)
    module.load_state_dict(reference.state_dict())
    return reference, module


def forward_backward(module, x, grad_output):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(grad_output)
    return y, x.grad, *(p.grad for p in module.parameters())


# The fallback, the module and the switch: no extension needed.

@pytest.mark.parametrize('kernel_size, stride, height, width', [
    (3, 1, 13, 17), (7, 1, 14, 14), (9, 1, 7, 7), (31, 1, 9, 11), (5, 2, 13, 17), (7, 2, 14, 15), (1, 1, 5, 6)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_cpu_fallback_equals_nn_conv2d_forward_and_backward(kernel_size, stride, height, width, dtype):
    reference, module = depthwise_pair(6, kernel_size, stride, dtype=dtype)
    x = torch.randn(2, 6, height, width, dtype=dtype)
    grad_output = torch.randn_like(reference(x))
    for expected, actual in zip(forward_backward(reference, x, grad_output), forward_backward(module, x, grad_output)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize('bias', [True, False])
def test_state_dict_loads_both_ways_with_nn_conv2d(bias):
    reference, module = depthwise_pair(8, 7, bias=bias)
    assert isinstance(module, nn.Conv2d)
    shapes = {key: value.shape for key, value in reference.state_dict().items()}
    assert {key: value.shape for key, value in module.state_dict().items()} == shapes
    fresh_reference = nn.Conv2d(8, 8, 7, padding=3, groups=8, bias=bias)
    fresh_reference.load_state_dict(module.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fresh_reference.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize('kwargs, message', [
    (dict(kernel_size=4), 'positive odd int'), (dict(kernel_size=0), 'positive odd int'),
    (dict(kernel_size=3.0), 'positive odd int'), (dict(kernel_size=3, stride=3), 'stride must be 1 or 2')])
def test_module_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DepthwiseConv2d(8, **kwargs)


@pytest.mark.parametrize('extension_error, expected', [
    (None, 'stride-1 convolutions of CUDA tensors run on the in-tree CUDA kernel (kernels._dwconv_cuda), everything '
           'else on F.conv2d'),
    ('ImportError: no module', 'every convolution runs on F.conv2d; the CUDA extension kernels._dwconv_cuda is not '
                               'built (ImportError: no module)')])
def test_one_log_line_says_which_path_is_active(monkeypatch, caplog, extension_error, expected):
    monkeypatch.setattr(ops, 'EXTENSION_ERROR', extension_error)
    depthwise_conv._log_active_path.cache_clear()
    with caplog.at_level(logging.INFO, logger='kernels.depthwise_conv'):
        DepthwiseConv2d(8, 7)
        DepthwiseConv2d(16, 9)
    depthwise_conv._log_active_path.cache_clear()
    assert [record.getMessage() for record in caplog.records] == [f'kernels.DepthwiseConv2d: {expected}']


def test_switch_is_off_by_default(monkeypatch):
    monkeypatch.delenv('FAT_CUDA_DWCONV', raising=False)
    assert not any(use_cuda_dwconv(k, s) for k in (3, 5, 7, 9, 31) for s in (1, 2))


def test_switch_picks_stride1_kernels_from_7_when_the_extension_is_built(monkeypatch):
    monkeypatch.setenv('FAT_CUDA_DWCONV', '1')
    monkeypatch.setattr(ops, 'EXTENSION_ERROR', None)
    assert [k for k in range(1, 34) if use_cuda_dwconv(k, 1)] == list(range(7, 32, 2))
    assert not use_cuda_dwconv(7, 2)


def test_switch_without_the_extension_warns_once_and_keeps_nn_conv2d(monkeypatch, caplog):
    monkeypatch.setenv('FAT_CUDA_DWCONV', '1')
    monkeypatch.setattr(ops, 'EXTENSION_ERROR', 'ImportError: no module')
    depthwise_conv._warn_switch_without_extension.cache_clear()
    with caplog.at_level(logging.WARNING, logger='kernels.depthwise_conv'):
        assert not use_cuda_dwconv(7, 1)
        assert not use_cuda_dwconv(9, 1)
    depthwise_conv._warn_switch_without_extension.cache_clear()
    assert [record.getMessage() for record in caplog.records] == [
        'FAT_CUDA_DWCONV=1 but the CUDA extension kernels._dwconv_cuda is not built (ImportError: no module): '
        'depthwise convolutions stay nn.Conv2d']


def test_switch_rejects_values_other_than_0_and_1(monkeypatch):
    monkeypatch.setenv('FAT_CUDA_DWCONV', 'yes')
    with pytest.raises(ValueError, match="FAT_CUDA_DWCONV must be 0 or 1, got 'yes'"):
        use_cuda_dwconv(7, 1)


def test_functional_op_without_the_extension_says_so(monkeypatch):
    monkeypatch.setattr(ops, 'EXTENSION_ERROR', 'ImportError: no module')
    with pytest.raises(RuntimeError, match=r'kernels._dwconv_cuda is not built \(ImportError: no module\)'):
        kernels.dwconv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 1, 3, 3), None, 1)


# The ops' registration, with the extension built; the CPU implementations stand in for the CUDA ones.

@needs_extension
def test_ops_are_registered_with_cuda_kernels():
    schemas = {name: str(getattr(torch.ops.fat_kernels, name).default._schema)
               for name in ('dwconv2d', 'dwconv2d_grad_input', 'dwconv2d_grad_weight')}
    assert schemas == {
        'dwconv2d': 'fat_kernels::dwconv2d(Tensor input, Tensor weight, Tensor? bias, int padding) -> Tensor',
        'dwconv2d_grad_input': 'fat_kernels::dwconv2d_grad_input(Tensor grad_output, Tensor weight, int padding) '
                               '-> Tensor',
        'dwconv2d_grad_weight': 'fat_kernels::dwconv2d_grad_weight(Tensor grad_output, Tensor input, int kernel_size, '
                                'int padding) -> (Tensor, Tensor)',
    }
    for name in schemas:
        for key in ('CUDA', 'CPU', 'Meta'):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f'fat_kernels::{name}', key), (name, key)


@needs_extension
@pytest.mark.parametrize('dtype, kernel_size, padding, bias', [
    (torch.float64, 3, 1, True), (torch.float32, 7, 3, False), (torch.bfloat16, 5, 4, True)])
def test_opcheck(dtype, kernel_size, padding, bias):
    x = torch.randn(2, 3, 9, 11, dtype=dtype, requires_grad=True)
    weight = torch.randn(3, 1, kernel_size, kernel_size, dtype=dtype, requires_grad=True)
    bias_tensor = torch.randn(3, dtype=dtype, requires_grad=True) if bias else None
    grad_output = torch.randn_like(F.conv2d(x, weight, padding=padding, groups=3)).detach()
    torch.library.opcheck(torch.ops.fat_kernels.dwconv2d.default, (x, weight, bias_tensor, padding))
    torch.library.opcheck(torch.ops.fat_kernels.dwconv2d_grad_input.default, (grad_output, weight.detach(), padding))
    torch.library.opcheck(torch.ops.fat_kernels.dwconv2d_grad_weight.default,
                          (grad_output, x.detach(), kernel_size, padding))


@needs_extension
@pytest.mark.parametrize('kernel_size, padding', [(3, 1), (7, 3), (7, 0), (7, 6), (9, 4)])
def test_op_gradients_equal_conv2d_autograd(kernel_size, padding):
    """The autograd formula and the grad ops (the kernel rotated by 180 degrees, padding k - 1 - padding)."""
    x = torch.randn(2, 4, 10, 13, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 1, kernel_size, kernel_size, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(x, weight, bias, padding=padding, groups=4)
    actual = kernels.dwconv2d(x, weight, bias, padding)
    grad_output = torch.randn_like(expected)
    torch.testing.assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, (x, weight, bias), grad_output),
                    torch.autograd.grad(expected, (x, weight, bias), grad_output)):
        torch.testing.assert_close(a, e)
    small_inputs = [t.detach().requires_grad_() for t in (x[:1, :2], weight[:2], bias[:2])]
    assert torch.autograd.gradcheck(lambda *args: kernels.dwconv2d(*args, padding), small_inputs, fast_mode=True)


@needs_extension
def test_op_compiles_without_graph_breaks():
    def convolve_and_reduce(x, weight, bias):
        return kernels.dwconv2d(x, weight, bias, 3).square().mean()

    compiled = torch.compile(convolve_and_reduce, backend='aot_eager', fullgraph=True)
    x = torch.randn(2, 4, 14, 14, requires_grad=True)
    weight = torch.randn(4, 1, 7, 7, requires_grad=True)
    bias = torch.randn(4, requires_grad=True)
    eager_loss = convolve_and_reduce(x, weight, bias)
    eager_grads = torch.autograd.grad(eager_loss, (x, weight, bias))
    compiled_loss = compiled(x, weight, bias)
    compiled_grads = torch.autograd.grad(compiled_loss, (x, weight, bias))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)


@needs_extension
def test_module_kernel_branch_compiles_whole_and_casts_like_autocast(monkeypatch):
    """The branch CUDA tensors take, on CPU tensors (the op's CPU implementation): torch.compile traces it
    without graph breaks, and under autocast it casts as autocast casts conv2d."""
    monkeypatch.setattr(DepthwiseConv2d, '_runs_on_extension', lambda self, x: True)
    reference, module = depthwise_pair(8, 7)
    compiled = torch.compile(module, backend='aot_eager', fullgraph=True)
    x = torch.randn(2, 8, 14, 14)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        expected, eager, traced = reference(x), module(x), compiled(x)
    assert expected.dtype == eager.dtype == traced.dtype == torch.bfloat16
    torch.testing.assert_close(eager, expected)
    torch.testing.assert_close(traced, eager)


@needs_extension
@pytest.mark.parametrize('make_arguments, error, message', [
    (lambda: (torch.randn(1, 4, 9, 9), torch.randn(4, 1, 4, 4), None, 1), ValueError,
     r'kernel size must be odd and in \[3, 31\], got 4'),
    (lambda: (torch.randn(1, 4, 40, 40), torch.randn(4, 1, 33, 33), None, 16), ValueError,
     r'kernel size must be odd and in \[3, 31\], got 33'),
    (lambda: (torch.randn(1, 4, 9, 9), torch.randn(4, 2, 3, 3), None, 1), ValueError,
     r'groups == channels\) of 4 channels needs a weight of shape \[4, 1, k, k\], got \[4, 2, 3, 3\]'),
    (lambda: (torch.randn(1, 4, 9, 9), torch.randn(8, 1, 3, 3), None, 1), ValueError,
     r'needs a weight of shape \[4, 1, k, k\], got \[8, 1, 3, 3\]'),
    (lambda: (torch.randn(1, 4, 9, 9), torch.randn(4, 1, 3, 3, dtype=torch.float64), None, 1), TypeError,
     'weight is torch.float64 but input is torch.float32'),
    (lambda: (torch.randn(1, 4, 9, 9).int(), torch.randn(4, 1, 3, 3).int(), None, 1), TypeError,
     'input must be float16, bfloat16, float32 or float64, got torch.int32'),
    (lambda: (torch.randn(4, 9, 9), torch.randn(4, 1, 3, 3), None, 1), ValueError,
     r'input must be 4-D \(N, C, H, W\), got shape \[4, 9, 9\]'),
    (lambda: (torch.randn(1, 4, 9, 9), torch.randn(4, 1, 3, 3), torch.randn(5), 1), ValueError,
     r'bias must have shape \[4\], got \[5\]'),
    (lambda: (torch.randn(1, 4, 9, 9), torch.randn(4, 1, 3, 3), None, 3), ValueError,
     r'padding must be in \[0, 2\] for kernel size 3, got 3'),
    (lambda: (torch.randn(1, 4, 5, 5), torch.randn(4, 1, 9, 9), None, 0), ValueError,
     'an input of 5x5 is smaller than the kernel 9x9 with padding 0'),
])
def test_op_rejects_bad_input_clearly(make_arguments, error, message):
    with pytest.raises(error, match=message):
        torch.ops.fat_kernels.dwconv2d(*make_arguments())


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_extension
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_module_sends_cuda_tensors_to_the_op_with_fake_shapes(dtype):
    """Fake CUDA tensors need no GPU: the module dispatches them to fat_kernels.dwconv2d, whose fake
    implementations give the shapes the CUDA kernels produce."""
    with FakeTensorMode():
        module = DepthwiseConv2d(8, 7, device='cuda', dtype=dtype)
        x = torch.empty(4, 8, 13, 15, device='cuda', dtype=dtype)
        with _RecordOps() as recorder:
            y = module(x)
            grad_input = torch.ops.fat_kernels.dwconv2d_grad_input(y, module.weight, 3)
            grad_weight, grad_bias = torch.ops.fat_kernels.dwconv2d_grad_weight(y, x, 7, 3)
        strided = DepthwiseConv2d(8, 7, stride=2, device='cuda', dtype=dtype)
        with _RecordOps() as strided_recorder:
            strided_y = strided(x)
    assert [op for op in recorder.ops if op.startswith('fat_kernels.')] == [
        'fat_kernels.dwconv2d.default', 'fat_kernels.dwconv2d_grad_input.default',
        'fat_kernels.dwconv2d_grad_weight.default']
    assert (y.shape, y.dtype, y.device.type) == ((4, 8, 13, 15), dtype, 'cuda')
    assert y.is_contiguous()
    assert grad_input.shape == x.shape and grad_weight.shape == (8, 1, 7, 7) and grad_bias.shape == (8,)
    assert not any(op.startswith('fat_kernels.') for op in strided_recorder.ops)
    assert strided_y.shape == (4, 8, 7, 8)


# The CUDA kernels' source, run on the CPU emulation.

@pytest.fixture(scope='session')
def emulation(tmp_path_factory):
    compiler = shutil.which('g++')
    if compiler is None:
        pytest.skip('the kernels emulation needs g++')
    library = tmp_path_factory.mktemp('dwconv_emulation') / 'emulated_depthwise_conv.so'
    subprocess.run([compiler, '-std=c++20', '-O1', '-pthread', '-shared', '-fPIC', '-Wall', '-Wextra',
                    '-Wno-unknown-pragmas', '-Werror', '-o', str(library), str(EMULATION_SOURCE)], check=True)
    emulation = ctypes.CDLL(str(library))
    emulation.emulated_last_error.restype = ctypes.c_char_p
    return emulation


_GUARD = 64


def _guarded(tensor):
    """A copy of tensor inside a buffer with NaN guards on either side: reads past it poison the results."""
    storage = torch.full((tensor.numel() + 2 * _GUARD,), float('nan'), dtype=tensor.dtype)
    storage[_GUARD:-_GUARD] = tensor.flatten()
    return storage, storage[_GUARD:-_GUARD].view(tensor.shape)


def _pointer(tensor):
    return ctypes.c_void_p(None if tensor is None else tensor.data_ptr())


def _check(emulation, status):
    assert status == 0, (status, emulation.emulated_last_error())


def emulated_forward(emulation, x, weight, bias, padding, flip_weight=False):
    batch, channels, height, width = x.shape
    kernel_size = weight.shape[-1]
    out_shape = (batch, channels, height + 2 * padding - kernel_size + 1, width + 2 * padding - kernel_size + 1)
    (_, x), (_, weight) = _guarded(x), _guarded(weight)
    bias = None if bias is None else _guarded(bias)[1]
    output_storage, output = _guarded(torch.full(out_shape, float('nan'), dtype=x.dtype))
    launch = {torch.float32: emulation.emulated_forward_float32, torch.float64: emulation.emulated_forward_float64}
    _check(emulation, launch[x.dtype](_pointer(x), _pointer(weight), _pointer(bias), _pointer(output), batch, channels,
                                      height, width, kernel_size, padding, int(flip_weight)))
    assert output_storage[:_GUARD].isnan().all() and output_storage[-_GUARD:].isnan().all(), 'wrote past the output'
    return output


def emulated_weight_grad(emulation, grad_output, x, kernel_size, padding, multiprocessor_count):
    """The gradients of weight and bias, and the number of splits they were summed from."""
    batch, channels, height, width = x.shape
    splits = emulation.emulated_weight_grad_splits(batch, channels, height, width, kernel_size, padding,
                                                   x.element_size(), multiprocessor_count)
    partial_sums = torch.full((splits, channels, kernel_size ** 2 + 1), float('nan'), dtype=x.dtype)
    (_, grad_output), (_, x) = _guarded(grad_output), _guarded(x)
    launch = {torch.float32: emulation.emulated_weight_grad_float32,
              torch.float64: emulation.emulated_weight_grad_float64}
    _check(emulation, launch[x.dtype](_pointer(grad_output), _pointer(x), _pointer(partial_sums), batch, channels,
                                      height, width, kernel_size, padding, multiprocessor_count))
    sums = partial_sums.sum(0)
    return sums[:, :-1].reshape(channels, 1, kernel_size, kernel_size), sums[:, -1], splits


# (batch, channels, height, width, kernel size, padding, dtype, multiprocessor count); the comments say what
# each adds in the tilings of kernels/csrc/depthwise_conv.h.
EMULATED_CASES = [
    (2, 3, 9, 9, 3, 1, torch.float64, 2),  # several planes per forward block, two images per item
    (1, 2, 70, 67, 3, 1, torch.float64, 2),  # forward 3 x 2 tiles a plane, weight grad 2 x 2 tiles and 4 splits
    (40, 3, 7, 7, 9, 4, torch.float64, 1),  # FAT's 9x9 on 7x7: a partial last block of planes, partial image block
    (40, 4, 7, 7, 9, 4, torch.float64, 1),  # 3 items on 2 splits: one split takes two
    (3, 4, 14, 14, 7, 3, torch.float32, 100),  # FAT's 7x7 on 14x14, in float
    (2, 3, 13, 11, 5, 0, torch.float64, 50),  # no padding; odd sizes
    (2, 3, 6, 5, 7, 6, torch.float64, 2),  # the largest padding: output larger than the input
    (2, 2, 40, 40, 31, 15, torch.float64, 3),  # the largest kernel: two reduction passes in double
    (1, 1, 33, 9, 31, 15, torch.float32, 1),  # the largest kernel in float
]


@pytest.mark.parametrize('batch, channels, height, width, kernel_size, padding, dtype, multiprocessors',
                         EMULATED_CASES)
def test_emulated_kernels_equal_conv2d_autograd(emulation, batch, channels, height, width, kernel_size, padding,
                                                dtype, multiprocessors):
    x = torch.randn(batch, channels, height, width, dtype=dtype, requires_grad=True)
    weight = torch.randn(channels, 1, kernel_size, kernel_size, dtype=dtype, requires_grad=True)
    bias = torch.randn(channels, dtype=dtype, requires_grad=True)
    y = F.conv2d(x, weight, bias, padding=padding, groups=channels)
    grad_output = torch.randn_like(y)
    grad_x, grad_weight, grad_bias = torch.autograd.grad(y, (x, weight, bias), grad_output)
    x, weight, bias = x.detach(), weight.detach(), bias.detach()

    tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(emulated_forward(emulation, x, weight, bias, padding), y.detach(), **tolerance)
    # what dwconv2d_grad_input launches: the forward kernel, rotated weights, padding k - 1 - padding
    torch.testing.assert_close(emulated_forward(emulation, grad_output, weight, None, kernel_size - 1 - padding,
                                                flip_weight=True), grad_x, **tolerance)
    emulated_grad_weight, emulated_grad_bias, _ = emulated_weight_grad(emulation, grad_output, x, kernel_size, padding,
                                                                       multiprocessors)
    torch.testing.assert_close(emulated_grad_weight, grad_weight, **tolerance)
    torch.testing.assert_close(emulated_grad_bias, grad_bias, **tolerance)


def test_emulated_weight_grad_splits_follow_the_multiprocessor_count(emulation):
    """Eight blocks per multiprocessor, at most one split per work item; the sum does not depend on it."""
    x = torch.randn(1, 8, 70, 67, dtype=torch.float64)  # 2 x 2 tiles: 4 items per channel
    grad_output = torch.randn_like(x)
    results = [emulated_weight_grad(emulation, grad_output, x, 3, 1, multiprocessors) for multiprocessors in (1, 3, 50)]
    assert [splits for _, _, splits in results] == [1, 3, 4]
    for grad_weight, grad_bias, _ in results[1:]:
        torch.testing.assert_close(grad_weight, results[0][0])
        torch.testing.assert_close(grad_bias, results[0][1])


def test_emulation_reports_a_kernel_size_it_has_no_kernel_for(emulation):
    x = torch.randn(1, 1, 11, 11)
    weight = torch.randn(1, 1, 11, 11)
    output = torch.empty(1, 1, 11, 11)
    assert 11 not in EMULATED_KERNEL_SIZES
    assert emulation.emulated_forward_float32(_pointer(x), _pointer(weight), _pointer(None), _pointer(output),
                                              1, 1, 11, 11, 11, 5, 0) == 1


# The CUDA kernels on a GPU. Tolerances: one rounding of the float32 accumulation to the dtype.

_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-12}


def _assert_close_to_reference(actual, expected, dtype):
    tolerance = _TOLERANCE[dtype]
    assert actual.dtype == dtype
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance,
                               atol=tolerance * max(expected.abs().max().item(), 1e-30))


def _check_against_float64_reference(x, weight, bias, padding, grad_output=None):
    """The extension's forward and backward against F.conv2d in float64 on the same (rounded) values."""
    dtype = x.dtype
    channels = x.shape[1]
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = kernels.dwconv2d(leaves[0], leaves[1], leaves[2], padding)
    grad_output = torch.randn_like(y) if grad_output is None else grad_output
    grads = torch.autograd.grad(y, leaves, grad_output)
    references = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = F.conv2d(references[0], references[1], references[2], padding=padding, groups=channels)
    expected_grads = torch.autograd.grad(expected, references, grad_output.double())
    _assert_close_to_reference(y, expected.detach(), dtype)
    for actual, reference in zip(grads, expected_grads):
        _assert_close_to_reference(actual, reference, dtype)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize('kernel_size, padding', [(3, 1), (7, 3), (7, 0), (7, 6), (9, 4), (31, 15)])
def test_gpu_gradcheck_float64(kernel_size, padding):
    inputs = (torch.randn(2, 3, 8, 9, dtype=torch.float64, device='cuda', requires_grad=True),
              torch.randn(3, 1, kernel_size, kernel_size, dtype=torch.float64, device='cuda', requires_grad=True),
              torch.randn(3, dtype=torch.float64, device='cuda', requires_grad=True))
    assert torch.autograd.gradcheck(lambda *args: kernels.dwconv2d(*args, padding), inputs)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize('batch, channels, height, width, kernel_size', [
    (2, 32, 56, 56, 3), (2, 80, 28, 28, 5), (4, 160, 14, 14, 7), (4, 256, 7, 7, 9),  # FAT-B0's stages
    (3, 5, 13, 17, 7), (2, 3, 37, 70, 31), (2, 6, 9, 130, 11), (1, 8, 14, 14, 7), (256, 8, 7, 7, 9),
    (256, 4, 14, 14, 7)])
def test_gpu_kernels_match_float64_reference(dtype, batch, channels, height, width, kernel_size):
    x = torch.randn(batch, channels, height, width, device='cuda', dtype=dtype)
    weight = torch.randn(channels, 1, kernel_size, kernel_size, device='cuda', dtype=dtype)
    bias = torch.randn(channels, device='cuda', dtype=dtype)
    _check_against_float64_reference(x, weight, bias, kernel_size // 2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize('padding', [0, 1, 6])
def test_gpu_any_padding_below_the_kernel_size(padding):
    x = torch.randn(3, 4, 11, 12, device='cuda', dtype=torch.float16)
    weight = torch.randn(4, 1, 7, 7, device='cuda', dtype=torch.float16)
    bias = torch.randn(4, device='cuda', dtype=torch.float16)
    _check_against_float64_reference(x, weight, bias, padding)


@pytest.mark.gpu
@needs_gpu
def test_gpu_non_contiguous_inputs():
    x = torch.randn(2, 12, 15, 30, device='cuda', dtype=torch.float16)[:, ::2, :, ::2]
    weight = torch.randn(6, 1, 7, 7, device='cuda', dtype=torch.float16).transpose(2, 3)
    bias = torch.randn(12, device='cuda', dtype=torch.float16)[::2]
    grad_output = torch.randn(2, 6, 15, 15, device='cuda', dtype=torch.float16).transpose(2, 3).contiguous()
    assert not any(t.is_contiguous() for t in (x, weight, bias, grad_output.transpose(2, 3)))
    _check_against_float64_reference(x, weight, bias, 3, grad_output.transpose(2, 3))
    channels_last = torch.randn(2, 6, 15, 15, device='cuda', dtype=torch.float16).to(memory_format=torch.channels_last)
    _check_against_float64_reference(channels_last, weight, bias, 3)


@pytest.mark.gpu
@needs_gpu
def test_gpu_empty_batch():
    x = torch.randn(0, 4, 7, 7, device='cuda', requires_grad=True)
    weight = torch.randn(4, 1, 7, 7, device='cuda', requires_grad=True)
    bias = torch.randn(4, device='cuda', requires_grad=True)
    y = kernels.dwconv2d(x, weight, bias, 3)
    assert y.shape == (0, 4, 7, 7)
    y.sum().backward()
    assert weight.grad.count_nonzero() == 0 and bias.grad.count_nonzero() == 0


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_gpu_module_under_autocast_matches_nn_conv2d(dtype):
    reference, module = depthwise_pair(16, 7, device='cuda')
    x = torch.randn(4, 16, 14, 14, device='cuda')
    with torch.autocast('cuda', dtype=dtype):
        expected, actual = reference(x), module(x)
    assert actual.dtype == expected.dtype == dtype
    tolerance = 2 * _TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    expected.float().square().sum().backward()
    actual.float().square().sum().backward()
    for p, q in zip(module.parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=4 * _TOLERANCE[dtype],
                                   atol=4 * _TOLERANCE[dtype] * q.grad.abs().max().item())


@pytest.mark.gpu
@needs_gpu
def test_gpu_module_compiles_and_matches_eager():
    _, module = depthwise_pair(16, 9, device='cuda')
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(4, 16, 7, 7, device='cuda')
    grad_output = torch.randn(4, 16, 7, 7, device='cuda')
    for eager, traced in zip(forward_backward(module, x, grad_output), forward_backward(compiled, x, grad_output)):
        torch.testing.assert_close(traced, eager)


@pytest.mark.gpu
@needs_gpu
def test_gpu_opcheck():
    x = torch.randn(2, 3, 9, 11, device='cuda', requires_grad=True)
    weight = torch.randn(3, 1, 7, 7, device='cuda', requires_grad=True)
    bias = torch.randn(3, device='cuda', requires_grad=True)
    torch.library.opcheck(torch.ops.fat_kernels.dwconv2d.default, (x, weight, bias, 3))
    grad_output = torch.randn(2, 3, 9, 11, device='cuda')
    torch.library.opcheck(torch.ops.fat_kernels.dwconv2d_grad_input.default, (grad_output, weight.detach(), 3))
    torch.library.opcheck(torch.ops.fat_kernels.dwconv2d_grad_weight.default, (grad_output, x.detach(), 7, 3))


@pytest.mark.gpu
@needs_gpu
def test_gpu_op_rejects_tensors_off_the_gpu():
    x = torch.randn(1, 4, 9, 9, device='cuda')
    with pytest.raises(ValueError, match='weight is on cpu but input on cuda:0'):
        torch.ops.fat_kernels.dwconv2d(x, torch.randn(4, 1, 3, 3), None, 1)
    with pytest.raises(ValueError, match='input must be a CUDA tensor, got one on cpu'):
        torch.ops.fat_kernels.dwconv2d(x.cpu(), torch.randn(4, 1, 3, 3, device='cuda'), None, 1)
