// Argument checks and static sizes of visionzip::group_pool (docs/spec.md "Group pool"), shared by the
// CPU and CUDA bindings: the C++ twin of visionzip_kernels/ops/group_pool.py (check_group_pool_inputs,
// GroupPoolPlan). The Python entry raises ValueError with the same wording first; these TORCH_CHECKs
// guard C++/libtorch callers and the kernels' memory accesses.
#pragma once

#include <ATen/ATen.h>

#include "common.h"

namespace visionzip {

struct GroupPoolPlan {
  int64_t batch = 0, groups = 0, patches = 0, channels = 0;  // B, M, N, C
  double eps = 1.0;
  at::Tensor logits;  // contiguous (B, M, N), any float dtype
  at::Tensor values;  // contiguous (B, N, C)
};

inline GroupPoolPlan check_group_pool_inputs(const at::Tensor& logits, const at::Tensor& values,
                                             const at::Scalar& eps_arg) {
  constexpr const char* op = "visionzip::group_pool";
  TORCH_CHECK(logits.dim() == 3, op, ": logits must have shape (B, M, N); got ", logits.sizes());
  TORCH_CHECK(values.dim() == 3, op, ": values must have shape (B, N, C); got ", values.sizes());
  TORCH_CHECK(is_float_dtype(logits), op, ": logits must be a floating tensor; got ", logits.scalar_type());
  TORCH_CHECK(is_float_dtype(values), op, ": values must be a floating tensor; got ", values.scalar_type());
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(2) >= 1, op,
              ": logits must have M >= 1 groups and N >= 1 patches; got ", logits.sizes());
  TORCH_CHECK(values.size(0) == logits.size(0) && values.size(1) == logits.size(2) && values.size(2) >= 1, op,
              ": values of shape ", values.sizes(), " does not match logits ", logits.sizes(),
              ": expected (B, N, C) with C >= 1");
  TORCH_CHECK(values.device() == logits.device(), op, ": values is on ", values.device(), " but logits is on ",
              logits.device());
  GroupPoolPlan g;
  g.eps = positive_arg(op, "eps", eps_arg);
  g.batch = logits.size(0);
  g.groups = logits.size(1);
  g.patches = logits.size(2);
  g.channels = values.size(2);
  g.logits = logits.contiguous();
  g.values = values.contiguous();
  return g;
}

// Outputs (docs/spec.md "Group pool"): (B, M, C) in values' dtype, (B, N) labels, (B, M) counts.
struct GroupPoolOutputs {
  at::Tensor output, labels, counts;
};

inline GroupPoolOutputs allocate_group_pool_outputs(const GroupPoolPlan& g) {
  auto idx = g.values.options().dtype(at::kLong);
  return {at::empty({g.batch, g.groups, g.channels}, g.values.options()), at::empty({g.batch, g.patches}, idx),
          at::empty({g.batch, g.groups}, idx)};
}

}  // namespace visionzip
