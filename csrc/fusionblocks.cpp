// fusionblocks._C: operator schemas of the compiled kernels and the Python module that loads them.
//
// Kernels register implementations per device in csrc/cpu/*.cpp and csrc/cuda/*; autograd, fake
// (meta) kernels and the choice of backend live in Python (fusionblocks/ops/cpp.py, ops/cuda.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusionblocks_C, m) {
  m.def("decay_full_fwd(Tensor q, Tensor k, Tensor v, Tensor log_gamma, int H, int W, float scale) -> (Tensor, Tensor)");
  m.def(
      "decay_full_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor log_gamma, Tensor out, Tensor lse, int H, "
      "int W, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "decay_dec_fwd(Tensor q, Tensor k, Tensor v, Tensor log_gamma, int H, int W, float scale) -> (Tensor, Tensor, "
      "Tensor, Tensor)");
  m.def(
      "decay_dec_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor log_gamma, Tensor out, Tensor mid, "
      "Tensor lse_row, Tensor lse_col, int H, int W, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "window_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias_table, int H, int W, int window_size, int shift, "
      "float scale) -> Tensor");
  m.def(
      "window_bwd(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? bias_table, int H, int W, int window_size, "
      "int shift, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}

static PyModuleDef fusionblocks_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                            "Compiled kernels of fusionblocks; the ops live in torch.ops.fusionblocks_C.",
                                            -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&fusionblocks_c_module);
  if (mod == nullptr) return nullptr;
#ifdef FUSIONBLOCKS_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  return mod;
}
