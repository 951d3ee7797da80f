// Small helpers shared by every C++ binding of the visionzip ops.
#pragma once

#include <ATen/ATen.h>

namespace visionzip {

// The floating dtypes the ops accept (the Python side raises ValueError for others first).
inline bool is_float_dtype(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

}  // namespace visionzip
