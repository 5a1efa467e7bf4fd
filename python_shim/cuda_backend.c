/* dlopen of the CUDA kernel library, kept in the module state (no globals). */
#include "cuda_backend.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

PyObject *cuda_backend_path(PyObject *module) {
    const char *override = getenv("DIPP_CUDA_LIBRARY");
    if (override && override[0]) return PyUnicode_FromString(override);
    PyObject *file = PyModule_GetFilenameObject(module);
    if (!file) return NULL;
    PyObject *os_path = PyImport_ImportModule("os.path");
    PyObject *path = NULL;
    if (os_path) {
        PyObject *dir = PyObject_CallMethod(os_path, "dirname", "O", file);
        if (dir) path = PyObject_CallMethod(os_path, "join", "Os", dir, "libdipp_cuda.so");
        Py_XDECREF(dir);
        Py_DECREF(os_path);
    }
    Py_DECREF(file);
    return path;
}

static int load(cuda_backend *b, PyObject *module) {
    PyObject *path = cuda_backend_path(module);
    if (!path) {
        snprintf(b->reason, sizeof b->reason, "could not locate the package directory");
        PyErr_Clear();
        return -1;
    }
    const char *text = PyUnicode_AsUTF8(path);
    if (!text) {
        Py_DECREF(path);
        PyErr_Clear();
        snprintf(b->reason, sizeof b->reason, "library path is not valid UTF-8");
        return -1;
    }
    b->handle = dlopen(text, RTLD_NOW | RTLD_LOCAL);
    if (!b->handle) {
        const char *why = dlerror();
        snprintf(b->reason, sizeof b->reason, "the CUDA backend is not available (%s); rebuild with nvcc on PATH "
                 "(DIPP_CUDA=1 pip install .)", why ? why : text);
        Py_DECREF(path);
        return -1;
    }
#define DIPP_CUDA_RESOLVE(name, argtype)                                                        \
    b->kernels.name = (dipp_status(*)(argtype *, void *))dlsym(b->handle, "dipp_cuda_" #name);   \
    if (!b->kernels.name) {                                                                     \
        snprintf(b->reason, sizeof b->reason, "%s lacks the symbol dipp_cuda_" #name, text);    \
        Py_DECREF(path);                                                                        \
        dlclose(b->handle);                                                                     \
        b->handle = NULL;                                                                       \
        return -1;                                                                              \
    }
    DIPP_KERNELS(DIPP_CUDA_RESOLVE)
#undef DIPP_CUDA_RESOLVE
    /* A library that loads can still be unusable here (no device, old driver, no kernel image for
     * this GPU); asking once now lets the caller fall back with one reason instead of failing in
     * the first kernel with a bare "CUDA runtime call failed". */
    int (*check)(char *, size_t) = (int (*)(char *, size_t))dlsym(b->handle, "dipp_cuda_device_check");
    char why[400];
    int code = 0;
    if (!check) snprintf(why, sizeof why, "it lacks the symbol dipp_cuda_device_check (rebuild it)");
    else if ((code = check(why, sizeof why)) != 0) why[sizeof why - 1] = '\0';
    if (!check || code != 0) {
        snprintf(b->reason, sizeof b->reason, "the CUDA library %s cannot run here: %s", text, why);
        Py_DECREF(path);
        dlclose(b->handle);
        b->handle = NULL;
        return -1;
    }
    Py_DECREF(path);
    return 0;
}

const cuda_kernels *cuda_backend_get(cuda_backend *b, PyObject *module) {
    if (!b->tried) {
        b->tried = 1;
        load(b, module);
    }
    if (!b->handle) {
        PyErr_SetString(PyExc_RuntimeError, b->reason);
        return NULL;
    }
    return &b->kernels;
}

void cuda_backend_close(cuda_backend *b) {
    if (b->handle) dlclose(b->handle);
    b->handle = NULL;
    b->tried = 0;
}
