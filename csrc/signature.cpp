// rtdetr_kernels._C.call_signature(*args): what an op's argument checks depend on, as one bytes key, or
// None when this function cannot say (so the caller runs the checks).
//
// The ops' Python validation (kernels/<op>/op.py validate) reads only metadata: each tensor's dtype,
// device and shape, and the plain ints and bools. kernels/_library.py remembers, per op, the backend
// chosen for a key whose call passed validation, and skips validation, description and backend choice
// for a later call with the same key: on a 2-core CPU they cost about 200 us once the kernels of the
// previous call have swept the caches, against about 20 us for this function.
//
// Encoded per argument: None; a Python int (exact type, value); a bool (value); a tensor whose type is
// exactly one of the registered types (torch.Tensor, nn.Parameter: no subclass, fake or functional
// tensor), with its dtype, device type and index, and sizes (a tensor with symbolic sizes gives None); a
// list or tuple of such tensors. Anything else gives None. Strides, values and requires_grad are not
// encoded: validation does not read them.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <string>

namespace rtdetr_kernels {
namespace {

PyObject* tensor_types = nullptr;  // a tuple of the exact types accepted (set_signature_types)

bool exact_tensor(PyObject* a) {
  if (tensor_types == nullptr) return false;
  const Py_ssize_t n = PyTuple_GET_SIZE(tensor_types);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (reinterpret_cast<PyObject*>(Py_TYPE(a)) == PyTuple_GET_ITEM(tensor_types, i)) return true;
  }
  return false;
}

void put(std::string& key, int64_t v) { key.append(reinterpret_cast<const char*>(&v), sizeof(v)); }

// false: not encodable
bool put_tensor(std::string& key, PyObject* a) {
  if (!exact_tensor(a) || !THPVariable_Check(a)) return false;
  const at::Tensor& t = THPVariable_Unpack(a);
  if (!t.defined() || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides()) return false;
  key.push_back('T');
  put(key, static_cast<int64_t>(t.scalar_type()));
  put(key, static_cast<int64_t>(t.device().type()));
  put(key, static_cast<int64_t>(t.device().index()));
  put(key, t.dim());
  for (const int64_t s : t.sizes()) put(key, s);
  return true;
}

PyObject* call_signature(PyObject* /*self*/, PyObject* args) {
  const Py_ssize_t n = PyTuple_GET_SIZE(args);
  std::string key;
  key.reserve(static_cast<size_t>(n) * 48);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* a = PyTuple_GET_ITEM(args, i);
    if (a == Py_None) {
      key.push_back('N');
    } else if (PyBool_Check(a)) {
      key.push_back(a == Py_True ? 'Y' : 'F');
    } else if (PyLong_CheckExact(a)) {
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(a, &overflow);
      if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        Py_RETURN_NONE;
      }
      key.push_back('I');
      put(key, static_cast<int64_t>(v));
    } else if (PyList_CheckExact(a) || PyTuple_CheckExact(a)) {
      const bool list = PyList_CheckExact(a);
      const Py_ssize_t m = list ? PyList_GET_SIZE(a) : PyTuple_GET_SIZE(a);
      key.push_back(list ? 'L' : 'U');
      put(key, m);
      for (Py_ssize_t j = 0; j < m; ++j) {
        if (!put_tensor(key, list ? PyList_GET_ITEM(a, j) : PyTuple_GET_ITEM(a, j))) Py_RETURN_NONE;
      }
    } else if (!put_tensor(key, a)) {
      Py_RETURN_NONE;
    }
  }
  return PyBytes_FromStringAndSize(key.data(), static_cast<Py_ssize_t>(key.size()));
}

PyObject* set_signature_types(PyObject* /*self*/, PyObject* types) {
  if (!PyTuple_Check(types)) {
    PyErr_SetString(PyExc_TypeError, "set_signature_types: expected a tuple of types");
    return nullptr;
  }
  Py_INCREF(types);
  Py_XSETREF(tensor_types, types);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"call_signature", call_signature, METH_VARARGS,
     "call_signature(*args) -> bytes or None: the metadata an op's argument checks read (csrc/signature.cpp)"},
    {"set_signature_types", set_signature_types, METH_O,
     "set_signature_types(types): the exact tensor types call_signature encodes"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

int add_signature_functions(PyObject* module) { return PyModule_AddFunctions(module, methods); }

}  // namespace rtdetr_kernels
