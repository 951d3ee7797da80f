// Fused CPU kernels of visionzip::cls_scores and visionzip::received_scores: the token
// scores of VisionZip computed from the selection layer's q and k without the N x N matrix
// (docs/spec.md "Scores").
//
// cls_scores: one softmax row per (image, head), O(N d) work and O(B H N) memory.
// received_scores: column sums of softmax(Q K^T * scale) in one pass over the scores, parallel
// over (image, head): per block of kTile queries, their score rows within the segment (a
// kTile x segment strip, computed in kTile x kTile tiles from the head's keys transposed once),
// e = exp(s - row max) in place, and every key's column gets e / row sum, queries ascending.
// Each logit is computed once (the two-pass log-sum-exp form computed it twice). Only (B, H, N)
// vectors (per-head column sums) and per-thread buffers are stored. Every output element is
// produced by one thread in a fixed order (queries ascending, heads ascending), so results are
// bit-identical across runs and thread counts for one instruction-set path.
//
// The kernels (scores_kernels.inc) are compiled three times: portable, AVX2 + FMA and AVX-512
// inside `#pragma GCC target` regions (the extension is built for the baseline x86-64 ISA),
// picked at run time by CPU feature (isa.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "isa.h"

namespace visionzip {
namespace {

constexpr int64_t kTile = 64;  // queries and keys per tile: a 64 x 64 fp32 score tile is 16 KiB


// q and k share one floating dtype and one device; the last dim must be contiguous (a copy otherwise).
void check_common(const char* op, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.device().is_cpu(), op, " (CPU kernel): q must be on the CPU; got ", q.device());
  TORCH_CHECK(k.device() == q.device(), op, ": k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK(is_float_dtype(q), op, ": q must be a floating tensor; got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": q and k must have the same dtype; got q ",
              q.scalar_type(), ", k ", k.scalar_type());
  TORCH_CHECK(k.dim() == 4 && k.size(1) >= 1 && k.size(2) >= 1 && k.size(3) >= 1, op,
              ": k must have shape (B, H, N, d) with H, N, d >= 1; got ", k.sizes());
}

inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline at::ScalarType acc_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline double resolve_scale(std::optional<double> scale, int64_t d) {
  return scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
}


#define VISIONZIP_KERNELS_INC "scores_kernels.inc"
#define VISIONZIP_FP_CONTRACT_FAST  // a * b + c -> FMA in the wide paths
#include "isa_builds.inc"

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------


at::Tensor cls_scores_cpu(const at::Tensor& q_in, const at::Tensor& k_in, std::optional<double> scale) {
  const char* op = "visionzip::cls_scores";
  check_common(op, q_in, k_in);
  scale_arg(op, scale);
  TORCH_CHECK(q_in.dim() == 3 && q_in.size(0) == k_in.size(0) && q_in.size(1) == k_in.size(1) &&
                  q_in.size(2) == k_in.size(3),
              op, ": q must have shape (B, H, d) matching k ", k_in.sizes(), "; got ", q_in.sizes());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  at::Tensor out = at::empty({k.size(0), k.size(2)}, q.options().dtype(acc_dtype(q)));
  if (k.size(0) == 0) return out;
  const double sc = resolve_scale(scale, k.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "visionzip_cls_scores_cpu",
                                  [&] {
    VISIONZIP_ISA_DISPATCH(cls_scores_kernel<scalar_t>(q, k, sc, out));
  });
  return out;
}


// Segment bounds 0 = c_0 <= ... <= c_S = N from cu_seqlens, or {0, N} without it.
std::vector<int64_t> segment_bounds(const std::optional<at::Tensor>& cu_seqlens, int64_t batch, int64_t n,
                                    const at::Device& device) {
  const char* op = "visionzip::received_scores";
  if (!cu_seqlens.has_value()) return {0, n};
  const at::Tensor& cu = *cu_seqlens;
  TORCH_CHECK(cu.device() == device, op, ": cu_seqlens is on ", cu.device(), " but q is on ", device);
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 2, op, ": cu_seqlens must have shape (S + 1,) with S >= 1; got ",
              cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, op,
              ": cu_seqlens must be int32 or int64; got ", cu.scalar_type());
  TORCH_CHECK(batch == 1, op, ": with cu_seqlens the images are packed along N, so B must be 1; got B = ", batch);
  const at::Tensor c = cu.to(at::kLong).contiguous();
  std::vector<int64_t> bounds(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  TORCH_CHECK(bounds.front() == 0 && bounds.back() == n, op, ": cu_seqlens must start at 0 and end at N = ", n,
              "; got ", bounds.front(), " ... ", bounds.back());
  for (size_t s = 1; s < bounds.size(); ++s)
    TORCH_CHECK(bounds[s] >= bounds[s - 1], op, ": cu_seqlens must be non-decreasing; got ", bounds[s - 1],
                " then ", bounds[s]);
  return bounds;
}

at::Tensor received_scores_cpu(const at::Tensor& q_in, const at::Tensor& k_in, std::optional<double> scale,
                               const std::optional<at::Tensor>& cu_seqlens) {
  const char* op = "visionzip::received_scores";
  check_common(op, q_in, k_in);
  scale_arg(op, scale);
  TORCH_CHECK(q_in.dim() == 4 && q_in.sizes() == k_in.sizes(), op,
              ": q must have the shape (B, H, N, d) of k ", k_in.sizes(), "; got ", q_in.sizes());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  const int64_t B = k.size(0), N = k.size(2);
  const std::vector<int64_t> bounds = segment_bounds(cu_seqlens, B, N, q.device());
  at::Tensor out = at::empty({B, N}, q.options().dtype(acc_dtype(q)));
  if (B == 0) return out;
  const double sc = resolve_scale(scale, k.size(3));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "visionzip_received_scores_cpu",
                                  [&] {
    VISIONZIP_ISA_DISPATCH(received_scores_kernel<scalar_t>(q, k, sc, bounds, out));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CPU, m) {
  m.impl("cls_scores", &cls_scores_cpu);
  m.impl("received_scores", &received_scores_cpu);
}

}  // namespace visionzip
