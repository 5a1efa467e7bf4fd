/* Status translation, thread count, bandwidth probes and CUDA backend status. */
#include "ops.h"

int raise_status(dipp_status status) {
    switch (status) {
    case DIPP_OK: return 0;
    case DIPP_ERR_NOMEM: PyErr_SetString(PyExc_MemoryError, dipp_status_message(status)); return -1;
    case DIPP_ERR_CUDA: PyErr_SetString(PyExc_RuntimeError, dipp_status_message(status)); return -1;
    case DIPP_ERR_ARGUMENT: PyErr_SetString(PyExc_ValueError, dipp_status_message(status)); return -1;
    }
    PyErr_SetString(PyExc_RuntimeError, dipp_status_message(status));
    return -1;
}

OP_DECLARE(threads) {
    (void)module;
    (void)args;
    (void)kwargs;
    return PyLong_FromLong(dipp_cpu_threads());
}

static PyObject *stream_probe(PyObject *args, PyObject *kwargs, int triad) {
    static char *kwlist[] = {"a", "b", "c", "scalar", NULL};
    PyObject *a_obj, *b_obj, *c_obj = Py_None, *scalar_obj = NULL;
    double scalar = 3.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|OO", kwlist, &a_obj, &b_obj, &c_obj, &scalar_obj)) return NULL;
    if (arg_double(scalar_obj, "scalar", &scalar) < 0 || arg_f32_finite("scalar", scalar) < 0) return NULL;
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    tensor_view *a = call_tensor(&call, a_obj, "a", ROLE_OUTPUT, DTYPES_F32);
    tensor_view *b = a ? call_tensor(&call, b_obj, "b", ROLE_INPUT, DTYPES_F32) : NULL;
    tensor_view *c = (b && triad) ? call_tensor(&call, c_obj, "c", ROLE_INPUT, DTYPES_F32) : NULL;
    if (!b || (triad && !c) || check_same_shape(a, b) < 0 || (c && check_same_shape(a, c) < 0)) goto done;
    if (call_check_devices_and_overlap(&call) < 0) goto done;
    if (a->device_type != kDLCPU) {
        PyErr_SetString(PyExc_ValueError, "the bandwidth probes run on the CPU");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (triad) dipp_cpu_stream_triad(a->data, b->data, c->data, (float)scalar, a->numel);
    else dipp_cpu_stream_copy(a->data, b->data, a->numel);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    call_release(&call);
    return result;
}

OP_DECLARE(stream_copy) {
    (void)module;
    return stream_probe(args, kwargs, 0);
}

OP_DECLARE(stream_triad) {
    (void)module;
    return stream_probe(args, kwargs, 1);
}

/* (loaded, path, reason): does not load anything unless load=True. */
OP_DECLARE(cuda_status) {
    static char *kwlist[] = {"load", NULL};
    PyObject *load_obj = NULL;
    int load = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O", kwlist, &load_obj) || arg_bool(load_obj, "load", &load) < 0)
        return NULL;
    module_state *state = PyModule_GetState(module);
    if (load && !cuda_backend_get(&state->cuda, module)) PyErr_Clear();
    PyObject *path = cuda_backend_path(module);
    if (!path) return NULL;
    PyObject *result = Py_BuildValue("(OOs)", state->cuda.handle ? Py_True : Py_False, path,
                                     state->cuda.tried && !state->cuda.handle ? state->cuda.reason : "");
    Py_DECREF(path);
    return result;
}
