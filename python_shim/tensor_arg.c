/* Zero-copy ingestion of NumPy arrays and DLPack capsules, with argument checks. */
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL DIPP_ARRAY_API
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include "tensor_arg.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <numpy/arrayobject.h>
#include <stdlib.h>
#include <string.h>

/* DLPack 1.x: the producer copied the data (DLPACK_FLAG_BITMASK_IS_COPIED). */
#define DIPP_DLPACK_FLAG_IS_COPIED (1UL << 1UL)

static const char *const dtype_names[VIEW_NTYPES] = {"float32", "float16", "bfloat16", "float64", "int64"};
static const int64_t dtype_sizes[VIEW_NTYPES] = {4, 2, 2, 8, 8};

void raise_error(PyObject *exception, const char *format, ...) {
    char message[512];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    PyErr_SetString(exception, message);
}

const char *view_dtype_name(int dtype) {
    return (dtype >= 0 && dtype < VIEW_NTYPES) ? dtype_names[dtype] : "unsupported";
}

void call_init(call_views *call) {
    call->views = NULL;
    call->count = 0;
    call->capacity = 0;
}

/* The pending exception as one normalized object (NULL if none), cleared; and
 * putting one back (steals the reference; NULL clears). PyErr_Fetch/Restore are
 * deprecated from Python 3.12 on, PyErr_GetRaisedException is 3.12+. */
static PyObject *take_exception(void) {
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    if (!type) return NULL;
    PyErr_NormalizeException(&type, &value, &traceback);
    if (traceback && value) PyException_SetTraceback(value, traceback);
    Py_DECREF(type);
    Py_XDECREF(traceback);
    return value;
#endif
}

static void restore_exception(PyObject *exc) {
    if (!exc) {
        PyErr_Clear();
        return;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

static void view_release(tensor_view *v) {
    if (v->versioned && v->versioned->deleter) v->versioned->deleter(v->versioned);
    if (v->legacy && v->legacy->deleter) v->legacy->deleter(v->legacy);
    v->versioned = NULL;
    v->legacy = NULL;
    Py_CLEAR(v->owner);
}

void call_release(call_views *call) {
    /* Deleters and capsule destructors may run Python code (a Python producer's
     * deleter, NumPy's Py_DECREF of the exported array): never with an exception
     * set. The pending exception, if any, is put back afterwards; anything a
     * deleter raises is dropped, as deleters cannot report errors. */
    PyObject *pending = take_exception();
    for (Py_ssize_t i = 0; i < call->count; ++i) {
        view_release(call->views[i]);
        PyMem_Free(call->views[i]);
    }
    PyMem_Free(call->views);
    call_init(call);
    restore_exception(pending);
}

static tensor_view *call_new_view(call_views *call) {
    if (call->count == call->capacity) {
        Py_ssize_t capacity = call->capacity ? 2 * call->capacity : 16;
        tensor_view **grown = PyMem_Realloc(call->views, (size_t)capacity * sizeof(tensor_view *));
        if (!grown) {
            PyErr_NoMemory();
            return NULL;
        }
        call->views = grown;
        call->capacity = capacity;
    }
    tensor_view *v = PyMem_Calloc(1, sizeof(tensor_view));
    if (!v) {
        PyErr_NoMemory();
        return NULL;
    }
    call->views[call->count++] = v; /* counted now so that call_release frees a half-built view */
    return v;
}

static void allowed_list(unsigned dtypes, char *buf, size_t size) {
    buf[0] = '\0';
    for (int t = 0; t < VIEW_NTYPES; ++t) {
        if (!(dtypes & (1u << t))) continue;
        if (buf[0]) strncat(buf, ", ", size - strlen(buf) - 1);
        strncat(buf, dtype_names[t], size - strlen(buf) - 1);
    }
}

static int check_dtype_allowed(const tensor_view *v, unsigned dtypes, const char *got) {
    if (v->dtype >= 0 && (dtypes & (1u << v->dtype))) return 0;
    char allowed[96];
    allowed_list(dtypes, allowed, sizeof allowed);
    PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %s", v->name, allowed, got);
    return -1;
}

static int numpy_dtype(int typenum) {
    switch (typenum) {
    case NPY_FLOAT32: return VIEW_F32;
    case NPY_FLOAT16: return VIEW_F16;
    case NPY_FLOAT64: return VIEW_F64;
    case NPY_INT64: return VIEW_I64;
    default: return -1;
    }
}

static int from_numpy(PyObject *obj, tensor_view *v, unsigned dtypes) {
    PyArrayObject *arr = (PyArrayObject *)obj;
    v->dtype = numpy_dtype(PyArray_TYPE(arr));
    if (check_dtype_allowed(v, dtypes, PyArray_DESCR(arr)->typeobj->tp_name) < 0) return -1;
    if (!PyArray_ISNOTSWAPPED(arr)) {
        PyErr_Format(PyExc_TypeError, "%s: expected native byte order", v->name);
        return -1;
    }
    if (PyArray_NDIM(arr) > VIEW_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d dimensions supported", v->name, VIEW_MAX_DIMS);
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(arr) || !PyArray_ISALIGNED(arr)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected a C-contiguous, aligned array with positive strides "
                     "(use numpy.ascontiguousarray or tensor.contiguous())",
                     v->name);
        return -1;
    }
    if (v->role != ROLE_INPUT && !PyArray_ISWRITEABLE(arr)) {
        PyErr_Format(PyExc_ValueError, "%s: output array is read-only", v->name);
        return -1;
    }
    v->ndim = PyArray_NDIM(arr);
    for (int d = 0; d < v->ndim; ++d) v->shape[d] = PyArray_DIM(arr, d);
    v->data = PyArray_DATA(arr);
    v->device_type = kDLCPU;
    v->device_id = 0;
    Py_INCREF(obj);
    v->owner = obj;
    return 0;
}

static int dlpack_dtype(DLDataType t) {
    if (t.lanes != 1) return -1;
    if (t.code == kDLFloat && t.bits == 32) return VIEW_F32;
    if (t.code == kDLFloat && t.bits == 16) return VIEW_F16;
    if (t.code == kDLBfloat && t.bits == 16) return VIEW_BF16;
    if (t.code == kDLFloat && t.bits == 64) return VIEW_F64;
    if (t.code == kDLInt && t.bits == 64) return VIEW_I64;
    return -1;
}

/* Re-raises an exception that a producer's __dlpack__ / __dlpack_device__ raised as
 * BufferError naming the argument, chained to the original (its __cause__).
 * Non-Exception errors (KeyboardInterrupt, SystemExit) pass through unchanged. */
static void wrap_producer_error(const char *name, const char *what) {
    if (!PyErr_Occurred() || !PyErr_ExceptionMatches(PyExc_Exception)) return;
    PyObject *cause = take_exception();
    if (!cause) return;
    PyObject *text = PyObject_Str(cause);
    const char *message = text ? PyUnicode_AsUTF8(text) : NULL;
    if (!message) {
        PyErr_Clear();
        message = "";
    }
    PyErr_Format(PyExc_BufferError, "%s: %s failed (%s: %s)", name, what, Py_TYPE(cause)->tp_name, message);
    Py_XDECREF(text);
    PyObject *exc = take_exception();
    if (exc) {
        PyException_SetContext(exc, Py_NewRef(cause)); /* steals one reference */
        PyException_SetCause(exc, cause);              /* steals the other */
    } else {
        Py_DECREF(cause);
    }
    restore_exception(exc);
}

/* Asks the producer for a capsule: versioned first, then the 0.x protocol. */
static PyObject *request_capsule(PyObject *obj, const char *name, int is_cuda) {
    PyObject *method = PyObject_GetAttrString(obj, "__dlpack__");
    if (!method) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a NumPy array or an object with __dlpack__ (a torch.Tensor), got %s",
                     name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyObject *empty = PyTuple_New(0);
    PyObject *kwargs = PyDict_New();
    PyObject *capsule = NULL;
    if (empty && kwargs) {
        int ok = 0;
        if (is_cuda) {
            /* -1: no producer-side synchronisation; we launch on the caller's stream */
            PyObject *stream = PyLong_FromLong(-1);
            ok = stream ? PyDict_SetItemString(kwargs, "stream", stream) : -1;
            Py_XDECREF(stream);
        }
        PyObject *version = Py_BuildValue("(ii)", 1, 0);
        if (ok == 0 && version && PyDict_SetItemString(kwargs, "max_version", version) == 0) {
            capsule = PyObject_Call(method, empty, kwargs);
            if (!capsule && PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyDict_DelItemString(kwargs, "max_version");
                capsule = PyObject_Call(method, empty, kwargs);
            }
        }
        Py_XDECREF(version);
    }
    Py_XDECREF(empty);
    Py_XDECREF(kwargs);
    Py_DECREF(method);
    if (!capsule) wrap_producer_error(name, "__dlpack__()");
    return capsule;
}

static int query_device(PyObject *obj, const char *name, int *device_type, int *device_id) {
    PyObject *method = PyObject_GetAttrString(obj, "__dlpack_device__");
    if (!method) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: %s has __dlpack__ but no __dlpack_device__ (not a DLPack producer)", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *dev = PyObject_CallNoArgs(method);
    Py_DECREF(method);
    if (!dev) {
        wrap_producer_error(name, "__dlpack_device__()");
        return -1;
    }
    int ok = PyTuple_Check(dev) && PyArg_ParseTuple(dev, "ii", device_type, device_id);
    Py_DECREF(dev);
    if (!ok) {
        PyErr_Format(PyExc_BufferError, "%s: __dlpack_device__ did not return (device_type, device_id)", name);
        return -1;
    }
    return 0;
}

/* torch keeps a lazy negation (torch._neg_view, or the real view z.conj().imag of a complex z)
 * or conjugation as a bit on the tensor, which DLPack cannot express: the capsule describes the
 * memory without the sign, so an input would be read as -x and an output would read back
 * negated. torch's __dlpack__ refuses only the conjugate bit, so both are checked here. Objects
 * without these methods (NumPy arrays, other producers) carry no such bits. */
static int check_no_lazy_bits(PyObject *obj, const char *name) {
    static const char *const methods[2] = {"is_neg", "is_conj"};
    static const char *const calls[2] = {"is_neg()", "is_conj()"};
    static const char *const what[2] = {"negated view (is_neg(), e.g. torch._neg_view or z.conj().imag); "
                                        "pass x.resolve_neg()",
                                        "conjugated view; pass x.resolve_conj()"};
    for (int i = 0; i < 2; ++i) {
        PyObject *method = PyObject_GetAttrString(obj, methods[i]);
        if (!method) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
                wrap_producer_error(name, calls[i]);
                return -1;
            }
            PyErr_Clear();
            continue;
        }
        PyObject *flag = PyCallable_Check(method) ? PyObject_CallNoArgs(method) : Py_NewRef(Py_False);
        Py_DECREF(method);
        int set = flag ? PyObject_IsTrue(flag) : -1;
        Py_XDECREF(flag);
        if (set < 0) {
            wrap_producer_error(name, calls[i]);
            return -1;
        }
        if (set) {
            PyErr_Format(PyExc_BufferError,
                         "%s: a lazily %s instead (DLPack cannot carry the view's sign, so it would be read or "
                         "written negated)",
                         name, what[i]);
            return -1;
        }
    }
    return 0;
}

static int contiguous_strides(const DLTensor *t) {
    if (!t->strides) return 1;
    for (int d = 0; d < t->ndim; ++d)
        if (t->shape[d] == 0) return 1; /* empty: any strides (rejected as empty later, with that message) */
    int64_t expected = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
        if (t->shape[d] != 1 && t->strides[d] != expected) return 0;
        expected *= t->shape[d];
    }
    return 1;
}

static int from_dlpack(PyObject *obj, tensor_view *v, unsigned dtypes) {
    int device_type = 0, device_id = 0;
    /* A capsule passed directly (the Python layer's cheap path for CPU tensors) is consumed as is. */
    const int direct = PyCapsule_CheckExact(obj);
    PyObject *capsule;
    if (direct) {
        capsule = Py_NewRef(obj);
    } else {
        if (!PyObject_HasAttrString(obj, "__dlpack__")) {
            PyErr_Format(PyExc_TypeError,
                         "%s: expected a NumPy array, a DLPack capsule or an object with __dlpack__ (a torch.Tensor), "
                         "got %s",
                         v->name, Py_TYPE(obj)->tp_name);
            return -1;
        }
        if (check_no_lazy_bits(obj, v->name) < 0) return -1;
        if (query_device(obj, v->name, &device_type, &device_id) < 0) return -1;
        if (device_type != kDLCPU && device_type != kDLCUDA) {
            PyErr_Format(PyExc_ValueError, "%s: unsupported device type %d (only CPU and CUDA tensors)", v->name,
                         device_type);
            return -1;
        }
        capsule = request_capsule(obj, v->name, device_type == kDLCUDA);
        if (!capsule) return -1;
    }
    DLTensor *t = NULL;
    uint64_t flags = 0;
    if (PyCapsule_IsValid(capsule, "dltensor_versioned")) {
        DLManagedTensorVersioned *m = PyCapsule_GetPointer(capsule, "dltensor_versioned");
        if (!m || PyCapsule_SetName(capsule, "used_dltensor_versioned") < 0) goto fail;
        v->versioned = m;
        v->owner = capsule; /* from here on call_release runs the deleter, also on a version mismatch */
        if (m->version.major != 1) {
            PyErr_Format(PyExc_BufferError, "%s: DLPack major version %u is not supported (need 1)", v->name,
                         (unsigned)m->version.major);
            return -1;
        }
        t = &m->dl_tensor;
        flags = m->flags;
    } else if (PyCapsule_IsValid(capsule, "dltensor")) {
        DLManagedTensor *m = PyCapsule_GetPointer(capsule, "dltensor");
        if (!m || PyCapsule_SetName(capsule, "used_dltensor") < 0) goto fail;
        v->legacy = m;
        t = &m->dl_tensor;
    } else {
        PyErr_Format(PyExc_BufferError, "%s: %s an already used or unknown capsule", v->name,
                     direct ? "got" : "__dlpack__ returned");
        goto fail;
    }
    v->owner = capsule;
    v->dtype = dlpack_dtype(t->dtype);
    {
        char got[48];
        snprintf(got, sizeof got, "DLPack code %u bits %u lanes %u", t->dtype.code, t->dtype.bits, t->dtype.lanes);
        if (check_dtype_allowed(v, dtypes, v->dtype >= 0 ? dtype_names[v->dtype] : got) < 0) return -1;
    }
    if (t->ndim > VIEW_MAX_DIMS || t->ndim < 0) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d dimensions supported", v->name, VIEW_MAX_DIMS);
        return -1;
    }
    if (direct) {
        device_type = t->device.device_type;
        device_id = t->device.device_id;
        if (device_type != kDLCPU && device_type != kDLCUDA) {
            PyErr_Format(PyExc_ValueError, "%s: unsupported device type %d (only CPU and CUDA tensors)", v->name,
                         device_type);
            return -1;
        }
    }
    if (t->device.device_type != device_type || t->device.device_id != device_id) {
        PyErr_Format(PyExc_BufferError,
                     "%s: __dlpack__ returned a tensor on device (%d, %d) but __dlpack_device__ said (%d, %d)",
                     v->name, (int)t->device.device_type, (int)t->device.device_id, device_type, device_id);
        return -1;
    }
    if (t->ndim > 0 && !t->shape) {
        PyErr_Format(PyExc_BufferError, "%s: DLPack tensor has %d dimensions but no shape", v->name, (int)t->ndim);
        return -1;
    }
    if (!contiguous_strides(t)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected a C-contiguous tensor with positive strides (use tensor.contiguous())", v->name);
        return -1;
    }
    if (v->role != ROLE_INPUT && (flags & DLPACK_FLAG_BITMASK_READ_ONLY)) {
        PyErr_Format(PyExc_ValueError, "%s: output tensor is read-only", v->name);
        return -1;
    }
    if (v->role != ROLE_INPUT && (flags & DIPP_DLPACK_FLAG_IS_COPIED)) {
        PyErr_Format(PyExc_BufferError, "%s: __dlpack__ exported a copy; results written to it would be lost",
                     v->name);
        return -1;
    }
    v->ndim = t->ndim;
    for (int d = 0; d < v->ndim; ++d) v->shape[d] = t->shape[d];
    v->data = (char *)t->data + t->byte_offset;
    v->device_type = t->device.device_type;
    v->device_id = t->device.device_id;
    if ((uintptr_t)v->data % (uintptr_t)dtype_sizes[v->dtype] != 0) {
        PyErr_Format(PyExc_ValueError, "%s: data pointer is not aligned to its element size", v->name);
        return -1;
    }
    return 0;
fail:
    Py_DECREF(capsule);
    v->versioned = NULL;
    v->legacy = NULL;
    return -1;
}

tensor_view *call_tensor(call_views *call, PyObject *obj, const char *name, view_role role, unsigned dtypes) {
    if (obj == NULL || obj == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s: a tensor is required, got None", name);
        return NULL;
    }
    tensor_view *v = call_new_view(call);
    if (!v) return NULL;
    snprintf(v->label, sizeof v->label, "%s", name);
    v->name = v->label;
    v->role = role;
    v->dtype = -1;
    int rc = PyArray_Check(obj) ? from_numpy(obj, v, dtypes) : from_dlpack(obj, v, dtypes);
    if (rc < 0) return NULL;
    v->itemsize = dtype_sizes[v->dtype];
    v->numel = 1;
    for (int d = 0; d < v->ndim; ++d) {
        if (v->shape[d] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative dimension", name);
            return NULL;
        }
        if (v->shape[d] > 0 && v->numel > INT64_MAX / 16 / v->shape[d]) {
            PyErr_Format(PyExc_ValueError, "%s: too many elements", name);
            return NULL;
        }
        v->numel *= v->shape[d];
    }
    if (v->numel == 0) {
        PyErr_Format(PyExc_ValueError, "%s: is empty (zero elements)", name);
        return NULL;
    }
    if (!v->data) {
        PyErr_Format(PyExc_BufferError, "%s: DLPack tensor has a NULL data pointer", name);
        return NULL;
    }
    return v;
}

tensor_view *call_optional(call_views *call, PyObject *obj, const char *name, view_role role, unsigned dtypes) {
    if (obj == NULL || obj == Py_None) return NULL;
    return call_tensor(call, obj, name, role, dtypes);
}

static const char *device_name(int device_type) { return device_type == kDLCUDA ? "cuda" : "cpu"; }

static int compare_start(const void *pa, const void *pb) {
    uintptr_t a = (uintptr_t)(*(tensor_view *const *)pa)->data, b = (uintptr_t)(*(tensor_view *const *)pb)->data;
    return (a > b) - (a < b);
}

/* Sweep over views sorted by start address: any view starting before the
 * furthest end seen so far overlaps the view that reached it. */
static int check_overlap(call_views *call) {
    tensor_view **sorted = PyMem_Malloc((size_t)call->count * sizeof(tensor_view *));
    if (!sorted) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(sorted, call->views, (size_t)call->count * sizeof(tensor_view *));
    qsort(sorted, (size_t)call->count, sizeof(tensor_view *), compare_start);
    uintptr_t end_all = 0, end_out = 0;
    const tensor_view *holder_all = NULL, *holder_out = NULL;
    int rc = 0;
    for (Py_ssize_t i = 0; i < call->count && rc == 0; ++i) {
        const tensor_view *v = sorted[i];
        uintptr_t start = (uintptr_t)v->data, end = start + (uintptr_t)(v->numel * v->itemsize);
        const tensor_view *clash = NULL;
        if (v->role != ROLE_INPUT && holder_all && start < end_all) clash = holder_all;
        else if (holder_out && start < end_out) clash = holder_out;
        if (clash) {
            PyErr_Format(PyExc_ValueError, "%s overlaps %s in memory; outputs must not alias other arguments",
                         v->role != ROLE_INPUT ? v->name : clash->name, v->role != ROLE_INPUT ? clash->name : v->name);
            rc = -1;
        }
        if (end > end_all) {
            end_all = end;
            holder_all = v;
        }
        if (v->role != ROLE_INPUT && end > end_out) {
            end_out = end;
            holder_out = v;
        }
    }
    PyMem_Free(sorted);
    return rc;
}

int call_check_devices_and_overlap(call_views *call) {
    if (call->count == 0) return 0;
    const tensor_view *first = call->views[0];
    for (Py_ssize_t i = 1; i < call->count; ++i) {
        const tensor_view *a = call->views[i];
        if (a->device_type != first->device_type || a->device_id != first->device_id) {
            PyErr_Format(PyExc_ValueError, "%s is on %s:%d but %s is on %s:%d; all tensors must share one device",
                         a->name, device_name(a->device_type), a->device_id, first->name,
                         device_name(first->device_type), first->device_id);
            return -1;
        }
    }
    return check_overlap(call);
}

static void shape_text(const tensor_view *v, char *buf, size_t size) {
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int d = 0; d < v->ndim && used < size; ++d)
        used += (size_t)snprintf(buf + used, size - used, d ? ", %lld" : "%lld", (long long)v->shape[d]);
    if (used < size) snprintf(buf + used, size - used, v->ndim == 1 ? ",)" : ")");
}

int check_same_shape(const tensor_view *a, const tensor_view *b) {
    int same = a->ndim == b->ndim;
    for (int d = 0; same && d < a->ndim; ++d) same = a->shape[d] == b->shape[d];
    if (same) return 0;
    char sa[128], sb[128];
    shape_text(a, sa, sizeof sa);
    shape_text(b, sb, sizeof sb);
    PyErr_Format(PyExc_ValueError, "%s has shape %s but %s has shape %s; they must match", b->name, sb, a->name, sa);
    return -1;
}

int check_same_dtype(const tensor_view *a, const tensor_view *b) {
    if (a->dtype == b->dtype) return 0;
    PyErr_Format(PyExc_TypeError, "%s is %s but %s is %s; they must share a dtype", b->name,
                 view_dtype_name(b->dtype), a->name, view_dtype_name(a->dtype));
    return -1;
}

int check_per_sample(const tensor_view *v, int64_t batch, const char *of) {
    if (v->ndim == 1 && v->shape[0] == batch) return 0;
    char s[128];
    shape_text(v, s, sizeof s);
    if (of)
        PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld,) (one value per sample of %s), got %s", v->name,
                     (long long)batch, of, s);
    else
        PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld,) (one value per sample), got %s", v->name,
                     (long long)batch, s);
    return -1;
}

int check_batched(const tensor_view *v) {
    if (v->ndim >= 1) return 0;
    PyErr_Format(PyExc_ValueError, "%s: expected a batch (at least one dimension), got a scalar", v->name);
    return -1;
}

int arg_f32_finite(const char *name, double value) {
    if (!isfinite(value)) {
        raise_error(PyExc_ValueError, "%s must be finite, got %g", name, value);
        return -1;
    }
    if (fabs(value) <= FLT_MAX) return 0;
    raise_error(PyExc_ValueError, "%s must be at most %.8g in magnitude (the float32 range), got %g", name,
                (double)FLT_MAX, value);
    return -1;
}

int arg_f32_positive(const char *name, double value) {
    if (!(isfinite(value) && value > 0.0)) {
        raise_error(PyExc_ValueError, "%s must be a finite number > 0, got %g", name, value);
        return -1;
    }
    /* the range check comes first: converting a double beyond FLT_MAX to float is undefined in C */
    if (value <= FLT_MAX && (float)value > 0.0f) return 0;
    raise_error(PyExc_ValueError,
                "%s must be representable in float32 (> 0 after conversion: about %.2g to %.8g), got %g", name,
                (double)FLT_TRUE_MIN, (double)FLT_MAX, value);
    return -1;
}

int arg_in_range(const char *name, double value, double lo, double hi, int lo_open, int hi_open) {
    int ok = isfinite(value) && (lo_open ? value > lo : value >= lo) && (hi_open ? value < hi : value <= hi);
    if (ok) return 0;
    raise_error(PyExc_ValueError, "%s must be in %c%g, %g%c, got %g", name, lo_open ? '(' : '[', lo, hi,
                 hi_open ? ')' : ']', value);
    return -1;
}

/* An exception from a scalar's own __float__ / __index__ gets replaced by one naming the
 * argument, unless it is not an Exception (KeyboardInterrupt, SystemExit): 1 to replace. */
static int replaceable_error(void) {
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return 0;
    PyErr_Clear();
    return 1;
}

/* bool is an int subclass and numpy.bool_ converts to float: a flag passed where a
 * number belongs is a mistake, not 0 or 1. */
static int is_bool(PyObject *obj) { return PyBool_Check(obj) || PyArray_IsScalar(obj, Bool); }

int arg_double(PyObject *obj, const char *name, double *out) {
    if (!obj) return 0;
    if (PyFloat_Check(obj)) {
        *out = PyFloat_AS_DOUBLE(obj);
        return 0;
    }
    const PyNumberMethods *nb = Py_TYPE(obj)->tp_as_number;
    if (is_bool(obj) || PyComplex_Check(obj) || PyArray_IsScalar(obj, ComplexFloating) || !nb ||
        (!nb->nb_float && !nb->nb_index)) {
        PyErr_Format(PyExc_TypeError, "%s must be a real number, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    double value = PyFloat_AsDouble(obj);
    if (value == -1.0 && PyErr_Occurred()) {
        int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        if (!replaceable_error()) return -1;
        if (overflow)
            PyErr_Format(PyExc_ValueError, "%s must be a finite number, got an int too large for a float", name);
        else
            PyErr_Format(PyExc_TypeError, "%s must be a real number, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = value;
    return 0;
}

/* obj as a new reference to a Python int (ints and NumPy integers, not bools); NULL with
 * TypeError naming the argument otherwise. */
static PyObject *as_index(PyObject *obj, const char *name, const char *expected) {
    PyObject *index = is_bool(obj) ? NULL : PyNumber_Index(obj);
    if (!index) {
        if (PyErr_Occurred() && !replaceable_error()) return NULL;
        PyErr_Format(PyExc_TypeError, "%s must be %s, got %s", name, expected, Py_TYPE(obj)->tp_name);
    }
    return index;
}

/* How an out-of-range int reads in a message, without str() of a huge int (which fails
 * beyond sys.get_int_max_str_digits()). */
static void int_text(PyObject *index, char *buf, size_t size) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (overflow > 0) snprintf(buf, size, "an int >= 2**63");
    else if (overflow < 0) snprintf(buf, size, "an int < -2**63");
    else snprintf(buf, size, "%lld", v);
}

int arg_bool(PyObject *obj, const char *name, int *out) {
    if (!obj) return 0;
    if (obj == Py_True || obj == Py_False) {
        *out = obj == Py_True;
        return 0;
    }
    if (PyArray_IsScalar(obj, Bool)) {
        *out = PyObject_IsTrue(obj);
        return *out < 0 ? -1 : 0;
    }
    if (!PyLong_Check(obj) && !PyArray_IsScalar(obj, Integer)) {
        PyErr_Format(PyExc_TypeError, "%s must be a bool, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *index = as_index(obj, name, "a bool");
    if (!index) return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (!overflow && (v == 0 || v == 1)) {
        Py_DECREF(index);
        *out = (int)v;
        return 0;
    }
    char text[48];
    int_text(index, text, sizeof text);
    Py_DECREF(index);
    PyErr_Format(PyExc_ValueError, "%s must be True or False (or 0 or 1), got %s", name, text);
    return -1;
}

int arg_i64(PyObject *obj, const char *name, int64_t lo, int64_t hi, int64_t *out) {
    if (!obj) return 0;
    PyObject *index = as_index(obj, name, "an int");
    if (!index) return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    if (!overflow && v >= lo && v <= hi) {
        Py_DECREF(index);
        *out = (int64_t)v;
        return 0;
    }
    char text[48];
    int_text(index, text, sizeof text);
    Py_DECREF(index);
    if (hi == INT64_MAX && !overflow)
        PyErr_Format(PyExc_ValueError, "%s must be >= %lld, got %s", name, (long long)lo, text);
    else if (hi == INT64_MAX)
        PyErr_Format(PyExc_ValueError, "%s must be in [%lld, 2**63), got %s", name, (long long)lo, text);
    else
        PyErr_Format(PyExc_ValueError, "%s must be in [%lld, %lld], got %s", name, (long long)lo, (long long)hi, text);
    return -1;
}

int arg_u64(PyObject *obj, const char *name, uint64_t *out) {
    if (!obj) return 0;
    PyObject *index = as_index(obj, name, "an int");
    if (!index) return -1;
    unsigned long long value = PyLong_AsUnsignedLongLong(index);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
        Py_DECREF(index);
        char text[48];
        if (overflow) snprintf(text, sizeof text, overflow > 0 ? "an int >= 2**64" : "an int < -2**63");
        else snprintf(text, sizeof text, "%lld", v);
        PyErr_Format(PyExc_ValueError, "%s must be in [0, 2**64), got %s", name, text);
        return -1;
    }
    Py_DECREF(index);
    *out = (uint64_t)value;
    return 0;
}

int arg_choice(PyObject *obj, const char *name, const char *const *choices, int fallback) {
    if (!obj) return fallback;
    char allowed[160] = "";
    for (int i = 0; choices[i]; ++i) {
        if (i) strncat(allowed, ", ", sizeof allowed - strlen(allowed) - 1);
        strncat(allowed, choices[i], sizeof allowed - strlen(allowed) - 1);
    }
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a str (one of %s), got %s", name, allowed, Py_TYPE(obj)->tp_name);
        return -1;
    }
    /* compares the whole str: an embedded NUL or a lone surrogate simply does not match */
    for (int i = 0; choices[i]; ++i)
        if (PyUnicode_CompareWithASCIIString(obj, choices[i]) == 0) return i;
    PyErr_Format(PyExc_ValueError, "%s must be one of %s, got %R", name, allowed, obj);
    return -1;
}

int check_sigma_values(const tensor_view *sigma) {
    if (sigma->device_type != kDLCPU || sigma->dtype != VIEW_F32) return 0;
    const float *s = sigma->data;
    for (int64_t i = 0; i < sigma->numel; ++i) {
        if (!(isfinite(s[i]) && s[i] > 0.0f)) {
            raise_error(PyExc_ValueError, "%s[%lld] must be finite and > 0, got %g", sigma->name, (long long)i,
                         (double)s[i]);
            return -1;
        }
    }
    return 0;
}
