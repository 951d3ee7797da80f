// Fused CPU kernel of visionzip::compress (docs/spec.md "Compress").
//
// Per image: head/query reduction of the attention into float scores, partial selection of the
// dominant tokens on integer keys, cosine assignment of the remaining tokens to the contextual
// targets, then one pass over hidden that writes the dominant and target rows and sums the members
// (each target's in token order; the rows read target by target when hidden fits in the
// last-level cache, cache.h) (compress_kernels.inc). Whole rounds of images run one per thread; the images
// left over (B mod threads, e.g. B = 1) run with the loops inside the image in parallel (row
// blocks of the attention, member blocks, channel slices). Every output element is computed by one
// thread in an order fixed by the shapes, so results are bit-identical across runs and thread
// counts (for one instruction-set path, see isa.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "../compress_common.h"
#include "cache.h"
#include "isa.h"

namespace visionzip {
namespace {

#define VISIONZIP_KERNELS_INC "compress_kernels.inc"
#include "isa_builds.inc"

CompressOutputs compress_pass(const at::Tensor& hidden, const at::Tensor& attn, const at::Scalar& k,
                              const std::optional<at::Tensor>& keys, const std::optional<at::Scalar>& contextual,
                              const std::optional<bool>& has_cls) {
  TORCH_CHECK(hidden.device().is_cpu(), "visionzip::compress (CPU kernel): hidden must be on the CPU; got ",
              hidden.device());
  CompressPlan g = check_compress_inputs(hidden, attn, k, keys, contextual, has_cls);
  CompressOutputs o = allocate_outputs(g);
  if (g.batch == 0) return o;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.hidden.scalar_type(), "visionzip_compress_cpu",
                                  [&] { VISIONZIP_ISA_DISPATCH(compress_images<scalar_t>(g, o)); });
  return o;
}

at::Tensor compress_cpu(const at::Tensor& hidden, const at::Tensor& attn, const at::Scalar& k,
                        const std::optional<at::Tensor>& keys, const std::optional<at::Scalar>& contextual,
                        const std::optional<bool>& has_cls) {
  return compress_pass(hidden, attn, k, keys, contextual, has_cls).output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compress_with_indices_cpu(
    const at::Tensor& hidden, const at::Tensor& attn, const at::Scalar& k, const std::optional<at::Tensor>& keys,
    const std::optional<at::Scalar>& contextual, const std::optional<bool>& has_cls) {
  CompressOutputs o = compress_pass(hidden, attn, k, keys, contextual, has_cls);
  return {o.output, o.dominant_indices, o.contextual_indices, o.token_map};
}

// Diagnostic: compress with each phase of the kernel timed on its own (profile_compress in
// compress_kernels.inc). Returns (seconds (6,) float64: scores, selection, targets, assignment,
// slots, pass over hidden, summed over the images; output).
std::tuple<at::Tensor, at::Tensor> compress_cpu_phases(const at::Tensor& hidden, const at::Tensor& attn,
                                                       const at::Scalar& k, const std::optional<at::Tensor>& keys,
                                                       const std::optional<at::Scalar>& contextual,
                                                       const std::optional<bool>& has_cls) {
  TORCH_CHECK(hidden.device().is_cpu(), "visionzip::_compress_cpu_phases: hidden must be on the CPU; got ",
              hidden.device());
  CompressPlan g = check_compress_inputs(hidden, attn, k, keys, contextual, has_cls);
  CompressOutputs o = allocate_outputs(g);
  at::Tensor secs = at::zeros({6}, at::kDouble);
  double* s = secs.data_ptr<double>();
  if (g.batch > 0)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.hidden.scalar_type(), "visionzip_compress_cpu_phases",
                                    [&] { VISIONZIP_ISA_DISPATCH(profile_images<scalar_t>(g, o, s)); });
  return {secs, o.output};
}

}  // namespace

TORCH_LIBRARY_IMPL(visionzip, CPU, m) {
  m.impl("compress", &compress_cpu);
  m.impl("compress_with_indices", &compress_with_indices_cpu);
  m.impl("_compress_cpu_phases", &compress_cpu_phases);
}

}  // namespace visionzip
