// Hand-written CUDA kernel of visionzip::compress (docs/spec.md "Compress"), on raw pointers: no torch headers,
// so it compiles with plain nvcc and (with tests/cuda_emulation/host_emulation.h providing the CUDA
// built-ins) as host C++, which is how the block algorithm is tested without a GPU.
//
// Grid (B, S): block (b, s) does the whole pass for image b in shared memory and writes output
// channels [s * split, (s + 1) * split). With few images one block per image would leave most SMs idle
// (B = 32 frames: 32 blocks on 132 SMs) and the row phases, where the bytes are, on those few SMs;
// the S blocks of an image repeat the cheap phases (attention rows, the Cm = 64 metric: L2 hits when
// they run together), write identical index values, and split the row phases 3 and 6 by channels.
// Per-channel sums keep their order, so the output is bit-identical for every S. The phases:
//   1. scores: column sums of the (B, H, Q, N) attention view over heads (and queries), float32,
//      in a fixed h-then-q order per column (16-byte loads where aligned). For received attention
//      with few images, a pre-pass kernel (score_partials_kernel) splits the H*Q rows over several
//      blocks per image and the main kernel adds the slices in slice order (still deterministic);
//   2. top-D: radix select (8 passes of 8 bits) of the D-th largest packed 64-bit key
//      (orderable float bits << 32 | (N-1-index)): keys are distinct, so "key >= threshold" keeps
//      exactly D tokens, with NaN below every number, -0.0 == +0.0, and ties to the lower index;
//   3. ordered gather: a block-wide ballot scan keeps the dominant tokens in ascending index and
//      the remaining ones in original order; dominant rows are copied to the output;
//   4. targets at remaining positions 0, step, ...; their metric rows are L2-normalised
//      (x / max(|x|, 1e-12)) into shared memory (or a global scratch when they do not fit);
//   5. assignment: one warp per remaining token, warp-shuffle dot products against every target,
//      argmax with ties to the lower target and NaN lowest (the token's own norm is a positive
//      factor and is skipped, as in the C++ CPU kernel);
//   6. segmented mean: stable per-target member lists (ballot compaction, ascending token order),
//      then hidden[target] + sum(members) / max(count, 1) in float32, written in hidden's dtype
//      (member_lists / segment_sums of segmented_sum.cuh, shared with group_pool).
// Every value is produced by one thread in a fixed order: results are bit-identical run to run.
#pragma once

#include "kernel_common.cuh"
#include "segmented_sum.cuh"

namespace visionzip {
namespace cuda_kernel {

constexpr int kPartialThreads = 256;  // score pre-pass: threads per block
constexpr int kCachedMetric = 4;  // metric elements per lane kept in registers during assignment

// Everything the kernels read or write. Pointers are to device memory; element strides.
struct CompressParams {
  const void* hidden;  // (B, N, C) contiguous, scalar_t
  const void* attn;    // (B, H, Q, N) view, last stride 1, attn_t
  int64_t attn_stride_b, attn_stride_h, attn_stride_q;
  const void* metric;  // (B, N, Cm) contiguous, metric_t (keys, or hidden itself)
  float* score_partials;  // (B, S, N) float32 column sums of row slices, or nullptr (S == 1)
  float* target_scratch;  // (B * S, Cx, Cm) float32 when the normalised targets do not fit in shared memory
  void* out;              // (B, D + Cx, C) scalar_t
  int64_t* dominant;      // (B, D)
  int64_t* contextual_indices;  // (B, Cx) token of each contextual target
  int64_t* token_map;     // (B, N)
  int batch, tokens, channels, metric_dim, heads, queries;
  int dominant_count, contextual, step, partial_slices;
  int split_channels;  // output channels per block (gridDim.y blocks per image), a multiple of 8
  bool has_cls;
};

// Dynamic shared memory of the main kernel (byte offsets). The keys area is reused after the
// selection for the per-token labels (first 4N bytes) and the member lists (next 4N bytes).
struct SmemLayout {
  size_t hist, warp_sums, misc, keys, order, offsets, targets, total;
};

VZ_HD size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

VZ_HD SmemLayout smem_layout(int n, int cx, int cm, bool targets_in_smem) {
  SmemLayout l;
  l.hist = 0;                        // int[256] radix histogram
  l.warp_sums = l.hist + 256 * 4;    // int[32] per-warp counts of the block scan
  l.misc = l.warp_sums + 32 * 4;     // uint64[2] radix select state
  l.keys = align_up(l.misc + 2 * 8, 16);  // uint64[N] sort keys | int[N] labels + int[N] members
  l.order = l.keys + size_t(n) * 8;  // int[N]: remaining tokens (R), then dominant tokens (D)
  l.offsets = l.order + size_t(n) * 4;  // int[Cx + 1] member list offsets
  l.targets = align_up(l.offsets + (size_t(cx) + 1) * 4, 16);  // float[Cx * Cm] normalised targets
  l.total = l.targets + (targets_in_smem ? size_t(cx) * size_t(cm) * 4 : 0);
  return l;
}

struct LaunchPlan {
  bool ok = false;            // false: the shape exceeds the kernel's shared-memory limit
  size_t smem_bytes = 0;      // dynamic shared memory of the main kernel
  size_t smem_needed = 0;     // minimum the shape needs (for the error message)
  bool targets_in_smem = false;
  int partial_slices = 1;     // row slices per image of the received-attention pre-pass
  int channel_splits = 1;     // blocks per image (grid y), each writing split_channels channels
  int split_channels = 0;
};

// Host-side launch geometry, shared by the torch binding and the emulation tests.
// channels: C; metric_is_hidden: no keys given (each block then reads all hidden rows for the
// assignment, so at most 2 blocks per image); splits: blocks per image, 0 to choose.
inline LaunchPlan plan_compress(int batch, int n, int cx, int cm, int heads, int queries, size_t smem_limit,
                                int num_sms, int channels, bool metric_is_hidden, int splits = 0) {
  LaunchPlan plan;
  choose_channel_split(batch, channels, num_sms, metric_is_hidden ? 2 : 0, splits, plan.channel_splits,
                       plan.split_channels);
  plan.smem_needed = smem_layout(n, cx, cm, false).total;
  if (plan.smem_needed > smem_limit) return plan;
  plan.ok = true;
  const size_t with_targets = smem_layout(n, cx, cm, true).total;
  plan.targets_in_smem = cx > 0 && with_targets <= smem_limit;
  plan.smem_bytes = plan.targets_in_smem ? with_targets : plan.smem_needed;
  if (queries > 1 && batch > 0) {
    // Received attention reads H*N*N values per image: spread them over ~4 blocks per SM,
    // at least 32 rows per slice.
    const int64_t rows = int64_t(heads) * queries;
    const int64_t want = (4 * int64_t(num_sms) + batch - 1) / batch;
    const int64_t most = rows / 32 > 1 ? rows / 32 : 1;
    plan.partial_slices = int(want < 1 ? 1 : (want > most ? most : want));
  }
  return plan;
}


// ---- scores ----

// Larger keys rank first. NaN -> 0 (below -inf, whose key is 0x007fffff...), -0.0 -> +0.0, and
// the low word N-1-j makes equal scores rank by ascending index.
VZ_DEVICE uint64_t make_key(float s, int j, int n) {
  uint32_t u = __float_as_uint(s);
  if (is_nan(s)) {
    u = 0u;
  } else {
    if ((u << 1) == 0u) u = 0u;  // -0.0 -> +0.0
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (uint64_t(u) << 32) | uint32_t(n - 1 - j);
}

// Column sums over rows [row0, row1) of the (H, Q) rows of one image (h outer, q inner), one
// column (or 16-byte vector of columns) per thread; emit(j, sum) for every column j < n.
template <typename attn_t, typename Emit>
VZ_DEVICE void column_sums(const attn_t* a, int64_t stride_h, int64_t stride_q, int queries, int64_t row0,
                           int64_t row1, int n, Emit emit) {
  constexpr int V = vec_size<attn_t>();
  const bool vec_ok = aligned16(a) && stride_h % V == 0 && stride_q % V == 0;
  const int nvec = vec_ok ? n / V : 0;
  const int items = nvec + (n - nvec * V);
  const int h0 = int(row0 / queries), q0 = int(row0 % queries);
  for (int item = int(threadIdx.x); item < items; item += int(blockDim.x)) {
    if (item < nvec) {
      float acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0.0f;
      int h = h0, q = q0;
      for (int64_t row = row0; row < row1; ++row) {
        float x[V];
        load_floats<V>(a + h * stride_h + q * stride_q + int64_t(item) * V, x);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += x[i];
        if (++q == queries) q = 0, ++h;
      }
#pragma unroll
      for (int i = 0; i < V; ++i) emit(item * V + i, acc[i]);
    } else {
      const int j = nvec * V + (item - nvec);
      float acc = 0.0f;
      int h = h0, q = q0;
      for (int64_t row = row0; row < row1; ++row) {
        acc += to_float(a[h * stride_h + q * stride_q + j]);
        if (++q == queries) q = 0, ++h;
      }
      emit(j, acc);
    }
  }
}

// Pre-pass for received attention: block (b, s) sums rows [s*HQ/S, (s+1)*HQ/S) of image b.
template <typename attn_t>
VZ_KERNEL(kPartialThreads, 1) score_partials_kernel(const CompressParams p) {
  const int slices = p.partial_slices, n = p.tokens;
  const int b = int(blockIdx.x) / slices, s = int(blockIdx.x) % slices;
  const int64_t rows = int64_t(p.heads) * p.queries;
  const int64_t row0 = rows * s / slices, row1 = rows * (s + 1) / slices;
  const attn_t* a = static_cast<const attn_t*>(p.attn) + b * p.attn_stride_b;
  float* dst = p.score_partials + (int64_t(b) * slices + s) * n;
  column_sums(a, p.attn_stride_h, p.attn_stride_q, p.queries, row0, row1, n, [&](int j, float v) { dst[j] = v; });
}

// ---- main kernel stages ----

// The D-th largest key (all keys distinct); every thread returns it. Contains __syncthreads.
VZ_DEVICE uint64_t select_threshold(const uint64_t* keys, int n, int d, int* hist, uint64_t* misc) {
  if (d == 0) return ~uint64_t(0);  // above every key: nothing kept
  const int tid = int(threadIdx.x), nthreads = int(blockDim.x), lane = lane_id();
  uint64_t prefix = 0, mask = 0;
  int want = d;  // rank of the threshold among the keys matching prefix on mask, from the top
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += nthreads) hist[i] = 0;
    __syncthreads();
    for (int j = tid; j < n; j += nthreads) {
      const uint64_t k = keys[j];
      if ((k & mask) == prefix) atomicAdd(&hist[int((k >> shift) & 0xffu)], 1);
    }
    __syncthreads();
    if (warp_id() == 0) {
      // Lane L owns digits 255-8L down to 248-8L: a scan over lanes counts from the top.
      int cnt[8], lane_total = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) lane_total += (cnt[i] = hist[255 - 8 * lane - i]);
      const int incl = warp_inclusive_scan(lane_total);
      int cum = incl - lane_total;
      if (cum < want && want <= incl) {
        for (int i = 0; i < 8; ++i) {
          if (cum + cnt[i] >= want) {
            misc[0] = prefix | (uint64_t(255 - 8 * lane - i) << shift);
            misc[1] = uint64_t(want - cum);
            break;
          }
          cum += cnt[i];
        }
      }
    }
    __syncthreads();
    prefix = misc[0];
    want = int(misc[1]);
    mask |= uint64_t(0xff) << shift;
    // misc is next written after two more __syncthreads, hist after one: no barrier needed here.
  }
  return prefix;
}

// out rows [0, rows) = hidden rows src[0..rows), channels [c0, c1) of rows of c, raw copies (16 bytes
// at a time when aligned).
template <typename scalar_t>
VZ_DEVICE void copy_rows(const scalar_t* hid, scalar_t* out, const int* src, int rows, int c, int c0, int c1,
                         bool vec_ok) {
  const int w = c1 - c0;
  if (vec_ok) {
    constexpr int V = vec_size<scalar_t>();
    const int units = w / V;
    for (int item = int(threadIdx.x); item < rows * units; item += int(blockDim.x)) {
      const int i = item / units, u = item % units;
      const uint4* s = reinterpret_cast<const uint4*>(hid + int64_t(src[i]) * c + c0) + u;
      reinterpret_cast<uint4*>(out + int64_t(i) * c + c0)[u] = *s;
    }
  } else {
    for (int item = int(threadIdx.x); item < rows * w; item += int(blockDim.x)) {
      const int i = item / w, u = c0 + item % w;
      out[int64_t(i) * c + u] = hid[int64_t(src[i]) * c + u];
    }
  }
}

// contextual row t = hidden[target t] + sum(members) / max(count, 1) on channels [c0, c1) of rows
// of c, V channels per work item; members in ascending token order, as the CPU kernel (segment_sums).
template <int V, typename scalar_t>
VZ_DEVICE void segment_means(const scalar_t* hid, scalar_t* out, const int* order, const int* members,
                             const int* offsets, int cx, int step, int c, int c0, int c1) {
  segment_sums<V>(hid, c, c0, c1, cx, offsets, [&](int m) { return order[members[m]]; },
                  [&](int t, int channel, int count, const float(&acc)[V]) {
                    const float cnt = float(count > 1 ? count : 1);
                    float y[V];
                    load_floats<V>(hid + int64_t(order[t * step]) * c + channel, y);
#pragma unroll
                    for (int i = 0; i < V; ++i) y[i] = y[i] + acc[i] / cnt;
                    store_floats<V>(out + int64_t(t) * c + channel, y);
                  });
}

VZ_DEVICE bool is_target_position(int pos, int step, int cx) { return pos % step == 0 && pos / step < cx; }

template <typename scalar_t, typename attn_t, typename metric_t>
VZ_KERNEL(kThreads, kMinBlocks) compress_kernel(const CompressParams p) {
  VZ_DYNAMIC_SMEM(smem);
  const int b = int(blockIdx.x), tid = int(threadIdx.x), nthreads = int(blockDim.x);
  const int lane = lane_id(), warp = warp_id(), nwarps = nthreads >> 5;
  const int n = p.tokens, c = p.channels, cm = p.metric_dim, d = p.dominant_count, cx = p.contextual;
  const int r = n - d, step = p.step;
  const SmemLayout L = smem_layout(n, cx, cm, p.target_scratch == nullptr);
  int* hist = reinterpret_cast<int*>(smem + L.hist);
  int* warp_sums = reinterpret_cast<int*>(smem + L.warp_sums);
  uint64_t* misc = reinterpret_cast<uint64_t*>(smem + L.misc);
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem + L.keys);
  int* order = reinterpret_cast<int*>(smem + L.order);

  const scalar_t* hid = static_cast<const scalar_t*>(p.hidden) + int64_t(b) * n * c;
  const metric_t* met = static_cast<const metric_t*>(p.metric) + int64_t(b) * n * cm;
  scalar_t* out = static_cast<scalar_t*>(p.out) + int64_t(b) * (d + cx) * c;
  int64_t* dom_out = p.dominant + int64_t(b) * d;
  int64_t* map_out = p.token_map + int64_t(b) * n;
  const int c_lo = int(blockIdx.y) * p.split_channels;
  const int c_hi = c_lo + p.split_channels < c ? c_lo + p.split_channels : c;
  const bool rows_vec_ok = (c * int(sizeof(scalar_t))) % 16 == 0 && (c_lo * int(sizeof(scalar_t))) % 16 == 0 &&
                           aligned16(p.hidden) && aligned16(p.out);

  // 1. Scores -> packed keys. The CLS token scores +inf, and wins ties by its index: always kept.
  auto emit_key = [&](int j, float s) { keys[j] = make_key((p.has_cls && j == 0) ? INFINITY : s, j, n); };
  if (p.score_partials != nullptr) {
    const float* part = p.score_partials + int64_t(b) * p.partial_slices * n;
    for (int j = tid; j < n; j += nthreads) {
      float s = 0.0f;
      for (int sl = 0; sl < p.partial_slices; ++sl) s += part[int64_t(sl) * n + j];
      emit_key(j, s);
    }
  } else {
    const attn_t* a = static_cast<const attn_t*>(p.attn) + int64_t(b) * p.attn_stride_b;
    column_sums(a, p.attn_stride_h, p.attn_stride_q, p.queries, 0, int64_t(p.heads) * p.queries, n, emit_key);
  }
  __syncthreads();

  // 2. Threshold of the top D.
  const uint64_t thr = (d == n) ? uint64_t(0) : select_threshold(keys, n, d, hist, misc);

  // 3. Ordered compaction: order[0, R) remaining tokens, order[R, N) dominant tokens, ascending.
  int kept_before = 0;
  for (int base = 0; base < n; base += nthreads) {
    const int j = base + tid;
    const bool valid = j < n;
    const bool kept = valid && keys[j] >= thr;
    const ScanResult s = block_count(kept, warp_sums);
    if (valid) {
      const int pos = kept_before + s.before;  // dominant tokens before j
      if (kept) {
        order[r + pos] = j;
        dom_out[pos] = j;
        map_out[j] = pos;
      } else {
        order[j - pos] = j;
      }
    }
    kept_before += s.total;
  }
  __syncthreads();  // keys are dead from here on; their area holds labels and member lists
  copy_rows(hid, out, order + r, d, c, c_lo, c_hi, rows_vec_ok);
  if (cx == 0) {
    for (int i = tid; i < r; i += nthreads) map_out[order[i]] = -1;
    return;
  }

  // 4. Targets and their normalised metric rows.
  float* that = p.target_scratch == nullptr ? reinterpret_cast<float*>(smem + L.targets)
                                            : p.target_scratch + (int64_t(b) * gridDim.y + blockIdx.y) * cx * cm;
  for (int t = tid; t < cx; t += nthreads) p.contextual_indices[int64_t(b) * cx + t] = order[t * step];
  for (int t = warp; t < cx; t += nwarps) {
    const metric_t* x = met + int64_t(order[t * step]) * cm;
    float ss = 0.0f;
    for (int i = lane; i < cm; i += 32) {
      const float v = to_float(x[i]);
      ss = fmaf(v, v, ss);
    }
    const float inv = 1.0f / fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
    for (int i = lane; i < cm; i += 32) that[int64_t(t) * cm + i] = to_float(x[i]) * inv;
  }
  __syncthreads();

  // 5. Assignment: argmax_t <x, t_hat>, ties to the lower t, NaN lowest. One warp per token.
  int* label = reinterpret_cast<int*>(smem + L.keys);
  int* members = label + n;
  for (int pos = warp; pos < r; pos += nwarps) {
    int best = pos / step;
    if (!is_target_position(pos, step, cx)) {
      const metric_t* x = met + int64_t(order[pos]) * cm;
      float xc[kCachedMetric];
#pragma unroll
      for (int k = 0; k < kCachedMetric; ++k) xc[k] = lane + 32 * k < cm ? to_float(x[lane + 32 * k]) : 0.0f;
      float best_s = 0.0f;
      for (int t = 0; t < cx; ++t) {
        const float* th = that + int64_t(t) * cm;
        float acc = 0.0f;
#pragma unroll
        for (int k = 0; k < kCachedMetric; ++k)
          if (lane + 32 * k < cm) acc = fmaf(xc[k], th[lane + 32 * k], acc);
        for (int i = lane + 32 * kCachedMetric; i < cm; i += 32) acc = fmaf(to_float(x[i]), th[i], acc);
        const float s = warp_sum(acc);  // identical in every lane: the decision is warp-uniform
        if (t == 0 || (!is_nan(s) && (is_nan(best_s) || s > best_s))) best = t, best_s = s;
      }
    }
    if (lane == 0) {
      label[pos] = best;
      map_out[order[pos]] = d + best;
    }
  }
  int* offsets = reinterpret_cast<int*>(smem + L.offsets);
  __syncthreads();

  // 6. Segmented mean: stable member lists (targets excluded), then the sums (segmented_sum.cuh).
  member_lists(label, r, cx, [&](int pos) { return !is_target_position(pos, step, cx); }, offsets, members);
  if (rows_vec_ok) {
    segment_means<vec_size<scalar_t>()>(hid, out + int64_t(d) * c, order, members, offsets, cx, step, c, c_lo,
                                        c_hi);
  } else {
    segment_means<1>(hid, out + int64_t(d) * c, order, members, offsets, cx, step, c, c_lo, c_hi);
  }
}

#if defined(__CUDACC__)
// Launches the pass on `stream` (no host synchronisation). p.partial_slices, p.score_partials and
// p.target_scratch must follow `plan`; returns the first launch error.
template <typename scalar_t, typename attn_t, typename metric_t>
cudaError_t launch_compress(const CompressParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (p.partial_slices > 1) {
    score_partials_kernel<attn_t><<<unsigned(p.batch) * unsigned(p.partial_slices), kPartialThreads, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return launch_blocks(compress_kernel<scalar_t, attn_t, metric_t>,
                       dim3(unsigned(p.batch), unsigned(plan.channel_splits)), plan.smem_bytes, stream, p);
}
#endif


#if defined(__CUDACC__) || defined(VZ_DECLARE_LAUNCH)
// Defined in compress_kernel.cu (the only translation unit with device code): launches the
// instantiation for (hidden, attn, metric) dtypes. attn and metric are hidden's dtype or float32;
// returns cudaErrorInvalidValue for any other combination.
cudaError_t launch_compress_dtypes(DType hidden, DType attn, DType metric, const CompressParams& p,
                                   const LaunchPlan& plan, cudaStream_t stream);
#endif

}  // namespace cuda_kernel
}  // namespace visionzip
