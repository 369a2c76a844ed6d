// Operator schemas of the `ilf` namespace and the Python module ilf_runtime._C.
//
// The module holds no Python functions: importing it loads this library, whose static
// initialisers register the schemas below and the CPU (and, in CUDA builds, CUDA) kernels.
// The ops are then reached as torch.ops.ilf.<name>; fake (meta) kernels live in
// ilf_runtime/ops.py. Not including <torch/extension.h> (pybind11) keeps compile time short.
#include <Python.h>
#include <torch/library.h>

#ifndef ILF_WITH_CUDA
#define ILF_WITH_CUDA 0
#endif

TORCH_LIBRARY(ilf, m) {
  // h + s * f; h, f: (B, T, D); s: () or (D,). Computed in fp32, returned in h's dtype.
  m.def("feedback_inject(Tensor h, Tensor f, Tensor s) -> Tensor");
  // layer_norm(x, no affine, eps) * (1 + scale) + shift; x: (B, T, D); shift, scale: (B, D) or
  // (B, 1, D). Statistics in fp32, returned in x's dtype. With the (D,) tables (PixArt's
  // adaLN-single: scale_shift_table rows) the modulation is shift + shift_table, scale + scale_table.
  m.def(
      "ada_layernorm(Tensor x, Tensor shift, Tensor scale, float eps, Tensor? shift_table=None, "
      "Tensor? scale_table=None) -> Tensor");
  // The gated residual epilogue of a DiT / PixArt block: out = x + (gate + gate_table) * y, rounded
  // to x's dtype; with f and s, the next loop block's input out + s * f instead (rounded once more,
  // so it equals feedback_inject(gated_residual(x, gate, y), f, s)). x, y, f: (B, T, D); gate:
  // (B, D) or (B, 1, D); gate_table: (D,); s: () or (D,).
  m.def(
      "gated_residual(Tensor x, Tensor gate, Tensor y, Tensor? gate_table=None, Tensor? f=None, "
      "Tensor? s=None) -> Tensor");
}

static PyModuleDef ilf_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Compiled kernels of ilf_runtime; the ops are registered under torch.ops.ilf.",
    -1,       // m_size: no per-module state
    nullptr,  // m_methods
    nullptr,  // m_slots
    nullptr,  // m_traverse
    nullptr,  // m_clear
    nullptr,  // m_free
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&ilf_module);
  if (m != nullptr && PyModule_AddIntConstant(m, "with_cuda", ILF_WITH_CUDA) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
