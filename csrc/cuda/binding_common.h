// Helpers of the torch bindings of the CUDA kernels (compress_cuda.cu, group_pool_cuda.cu): dtype codes
// and the device limits a launch plan needs.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include "kernel_common.cuh"

namespace visionzip {

// The kernels' code of a tensor dtype (each launch function rejects the codes it has no kernel for).
inline cuda_kernel::DType kernel_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cuda_kernel::DType::kFloat32;
    case at::kHalf: return cuda_kernel::DType::kFloat16;
    case at::kBFloat16: return cuda_kernel::DType::kBFloat16;
    case at::kDouble: return cuda_kernel::DType::kFloat64;
    default: break;
  }
  TORCH_CHECK(false, op, " (CUDA kernel): unsupported dtype ", t);
}

struct DeviceLimits {
  int smem_optin = 0;  // dynamic shared memory a block may opt in to
  int num_sms = 0;
};

// Attribute queries are host-only (no synchronisation, allowed during graph capture).
inline DeviceLimits device_limits(int device) {
  DeviceLimits l;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l.num_sms, cudaDevAttrMultiProcessorCount, device));
  return l;
}

}  // namespace visionzip
