// The instantiations of the CUDA kernels of visionzip::compress (compress_kernel.cuh). No torch
// headers: the torch binding (compress_cuda.cu) calls launch_compress_dtypes.
#include "compress_kernel.cuh"

namespace visionzip {
namespace cuda_kernel {

namespace {
template <typename T>
cudaError_t launch_aux(DType hidden, DType attn, DType metric, const CompressParams& p, const LaunchPlan& plan,
                       cudaStream_t stream) {
  const bool attn_same = attn == hidden, metric_same = metric == hidden;
  const bool attn_f32 = attn == DType::kFloat32, metric_f32 = metric == DType::kFloat32;
  if (!(attn_same || attn_f32) || !(metric_same || metric_f32)) return cudaErrorInvalidValue;
  if (attn_same && metric_same) return launch_compress<T, T, T>(p, plan, stream);
  if (attn_same) return launch_compress<T, T, float>(p, plan, stream);
  if (metric_same) return launch_compress<T, float, T>(p, plan, stream);
  return launch_compress<T, float, float>(p, plan, stream);
}
}  // namespace

cudaError_t launch_compress_dtypes(DType hidden, DType attn, DType metric, const CompressParams& p,
                                   const LaunchPlan& plan, cudaStream_t stream) {
  switch (hidden) {
    case DType::kFloat32:
      if (attn != DType::kFloat32 || metric != DType::kFloat32) return cudaErrorInvalidValue;
      return launch_compress<float, float, float>(p, plan, stream);
    case DType::kFloat16:
      return launch_aux<__half>(hidden, attn, metric, p, plan, stream);
    case DType::kBFloat16:
      return launch_aux<__nv_bfloat16>(hidden, attn, metric, p, plan, stream);
    default:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_kernel
}  // namespace visionzip
