// The instantiations of the CUDA kernel of visionzip::group_pool (group_pool_kernel.cuh). No torch
// headers: the torch binding (group_pool_cuda.cu) calls launch_group_pool_dtypes.
#include "group_pool_kernel.cuh"

namespace visionzip {
namespace cuda_kernel {

namespace {
template <typename T>
cudaError_t launch_logits(DType values, DType logits, const GroupPoolParams& p, const GroupPoolLaunch& plan,
                          cudaStream_t stream) {
  if (logits == DType::kFloat32) return launch_group_pool<T, float>(p, plan, stream);
  if (logits == DType::kFloat64) return launch_group_pool<T, double>(p, plan, stream);
  if (logits == values) return launch_group_pool<T, T>(p, plan, stream);
  return cudaErrorInvalidValue;
}
}  // namespace

cudaError_t launch_group_pool_dtypes(DType values, DType logits, const GroupPoolParams& p,
                                     const GroupPoolLaunch& plan, cudaStream_t stream) {
  switch (values) {
    case DType::kFloat32: return launch_logits<float>(values, logits, p, plan, stream);
    case DType::kFloat16: return launch_logits<__half>(values, logits, p, plan, stream);
    case DType::kBFloat16: return launch_logits<__nv_bfloat16>(values, logits, p, plan, stream);
    default: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_kernel
}  // namespace visionzip
