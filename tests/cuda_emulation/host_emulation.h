// The CUDA built-ins used by csrc/cuda/compress_kernel.cuh, emulated on the host so the block
// algorithm runs (and is tested) without a GPU: every CUDA thread of a block is a std::thread,
// __syncthreads is a std::barrier over the block, and warp shuffles / ballots exchange values
// through a per-warp buffer between two barrier phases over the warp's 32 threads. Blocks run one
// after the other, so the dynamic shared memory is one buffer. Warp primitives require all 32
// lanes to call them (full mask), as the kernel does; a divergent call deadlocks (the test has a
// timeout). Include this before the kernel header, in host-only C++20.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

namespace vz_emulation {

struct Warp {
  std::barrier<> bar{32};
  uint64_t buf[32];
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<uint64_t> smem;  // 8-byte words, so the buffer is 16-byte aligned in practice
};

inline Block* current_block = nullptr;

}  // namespace vz_emulation

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline uint3 blockDim;
inline uint3 gridDim;

inline unsigned char* vz_emulation_dynamic_smem() {
  return reinterpret_cast<unsigned char*>(vz_emulation::current_block->smem.data());
}

inline void __syncthreads() { vz_emulation::current_block->bar->arrive_and_wait(); }

namespace vz_emulation {
inline Warp& my_warp() { return *current_block->warps[threadIdx.x / 32]; }

template <typename T, typename SrcLane>
T exchange(T v, SrcLane src_of) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  Warp& w = my_warp();
  const int lane = int(threadIdx.x % 32);
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  w.buf[lane] = raw;
  w.bar.arrive_and_wait();
  const uint64_t got = w.buf[src_of(lane)];
  w.bar.arrive_and_wait();  // nobody overwrites buf before every lane has read it
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}
}  // namespace vz_emulation

template <typename T>
T __shfl_xor_sync(unsigned, T v, int m) {
  return vz_emulation::exchange(v, [m](int lane) { return lane ^ m; });
}
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned d) {
  return vz_emulation::exchange(v, [d](int lane) { return lane >= int(d) ? lane - int(d) : lane; });
}
template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return vz_emulation::exchange(v, [src](int) { return src & 31; });
}

inline unsigned __ballot_sync(unsigned, int pred) {
  vz_emulation::Warp& w = vz_emulation::my_warp();
  const int lane = int(threadIdx.x % 32);
  w.buf[lane] = pred ? 1 : 0;
  w.bar.arrive_and_wait();
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= unsigned(w.buf[i]) << i;
  w.bar.arrive_and_wait();
  return bits;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }

namespace vz_emulation {

// Runs fn() as a grid of grid x grid_y blocks of `threads` threads with `smem_bytes` of shared memory,
// one block after the other (x fastest).
inline void launch(unsigned grid, unsigned threads, size_t smem_bytes, const std::function<void()>& fn,
                   unsigned grid_y = 1) {
  gridDim = uint3{grid, grid_y, 1};
  blockDim = uint3{threads, 1, 1};
  for (unsigned by = 0; by < grid_y; ++by) {
    for (unsigned blk = 0; blk < grid; ++blk) {
      Block block;
      block.bar = std::make_unique<std::barrier<>>(threads);
      for (unsigned w = 0; w < threads / 32; ++w) block.warps.push_back(std::make_unique<Warp>());
      // Poison the shared memory, so reading what the kernel never wrote shows up in the results.
      block.smem.assign(smem_bytes / 8 + 2, 0xA5A5A5A5A5A5A5A5ull);
      current_block = &block;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          threadIdx = uint3{t, 0, 0};
          blockIdx = uint3{blk, by, 0};
          fn();
        });
      }
      for (auto& th : pool) th.join();
      current_block = nullptr;
    }
  }
}

}  // namespace vz_emulation
