// Argument checks and the static sizes of one call (CompressPlan), shared by the CPU and CUDA bindings
// of visionzip::compress: the C++ twin of visionzip_kernels/compress.py (check_compress_inputs,
// CompressPlan). The Python entry points raise ValueError with the same wording first; these
// TORCH_CHECKs guard C++/libtorch callers and the kernels' memory accesses.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common.h"

namespace visionzip {

struct CompressPlan {
  int64_t batch = 0, tokens = 0, channels = 0;
  int64_t dominant = 0, contextual = 0;
  bool has_cls = true;
  // Scores view: (B, H, Q, N) with Q = N for received attention, 1 otherwise; last stride 1.
  at::Tensor attn;
  int64_t heads = 1, queries = 1;
  at::Tensor hidden;  // contiguous (B, N, C)
  at::Tensor metric;  // contiguous (B, N, Cm): keys, or hidden when keys are absent
  int64_t step() const {
    return contextual > 0 ? std::max<int64_t>(1, (tokens - dominant) / contextual) : 1;
  }
};

inline CompressPlan check_compress_inputs(
    const at::Tensor& hidden, const at::Tensor& attn, const at::Scalar& k_arg, const std::optional<at::Tensor>& keys,
    const std::optional<at::Scalar>& contextual_arg, const std::optional<bool>& has_cls_arg) {
  constexpr const char* op = "visionzip::compress";
  const int64_t k = int_arg(op, "k", k_arg);
  const std::optional<int64_t> contextual = optional_int_arg(op, "contextual", contextual_arg);
  const bool has_cls = bool_arg(op, "has_cls", has_cls_arg);
  TORCH_CHECK(hidden.dim() == 3, "visionzip::compress: hidden must have shape (B, N, C); got ", hidden.sizes());
  TORCH_CHECK(is_float_dtype(hidden), "visionzip::compress: hidden must be a floating tensor; got ", hidden.scalar_type());
  TORCH_CHECK(is_float_dtype(attn), "visionzip::compress: attn must be a floating tensor; got ", attn.scalar_type());
  const int64_t b = hidden.size(0), n = hidden.size(1), c = hidden.size(2);
  TORCH_CHECK(n >= 1 && c >= 1, "visionzip::compress: hidden must have N >= 1 and C >= 1; got ", hidden.sizes());
  TORCH_CHECK(attn.device() == hidden.device(), "visionzip::compress: attn is on ", attn.device(),
              " but hidden is on ", hidden.device());

  CompressPlan g;
  g.batch = b; g.tokens = n; g.channels = c; g.has_cls = has_cls;
  const int64_t cx = contextual.has_value() ? *contextual : k * 5 / 32;
  TORCH_CHECK(k >= 1 && k <= n, "visionzip::compress: k must satisfy 1 <= k <= N = ", n, "; got k=", k);
  TORCH_CHECK(cx >= 0, "visionzip::compress: contextual must be >= 0; got ", cx);
  TORCH_CHECK(cx <= k, "visionzip::compress: contextual=", cx, " exceeds the budget k=", k);
  TORCH_CHECK(!has_cls || k - cx >= 1, "visionzip::compress: with has_cls=True k - contextual must be >= 1; got k=",
              k, ", contextual=", cx);
  g.dominant = k - cx; g.contextual = cx;

  at::Tensor a;  // (B, H, Q, N)
  if (attn.dim() == 4) {
    TORCH_CHECK(attn.size(0) == b && attn.size(2) == n && attn.size(3) == n && attn.size(1) >= 1,
                "visionzip::compress: attn of shape ", attn.sizes(), " does not match hidden ", hidden.sizes(),
                ": expected (B, H, N, N)");
    a = has_cls ? attn.narrow(2, 0, 1) : attn;  // only the CLS query row is read when there is a CLS
  } else if (attn.dim() == 3) {
    TORCH_CHECK(attn.size(0) == b && attn.size(2) == n && attn.size(1) >= 1, "visionzip::compress: attn of shape ",
                attn.sizes(), " does not match hidden ", hidden.sizes(), ": expected (B, H, N)");
    a = attn.unsqueeze(2);
  } else if (attn.dim() == 2) {
    TORCH_CHECK(attn.size(0) == b && attn.size(1) == n, "visionzip::compress: attn of shape ", attn.sizes(),
                " does not match hidden ", hidden.sizes(), ": expected (B, N)");
    a = attn.unsqueeze(1).unsqueeze(2);
  } else {
    TORCH_CHECK(false, "visionzip::compress: attn must have shape (B, H, N, N), (B, H, N) or (B, N); got ",
                attn.sizes());
  }
  // Kernels are instantiated for attn/keys in hidden's dtype or float32; other mixes are upcast
  // (exactly, except float64 -> float32, which is what the float32 scores would round to anyway).
  auto aux_dtype = [&](const at::Tensor& t) {
    return (t.scalar_type() == hidden.scalar_type() || t.scalar_type() == at::kFloat) ? t : t.to(at::kFloat);
  };
  a = aux_dtype(a);
  if (a.stride(3) != 1) a = a.contiguous();
  g.attn = a; g.heads = a.size(1); g.queries = a.size(2);

  g.hidden = hidden.contiguous();
  if (keys.has_value()) {
    const at::Tensor& kt = *keys;
    TORCH_CHECK(kt.dim() == 3 && kt.size(0) == b && kt.size(1) == n && kt.size(2) >= 1,
                "visionzip::compress: keys must have shape (B, N, Ck) matching hidden ", hidden.sizes(), "; got ",
                kt.sizes());
    TORCH_CHECK(is_float_dtype(kt), "visionzip::compress: keys must be a floating tensor; got ", kt.scalar_type());
    TORCH_CHECK(kt.device() == hidden.device(), "visionzip::compress: keys is on ", kt.device(),
                " but hidden is on ", hidden.device());
    g.metric = aux_dtype(kt).contiguous();
  } else {
    g.metric = g.hidden;
  }
  return g;
}

// Outputs of one pass (docs/spec.md "Outputs"): (B, k, C) output rows, (B, D) dominant indices,
// (B, Cx) contextual indices (the token of each contextual target), (B, N) token map.
struct CompressOutputs {
  at::Tensor output, dominant_indices, contextual_indices, token_map;
};

inline CompressOutputs allocate_outputs(const CompressPlan& g) {
  auto idx = g.hidden.options().dtype(at::kLong);
  return {at::empty({g.batch, g.dominant + g.contextual, g.channels}, g.hidden.options()),
          at::empty({g.batch, g.dominant}, idx), at::empty({g.batch, g.contextual}, idx),
          at::empty({g.batch, g.tokens}, idx)};
}

}  // namespace visionzip
