// The extension's kernels and launchers, built for the CPU emulation (cuda_emulation.h) with a C
// interface for tests/test_kernels.py. Only the kernel sizes below are compiled, to keep the build short:
// the smallest, FAT's, and the largest (several reduction passes in double).
#include "cuda_emulation.h"

#define DWCONV_KERNEL_SIZES(X) X(3) X(5) X(7) X(9) X(31)
#include "../depthwise_conv_kernels.cuh"

#include <exception>
#include <string>

namespace {

std::string last_error;

using fat_kernels::ConvGeometry;

// 0: done; 1: no kernel compiled for this size; 2: the emulation raised (see emulated_last_error).
template <typename Launch>
int run(Launch&& launch) {
  try {
    return launch() ? 0 : 1;
  } catch (const std::exception& error) {
    last_error = error.what();
    return 2;
  }
}

template <typename scalar_t>
int forward(const void* input, const void* weight, const void* bias, void* output, int batch, int channels,
            int height, int width, int kernel_size, int padding, int flip_weight) {
  const ConvGeometry geometry = fat_kernels::make_geometry(batch, channels, height, width, kernel_size, padding);
  return run([&] {
    return fat_kernels::launch_forward<scalar_t>(
        static_cast<const scalar_t*>(input), static_cast<const scalar_t*>(weight),
        static_cast<const scalar_t*>(bias), static_cast<scalar_t*>(output), geometry, flip_weight != 0, nullptr);
  });
}

template <typename scalar_t>
int weight_grad(const void* grad_output, const void* input, void* partial_sums, int batch, int channels,
                int height, int width, int kernel_size, int padding, int multiprocessor_count) {
  const ConvGeometry geometry = fat_kernels::make_geometry(batch, channels, height, width, kernel_size, padding);
  const auto tiling = fat_kernels::weight_grad_tiling(geometry, sizeof(scalar_t), multiprocessor_count);
  return run([&] {
    return fat_kernels::launch_weight_grad<scalar_t>(static_cast<const scalar_t*>(grad_output),
                                                     static_cast<const scalar_t*>(input),
                                                     static_cast<scalar_t*>(partial_sums), geometry, tiling, nullptr);
  });
}

}  // namespace

extern "C" {

const char* emulated_last_error() { return last_error.c_str(); }

int emulated_forward_float32(const void* input, const void* weight, const void* bias, void* output, int batch,
                             int channels, int height, int width, int kernel_size, int padding, int flip_weight) {
  return forward<float>(input, weight, bias, output, batch, channels, height, width, kernel_size, padding,
                        flip_weight);
}

int emulated_forward_float64(const void* input, const void* weight, const void* bias, void* output, int batch,
                             int channels, int height, int width, int kernel_size, int padding, int flip_weight) {
  return forward<double>(input, weight, bias, output, batch, channels, height, width, kernel_size, padding,
                         flip_weight);
}

// The number of splits, i.e. the leading size of partial_sums: [splits, channels, kernel_size ** 2 + 1].
int emulated_weight_grad_splits(int batch, int channels, int height, int width, int kernel_size, int padding,
                                int element_size, int multiprocessor_count) {
  const ConvGeometry geometry = fat_kernels::make_geometry(batch, channels, height, width, kernel_size, padding);
  return fat_kernels::weight_grad_tiling(geometry, element_size, multiprocessor_count).splits;
}

int emulated_weight_grad_float32(const void* grad_output, const void* input, void* partial_sums, int batch,
                                 int channels, int height, int width, int kernel_size, int padding,
                                 int multiprocessor_count) {
  return weight_grad<float>(grad_output, input, partial_sums, batch, channels, height, width, kernel_size, padding,
                            multiprocessor_count);
}

int emulated_weight_grad_float64(const void* grad_output, const void* input, void* partial_sums, int batch,
                                 int channels, int height, int width, int kernel_size, int padding,
                                 int multiprocessor_count) {
  return weight_grad<double>(grad_output, input, partial_sums, batch, channels, height, width, kernel_size,
                             padding, multiprocessor_count);
}

}  // extern "C"
