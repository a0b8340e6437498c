// The Python module object of fastbert._C. Importing it runs the static initialisers of the other
// translation units, which register the op schemas (ops.cpp) and their CPU/CUDA kernels with torch.
// Only Python.h is needed here; the ops themselves are reached through torch.ops.fastbert.*.
#include <Python.h>

#ifndef FASTBERT_WITH_CUDA
#define FASTBERT_WITH_CUDA 0
#endif

static struct PyModuleDef fastbert_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fastbert's compiled ops; use them through fastbert.ops, which chooses a backend.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&fastbert_c_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "WITH_CUDA", FASTBERT_WITH_CUDA) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
