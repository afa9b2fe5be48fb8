// Depthwise 2-D convolution (groups == channels, stride 1, NCHW, odd square kernels): the launch
// geometry shared by the CUDA kernels, the torch op that launches them and the CPU emulation that
// tests them. Plain C++, so that a host compiler can build it without the CUDA toolkit.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define DWCONV_HOST_DEVICE __host__ __device__
#else
#define DWCONV_HOST_DEVICE
#endif

namespace fat_kernels {

constexpr int kMinKernelSize = 3;
constexpr int kMaxKernelSize = 31;
// Every block has at most this many threads; the weight-gradient kernel always has exactly this many.
constexpr int kBlockThreads = 256;
// Forward: a thread computes this many adjacent outputs of one row, reusing a register window of inputs.
constexpr int kOutputsPerThread = 8;
// Forward: threads across one tile row, so a tile is at most 64 outputs wide.
constexpr int kMaxColumnThreads = 8;
// Weight gradient: output columns a thread takes in one step over a row (one register window).
constexpr int kColumnsPerStep = 8;
constexpr int kMaxWeightGradTileWidth = 64;
// Weight gradient: output rows each thread should get per work item, to amortise the tile loads.
constexpr int kWeightGradRowsPerThread = 4;
// Weight gradient: blocks per multiprocessor to aim for; eight blocks of 256 threads fill one.
constexpr int kWeightGradBlocksPerMultiprocessor = 8;
// The dynamic shared memory a block may take without opting in to more.
constexpr std::size_t kSharedMemoryBudget = 48 * 1024;
constexpr int kMaxGridY = 65535;

template <typename scalar_t>
struct AccumulatorType {
  using type = float;
};
template <>
struct AccumulatorType<double> {
  using type = double;
};

DWCONV_HOST_DEVICE inline int min_of(int a, int b) { return a < b ? a : b; }
DWCONV_HOST_DEVICE inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
// Shared-memory rows of odd pitch: threads reading the same column of different rows hit different banks.
inline int odd_at_least(int value) { return value | 1; }

struct ConvGeometry {
  int batch;
  int channels;
  int in_height;
  int in_width;
  int out_height;
  int out_width;
  int kernel_size;
  int padding;
};

inline ConvGeometry make_geometry(int batch, int channels, int in_height, int in_width, int kernel_size,
                                  int padding) {
  return {batch,
          channels,
          in_height,
          in_width,
          in_height + 2 * padding - kernel_size + 1,
          in_width + 2 * padding - kernel_size + 1,
          kernel_size,
          padding};
}

// Walks a block's share of the elements of `planes` row-major rows x cols tiles: starts at element
// `start` and advances by `step` elements with no division per element.
struct TileCursor {
  int plane, row, col;
  int rows, cols;
  int plane_step, row_step, col_step;

  DWCONV_HOST_DEVICE TileCursor(int rows, int cols, int start, int step) : rows(rows), cols(cols) {
    const int plane_size = rows * cols;
    plane = start / plane_size;
    row = start % plane_size / cols;
    col = start % cols;
    plane_step = step / plane_size;
    row_step = step % plane_size / cols;
    col_step = step % cols;
  }

  DWCONV_HOST_DEVICE void advance() {
    col += col_step;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
    row += row_step;
    if (row >= rows) {
      row -= rows;
      ++plane;
    }
    plane += plane_step;
  }
};

// Forward kernel: a block convolves `planes_per_block` (image, channel) planes over one output tile of
// tile_height x tile_width. It stages each plane's input tile with its halo (input_rows x input_cols, zero
// outside the image) and the plane's weights in shared memory; each thread computes kOutputsPerThread
// adjacent outputs of one row, then the outputs are staged in the input's place for coalesced stores.
struct ForwardTiling {
  int tile_height;
  int tile_width;
  int column_threads;
  int planes_per_block;
  int input_rows;
  int input_cols;
  int input_pitch;
  int plane_stride;
  int output_pitch;
  int threads;
  int grid_x;
  int grid_y;
  int grid_z;
  std::size_t shared_bytes;
};

inline ForwardTiling forward_tiling(const ConvGeometry& g, std::size_t element_size) {
  const int k = g.kernel_size;
  const int budget = static_cast<int>(kSharedMemoryBudget / element_size);
  ForwardTiling t{};
  t.column_threads = min_of(ceil_div(g.out_width, kOutputsPerThread), kMaxColumnThreads);
  t.tile_width = t.column_threads * kOutputsPerThread;
  t.input_cols = t.tile_width + k - 1;
  t.input_pitch = odd_at_least(t.input_cols);
  t.output_pitch = odd_at_least(t.tile_width);
  const int rows_by_threads = kBlockThreads / t.column_threads;
  const int rows_by_memory = (budget - k * k) / t.input_pitch - (k - 1);
  const int max_rows = std::max(1, min_of(rows_by_threads, rows_by_memory));
  t.tile_height = ceil_div(g.out_height, ceil_div(g.out_height, max_rows));
  t.input_rows = t.tile_height + k - 1;
  t.plane_stride = t.input_rows * t.input_pitch;
  const int plane_elements = t.plane_stride + k * k;
  const int threads_per_plane = t.tile_height * t.column_threads;
  const int planes = g.batch * g.channels;
  t.planes_per_block =
      std::max(1, std::min({kBlockThreads / threads_per_plane, budget / plane_elements, planes}));
  t.threads = t.planes_per_block * threads_per_plane;
  t.grid_x = ceil_div(planes, t.planes_per_block);
  t.grid_y = ceil_div(g.out_height, t.tile_height);
  t.grid_z = ceil_div(g.out_width, t.tile_width);
  t.shared_bytes = static_cast<std::size_t>(t.planes_per_block) * plane_elements * element_size;
  return t;
}

// Weight-gradient kernel: block (channel, split) takes work items split, split + splits, ...; an item is
// one output tile (tile_height x tile_width) of images_per_item consecutive images. Thread (kh, row_group)
// accumulates the gradient of weight row kh (and, for kh == 0, of the bias) over the item's output rows
// row_group, row_group + row_groups, ... in registers. At the end the block sums its threads' partial sums
// in shared memory, groups_per_pass row groups at a time, and writes one partial sum per weight and bias
// per split; the op sums the splits.
struct WeightGradTiling {
  int tile_height;
  int tile_width;
  int tiles_high;
  int tiles_wide;
  int images_per_item;
  int items_per_channel;
  int splits;
  int input_rows;
  int input_cols;
  int input_pitch;
  int input_plane_stride;
  int grad_pitch;
  int grad_plane_stride;
  int row_groups;
  int reduction_pitch;
  int groups_per_pass;
  int grid_x;
  int grid_y;
  std::size_t shared_bytes;
};

inline WeightGradTiling weight_grad_tiling(const ConvGeometry& g, std::size_t element_size,
                                           int multiprocessor_count) {
  const int k = g.kernel_size;
  const int budget = static_cast<int>(kSharedMemoryBudget / element_size);
  WeightGradTiling t{};
  t.tile_width =
      min_of(ceil_div(g.out_width, kColumnsPerStep) * kColumnsPerStep, kMaxWeightGradTileWidth);
  t.tiles_wide = ceil_div(g.out_width, t.tile_width);
  t.input_cols = t.tile_width + k - 1;
  t.input_pitch = odd_at_least(t.input_cols);
  t.grad_pitch = odd_at_least(t.tile_width);
  // one image's tile of h output rows takes (h + k - 1) * input_pitch + h * grad_pitch elements
  const int max_rows = std::max(1, (budget - (k - 1) * t.input_pitch) / (t.input_pitch + t.grad_pitch));
  t.tile_height = ceil_div(g.out_height, ceil_div(g.out_height, max_rows));
  t.tiles_high = ceil_div(g.out_height, t.tile_height);
  t.input_rows = t.tile_height + k - 1;
  t.input_plane_stride = t.input_rows * t.input_pitch;
  t.grad_plane_stride = t.tile_height * t.grad_pitch;
  const int image_elements = t.input_plane_stride + t.grad_plane_stride;
  t.row_groups = kBlockThreads / k;
  const int wanted_images = ceil_div(kWeightGradRowsPerThread * t.row_groups, t.tile_height);
  t.images_per_item = std::max(1, std::min({wanted_images, budget / image_elements, g.batch}));
  t.items_per_channel = ceil_div(g.batch, t.images_per_item) * t.tiles_high * t.tiles_wide;
  const int wanted_splits = ceil_div(kWeightGradBlocksPerMultiprocessor * multiprocessor_count, g.channels);
  t.splits = std::max(1, std::min({wanted_splits, t.items_per_channel, kMaxGridY}));
  t.reduction_pitch = odd_at_least(k * k + 1);
  t.groups_per_pass = std::max(1, min_of(t.row_groups, budget / t.reduction_pitch));
  t.grid_x = g.channels;
  t.grid_y = t.splits;
  t.shared_bytes = static_cast<std::size_t>(std::max(t.images_per_item * image_elements,
                                                     t.groups_per_pass * t.reduction_pitch)) *
                   element_size;
  return t;
}

// Launch the forward kernel on `stream` (a cudaStream_t): output = conv(input, weight) + bias, with the
// kernel rotated by 180 degrees when flip_weight is set (the input gradient is the forward convolution
// of the output gradient with the rotated kernel and padding k - 1 - padding). bias may be null.
// Returns false, launching nothing, for a kernel size this build has no kernel for.
template <typename scalar_t>
bool launch_forward(const scalar_t* input, const scalar_t* weight, const scalar_t* bias, scalar_t* output,
                    const ConvGeometry& geometry, bool flip_weight, void* stream);

// Launch the weight-gradient kernel: partial_sums[split][channel][tap] for the k * k weight taps and, at
// tap k * k, the bias. Returns false, launching nothing, for a kernel size this build has no kernel for.
template <typename scalar_t>
bool launch_weight_grad(const scalar_t* grad_output, const scalar_t* input,
                        typename AccumulatorType<scalar_t>::type* partial_sums, const ConvGeometry& geometry,
                        const WeightGradTiling& tiling, void* stream);

}  // namespace fat_kernels
