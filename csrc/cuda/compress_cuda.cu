// CUDA kernels of visionzip::compress and visionzip::compress_with_indices: argument checks
// (compress_common.h), output allocation and the launch of compress_kernel.cuh (instantiated in
// compress_kernel.cu, which has no torch headers) on the current stream. No host synchronisation
// and no data-dependent shapes, so the op can be captured in a CUDA graph. float64 is not
// supported by this kernel (the packed 64-bit keys hold float32 scores).
// c10/cuda headers only: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers, which a bare
// CUDA toolkit (the CI compile check) lacks; c10::cuda::getCurrentCUDAStream is the stream
// at::cuda::getCurrentCUDAStream returns.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../compress_common.h"
#include "binding_common.h"
#include "compress_kernel.cuh"

namespace visionzip {
namespace {

namespace ck = cuda_kernel;

CompressOutputs compress_pass(const at::Tensor& hidden, const at::Tensor& attn, const at::Scalar& k,
                              const std::optional<at::Tensor>& keys, const std::optional<at::Scalar>& contextual,
                              const std::optional<bool>& has_cls) {
  TORCH_CHECK(hidden.is_cuda(), "visionzip::compress (CUDA kernel): hidden must be on a CUDA device; got ",
              hidden.device());
  TORCH_CHECK(hidden.scalar_type() != at::kDouble,
              "visionzip::compress (CUDA kernel): float64 hidden is not supported; cast to float32 or use "
              "backend='reference'");
  const c10::cuda::CUDAGuard guard(hidden.device());
  CompressPlan g = check_compress_inputs(hidden, attn, k, keys, contextual, has_cls);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(g.tokens <= kIntMax && g.channels <= kIntMax && g.metric.size(2) <= kIntMax &&
                  g.batch <= kIntMax && g.heads <= kIntMax,
              "visionzip::compress (CUDA kernel): sizes must fit in int32; got hidden ", hidden.sizes());
  CompressOutputs o = allocate_outputs(g);
  if (g.batch == 0) return o;

  const int device = hidden.get_device();
  const auto [smem_optin, num_sms] = device_limits(device);
  const int n = int(g.tokens), cx = int(g.contextual), cm = int(g.metric.size(2));
  const ck::LaunchPlan plan =
      ck::plan_compress(int(g.batch), n, cx, cm, int(g.heads), int(g.queries), size_t(smem_optin), num_sms,
                        int(g.channels), !keys.has_value());
  TORCH_CHECK(plan.ok, "visionzip::compress (CUDA kernel): N = ", n, " tokens with contextual = ", cx,
              " need ", plan.smem_needed, " bytes of shared memory per block, more than the ", smem_optin,
              " this device allows; use backend='triton' or 'reference'");
  TORCH_CHECK(int64_t(plan.partial_slices) * g.batch <= kIntMax, "visionzip::compress (CUDA kernel): batch too large");

  // Scratch buffers (allocated on the current stream by the caching allocator; capture-safe).
  const auto f32 = g.hidden.options().dtype(at::kFloat);
  at::Tensor partials, scratch;
  if (plan.partial_slices > 1) partials = at::empty({g.batch, plan.partial_slices, g.tokens}, f32);
  if (cx > 0 && !plan.targets_in_smem) {
    scratch = at::empty({g.batch * plan.channel_splits, g.contextual, g.metric.size(2)}, f32);
  }

  ck::CompressParams p{};
  p.hidden = g.hidden.data_ptr();
  p.attn = g.attn.data_ptr();
  p.attn_stride_b = g.attn.stride(0);
  p.attn_stride_h = g.attn.stride(1);
  p.attn_stride_q = g.attn.stride(2);
  p.metric = g.metric.data_ptr();
  p.score_partials = partials.defined() ? partials.data_ptr<float>() : nullptr;
  p.target_scratch = scratch.defined() ? scratch.data_ptr<float>() : nullptr;
  p.out = o.output.data_ptr();
  p.dominant = o.dominant_indices.data_ptr<int64_t>();
  p.contextual_indices = o.contextual_indices.data_ptr<int64_t>();
  p.token_map = o.token_map.data_ptr<int64_t>();
  p.batch = int(g.batch);
  p.tokens = n;
  p.channels = int(g.channels);
  p.metric_dim = cm;
  p.heads = int(g.heads);
  p.queries = int(g.queries);
  p.dominant_count = int(g.dominant);
  p.contextual = cx;
  p.step = int(g.step());
  p.partial_slices = plan.partial_slices;
  p.split_channels = plan.split_channels;
  p.has_cls = g.has_cls;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  constexpr const char* op = "visionzip::compress";
  C10_CUDA_CHECK(ck::launch_compress_dtypes(kernel_dtype(g.hidden.scalar_type(), op),
                                            kernel_dtype(g.attn.scalar_type(), op),
                                            kernel_dtype(g.metric.scalar_type(), op), p, plan, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return o;
}

at::Tensor compress_cuda(const at::Tensor& hidden, const at::Tensor& attn, const at::Scalar& k,
                         const std::optional<at::Tensor>& keys, const std::optional<at::Scalar>& contextual,
                         const std::optional<bool>& has_cls) {
  return compress_pass(hidden, attn, k, keys, contextual, has_cls).output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_with_indices_cuda(
    const at::Tensor& hidden, const at::Tensor& attn, const at::Scalar& k, const std::optional<at::Tensor>& keys,
    const std::optional<at::Scalar>& contextual, const std::optional<bool>& has_cls) {
  CompressOutputs o = compress_pass(hidden, attn, k, keys, contextual, has_cls);
  return {o.output, o.dominant_indices, o.contextual_indices, o.token_map};
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CUDA, m) {
  m.impl("compress", &compress_cuda);
  m.impl("compress_with_indices", &compress_with_indices_cuda);
}

}  // namespace visionzip
