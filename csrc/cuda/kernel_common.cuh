// Device helpers shared by the hand-written CUDA kernels (compress_kernel.cuh, group_pool_kernel.cuh):
// the host/device macros, element conversions and 16-byte vector loads, warp and block helpers, the
// NaN test, the channel split of a grid (B, S) and the dtype codes of the launch functions. On raw
// pointers, no torch headers: compiles with plain nvcc and, with tests/cuda_emulation/host_emulation.h
// providing the CUDA built-ins, as host C++.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define VZ_HD __host__ __device__ __forceinline__
#define VZ_DEVICE __device__ __forceinline__
#define VZ_KERNEL(threads, min_blocks) __global__ void __launch_bounds__(threads, min_blocks)
#define VZ_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#else  // host emulation: the including file defines threadIdx, __syncthreads, __shfl_xor_sync, ...
#define VZ_HD inline
#define VZ_DEVICE inline
#define VZ_KERNEL(threads, min_blocks) void
#define VZ_DYNAMIC_SMEM(name) unsigned char* name = vz_emulation_dynamic_smem()
#endif

namespace visionzip {
namespace cuda_kernel {

constexpr int kThreads = 512;         // threads per block of the main kernels (S blocks per image)
constexpr int kMinBlocks = 2;         // <= 64 registers, two blocks per SM
constexpr unsigned kFullMask = 0xffffffffu;

// ---- element conversions and 16-byte vector loads ----

VZ_DEVICE float to_float(float x) { return x; }
VZ_DEVICE float to_float(__half x) { return __half2float(x); }
VZ_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
VZ_DEVICE T from_float(float x);
template <>
VZ_DEVICE float from_float<float>(float x) { return x; }
template <>
VZ_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
VZ_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
constexpr int vec_size() { return int(16 / sizeof(T)); }

VZ_DEVICE bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// V consecutive elements as floats; V > 1 needs a 16-byte aligned p (V == 16 / sizeof(T)).
template <int V, typename T>
VZ_DEVICE void load_floats(const T* p, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_float(p[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T e[V];
    memcpy(e, &raw, 16);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = to_float(e[i]);
  }
}

template <int V, typename T>
VZ_DEVICE void store_floats(T* p, const float (&in)[V]) {
  if constexpr (V == 1) {
    p[0] = from_float<T>(in[0]);
  } else {
    T e[V];
#pragma unroll
    for (int i = 0; i < V; ++i) e[i] = from_float<T>(in[i]);
    uint4 raw;
    memcpy(&raw, e, 16);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// ---- warp and block helpers (every lane of the warp / thread of the block must call them) ----

VZ_DEVICE int lane_id() { return int(threadIdx.x) & 31; }
VZ_DEVICE int warp_id() { return int(threadIdx.x) >> 5; }

// XOR butterfly: each step adds the same two values in every lane of a pair (a + b == b + a),
// so all lanes end with the bit-identical sum.
VZ_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

VZ_DEVICE int warp_inclusive_scan(int v) {
  const int lane = lane_id();
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += u;
  }
  return v;
}

struct ScanResult {
  int before;  // flags set in lower threads of the block
  int total;   // flags set in the block
};

// Block-wide exclusive count of a flag. Contains two __syncthreads.
VZ_DEVICE ScanResult block_count(bool flag, int* warp_sums) {
  const int lane = lane_id(), warp = warp_id(), nwarps = int(blockDim.x) >> 5;
  const unsigned bal = __ballot_sync(kFullMask, flag);
  if (lane == 0) warp_sums[warp] = __popc(bal);
  __syncthreads();
  ScanResult r{__popc(bal & ((1u << lane) - 1u)), 0};
  for (int w = 0; w < nwarps; ++w) {
    const int c = warp_sums[w];
    if (w < warp) r.before += c;
    r.total += c;
  }
  __syncthreads();  // warp_sums is rewritten by the next call
  return r;
}

// Bitwise, so the NaN rules hold even under fast-math flags.
VZ_DEVICE bool is_nan(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }

// Channel slices of a grid (B, S) (S blocks per image, each writing split_channels channels): with
// splits <= 0, about two blocks per SM (kMinBlocks) of at least 256 channels each, at most max_splits
// (0: no cap); split_channels is a multiple of 8 (at least 8), which keeps every slice 16-byte aligned.
inline void choose_channel_split(int batch, int channels, int num_sms, int max_splits, int splits,
                                 int& channel_splits, int& split_channels) {
  if (splits <= 0) {
    const int64_t want = batch > 0 ? (2 * int64_t(num_sms) + batch - 1) / batch : 1;
    int64_t cap = channels / 256 > 1 ? channels / 256 : 1;
    if (max_splits > 0 && cap > max_splits) cap = max_splits;
    splits = int(want < 1 ? 1 : (want > cap ? cap : want));
  }
  const int per = (channels + splits - 1) / splits;  // recount the blocks after rounding
  split_channels = per > 8 ? (per + 7) / 8 * 8 : 8;
  channel_splits = channels > 0 ? (channels + split_channels - 1) / split_channels : 1;
}

#if defined(__CUDACC__)
// kernel<<<grid, kThreads, smem_bytes, stream>>>(p), opting in to more than the default 48 KB of
// dynamic shared memory when the kernel needs it; returns the first error.
template <typename Params>
cudaError_t launch_blocks(void (*kernel)(Params), dim3 grid, size_t smem_bytes, cudaStream_t stream,
                          const Params& p) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}
#endif

// Element types of the kernels' tensors (float64 only for group_pool's logits).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace cuda_kernel
}  // namespace visionzip
