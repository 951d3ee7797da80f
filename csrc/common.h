// Small helpers shared by every C++ binding of the visionzip ops.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>

namespace visionzip {

// The floating dtypes the ops accept (the Python side raises ValueError for others first).
inline bool is_float_dtype(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

// Argument rules of docs/spec.md "Arguments", the C++ half (visionzip_kernels/_validation.py is the
// Python half). Integer arguments are `Scalar` in the schemas and flags `bool?`, so that a bool
// passed as an int, or None passed as a flag, reaches these checks instead of being converted by
// the Python binding (which would make True a k of 1 and None a has_cls of False).
inline int64_t int_arg(const char* op, const char* name, const at::Scalar& v) {
  TORCH_CHECK(v.isIntegral(/*includeBool=*/false), op, ": ", name, " must be an int; got a ",
              v.isBoolean() ? "bool" : (v.isFloatingPoint() ? "float" : "non-integer"), " (", v.toDouble(), ")");
  return v.toLong();
}

inline std::optional<int64_t> optional_int_arg(const char* op, const char* name,
                                                const std::optional<at::Scalar>& v) {
  if (!v.has_value()) return std::nullopt;
  return int_arg(op, name, *v);
}

inline bool bool_arg(const char* op, const char* name, const std::optional<bool>& v) {
  TORCH_CHECK(v.has_value(), op, ": ", name, " must be a bool (True or False); got None");
  return *v;
}

// scale of the score ops: None (1/sqrt(d)) or a finite float.
inline std::optional<double> scale_arg(const char* op, std::optional<double> scale) {
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale), op, ": scale must be finite or None; got ", *scale);
  return scale;
}

// eps of group_pool: a number (int or float, not a bool), finite and > 0.
inline double positive_arg(const char* op, const char* name, const at::Scalar& v) {
  TORCH_CHECK(!v.isBoolean() && (v.isFloatingPoint() || v.isIntegral(/*includeBool=*/false)), op, ": ", name,
              " must be a float; got a ", v.isBoolean() ? "bool" : "non-real number");
  const double x = v.toDouble();
  TORCH_CHECK(std::isfinite(x) && x > 0, op, ": ", name, " must be finite and > 0; got ", x);
  return x;
}

}  // namespace visionzip
