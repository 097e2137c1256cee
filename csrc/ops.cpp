// The Python module init of rtdetr_kernels._C (what was built, for `python -m rtdetr_kernels info`).
//
// Each op's schemas are in its folder (csrc/<op>/schema.cpp, a TORCH_LIBRARY_FRAGMENT of
// rtdetr_kernels_C), its kernels are registered per dispatch key next to their code (cpu.cpp: CPU,
// cuda_ops.cpp: CUDA), so adding an op touches no shared file.
// Autograd, fake tensors and backend choice live in Python (kernels/<op>/op.py), which calls these
// ops; the module has no pybind11, importing it runs the static registrations, and its only functions
// are call_signature and set_signature_types (signature.cpp, for the ops' eager fast path).
#include <Python.h>

#ifndef RTDETR_CUDA_ARCHS
#define RTDETR_CUDA_ARCHS ""
#endif
#ifndef RTDETR_CUDA_VERSION
#define RTDETR_CUDA_VERSION ""
#endif
#ifndef RTDETR_TORCH_VERSION  // setup.py: the torch this module is built against (checked at load)
#define RTDETR_TORCH_VERSION ""
#endif

namespace rtdetr_kernels {
namespace msda {
const char* cpu_isa();  // cpu.cpp: which build of the CPU kernels this machine runs
}  // namespace msda
int add_signature_functions(PyObject* module);  // signature.cpp: call_signature, set_signature_types
}  // namespace rtdetr_kernels

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "rtdetr_kernels compiled ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef RTDETR_WITH_CUDA
  PyModule_AddIntConstant(module, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(module, "WITH_CUDA", 0);
#endif
  PyModule_AddStringConstant(module, "CUDA_ARCHS", RTDETR_CUDA_ARCHS);
  PyModule_AddStringConstant(module, "CUDA_VERSION", RTDETR_CUDA_VERSION);
  PyModule_AddStringConstant(module, "TORCH_VERSION", RTDETR_TORCH_VERSION);
  PyModule_AddStringConstant(module, "CPU_ISA", rtdetr_kernels::msda::cpu_isa());
  if (rtdetr_kernels::add_signature_functions(module) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
