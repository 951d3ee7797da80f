// The segmented reduction of the CUDA kernels, shared by compress's contextual means
// (compress_kernel.cuh) and group_pool's group sums (group_pool_kernel.cuh): docs/spec.md "Group pool".
// Stable member lists per group (ballot compaction), then per (group, channel vector) one thread adds
// its members' rows in list order: every sum has one fixed order, bit-identical run to run and for
// any channel split, no atomics.
#pragma once

#include "kernel_common.cuh"

namespace visionzip {
namespace cuda_kernel {

constexpr int kMemberLoads = 4;  // member rows loaded ahead per thread in segment_sum

// Stable member lists of `groups` groups over the positions [0, r): members[offsets[g], offsets[g + 1])
// lists, in ascending order, the positions p with label[p] == g and keep(p) (offsets: groups + 1
// ints). One warp per group (ballot counts, a warp scan of the counts, ballot placement). Every thread
// of the block must call it; it contains three __syncthreads, the last after the lists are written.
template <typename Keep>
VZ_DEVICE void member_lists(const int* label, int r, int groups, Keep keep, int* offsets, int* members) {
  const int tid = int(threadIdx.x), lane = lane_id(), warp = warp_id(), nwarps = int(blockDim.x) >> 5;
  for (int g = warp; g < groups; g += nwarps) {
    int count = 0;
    for (int p0 = 0; p0 < r; p0 += 32) {
      const int pos = p0 + lane;
      const bool m = pos < r && label[pos] == g && keep(pos);
      count += __popc(__ballot_sync(kFullMask, m));
    }
    if (lane == 0) offsets[g + 1] = count;
  }
  if (tid == 0) offsets[0] = 0;
  __syncthreads();
  if (warp == 0) {
    int carry = 0;
    for (int c0 = 1; c0 <= groups; c0 += 32) {
      const int i = c0 + lane;
      const int incl = warp_inclusive_scan(i <= groups ? offsets[i] : 0);
      if (i <= groups) offsets[i] = carry + incl;
      carry += __shfl_sync(kFullMask, incl, 31);
    }
  }
  __syncthreads();
  for (int g = warp; g < groups; g += nwarps) {
    int at = offsets[g];
    for (int p0 = 0; p0 < r; p0 += 32) {
      const int pos = p0 + lane;
      const bool m = pos < r && label[pos] == g && keep(pos);
      const unsigned bal = __ballot_sync(kFullMask, m);
      if (m) members[at + __popc(bal & ((1u << lane) - 1u))] = pos;
      at += __popc(bal);
    }
  }
  __syncthreads();
}

// acc = the sum over list entries i in [m0, m1), in this order, of the V floats at col + row(i) * c
// (col: the work item's first channel in row 0; V > 1 needs 16-byte aligned rows). kMemberLoads
// rows are loaded before any is added, so that many loads are in flight per thread (one at a time
// left each thread waiting ~a DRAM latency per member); the additions keep the list order.
template <int V, typename scalar_t, typename RowOf>
VZ_DEVICE void segment_sum(const scalar_t* col, int64_t c, RowOf row, int m0, int m1, float (&acc)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.0f;
  int m = m0;
  for (; m + kMemberLoads <= m1; m += kMemberLoads) {
    float x[kMemberLoads][V];
#pragma unroll
    for (int j = 0; j < kMemberLoads; ++j) load_floats<V>(col + int64_t(row(m + j)) * c, x[j]);
#pragma unroll
    for (int j = 0; j < kMemberLoads; ++j)
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += x[j][i];
  }
  for (; m < m1; ++m) {
    float x[V];
    load_floats<V>(col + int64_t(row(m)) * c, x);
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += x[i];
  }
}

// The segmented sums of channels [c0, c1) (rows of c elements, V channels per work item, c1 - c0 a
// multiple of V): one thread per (group g, unit), acc = segment_sum of the group's list entries
// [offsets[g], offsets[g + 1]) through row(i); then finish(g, channel, count, acc) writes the result
// (channel: the unit's first channel; count: the group's list length).
template <int V, typename scalar_t, typename RowOf, typename Finish>
VZ_DEVICE void segment_sums(const scalar_t* src, int c, int c0, int c1, int groups, const int* offsets, RowOf row,
                            Finish finish) {
  const int units = (c1 - c0) / V;
  for (int item = int(threadIdx.x); item < groups * units; item += int(blockDim.x)) {
    const int g = item / units, channel = c0 + (item % units) * V;
    const int m0 = offsets[g], m1 = offsets[g + 1];
    float acc[V];
    segment_sum<V>(src + channel, c, row, m0, m1, acc);
    finish(g, channel, m1 - m0, acc);
  }
}

}  // namespace cuda_kernel
}  // namespace visionzip
