// The one place where the visionzip operator schemas are defined. Kernels register themselves per
// device in their own files (cpu/compress_cpu.cpp, cuda/*.cu); the fake (meta) kernels and the
// Triton implementations are registered from Python in visionzip_kernels/ops.py.
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

TORCH_LIBRARY(visionzip, m) {
#ifdef VISIONZIP_PYTHON_MODULE
  // Tells torch where the fake kernels live, so tracing without importing the package fails clearly.
  m.set_python_module("visionzip_kernels.ops");
#endif
  m.def(
      "compress(Tensor hidden, Tensor attn, int k, *, Tensor? keys=None, int? contextual=None, "
      "bool has_cls=True) -> Tensor");
  m.def(
      "compress_with_indices(Tensor hidden, Tensor attn, int k, *, Tensor? keys=None, int? contextual=None, "
      "bool has_cls=True) -> (Tensor output, Tensor dominant_indices, Tensor contextual_indices, "
      "Tensor token_map)");
}
