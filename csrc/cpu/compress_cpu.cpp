// Fused CPU kernel of visionzip::compress (SPEC 1-3).
//
// One pass per image: head/query reduction of the attention into float scores, partial selection
// of the dominant tokens (nth_element, no full sort), ordered gather, cosine assignment of the
// remaining tokens to the contextual targets, segmented mean and output write. Parallel over the
// batch; when the batch is smaller than the thread pool, the loops inside an image run in parallel
// instead (nested at::parallel_for calls run inline). Every output element is computed by one
// thread in a fixed order, so results are bit-identical across runs and thread counts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../compress_common.h"

namespace visionzip {
namespace {

template <typename T>
constexpr bool is_reduced_v = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// acc[i] += x[i] for i < n, lane-wise (no reassociation: the result does not depend on alignment).
template <typename T, typename acc_t>
inline void add_row(acc_t* acc, const T* x, int64_t n) {
  using aVec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  if constexpr (std::is_same_v<T, acc_t>) {
    for (; i + aVec::size() <= n; i += aVec::size()) (aVec::loadu(acc + i) + aVec::loadu(x + i)).store(acc + i);
  } else if constexpr (is_reduced_v<T> && std::is_same_v<acc_t, float>) {
    using tVec = at::vec::Vectorized<T>;
    for (; i + tVec::size() <= n; i += tVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(tVec::loadu(x + i));
      (aVec::loadu(acc + i) + lo).store(acc + i);
      (aVec::loadu(acc + i + aVec::size()) + hi).store(acc + i + aVec::size());
    }
  }
  for (; i < n; ++i) acc[i] += static_cast<acc_t>(x[i]);
}

// sum_i x[i] * y[i] with a fixed vector blocking (deterministic for a given n).
template <typename T, typename acc_t>
inline acc_t dot_row(const T* x, const acc_t* y, int64_t n) {
  using aVec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  aVec acc0(0), acc1(0);
  if constexpr (std::is_same_v<T, acc_t>) {
    for (; i + aVec::size() <= n; i += aVec::size()) acc0 = at::vec::fmadd(aVec::loadu(x + i), aVec::loadu(y + i), acc0);
  } else if constexpr (is_reduced_v<T> && std::is_same_v<acc_t, float>) {
    using tVec = at::vec::Vectorized<T>;
    for (; i + tVec::size() <= n; i += tVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(tVec::loadu(x + i));
      acc0 = at::vec::fmadd(lo, aVec::loadu(y + i), acc0);
      acc1 = at::vec::fmadd(hi, aVec::loadu(y + i + aVec::size()), acc1);
    }
  }
  acc_t s = at::vec::vec_reduce_all<acc_t>([](aVec& a, aVec& b) { return a + b; }, acc0 + acc1);
  for (; i < n; ++i) s += static_cast<acc_t>(x[i]) * y[i];
  return s;
}

// The ranking rule of SPEC 2: larger first, NaN below every number, ties toward the lower index.
template <typename acc_t>
inline bool ranks_before(acc_t sa, int64_t ia, acc_t sb, int64_t ib) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return ia < ib;
}

struct ImageOut {
  void* out;  // (k, C) rows of this image, hidden's dtype
  int64_t* dominant;
  int64_t* targets;
  int64_t* token_map;
};

template <typename scalar_t, typename attn_t, typename metric_t>
struct CompressKernel {
  using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
  const CompressGeometry& g;
  const scalar_t* hidden;
  const attn_t* attn;
  const metric_t* metric;
  int64_t metric_dim;
  int64_t sa_b, sa_h, sa_q;  // attn strides (elements)

  explicit CompressKernel(const CompressGeometry& geo)
      : g(geo),
        hidden(geo.hidden.data_ptr<scalar_t>()),
        attn(geo.attn.data_ptr<attn_t>()),
        metric(geo.metric.data_ptr<metric_t>()),
        metric_dim(geo.metric.size(2)),
        sa_b(geo.attn.stride(0)),
        sa_h(geo.attn.stride(1)),
        sa_q(geo.attn.stride(2)) {}

  void image(int64_t b, const ImageOut& o) const {
    const int64_t n = g.tokens, c = g.channels, d = g.dominant, cx = g.contextual, r = n - d;
    const scalar_t* hid = hidden + b * n * c;

    // 1. Scores: sum over heads (and queries for received attention), in a fixed h, q order.
    std::vector<acc_t> score(n, acc_t(0));
    const attn_t* a = attn + b * sa_b;
    at::parallel_for(0, n, 256, [&](int64_t j0, int64_t j1) {
      for (int64_t h = 0; h < g.heads; ++h)
        for (int64_t q = 0; q < g.queries; ++q) add_row(score.data() + j0, a + h * sa_h + q * sa_q + j0, j1 - j0);
    });

    // 2. Dominant selection: partial selection of the best D, then ascending index order.
    std::vector<int64_t> order(n);
    std::iota(order.begin(), order.end(), int64_t(0));
    if (g.has_cls) score[0] = std::numeric_limits<acc_t>::infinity();  // ties go to index 0: CLS always kept
    auto better = [&](int64_t x, int64_t y) { return ranks_before(score[x], x, score[y], y); };
    if (d < n) std::nth_element(order.begin(), order.begin() + d, order.end(), better);
    std::sort(order.begin(), order.begin() + d);
    std::vector<uint8_t> kept(n, 0);
    for (int64_t i = 0; i < d; ++i) {
      kept[order[i]] = 1;
      o.dominant[i] = order[i];
      o.token_map[order[i]] = i;
    }
    std::vector<int64_t> rest;  // remaining tokens in original order
    rest.reserve(r);
    for (int64_t j = 0; j < n; ++j)
      if (!kept[j]) rest.push_back(j);

    auto* out = static_cast<scalar_t*>(o.out);
    at::parallel_for(0, d, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) std::copy_n(hid + o.dominant[i] * c, c, out + i * c);
    });
    if (cx == 0) {
      for (int64_t j : rest) o.token_map[j] = -1;
      return;
    }

    // 3. Targets and their normalised metric rows.
    const int64_t step = g.step(), m = metric_dim;
    const metric_t* met = metric + b * n * m;
    std::vector<acc_t> tnorm(cx * m);
    for (int64_t t = 0; t < cx; ++t) {
      const int64_t tok = rest[t * step];
      o.targets[t] = tok;
      acc_t* row = tnorm.data() + t * m;
      std::fill_n(row, m, acc_t(0));
      add_row(row, met + tok * m, m);
      acc_t ss = 0;
      for (int64_t i = 0; i < m; ++i) ss += row[i] * row[i];
      const acc_t inv = acc_t(1) / std::max(std::sqrt(ss), acc_t(1e-12));
      for (int64_t i = 0; i < m; ++i) row[i] *= inv;
    }

    // 4. Assignment: argmax over targets of <x_i, t_hat>; the positive factor 1/|x_i| does not
    //    change the argmax, so the members' own norms are never computed.
    std::vector<int32_t> label(r);
    at::parallel_for(0, r, 64, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const metric_t* x = met + rest[p] * m;
        int32_t best = 0;
        acc_t best_s = dot_row(x, tnorm.data(), m);
        for (int64_t t = 1; t < cx; ++t) {
          const acc_t s = dot_row(x, tnorm.data() + t * m, m);
          if (ranks_before(s, t, best_s, int64_t(best))) best = int32_t(t), best_s = s;
        }
        label[p] = best;
      }
    });
    for (int64_t t = 0; t < cx; ++t) label[t * step] = int32_t(t);  // targets label themselves
    for (int64_t p = 0; p < r; ++p) o.token_map[rest[p]] = d + label[p];

    // 5. Segmented mean over the members (non-target remaining tokens), in ascending token order,
    //    parallel over channel slices so each element's sum has one fixed order.
    std::vector<int64_t> count(cx, 0);
    std::vector<uint8_t> is_target(r, 0);
    for (int64_t t = 0; t < cx; ++t) is_target[t * step] = 1;
    for (int64_t p = 0; p < r; ++p)
      if (!is_target[p]) ++count[label[p]];
    at::parallel_for(0, c, 256, [&](int64_t c0, int64_t c1) {
      const int64_t w = c1 - c0;
      std::vector<acc_t> sum(cx * w, acc_t(0));
      for (int64_t p = 0; p < r; ++p)
        if (!is_target[p]) add_row(sum.data() + label[p] * w, hid + rest[p] * c + c0, w);
      for (int64_t t = 0; t < cx; ++t) {
        const scalar_t* th = hid + o.targets[t] * c + c0;
        const acc_t cnt = acc_t(std::max<int64_t>(count[t], 1));
        scalar_t* dst = out + (d + t) * c + c0;
        const acc_t* s = sum.data() + t * w;
        for (int64_t i = 0; i < w; ++i) dst[i] = static_cast<scalar_t>(static_cast<acc_t>(th[i]) + s[i] / cnt);
      }
    });
  }
};

template <typename scalar_t, typename attn_t, typename metric_t>
void run_compress(const CompressGeometry& g, CompressOutputs& o) {
  CompressKernel<scalar_t, attn_t, metric_t> kernel(g);
  const int64_t k = g.dominant + g.contextual;
  auto* out = o.out.data_ptr<scalar_t>();
  auto* dom = o.dominant.data_ptr<int64_t>();
  auto* tgt = o.targets.data_ptr<int64_t>();
  auto* map = o.token_map.data_ptr<int64_t>();
  auto one = [&](int64_t b) {
    kernel.image(b, ImageOut{out + b * k * g.channels, dom + b * g.dominant, tgt + b * g.contextual,
                             map + b * g.tokens});
  };
  if (g.batch >= at::get_num_threads()) {
    at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) one(b);
    });
  } else {
    for (int64_t b = 0; b < g.batch; ++b) one(b);  // the loops inside the image go parallel
  }
}

template <typename scalar_t>
void dispatch_aux(const CompressGeometry& g, CompressOutputs& o) {
  const bool attn_same = g.attn.scalar_type() == g.hidden.scalar_type();
  const bool metric_same = g.metric.scalar_type() == g.hidden.scalar_type();
  if (attn_same && metric_same) return run_compress<scalar_t, scalar_t, scalar_t>(g, o);
  if (attn_same) return run_compress<scalar_t, scalar_t, float>(g, o);
  if (metric_same) return run_compress<scalar_t, float, scalar_t>(g, o);
  return run_compress<scalar_t, float, float>(g, o);
}

CompressOutputs compress_pass(const at::Tensor& hidden, const at::Tensor& attn, int64_t k,
                              const std::optional<at::Tensor>& keys, std::optional<int64_t> contextual,
                              bool has_cls) {
  TORCH_CHECK(hidden.device().is_cpu(), "visionzip::compress (CPU kernel): hidden must be on the CPU; got ",
              hidden.device());
  CompressGeometry g = check_compress_args(hidden, attn, k, keys, contextual, has_cls);
  CompressOutputs o = allocate_outputs(g);
  if (g.batch == 0) return o;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.hidden.scalar_type(), "visionzip_compress_cpu",
                                  [&] { dispatch_aux<scalar_t>(g, o); });
  return o;
}

at::Tensor compress_cpu(const at::Tensor& hidden, const at::Tensor& attn, int64_t k,
                        const std::optional<at::Tensor>& keys, std::optional<int64_t> contextual, bool has_cls) {
  return compress_pass(hidden, attn, k, keys, contextual, has_cls).out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_with_indices_cpu(
    const at::Tensor& hidden, const at::Tensor& attn, int64_t k, const std::optional<at::Tensor>& keys,
    std::optional<int64_t> contextual, bool has_cls) {
  CompressOutputs o = compress_pass(hidden, attn, k, keys, contextual, has_cls);
  return {o.out, o.dominant, o.targets, o.token_map};
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CPU, m) {
  m.impl("compress", &compress_cpu);
  m.impl("compress_with_indices", &compress_with_indices_cpu);
}

}  // namespace visionzip
