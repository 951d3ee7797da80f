// Hand-written CUDA kernel of visionzip::group_pool (docs/spec.md "Group pool"), on raw pointers: no
// torch headers, so it compiles with plain nvcc and (with tests/cuda_emulation/host_emulation.h
// providing the CUDA built-ins) as host C++, which is how it is tested without a GPU.
//
// Grid (B, S): block (b, s) handles image b and writes output channels [s * split, (s + 1) * split)
// (choose_channel_split: about two blocks per SM, at least 256 channels each). The S blocks of an
// image repeat the cheap phases 1-2 (M x N logits, L2 hits when they run together) and split phase 3,
// where the bytes are. Block (b, 0) writes the labels and counts.
//   1. labels: one thread per patch, the running argmax over the M groups (reads along N coalesced),
//      ties to the lower m, NaN lowest, -0.0 == +0.0, compared in float (double for float64 logits);
//   2. stable member lists per group (member_lists, shared with compress), whose sizes are the counts;
//   3. per (group, channel vector) one thread sums its members' rows in ascending patch order
//      (segment_sum, shared with compress) and writes sum / (count + eps) in float32, rounded to the
//      values' dtype. The same order as the C++ CPU kernel: bit-identical results on the same inputs.
// Shared memory: 8 N + 4 (M + 1) bytes (labels, member lists, offsets).
#pragma once

#include "kernel_common.cuh"
#include "segmented_sum.cuh"

namespace visionzip {
namespace cuda_kernel {

// Everything the kernel reads or writes. Pointers are to device memory, contiguous tensors.
struct GroupPoolParams {
  const void* logits;  // (B, M, N) logit_t
  const void* values;  // (B, N, C) scalar_t
  void* out;           // (B, M, C) scalar_t
  int64_t* labels;     // (B, N)
  int64_t* counts;     // (B, M)
  int batch, groups, patches, channels;
  float eps;
  int split_channels;  // output channels per block (gridDim.y blocks per image), a multiple of 8
};

struct GroupPoolLaunch {
  bool ok = false;         // false: the shape exceeds the shared-memory limit
  size_t smem_bytes = 0;   // dynamic shared memory per block
  int channel_splits = 1;  // blocks per image (grid y)
  int split_channels = 0;
};

VZ_HD size_t group_pool_smem(int n, int m) { return size_t(n) * 8 + (size_t(m) + 1) * 4; }

// Host-side launch geometry, shared by the torch binding and the emulation tests; splits: blocks per
// image, 0 to choose.
inline GroupPoolLaunch plan_group_pool(int batch, int m, int n, int channels, size_t smem_limit, int num_sms,
                                       int splits = 0) {
  GroupPoolLaunch plan;
  choose_channel_split(batch, channels, num_sms, 0, splits, plan.channel_splits, plan.split_channels);
  plan.smem_bytes = group_pool_smem(n, m);
  plan.ok = plan.smem_bytes <= smem_limit;
  return plan;
}

// Logits compared exactly: half / bfloat16 / float as float, double as double.
template <typename T>
VZ_DEVICE float logit_value(T x) { return to_float(x); }
VZ_DEVICE double logit_value(double x) { return x; }

VZ_DEVICE bool is_nan(double x) {  // bitwise, as is_nan(float)
  uint64_t u;
  memcpy(&u, &x, 8);
  return (u & 0x7fffffffffffffffull) > 0x7ff0000000000000ull;
}

// out rows [0, groups) = sum of each group's member rows / (count + eps), channels [c0, c1) of rows of c,
// V channels per work item (segment_sums, as compress's means).
template <int V, typename scalar_t>
VZ_DEVICE void group_means(const scalar_t* val, scalar_t* out, const int* members, const int* offsets, int groups,
                           float eps, int c, int c0, int c1) {
  segment_sums<V>(val, c, c0, c1, groups, offsets, [&](int i) { return members[i]; },
                  [&](int g, int channel, int count, const float(&acc)[V]) {
                    const float den = float(count) + eps;
                    float y[V];
#pragma unroll
                    for (int i = 0; i < V; ++i) y[i] = acc[i] / den;
                    store_floats<V>(out + int64_t(g) * c + channel, y);
                  });
}

template <typename scalar_t, typename logit_t>
VZ_KERNEL(kThreads, kMinBlocks) group_pool_kernel(const GroupPoolParams p) {
  VZ_DYNAMIC_SMEM(smem);
  const int b = int(blockIdx.x), tid = int(threadIdx.x), nthreads = int(blockDim.x);
  const int m = p.groups, n = p.patches, c = p.channels;
  int* label = reinterpret_cast<int*>(smem);
  int* members = label + n;
  int* offsets = members + n;
  const logit_t* lg = static_cast<const logit_t*>(p.logits) + int64_t(b) * m * n;
  const scalar_t* val = static_cast<const scalar_t*>(p.values) + int64_t(b) * n * c;
  scalar_t* out = static_cast<scalar_t*>(p.out) + int64_t(b) * m * c;
  const bool writes_indices = blockIdx.y == 0;

  // 1. Labels: groups in ascending order, a later one wins only when strictly better.
  for (int j = tid; j < n; j += nthreads) {
    auto best = logit_value(lg[j]);
    int arg = 0;
    for (int g = 1; g < m; ++g) {
      const auto s = logit_value(lg[int64_t(g) * n + j]);
      if (!is_nan(s) && (is_nan(best) || s > best)) best = s, arg = g;
    }
    label[j] = arg;
    if (writes_indices) p.labels[int64_t(b) * n + j] = arg;
  }
  __syncthreads();

  // 2. Member lists (every patch is a member of its group) and counts.
  member_lists(label, n, m, [](int) { return true; }, offsets, members);
  if (writes_indices)
    for (int g = tid; g < m; g += nthreads) p.counts[int64_t(b) * m + g] = offsets[g + 1] - offsets[g];

  // 3. Group sums on this block's channels.
  const int c_lo = int(blockIdx.y) * p.split_channels;
  const int c_hi = c_lo + p.split_channels < c ? c_lo + p.split_channels : c;
  const bool vec_ok = (c * int(sizeof(scalar_t))) % 16 == 0 && (c_lo * int(sizeof(scalar_t))) % 16 == 0 &&
                      aligned16(p.values) && aligned16(p.out);
  if (vec_ok) {
    group_means<vec_size<scalar_t>()>(val, out, members, offsets, m, p.eps, c, c_lo, c_hi);
  } else {
    group_means<1>(val, out, members, offsets, m, p.eps, c, c_lo, c_hi);
  }
}

#if defined(__CUDACC__)
// Launches the kernel on `stream` (no host synchronisation); returns the first launch error.
template <typename scalar_t, typename logit_t>
cudaError_t launch_group_pool(const GroupPoolParams& p, const GroupPoolLaunch& plan, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  return launch_blocks(group_pool_kernel<scalar_t, logit_t>,
                       dim3(unsigned(p.batch), unsigned(plan.channel_splits)), plan.smem_bytes, stream, p);
}
#endif

#if defined(__CUDACC__) || defined(VZ_DECLARE_LAUNCH)
// Defined in group_pool_kernel.cu: launches the instantiation for (values, logits) dtypes. logits are
// values' dtype, float32 or float64; returns cudaErrorInvalidValue for any other combination.
cudaError_t launch_group_pool_dtypes(DType values, DType logits, const GroupPoolParams& p,
                                     const GroupPoolLaunch& plan, cudaStream_t stream);
#endif

}  // namespace cuda_kernel
}  // namespace visionzip
