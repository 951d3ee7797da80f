// Autograd for visionzip::compress and compress_with_indices (device-generic, ATen ops only).
//
// The choices (scores, top-k, assignment) are discrete, so only `hidden` gets a gradient: a kept
// row passes its gradient back unchanged, each merged member receives 1/count of its contextual
// row's gradient (the target itself receives it whole). Without this kernel, backprop through the
// op would silently produce no gradient for `hidden`.
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

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CompositeExplicitAutograd, m) {
  m.impl("_compress_hidden_grad", &hidden_grad);
}

TORCH_LIBRARY_IMPL(visionzip, Autograd, m) {
  m.impl("compress", &compress_autograd);
  m.impl("compress_with_indices", &compress_with_indices_autograd);
}

}  // namespace visionzip
