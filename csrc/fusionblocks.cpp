// fusionblocks._C: operator schemas of the compiled kernels and the Python module that loads them.
//
// Kernels register implementations per device in csrc/cpu/*.cpp and csrc/cuda/*, autograd in
// csrc/autograd.cpp; fake (meta) kernels and the choice of backend live in Python
// (fusionblocks/ops/cpp.py, ops/cuda.py).
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "cpu/isa.h"

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
  // training forms (CPU): the forward also returns the softmax probabilities, the backward reads them
  m.def(
      "decay_dec_fwd_train(Tensor q, Tensor k, Tensor v, Tensor log_gamma, int H, int W, float scale) -> (Tensor, "
      "Tensor, Tensor, Tensor)");
  m.def(
      "decay_dec_bwd_probs(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor log_gamma, Tensor mid, Tensor p_row, "
      "Tensor p_col, int H, int W, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "window_fwd_train(Tensor q, Tensor k, Tensor v, Tensor? bias_table, int H, int W, int window_size, int shift, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "window_bwd_probs(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor probs, Tensor? bias_table, int H, int W, "
      "int window_size, int shift, float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace {

// The CPU kernel variant (csrc/cpu/isa.h), for fusionblocks.ops.cpp.set_isa / current_isa / supported_isas.
template <typename F>
PyObject* guarded(F f) {
  try {
    return f();
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  return guarded([] { return PyUnicode_FromString(fusionblocks::cpu::isa_name(fusionblocks::cpu::active_isa())); });
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  return guarded([arg]() -> PyObject* {
    if (arg == Py_None) {
      fusionblocks::cpu::set_active_isa(std::nullopt);
    } else {
      const char* name = PyUnicode_AsUTF8(arg);
      if (name == nullptr) return nullptr;
      fusionblocks::cpu::set_active_isa(fusionblocks::cpu::parse_isa(name));
    }
    Py_RETURN_NONE;
  });
}

PyObject* set_thread_cpu_isa(PyObject*, PyObject* arg) {
  return guarded([arg]() -> PyObject* {
    std::optional<fusionblocks::cpu::Isa> isa;
    if (arg != Py_None) {
      const char* name = PyUnicode_AsUTF8(arg);
      if (name == nullptr) return nullptr;
      isa = fusionblocks::cpu::parse_isa(name);
    }
    const auto prev = fusionblocks::cpu::set_thread_isa(isa);
    if (!prev.has_value()) Py_RETURN_NONE;
    return PyUnicode_FromString(fusionblocks::cpu::isa_name(*prev));
  });
}

PyObject* cpu_isas(PyObject*, PyObject*) {
  return guarded([]() -> PyObject* {
    const auto names = fusionblocks::cpu::supported_isas();
    PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
    if (list == nullptr) return nullptr;
    for (size_t i = 0; i < names.size(); ++i)
      PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), PyUnicode_FromString(names[i].c_str()));
    return list;
  });
}

PyObject* cpu_isa_unsupported_reason(PyObject*, PyObject* arg) {
  return guarded([arg]() -> PyObject* {
    const char* name = PyUnicode_AsUTF8(arg);
    if (name == nullptr) return nullptr;
    const std::string why = fusionblocks::cpu::isa_unsupported_reason(fusionblocks::cpu::parse_isa(name));
    return PyUnicode_FromString(why.c_str());
  });
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Name of the CPU kernel variant the next call uses."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Force a CPU kernel variant by name, or None for the automatic choice."},
    {"set_thread_cpu_isa", set_thread_cpu_isa, METH_O,
     "Set the calling thread's CPU kernel variant (below the forced one and FUSIONBLOCKS_CPU_ISA) by name, or "
     "None to clear it; returns the previous one."},
    {"cpu_isas", cpu_isas, METH_NOARGS, "Names of the CPU kernel variants this machine runs, best first."},
    {"cpu_isa_unsupported_reason", cpu_isa_unsupported_reason, METH_O,
     "Why this machine cannot run a CPU kernel variant ('' when it can)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

static PyModuleDef fusionblocks_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                            "Compiled kernels of fusionblocks; the ops live in torch.ops.fusionblocks_C.",
                                            -1, methods};

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
