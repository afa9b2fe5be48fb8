// The depthwise-convolution kernels and their launchers (layouts: depthwise_conv.h).
//
// Compiled by nvcc for the extension, and by a host compiler against emulation/cuda_emulation.h for the
// CPU tests, which defines DWCONV_EMULATION, DWCONV_LAUNCH and dynamic_shared_memory() itself. The code
// therefore keeps to what the emulation provides: 1-D blocks, dynamic shared memory and __syncthreads(),
// reached by every thread of a block.
#pragma once

#include <type_traits>

#include "depthwise_conv.h"

#ifndef DWCONV_EMULATION
#define DWCONV_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  kernel<<<grid, block, shared_bytes, static_cast<cudaStream_t>(stream)>>>(__VA_ARGS__)

__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char shared_memory_bytes[];
  return shared_memory_bytes;
}
#endif

// The kernel sizes with a compiled kernel; the CPU emulation compiles a subset to build quickly.
#ifndef DWCONV_KERNEL_SIZES
#define DWCONV_KERNEL_SIZES(X) \
  X(3) X(5) X(7) X(9) X(11) X(13) X(15) X(17) X(19) X(21) X(23) X(25) X(27) X(29) X(31)
#endif

namespace fat_kernels {

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kBlockThreads)
    depthwise_forward_kernel(const scalar_t* __restrict__ input, const scalar_t* __restrict__ weight,
                             const scalar_t* __restrict__ bias, scalar_t* __restrict__ output,
                             const ConvGeometry g, const ForwardTiling t, const bool flip_weight) {
  using acc_t = typename AccumulatorType<scalar_t>::type;
  constexpr int kOutputs = kOutputsPerThread;
  constexpr int kWindow = kOutputs + K - 1;
  acc_t* const tiles = reinterpret_cast<acc_t*>(dynamic_shared_memory());
  acc_t* const weights = tiles + t.planes_per_block * t.plane_stride;

  const int thread = threadIdx.x;
  const int threads = blockDim.x;
  const int first_plane = blockIdx.x * t.planes_per_block;
  const int block_planes = min_of(t.planes_per_block, g.batch * g.channels - first_plane);
  const int tile_row = blockIdx.y * t.tile_height;
  const int tile_col = blockIdx.z * t.tile_width;

  for (TileCursor at(K, K, thread, threads); at.plane < block_planes; at.advance()) {
    const int channel = (first_plane + at.plane) % g.channels;
    const int tap = at.row * K + at.col;
    const int source_tap = flip_weight ? K * K - 1 - tap : tap;
    weights[at.plane * K * K + tap] = static_cast<acc_t>(weight[channel * K * K + source_tap]);
  }
  const int64_t in_plane_size = static_cast<int64_t>(g.in_height) * g.in_width;
  for (TileCursor at(t.input_rows, t.input_cols, thread, threads); at.plane < block_planes; at.advance()) {
    const int y = tile_row - g.padding + at.row;
    const int x = tile_col - g.padding + at.col;
    acc_t value = 0;
    if (y >= 0 && y < g.in_height && x >= 0 && x < g.in_width) {
      value = static_cast<acc_t>(input[(first_plane + at.plane) * in_plane_size + y * g.in_width + x]);
    }
    tiles[at.plane * t.plane_stride + at.row * t.input_pitch + at.col] = value;
  }
  __syncthreads();

  // Consecutive threads take consecutive rows: with an odd pitch their reads fall in different banks.
  const int row = thread % t.tile_height;
  const int column_group = thread / t.tile_height % t.column_threads;
  const int plane = thread / (t.tile_height * t.column_threads);
  const bool active = plane < block_planes;
  acc_t sums[kOutputs];
  const acc_t initial =
      active && bias != nullptr ? static_cast<acc_t>(bias[(first_plane + plane) % g.channels]) : acc_t(0);
#pragma unroll
  for (int i = 0; i < kOutputs; ++i) sums[i] = initial;
  if (active) {
    const acc_t* const in = tiles + plane * t.plane_stride + row * t.input_pitch + column_group * kOutputs;
    const acc_t* const w = weights + plane * K * K;
#pragma unroll 1
    for (int kh = 0; kh < K; ++kh) {
      acc_t window[kWindow];
#pragma unroll
      for (int j = 0; j < kWindow; ++j) window[j] = in[kh * t.input_pitch + j];
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const acc_t tap_weight = w[kh * K + kw];
#pragma unroll
        for (int i = 0; i < kOutputs; ++i) sums[i] += tap_weight * window[i + kw];
      }
    }
  }
  __syncthreads();  // every thread is done reading the input tiles the outputs overwrite
  if (active) {
    acc_t* const staged = tiles + plane * t.plane_stride + row * t.output_pitch + column_group * kOutputs;
#pragma unroll
    for (int i = 0; i < kOutputs; ++i) staged[i] = sums[i];
  }
  __syncthreads();

  const int rows_here = min_of(t.tile_height, g.out_height - tile_row);
  const int cols_here = min_of(t.tile_width, g.out_width - tile_col);
  const int64_t out_plane_size = static_cast<int64_t>(g.out_height) * g.out_width;
  for (TileCursor at(rows_here, cols_here, thread, threads); at.plane < block_planes; at.advance()) {
    output[(first_plane + at.plane) * out_plane_size + (tile_row + at.row) * g.out_width + tile_col + at.col] =
        static_cast<scalar_t>(tiles[at.plane * t.plane_stride + at.row * t.output_pitch + at.col]);
  }
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kBlockThreads)
    depthwise_weight_grad_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ input,
                                 typename AccumulatorType<scalar_t>::type* __restrict__ partial_sums,
                                 const ConvGeometry g, const WeightGradTiling t) {
  using acc_t = typename AccumulatorType<scalar_t>::type;
  constexpr int kColumns = kColumnsPerStep;
  constexpr int kWindow = kColumns + K - 1;
  constexpr int kTaps = K * K + 1;  // the weights, then the bias
  constexpr int kTapsPerThread = (kTaps + kBlockThreads - 1) / kBlockThreads;
  acc_t* const input_tiles = reinterpret_cast<acc_t*>(dynamic_shared_memory());
  acc_t* const grad_tiles = input_tiles + t.images_per_item * t.input_plane_stride;

  const int thread = threadIdx.x;
  const int channel = blockIdx.x;
  const int split = blockIdx.y;
  // Consecutive threads take consecutive rows of the same kernel row: different banks (odd pitches).
  const int kh = thread / t.row_groups;
  const int row_group = thread % t.row_groups;
  const bool computes = kh < K;
  const int tiles_per_image = t.tiles_high * t.tiles_wide;
  const int64_t in_plane_size = static_cast<int64_t>(g.in_height) * g.in_width;
  const int64_t out_plane_size = static_cast<int64_t>(g.out_height) * g.out_width;

  acc_t sums[K];
#pragma unroll
  for (int kw = 0; kw < K; ++kw) sums[kw] = 0;
  acc_t bias_sum = 0;
  for (int item = split; item < t.items_per_channel; item += t.splits) {
    const int first_image = item / tiles_per_image * t.images_per_item;
    const int tile = item % tiles_per_image;
    const int tile_row = tile / t.tiles_wide * t.tile_height;
    const int tile_col = tile % t.tiles_wide * t.tile_width;
    const int images = min_of(t.images_per_item, g.batch - first_image);
    const int64_t first_plane = static_cast<int64_t>(first_image) * g.channels + channel;

    for (TileCursor at(t.input_rows, t.input_cols, thread, kBlockThreads); at.plane < images; at.advance()) {
      const int y = tile_row - g.padding + at.row;
      const int x = tile_col - g.padding + at.col;
      acc_t value = 0;
      if (y >= 0 && y < g.in_height && x >= 0 && x < g.in_width) {
        value = static_cast<acc_t>(
            input[(first_plane + static_cast<int64_t>(at.plane) * g.channels) * in_plane_size + y * g.in_width + x]);
      }
      input_tiles[at.plane * t.input_plane_stride + at.row * t.input_pitch + at.col] = value;
    }
    for (TileCursor at(t.tile_height, t.tile_width, thread, kBlockThreads); at.plane < images; at.advance()) {
      const int y = tile_row + at.row;
      const int x = tile_col + at.col;
      acc_t value = 0;
      if (y < g.out_height && x < g.out_width) {
        value = static_cast<acc_t>(
            grad_output[(first_plane + static_cast<int64_t>(at.plane) * g.channels) * out_plane_size +
                        y * g.out_width + x]);
      }
      grad_tiles[at.plane * t.grad_plane_stride + at.row * t.grad_pitch + at.col] = value;
    }
    __syncthreads();

    if (computes) {
      const int rows = images * t.tile_height;
#pragma unroll 1
      for (int row = row_group; row < rows; row += t.row_groups) {
        const int image = row / t.tile_height;
        const int r = row % t.tile_height;
        const acc_t* const in = input_tiles + image * t.input_plane_stride + (r + kh) * t.input_pitch;
        const acc_t* const grad = grad_tiles + image * t.grad_plane_stride + r * t.grad_pitch;
#pragma unroll 1
        for (int col = 0; col < t.tile_width; col += kColumns) {
          acc_t window[kWindow];
          acc_t grads[kColumns];
#pragma unroll
          for (int j = 0; j < kWindow; ++j) window[j] = in[col + j];
#pragma unroll
          for (int j = 0; j < kColumns; ++j) grads[j] = grad[col + j];
#pragma unroll
          for (int j = 0; j < kColumns; ++j) {
#pragma unroll
            for (int kw = 0; kw < K; ++kw) sums[kw] += grads[j] * window[j + kw];
          }
          if (kh == 0) {
#pragma unroll
            for (int j = 0; j < kColumns; ++j) bias_sum += grads[j];
          }
        }
      }
    }
    __syncthreads();  // the next item's loads overwrite the tiles
  }

  acc_t totals[kTapsPerThread];
#pragma unroll
  for (int m = 0; m < kTapsPerThread; ++m) totals[m] = 0;
  acc_t* const reduction = input_tiles;
  for (int first_group = 0; first_group < t.row_groups; first_group += t.groups_per_pass) {
    const int groups = min_of(t.groups_per_pass, t.row_groups - first_group);
    if (computes && row_group >= first_group && row_group < first_group + groups) {
      acc_t* const slot = reduction + (row_group - first_group) * t.reduction_pitch;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) slot[kh * K + kw] = sums[kw];
      if (kh == 0) slot[K * K] = bias_sum;
    }
    __syncthreads();
#pragma unroll
    for (int m = 0; m < kTapsPerThread; ++m) {
      const int tap = thread + m * kBlockThreads;
      if (tap < kTaps) {
        for (int group = 0; group < groups; ++group) totals[m] += reduction[group * t.reduction_pitch + tap];
      }
    }
    __syncthreads();  // the next pass overwrites the slots
  }
  acc_t* const block_sums = partial_sums + (static_cast<int64_t>(split) * g.channels + channel) * kTaps;
#pragma unroll
  for (int m = 0; m < kTapsPerThread; ++m) {
    const int tap = thread + m * kBlockThreads;
    if (tap < kTaps) block_sums[tap] = totals[m];
  }
}

// Calls function(std::integral_constant<int, k>()) for a compiled kernel size k; false for any other.
template <typename Function>
bool dispatch_kernel_size(int kernel_size, Function&& function) {
  switch (kernel_size) {
#define DWCONV_KERNEL_SIZE_CASE(k)               \
  case k:                                        \
    function(std::integral_constant<int, k>()); \
    return true;
    DWCONV_KERNEL_SIZES(DWCONV_KERNEL_SIZE_CASE)
#undef DWCONV_KERNEL_SIZE_CASE
    default:
      return false;
  }
}

template <typename scalar_t>
bool launch_forward(const scalar_t* input, const scalar_t* weight, const scalar_t* bias, scalar_t* output,
                    const ConvGeometry& geometry, bool flip_weight, void* stream) {
  using acc_t = typename AccumulatorType<scalar_t>::type;
  const ForwardTiling tiling = forward_tiling(geometry, sizeof(acc_t));
  return dispatch_kernel_size(geometry.kernel_size, [&](auto kernel_size) {
    const auto kernel = depthwise_forward_kernel<scalar_t, decltype(kernel_size)::value>;
    const dim3 grid(tiling.grid_x, tiling.grid_y, tiling.grid_z);
    DWCONV_LAUNCH(kernel, grid, dim3(tiling.threads), tiling.shared_bytes, stream, input, weight, bias, output,
                  geometry, tiling, flip_weight);
  });
}

template <typename scalar_t>
bool launch_weight_grad(const scalar_t* grad_output, const scalar_t* input,
                        typename AccumulatorType<scalar_t>::type* partial_sums, const ConvGeometry& geometry,
                        const WeightGradTiling& tiling, void* stream) {
  return dispatch_kernel_size(geometry.kernel_size, [&](auto kernel_size) {
    const auto kernel = depthwise_weight_grad_kernel<scalar_t, decltype(kernel_size)::value>;
    const dim3 grid(tiling.grid_x, tiling.grid_y);
    DWCONV_LAUNCH(kernel, grid, dim3(kBlockThreads), tiling.shared_bytes, stream, grad_output, input,
                  partial_sums, geometry, tiling);
  });
}

}  // namespace fat_kernels
