// A CPU stand-in for the part of CUDA that depthwise_conv_kernels.cuh uses, so that the tests can run the
// kernels' own source on a machine without a GPU: each thread of a block is a std::thread,
// __syncthreads() is a std::barrier, and dynamic shared memory is a buffer that starts out as NaN bytes
// (a read before any write shows up as NaN in the results) followed by a guard zone that must still hold
// them when the block is done (a write past the end is reported).
#pragma once

#define DWCONV_EMULATION

#include <algorithm>
#include <barrier>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

namespace emulation {

inline thread_local dim3 thread_index;
inline thread_local dim3 block_index;
inline dim3 block_dim;
inline thread_local unsigned char* block_shared_memory = nullptr;
inline thread_local std::barrier<>* block_barrier = nullptr;

constexpr unsigned char kUnwrittenByte = 0xFF;  // every float and double made of these bytes is a NaN
constexpr std::size_t kGuardBytes = 4096;

template <typename... Parameters, typename... Arguments>
void launch(void (*kernel)(Parameters...), dim3 grid, dim3 block, std::size_t shared_bytes,
            Arguments... arguments) {
  if (block.y != 1 || block.z != 1) throw std::invalid_argument("the emulation runs 1-D blocks only");
  if (block.x == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::invalid_argument("empty launch");
  block_dim = block;
  std::vector<unsigned char> shared(shared_bytes + kGuardBytes);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        std::fill(shared.begin(), shared.end(), kUnwrittenByte);
        std::barrier<> barrier(block.x);
        std::vector<std::thread> threads;
        threads.reserve(block.x);
        for (unsigned t = 0; t < block.x; ++t) {
          threads.emplace_back([&, t] {
            thread_index = dim3(t);
            block_index = dim3(x, y, z);
            block_shared_memory = shared.data();
            block_barrier = &barrier;
            kernel(arguments...);
          });
        }
        for (std::thread& thread : threads) thread.join();
        const bool guard_intact = std::all_of(shared.begin() + shared_bytes, shared.end(),
                                              [](unsigned char byte) { return byte == kUnwrittenByte; });
        if (!guard_intact) {
          throw std::runtime_error("block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                                   std::to_string(z) + ") wrote past its " + std::to_string(shared_bytes) +
                                   " bytes of shared memory");
        }
      }
    }
  }
}

}  // namespace emulation

#define threadIdx (::emulation::thread_index)
#define blockIdx (::emulation::block_index)
#define blockDim (::emulation::block_dim)

inline void __syncthreads() { emulation::block_barrier->arrive_and_wait(); }

inline unsigned char* dynamic_shared_memory() { return emulation::block_shared_memory; }

#define DWCONV_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  (static_cast<void>(stream), ::emulation::launch(kernel, grid, block, shared_bytes, __VA_ARGS__))
