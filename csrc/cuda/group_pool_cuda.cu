// CUDA kernels of visionzip::group_pool and group_pool_with_labels: argument checks
// (group_pool_common.h), output allocation and the launch of group_pool_kernel.cuh (instantiated in
// group_pool_kernel.cu, which has no torch headers) on the current stream. No host synchronisation and
// no data-dependent shapes, so the op can be captured in a CUDA graph. float64 values are not supported
// by this kernel (it accumulates in float32); float64 logits are (compared as double).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../group_pool_common.h"
#include "binding_common.h"
#include "group_pool_kernel.cuh"

namespace visionzip {
namespace {

namespace ck = cuda_kernel;

GroupPoolOutputs group_pool_pass(const at::Tensor& logits, const at::Tensor& values, const at::Scalar& eps) {
  TORCH_CHECK(values.is_cuda(), "visionzip::group_pool (CUDA kernel): values must be on a CUDA device; got ",
              values.device());
  TORCH_CHECK(values.scalar_type() != at::kDouble,
              "visionzip::group_pool (CUDA kernel): float64 values are not supported; cast to float32 or use "
              "backend='reference'");
  const c10::cuda::CUDAGuard guard(values.device());
  GroupPoolPlan g = check_group_pool_inputs(logits, values, eps);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(g.patches <= kIntMax && g.groups <= kIntMax && g.channels <= kIntMax && g.batch <= kIntMax,
              "visionzip::group_pool (CUDA kernel): sizes must fit in int32; got logits ", logits.sizes(),
              ", values ", values.sizes());
  // The kernel compares logits in values' dtype, float32 or float64; other half types are widened
  // to float32, exactly.
  const auto lt = g.logits.scalar_type();
  if (lt != g.values.scalar_type() && lt != at::kFloat && lt != at::kDouble) g.logits = g.logits.to(at::kFloat);
  GroupPoolOutputs o = allocate_group_pool_outputs(g);
  if (g.batch == 0) return o;

  const int device = values.get_device();
  const auto [smem_optin, num_sms] = device_limits(device);
  const ck::GroupPoolLaunch plan = ck::plan_group_pool(int(g.batch), int(g.groups), int(g.patches),
                                                       int(g.channels), size_t(smem_optin), num_sms);
  TORCH_CHECK(plan.ok, "visionzip::group_pool (CUDA kernel): N = ", g.patches, " patches and M = ", g.groups,
              " groups need ", plan.smem_bytes, " bytes of shared memory per block, more than the ", smem_optin,
              " this device allows; use backend='triton' or 'reference'");

  ck::GroupPoolParams p{};
  p.logits = g.logits.data_ptr();
  p.values = g.values.data_ptr();
  p.out = o.output.data_ptr();
  p.labels = o.labels.data_ptr<int64_t>();
  p.counts = o.counts.data_ptr<int64_t>();
  p.batch = int(g.batch);
  p.groups = int(g.groups);
  p.patches = int(g.patches);
  p.channels = int(g.channels);
  p.eps = float(g.eps);
  p.split_channels = plan.split_channels;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  constexpr const char* op = "visionzip::group_pool";
  C10_CUDA_CHECK(ck::launch_group_pool_dtypes(kernel_dtype(g.values.scalar_type(), op),
                                              kernel_dtype(g.logits.scalar_type(), op), p, plan, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o;
}

at::Tensor group_pool_cuda(const at::Tensor& logits, const at::Tensor& values, const at::Scalar& eps) {
  return group_pool_pass(logits, values, eps).output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_pool_with_labels_cuda(const at::Tensor& logits,
                                                                           const at::Tensor& values,
                                                                           const at::Scalar& eps) {
  GroupPoolOutputs o = group_pool_pass(logits, values, eps);
  return {o.output, o.labels, o.counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CUDA, m) {
  m.impl("group_pool", &group_pool_cuda);
  m.impl("group_pool_with_labels", &group_pool_with_labels_cuda);
}

}  // namespace visionzip
