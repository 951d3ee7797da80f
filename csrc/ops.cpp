// The one place where the visionzip operator schemas are defined. Kernels register themselves per
// device in their own files (cpu/compress_cpu.cpp, cuda/*.cu); the fake (meta) kernels are
// registered from Python by each op's module (visionzip_kernels/ops/), the Triton implementations
// by visionzip_kernels/triton/.
#include <torch/library.h>

#ifdef VISIONZIP_PYTHON_MODULE
#include <Python.h>

// Importing visionzip_kernels._C loads this library and so runs the TORCH_LIBRARY blocks below.
// No Python functions are exported: everything goes through torch.ops.visionzip.*.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

// One block per op module, so that torch knows where each op's fake kernels live (and a trace without
// the package imported fails with a clear message).
TORCH_LIBRARY(visionzip, m) {
#ifdef VISIONZIP_PYTHON_MODULE
  m.set_python_module("visionzip_kernels.ops.compress");
#endif
  // compress (docs/spec.md "Compress"). k and contextual are ints, declared as Scalar so that the
  // kernels see what the caller passed: a bool or a float for k is an error, not converted
  // (common.h int_arg). has_cls is `bool?` (TorchScript cannot pass a bool as a Scalar) so that
  // None reaches the check instead of becoming False (common.h bool_arg).
  m.def(
      "compress(Tensor hidden, Tensor attn, Scalar k, *, Tensor? keys=None, Scalar? contextual=None, "
      "bool? has_cls=True) -> Tensor");
  m.def(
      "compress_with_indices(Tensor hidden, Tensor attn, Scalar k, *, Tensor? keys=None, Scalar? contextual=None, "
      "bool? has_cls=True) -> (Tensor output, Tensor dominant_indices, Tensor contextual_indices, "
      "Tensor token_map)");
  // Backward of compress for `hidden` from the pass's indices (device-generic; csrc/autograd.cpp).
  // Public only so that every backend's autograd (C++ and the Triton custom ops) shares one formula.
  m.def(
      "_compress_hidden_grad(Tensor grad_out, Tensor token_map, Tensor contextual_indices, int dominant) "
      "-> Tensor");
  // Diagnostic, CPU only (benchmarks/profile_compress_cpu.py): compress with each phase of the CPU
  // kernel timed on its own, images one after another on the calling thread, nothing overlapped.
  // -> (seconds (6,) float64: scores, selection, targets, assignment, slots, pass over hidden; output).
  m.def(
      "_compress_cpu_phases(Tensor hidden, Tensor attn, Scalar k, *, Tensor? keys=None, Scalar? contextual=None, "
      "bool? has_cls=True) -> (Tensor seconds, Tensor output)");
}

TORCH_LIBRARY_FRAGMENT(visionzip, m) {
#ifdef VISIONZIP_PYTHON_MODULE
  m.set_python_module("visionzip_kernels.ops.scores");
#endif
  // Attention scores without the N x N matrix (docs/spec.md "Scores"). q, k in one floating dtype; the
  // result is float32 (float64 for float64 inputs). scale defaults to 1/sqrt(d) and must be finite.
  //   cls_scores: q (B, H, d) the CLS query of every head, k (B, H, N, d) -> (B, N):
  //     sum over heads of softmax(q . k^T * scale).
  //   received_scores: q, k (B, H, N, d) (same N: self-attention) -> (B, N): sum over heads and
  //     queries of softmax(Q K^T * scale), column by column, in two streaming passes. cu_seqlens
  //     (S+1,) int32/int64, 0 = c_0 <= c_1 <= ... <= c_S = N: tokens attend only inside their
  //     segment [c_s, c_s+1) (packed images, block-diagonal attention); it requires B = 1.
  m.def("cls_scores(Tensor q, Tensor k, *, float? scale=None) -> Tensor");
  m.def("received_scores(Tensor q, Tensor k, *, float? scale=None, Tensor? cu_seqlens=None) -> Tensor");
}

TORCH_LIBRARY_FRAGMENT(visionzip, m) {
#ifdef VISIONZIP_PYTHON_MODULE
  m.set_python_module("visionzip_kernels.ops.group_pool");
#endif
  // group_pool (docs/spec.md "Group pool"): logits (B, M, N), values (B, N, C) -> (B, M, C) in values'
  // dtype: label_j = argmax over m of logits[:, m, j] (ties to the lower m, NaN lowest), out_m = sum of
  // the values rows labelled m / (count_m + eps). eps is a finite number > 0, declared as Scalar so that
  // a bool is an error, not 1.0 (common.h positive_arg). The companion also returns labels (B, N) and
  // counts (B, M), int64.
  m.def("group_pool(Tensor logits, Tensor values, *, Scalar eps=1.0) -> Tensor");
  m.def(
      "group_pool_with_labels(Tensor logits, Tensor values, *, Scalar eps=1.0) -> (Tensor output, Tensor labels, "
      "Tensor counts)");
  // Backward of group_pool from the pass's labels and counts (device-generic; csrc/autograd.cpp): the
  // gradient of values, and the straight-through gradient of logits. Public only so that every
  // backend's autograd (C++ and the Triton custom ops) shares one formula.
  m.def("_group_pool_values_grad(Tensor grad_out, Tensor labels, Tensor counts, float eps) -> Tensor");
  m.def(
      "_group_pool_logits_grad(Tensor grad_out, Tensor logits, Tensor values, Tensor labels, Tensor counts, "
      "float eps) -> Tensor");
}
