// torch.ops.fat_kernels: the schemas of the depthwise-convolution ops and their CUDA implementations.
// kernels/ops.py registers the rest (fake and CPU implementations, autograd); its argument checks
// mirror the ones here.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "depthwise_conv.h"

namespace fat_kernels {
namespace {

constexpr int64_t kMaxSpatialSize = 65535;

void check_cuda_floating(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_VALUE(tensor.is_cuda(), "fat_kernels: ", name, " must be a CUDA tensor, got one on ",
                    tensor.device());
  const at::ScalarType dtype = tensor.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
                   "fat_kernels: ", name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

void check_matches(const at::Tensor& tensor, const char* name, const at::Tensor& reference,
                   const char* reference_name) {
  TORCH_CHECK_VALUE(tensor.device() == reference.device(), "fat_kernels: ", name, " is on ", tensor.device(),
                    " but ", reference_name, " on ", reference.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == reference.scalar_type(), "fat_kernels: ", name, " is ",
                   tensor.scalar_type(), " but ", reference_name, " is ", reference.scalar_type());
}

void check_activation(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK_VALUE(tensor.dim() == 4, "fat_kernels: ", name, " must be 4-D (N, C, H, W), got shape ",
                    tensor.sizes());
  check_cuda_floating(tensor, name);
}

int64_t check_kernel_size(int64_t kernel_size) {
  TORCH_CHECK_VALUE(kernel_size % 2 == 1 && kernel_size >= kMinKernelSize && kernel_size <= kMaxKernelSize,
                    "fat_kernels: the kernel size must be odd and in [", kMinKernelSize, ", ", kMaxKernelSize,
                    "], got ", kernel_size);
  return kernel_size;
}

// The kernel size of a depthwise weight [channels, 1, k, k].
int64_t check_weight(const at::Tensor& weight, const at::Tensor& activation, const char* activation_name) {
  const int64_t channels = activation.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == channels && weight.size(1) == 1 &&
                        weight.size(2) == weight.size(3),
                    "fat_kernels: a depthwise convolution (groups == channels) of ", channels,
                    " channels needs a weight of shape [", channels, ", 1, k, k], got ", weight.sizes());
  check_matches(weight, "weight", activation, activation_name);
  return check_kernel_size(weight.size(2));
}

// The geometry of the convolution of an input [batch, channels, height, width].
ConvGeometry checked_geometry(at::IntArrayRef input_sizes, int64_t kernel_size, int64_t padding) {
  TORCH_CHECK_VALUE(padding >= 0 && padding < kernel_size, "fat_kernels: padding must be in [0, ",
                    kernel_size - 1, "] for kernel size ", kernel_size, ", got ", padding);
  const int64_t batch = input_sizes[0], channels = input_sizes[1];
  const int64_t height = input_sizes[2], width = input_sizes[3];
  const int64_t out_height = height + 2 * padding - kernel_size + 1;
  const int64_t out_width = width + 2 * padding - kernel_size + 1;
  TORCH_CHECK_VALUE(out_height >= 1 && out_width >= 1, "fat_kernels: an input of ", height, "x", width,
                    " is smaller than the kernel ", kernel_size, "x", kernel_size, " with padding ", padding);
  TORCH_CHECK_VALUE(std::max(height, width) <= kMaxSpatialSize && std::max(out_height, out_width) <= kMaxSpatialSize,
                    "fat_kernels: spatial sizes up to ", kMaxSpatialSize, " are supported, got ", height, "x", width);
  TORCH_CHECK_VALUE(batch * channels <= std::numeric_limits<int>::max(),
                    "fat_kernels: batch * channels must fit in 32 bits, got ", batch, " * ", channels);
  return make_geometry(static_cast<int>(batch), static_cast<int>(channels), static_cast<int>(height),
                       static_cast<int>(width), static_cast<int>(kernel_size), static_cast<int>(padding));
}

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

int multiprocessor_count(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return count;
}

at::Tensor convolve(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                    const ConvGeometry& geometry, bool flip_weight) {
  auto output = at::empty({geometry.batch, geometry.channels, geometry.out_height, geometry.out_width},
                          input.options());
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fat_kernels::dwconv2d", [&] {
    const bool launched = launch_forward<scalar_t>(
        input.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, output.mutable_data_ptr<scalar_t>(), geometry,
        flip_weight, current_stream());
    TORCH_CHECK(launched, "fat_kernels: no kernel compiled for kernel size ", geometry.kernel_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

at::Tensor dwconv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         int64_t padding) {
  check_activation(input, "input");
  const int64_t kernel_size = check_weight(weight, input, "input");
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == input.size(1), "fat_kernels: bias must have shape [",
                      input.size(1), "], got ", bias->sizes());
    check_matches(*bias, "bias", input, "input");
  }
  const ConvGeometry geometry = checked_geometry(input.sizes(), kernel_size, padding);
  const c10::cuda::CUDAGuard device_guard(input.device());
  return convolve(input.contiguous(), weight.contiguous(), bias.has_value() ? bias->contiguous() : at::Tensor(),
                  geometry, /*flip_weight=*/false);
}

// The gradient of dwconv2d with respect to its input: the convolution of grad_output with the kernel
// rotated by 180 degrees and padding kernel_size - 1 - padding.
at::Tensor dwconv2d_grad_input_cuda(const at::Tensor& grad_output, const at::Tensor& weight, int64_t padding) {
  check_activation(grad_output, "grad_output");
  const int64_t kernel_size = check_weight(weight, grad_output, "grad_output");
  TORCH_CHECK_VALUE(padding >= 0 && padding < kernel_size, "fat_kernels: padding must be in [0, ",
                    kernel_size - 1, "] for kernel size ", kernel_size, ", got ", padding);
  const ConvGeometry geometry = checked_geometry(grad_output.sizes(), kernel_size, kernel_size - 1 - padding);
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  return convolve(grad_output.contiguous(), weight.contiguous(), at::Tensor(), geometry, /*flip_weight=*/true);
}

// The gradients of dwconv2d with respect to its weight [C, 1, k, k] and its bias [C].
std::tuple<at::Tensor, at::Tensor> dwconv2d_grad_weight_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                                             int64_t kernel_size, int64_t padding) {
  check_activation(input, "input");
  check_activation(grad_output, "grad_output");
  check_matches(grad_output, "grad_output", input, "input");
  check_kernel_size(kernel_size);
  const ConvGeometry geometry = checked_geometry(input.sizes(), kernel_size, padding);
  const std::vector<int64_t> output_sizes{geometry.batch, geometry.channels, geometry.out_height, geometry.out_width};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(output_sizes), "fat_kernels: grad_output must have shape ",
                    at::IntArrayRef(output_sizes), " for an input of shape ", input.sizes(), ", got ",
                    grad_output.sizes());
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int64_t taps = kernel_size * kernel_size;
  const at::ScalarType accumulator_dtype = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (geometry.batch == 0 || geometry.channels == 0) {
    return {at::zeros({geometry.channels, 1, kernel_size, kernel_size}, input.options()),
            at::zeros({geometry.channels}, input.options())};
  }
  const auto input_contiguous = input.contiguous();
  const auto grad_contiguous = grad_output.contiguous();
  const int multiprocessors = multiprocessor_count(input.device());
  at::Tensor sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fat_kernels::dwconv2d_grad_weight",
                                  [&] {
    using acc_t = typename AccumulatorType<scalar_t>::type;
    const WeightGradTiling tiling = weight_grad_tiling(geometry, sizeof(acc_t), multiprocessors);
    auto partial_sums =
        at::empty({tiling.splits, geometry.channels, taps + 1}, input.options().dtype(accumulator_dtype));
    const bool launched = launch_weight_grad<scalar_t>(
        grad_contiguous.const_data_ptr<scalar_t>(), input_contiguous.const_data_ptr<scalar_t>(),
        partial_sums.mutable_data_ptr<acc_t>(), geometry, tiling, current_stream());
    TORCH_CHECK(launched, "fat_kernels: no kernel compiled for kernel size ", kernel_size);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sums = partial_sums.sum(0);
  });
  auto grad_weight = sums.narrow(1, 0, taps).reshape({geometry.channels, 1, kernel_size, kernel_size});
  auto grad_bias = sums.select(1, taps);
  return {grad_weight.to(input.scalar_type()).contiguous(), grad_bias.to(input.scalar_type()).contiguous()};
}

}  // namespace
}  // namespace fat_kernels

TORCH_LIBRARY(fat_kernels, m) {
  m.set_python_module("kernels.ops");
  m.def("dwconv2d(Tensor input, Tensor weight, Tensor? bias, int padding) -> Tensor");
  m.def("dwconv2d_grad_input(Tensor grad_output, Tensor weight, int padding) -> Tensor");
  m.def("dwconv2d_grad_weight(Tensor grad_output, Tensor input, int kernel_size, int padding) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fat_kernels, CUDA, m) {
  m.impl("dwconv2d", &fat_kernels::dwconv2d_cuda);
  m.impl("dwconv2d_grad_input", &fat_kernels::dwconv2d_grad_input_cuda);
  m.impl("dwconv2d_grad_weight", &fat_kernels::dwconv2d_grad_weight_cuda);
}

// The module kernels._dwconv_cuda: importing it runs the registrations above.
PyMODINIT_FUNC PyInit__dwconv_cuda() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dwconv_cuda",
                               "CUDA kernels of torch.ops.fat_kernels (depthwise 2-D convolution)", -1, nullptr};
  return PyModule_Create(&module);
}
