// Autograd of the ops (device-generic, ATen ops only).
//
// compress / compress_with_indices: the choices (scores, top-k, assignment) are discrete, so only
// `hidden` gets a gradient: a kept row passes its gradient back unchanged, each merged member
// receives 1/count of its contextual row's gradient (the target itself receives it whole). Without
// this kernel, backprop through the op would silently produce no gradient for `hidden`.
//
// group_pool / group_pool_with_labels (docs/spec.md "Group pool", "Gradients"): values get the exact
// gradient of the hard assignment; logits the straight-through gradient, that of the same formula
// with the one-hot matrix replaced by softmax(logits) over the groups, evaluated at the hard one.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace visionzip {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using IndicesResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

IndicesResult call_with_indices(const at::Tensor& hidden, const at::Tensor& attn, const at::Scalar& k,
                                const std::optional<at::Tensor>& keys, const std::optional<at::Scalar>& contextual,
                                const std::optional<bool>& has_cls) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("visionzip::compress_with_indices", "")
                       .typed<IndicesResult(const at::Tensor&, const at::Tensor&, const at::Scalar&,
                                            const std::optional<at::Tensor>&, const std::optional<at::Scalar>&,
                                            const std::optional<bool>&)>();
  return op.call(hidden, attn, k, keys, contextual, has_cls);
}

// grad_out (B, k, C), token_map (B, N), contextual_indices (B, Cx) -> grad of hidden (B, N, C).
at::Tensor hidden_grad(const at::Tensor& grad_out, const at::Tensor& token_map, const at::Tensor& contextual_indices,
                       int64_t dominant) {
  const int64_t b = token_map.size(0), k = grad_out.size(1), c = grad_out.size(2);
  // counts and weights in float32 (exact to 2^24), float64 for float64 gradients
  const auto acc = at::promote_types(grad_out.scalar_type(), at::kFloat);
  auto kept = token_map.ge(0).to(acc);
  auto rows = token_map.clamp_min(0);
  // tokens mapped to each output row (a contextual row counts its target too)
  auto per_row = at::zeros({b, k}, grad_out.options().dtype(acc)).scatter_add_(1, rows, kept);
  auto is_target = at::zeros_like(token_map, token_map.options().dtype(at::kBool)).scatter_(1, contextual_indices, true);
  auto member = token_map.ge(dominant).logical_and(is_target.logical_not());
  auto scale = at::where(member, (per_row.gather(1, rows) - 1).clamp_min(1).reciprocal(), kept);
  return grad_out.gather(1, rows.unsqueeze(-1).expand({b, rows.size(1), c})) * scale.unsqueeze(-1).to(grad_out.scalar_type());
}

class CompressFunction : public torch::autograd::Function<CompressFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& attn,
                               const at::Scalar& k, const std::optional<at::Tensor>& keys,
                               const std::optional<at::Scalar>& contextual, const std::optional<bool>& has_cls) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, dominant, contextual_indices, token_map] =
        call_with_indices(hidden, attn, k, keys, contextual, has_cls);
    ctx->save_for_backward({token_map, contextual_indices});
    ctx->saved_data["dominant"] = dominant.size(1);
    ctx->mark_non_differentiable({dominant, contextual_indices, token_map});
    return {output, dominant, contextual_indices, token_map};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    at::Tensor grad_hidden;
    if (grads[0].defined()) grad_hidden = hidden_grad(grads[0], saved[0], saved[1], ctx->saved_data["dominant"].toInt());
    return {grad_hidden, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

IndicesResult compress_with_indices_autograd(const at::Tensor& hidden, const at::Tensor& attn, const at::Scalar& k,
                                             const std::optional<at::Tensor>& keys,
                                             const std::optional<at::Scalar>& contextual, const std::optional<bool>& has_cls) {
  auto r = CompressFunction::apply(hidden, attn, k, keys, contextual, has_cls);
  return {r[0], r[1], r[2], r[3]};
}

at::Tensor compress_autograd(const at::Tensor& hidden, const at::Tensor& attn, const at::Scalar& k,
                             const std::optional<at::Tensor>& keys, const std::optional<at::Scalar>& contextual,
                             const std::optional<bool>& has_cls) {
  if (at::GradMode::is_enabled() && hidden.requires_grad()) {
    return CompressFunction::apply(hidden, attn, k, keys, contextual, has_cls)[0];
  }
  // Inference: straight to the device kernel of `compress` (which may skip the index outputs).
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("visionzip::compress", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Scalar&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Scalar>&,
                                         const std::optional<bool>&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(hidden, attn, k, keys, contextual, has_cls);
}

// ---- group_pool ----

using PoolResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Gradients are computed in float32, float64 for float64 values (docs/spec.md "Numerics").
at::ScalarType pool_acc(const at::Tensor& values) {
  return values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// den[b, m] = count[b, m] + eps, in acc.
at::Tensor pool_denominator(const at::Tensor& counts, double eps, at::ScalarType acc) {
  return counts.to(acc) + eps;
}

// grad_out (B, M, C), labels (B, N), counts (B, M) -> grad of values (B, N, C) in grad_out's dtype:
// row j gets grad_out[label_j] / (count + eps).
at::Tensor pool_values_grad(const at::Tensor& grad_out, const at::Tensor& labels, const at::Tensor& counts,
                            double eps) {
  const auto acc = at::promote_types(grad_out.scalar_type(), at::kFloat);
  const int64_t b = labels.size(0), n = labels.size(1), c = grad_out.size(2);
  auto scaled = grad_out.to(acc) / pool_denominator(counts, eps, acc).unsqueeze(-1);
  return scaled.gather(1, labels.unsqueeze(-1).expand({b, n, c})).to(grad_out.scalar_type());
}

// Straight-through gradient of logits (B, M, N), in logits' dtype. With A the (M, N) assignment,
// out_m = sum_j A_mj v_j / (sum_j A_mj + eps), at A = one-hot(labels):
//   dL/dA_mj = g_m . v_j / den_m - g_m . out_m / den_m = P_mj - (sum over j' in m of P_mj') / den_m,
// P = (g / den) @ values^T; then the softmax over m: dL/dlogits = S * (dL/dA - sum_m S * dL/dA).
at::Tensor pool_logits_grad(const at::Tensor& grad_out, const at::Tensor& logits, const at::Tensor& values,
                            const at::Tensor& labels, const at::Tensor& counts, double eps) {
  const auto acc = pool_acc(values);
  const int64_t m = logits.size(1);
  auto den = pool_denominator(counts, eps, acc);
  auto p = at::bmm(grad_out.to(acc) / den.unsqueeze(-1), values.to(acc).transpose(1, 2));  // (B, M, N)
  auto hard = labels.unsqueeze(1).eq(at::arange(m, labels.options()).view({1, m, 1}));
  auto own = at::where(hard, p, at::zeros({}, p.options())).sum(-1) / den;  // g_m . out_m / den_m
  auto da = p - own.unsqueeze(-1);
  auto soft = at::softmax(logits.to(acc), 1);
  return (soft * (da - (soft * da).sum(1, /*keepdim=*/true))).to(logits.scalar_type());
}

PoolResult call_group_pool_with_labels(const at::Tensor& logits, const at::Tensor& values, const at::Scalar& eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("visionzip::group_pool_with_labels", "")
                       .typed<PoolResult(const at::Tensor&, const at::Tensor&, const at::Scalar&)>();
  return op.call(logits, values, eps);
}

class GroupPoolFunction : public torch::autograd::Function<GroupPoolFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& values,
                               const at::Scalar& eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, labels, counts] = call_group_pool_with_labels(logits, values, eps);
    ctx->save_for_backward({logits, values, labels, counts});
    ctx->saved_data["eps"] = eps.toDouble();  // validated by the kernel
    ctx->mark_non_differentiable({labels, counts});
    return {output, labels, counts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    at::Tensor grad_logits, grad_values;
    if (grads[0].defined()) {
      if (ctx->needs_input_grad(0)) grad_logits = pool_logits_grad(grads[0], saved[0], saved[1], saved[2], saved[3], eps);
      if (ctx->needs_input_grad(1)) grad_values = pool_values_grad(grads[0], saved[2], saved[3], eps);
    }
    return {grad_logits, grad_values, at::Tensor()};
  }
};

PoolResult group_pool_with_labels_autograd(const at::Tensor& logits, const at::Tensor& values, const at::Scalar& eps) {
  auto r = GroupPoolFunction::apply(logits, values, eps);
  return {r[0], r[1], r[2]};
}

at::Tensor group_pool_autograd(const at::Tensor& logits, const at::Tensor& values, const at::Scalar& eps) {
  if (at::GradMode::is_enabled() && (logits.requires_grad() || values.requires_grad())) {
    return GroupPoolFunction::apply(logits, values, eps)[0];
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("visionzip::group_pool", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Scalar&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(logits, values, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CompositeExplicitAutograd, m) {
  m.impl("_compress_hidden_grad", &hidden_grad);
  m.impl("_group_pool_values_grad", &pool_values_grad);
  m.impl("_group_pool_logits_grad", &pool_logits_grad);
}

TORCH_LIBRARY_IMPL(visionzip, Autograd, m) {
  m.impl("compress", &compress_autograd);
  m.impl("compress_with_indices", &compress_with_indices_autograd);
  m.impl("group_pool", &group_pool_autograd);
  m.impl("group_pool_with_labels", &group_pool_with_labels_autograd);
}

}  // namespace visionzip
