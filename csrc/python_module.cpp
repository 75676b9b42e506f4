// The Python extension module structloss_fast._C. Importing it loads the shared library, whose
// static initializers register the ops (TORCH_LIBRARY) with the dispatcher; it defines no
// Python functions of its own. CMakeLists.txt leaves this file out: libtorch users load the
// same ops with torch.ops.load_library.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "structloss_fast's compiled ops (registered with torch.ops.structloss_fast)", -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
