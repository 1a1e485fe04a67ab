// Python module entry point of trp_kernels._C. The ops register themselves through TORCH_LIBRARY when
// the shared library is loaded; importing it as a module needs PyInit__C, which only the setup.py build
// (TRP_PYTHON_MODULE) provides. The CMake build is a plain libtorch library, loaded with
// torch.ops.load_library.
#ifdef TRP_PYTHON_MODULE
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "trp_kernels compiled ops", -1,
                                      nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
#endif
