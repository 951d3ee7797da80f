// Fused CPU kernel of visionzip::group_pool and group_pool_with_labels (docs/spec.md "Group pool").
//
// Two passes over the batch: the argmax label of every patch (logits read once), then per image the
// group sizes and the segmented sum of the value rows into their groups (values read once, O(N C)
// instead of the dense (M x N) @ (N x C) product), written as sum / (count + eps). Every output
// element is one sum in ascending patch order computed by one thread (whichever order the rows are
// read in, see group_sums), so results are bit-identical across runs and thread counts (for one
// instruction-set path, see isa.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "../group_pool_common.h"
#include "cache.h"
#include "isa.h"

namespace visionzip {
namespace {

#define VISIONZIP_KERNELS_INC "group_pool_kernels.inc"
#include "isa_builds.inc"

GroupPoolOutputs group_pool_pass(const at::Tensor& logits, const at::Tensor& values, const at::Scalar& eps) {
  TORCH_CHECK(values.device().is_cpu(), "visionzip::group_pool (CPU kernel): values must be on the CPU; got ",
              values.device());
  GroupPoolPlan g = check_group_pool_inputs(logits, values, eps);
  GroupPoolOutputs o = allocate_group_pool_outputs(g);
  if (g.batch == 0) return o;
  int64_t* labels = o.labels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.logits.scalar_type(), "visionzip_group_labels_cpu",
                                  [&] { VISIONZIP_ISA_DISPATCH(group_labels<scalar_t>(g, labels)); });
  int64_t* counts = o.counts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.values.scalar_type(), "visionzip_group_sums_cpu", [&] {
    VISIONZIP_ISA_DISPATCH(group_sums<scalar_t>(g, labels, counts, o.output.data_ptr<scalar_t>()));
  });
  return o;
}

at::Tensor group_pool_cpu(const at::Tensor& logits, const at::Tensor& values, const at::Scalar& eps) {
  return group_pool_pass(logits, values, eps).output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_pool_with_labels_cpu(const at::Tensor& logits,
                                                                          const at::Tensor& values,
                                                                          const at::Scalar& eps) {
  GroupPoolOutputs o = group_pool_pass(logits, values, eps);
  return {o.output, o.labels, o.counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CPU, m) {
  m.impl("group_pool", &group_pool_cpu);
  m.impl("group_pool_with_labels", &group_pool_with_labels_cpu);
}

}  // namespace visionzip
