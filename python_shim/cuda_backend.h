/*
 * Lazy loading of the CUDA kernels (libdipp_cuda.so beside the module): the
 * first CUDA tensor triggers dlopen; importing never needs CUDA.
 */
#ifndef DIPP_CUDA_BACKEND_H
#define DIPP_CUDA_BACKEND_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "dipp.h"

typedef struct {
#define DIPP_CUDA_POINTER(name, argtype) dipp_status (*name)(argtype * args, void *stream);
    DIPP_KERNELS(DIPP_CUDA_POINTER)
#undef DIPP_CUDA_POINTER
} cuda_kernels;

typedef struct {
    int tried;
    void *handle;
    cuda_kernels kernels;
    char reason[512]; /* why loading failed, when it did */
} cuda_backend;

/* The kernel table, loading it on first use; NULL with RuntimeError naming why. */
const cuda_kernels *cuda_backend_get(cuda_backend *backend, PyObject *module);
/* Path that would be loaded (for diagnostics); new reference or NULL. */
PyObject *cuda_backend_path(PyObject *module);
void cuda_backend_close(cuda_backend *backend);

#endif /* DIPP_CUDA_BACKEND_H */
