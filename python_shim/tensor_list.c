/* The multi-tensor kernels' fast list path: all items of all lists in one allocation, no label
 * and no Python object per item kept, and every check inline. It is all-or-nothing: an item
 * it cannot take as it is (or that fails a check) makes it answer 0, and the caller then runs
 * the checked path (call_tensor), which raises the error naming the item. */
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL DIPP_ARRAY_API
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include "tensor_arg.h"

#include <numpy/arrayobject.h>
#include <string.h>

_Static_assert(sizeof(npy_intp) == sizeof(int64_t), "NumPy shapes are read as int64_t");

static int item_dtype(int code, int bits, int lanes) {
    if (lanes != 1) return -1;
    if (code == kDLFloat && bits == 32) return VIEW_F32;
    if (code == kDLFloat && bits == 16) return VIEW_F16;
    if (code == kDLBfloat && bits == 16) return VIEW_BF16;
    if (code == kDLInt && bits == 64) return VIEW_I64;
    return -1;
}

static uintptr_t item_size(int dtype) { return dtype == VIEW_I64 ? 8u : dtype == VIEW_F32 ? 4u : 2u; }

/* numel of a shape, 0 when empty, negative or too large (the checked path says which). */
static int64_t item_numel(const int64_t *shape, int ndim) {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) {
        if (shape[d] <= 0 || n > INT64_MAX / 16 / shape[d]) return 0;
        n *= shape[d];
    }
    return n;
}

static int numpy_item(PyObject *obj, list_item *it, view_role role, unsigned dtypes) {
    PyArrayObject *arr = (PyArrayObject *)obj;
    const int t = PyArray_TYPE(arr);
    it->dtype = t == NPY_FLOAT32 ? VIEW_F32 : t == NPY_FLOAT16 ? VIEW_F16 : t == NPY_INT64 ? VIEW_I64 : -1;
    it->ndim = PyArray_NDIM(arr);
    if (it->dtype < 0 || !(dtypes & (1u << it->dtype)) || !PyArray_ISNOTSWAPPED(arr) || it->ndim > VIEW_MAX_DIMS ||
        !PyArray_IS_C_CONTIGUOUS(arr) || !PyArray_ISALIGNED(arr) || (role != ROLE_INPUT && !PyArray_ISWRITEABLE(arr)))
        return 0;
    it->shape = (const int64_t *)PyArray_DIMS(arr);
    it->numel = item_numel(it->shape, it->ndim);
    it->data = PyArray_DATA(arr);
    return it->numel > 0 && it->data != NULL;
}

static int strides_contiguous(const DLTensor *t) {
    if (!t->strides) return 1;
    int64_t expected = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
        if (t->shape[d] != 1 && t->strides[d] != expected) return 0;
        expected *= t->shape[d];
    }
    return 1;
}

/* DLPack 1.3's C exchange API (dlpack.h, DLPackExchangeAPI): the table a producer's tensor type
 * shares as __dlpack_c_exchange_api__. Only the header and the non-owning export are used. */
typedef struct dlpack_exchange_header {
    DLPackVersion version;
    struct dlpack_exchange_header *prev_api;
} dlpack_exchange_header;

typedef struct {
    dlpack_exchange_header header;
    void *managed_tensor_allocator, *managed_tensor_from_py_object_no_sync, *managed_tensor_to_py_object_no_sync;
    int (*dltensor_from_py_object_no_sync)(void *py_object, DLTensor *out);
    void *current_work_stream;
} dlpack_exchange_api;

int list_exporter_arg(PyObject *obj, list_exporter *ex) {
    if (!obj || obj == Py_None) return 0;
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 4 || !PyCallable_Check(PyTuple_GET_ITEM(obj, 1)) ||
        !PyCallable_Check(PyTuple_GET_ITEM(obj, 2)) || !PyTuple_Check(PyTuple_GET_ITEM(obj, 3))) {
        PyErr_Format(PyExc_TypeError, "fast must be a tuple (exchange_api, export_fn, is_neg, types), got %s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *capsule = PyTuple_GET_ITEM(obj, 0);
    ex->dltensor_from = NULL;
    if (PyCapsule_IsValid(capsule, "dlpack_exchange_api")) {
        const dlpack_exchange_api *api = PyCapsule_GetPointer(capsule, "dlpack_exchange_api");
        if (api && api->header.version.major == 1 && api->header.version.minor >= 3)
            ex->dltensor_from = api->dltensor_from_py_object_no_sync;
    }
    ex->export_fn = PyTuple_GET_ITEM(obj, 1);
    ex->is_neg = PyTuple_GET_ITEM(obj, 2);
    ex->types = PyTuple_GET_ITEM(obj, 3);
    return 1;
}

/* The result of one exporter call: 1 for the value wanted, 0 for anything else (an Exception
 * included, cleared), -1 for an error that must propagate (KeyboardInterrupt, MemoryError). */
static int call_ok(PyObject *result) {
    if (result) return 1;
    if (!PyErr_ExceptionMatches(PyExc_Exception) || PyErr_ExceptionMatches(PyExc_MemoryError)) return -1;
    PyErr_Clear();
    return 0;
}

/* The checks of a CPU DLTensor, into it (shape and data stay the producer's). */
static int dl_item(const DLTensor *t, list_item *it, unsigned dtypes) {
    it->dtype = item_dtype(t->dtype.code, t->dtype.bits, t->dtype.lanes);
    it->ndim = t->ndim;
    if (it->dtype < 0 || !(dtypes & (1u << it->dtype)) || t->ndim < 0 || t->ndim > VIEW_MAX_DIMS ||
        (t->ndim > 0 && !t->shape) || t->device.device_type != kDLCPU || !t->data)
        return 0;
    it->shape = t->shape;
    it->numel = item_numel(t->shape, t->ndim);
    it->data = (char *)t->data + t->byte_offset;
    return it->numel > 0 && strides_contiguous(t) && (uintptr_t)it->data % item_size(it->dtype) == 0;
}

static int is_exchange_type(PyObject *obj, PyObject *types) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(types); ++i)
        if ((PyObject *)Py_TYPE(obj) == PyTuple_GET_ITEM(types, i)) return 1;
    return 0;
}

/* A torch CPU tensor that is not lazily negated: through the exchange API for the exact types that
 * share it (no allocation; the tensor, held by the caller's snapshot, keeps shape and data alive),
 * else through the exporter's DLPack capsule, consumed here. */
static int not_negated(PyObject *obj, const list_exporter *ex) {
    PyObject *neg = PyObject_CallOneArg(ex->is_neg, obj);
    int rc = call_ok(neg);
    if (rc <= 0) return rc;
    const int plain = neg == Py_False;
    Py_DECREF(neg);
    return plain;
}

static int exchange_item(PyObject *obj, list_item *it, unsigned dtypes, const list_exporter *ex) {
    DLTensor t;
    if (ex->dltensor_from(obj, &t) == 0) return dl_item(&t, it, dtypes);
    /* DLPack asks a failing exchange function to set an exception; one that does not is a mere refusal */
    return PyErr_Occurred() ? call_ok(NULL) : 0;
}

static int exported_item(PyObject *obj, list_item *it, unsigned dtypes, const list_exporter *ex) {
    int rc = not_negated(obj, ex);
    if (rc <= 0) return rc;
    if (ex->dltensor_from && is_exchange_type(obj, ex->types)) return exchange_item(obj, it, dtypes, ex);
    PyObject *capsule = PyObject_CallOneArg(ex->export_fn, obj);
    if ((rc = call_ok(capsule)) <= 0) return rc;
    DLManagedTensor *m = PyCapsule_IsValid(capsule, "dltensor") ? PyCapsule_GetPointer(capsule, "dltensor") : NULL;
    if (m && PyCapsule_SetName(capsule, "used_dltensor") < 0) m = NULL;
    Py_DECREF(capsule); /* renamed: its destructor leaves m to us */
    if (!m) {
        PyErr_Clear();
        return 0;
    }
    it->managed = m;
    return dl_item(&m->dl_tensor, it, dtypes);
}

int fast_item(PyObject *obj, list_item *it, view_role role, unsigned dtypes, const list_exporter *ex) {
    it->managed = NULL;
    if (PyArray_Check(obj)) return numpy_item(obj, it, role, dtypes);
    if (!ex->dltensor_from || !is_exchange_type(obj, ex->types)) return 0;
    int rc = not_negated(obj, ex);
    return rc <= 0 ? rc : exchange_item(obj, it, dtypes, ex);
}

int fast_items_disjoint(const list_item *items, const view_role *roles, int count) {
    for (int i = 0; i < count; ++i) {
        if (!items[i].data) continue;
        const uintptr_t s = (uintptr_t)items[i].data, e = s + (uintptr_t)items[i].numel * item_size(items[i].dtype);
        for (int j = i + 1; j < count; ++j) {
            if (!items[j].data || (roles[i] == ROLE_INPUT && roles[j] == ROLE_INPUT)) continue;
            const uintptr_t t = (uintptr_t)items[j].data, f = t + (uintptr_t)items[j].numel * item_size(items[j].dtype);
            if (s < f && t < e) return 0;
        }
    }
    return 1;
}

static int same_shape(const list_item *a, const list_item *b) {
    return a->ndim == b->ndim && memcmp(a->shape, b->shape, (size_t)a->ndim * sizeof(int64_t)) == 0;
}

int fast_lists_parse(fast_lists *f, PyObject *const *seqs, const view_role *roles, const unsigned *dtypes,
                     int nlists, const list_exporter *ex) {
    f->items = NULL;
    f->n = 0;
    f->nlists = nlists;
    const Py_ssize_t n = PyTuple_GET_SIZE(seqs[0]);
    for (int k = 1; k < nlists; ++k)
        if (PyTuple_GET_SIZE(seqs[k]) != n) return 0;
    if (n == 0) return 0;
    f->items = PyMem_Calloc((size_t)n * (size_t)nlists, sizeof(list_item));
    if (!f->items) {
        PyErr_NoMemory();
        return -1;
    }
    f->n = n;
    for (Py_ssize_t i = 0; i < n; ++i) {
        for (int k = 0; k < nlists; ++k) {
            list_item *it = &f->items[(Py_ssize_t)k * n + i];
            PyObject *obj = PyTuple_GET_ITEM(seqs[k], i);
            int rc = PyArray_Check(obj) ? numpy_item(obj, it, roles[k], dtypes[k])
                     : ex              ? exported_item(obj, it, dtypes[k], ex)
                                       : 0;
            if (rc <= 0) return rc;
            if (k && !same_shape(&f->items[i], it)) return 0;
        }
    }
    return 1;
}

void fast_lists_release(fast_lists *f) {
    if (!f->items) return;
    /* torch's deleters are C++, but a deleter may be any producer's: none runs with an exception set */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *pending = PyErr_GetRaisedException();
#else
    PyObject *type, *pending, *traceback;
    PyErr_Fetch(&type, &pending, &traceback);
#endif
    for (Py_ssize_t i = 0; i < f->n * f->nlists; ++i)
        if (f->items[i].managed && f->items[i].managed->deleter) f->items[i].managed->deleter(f->items[i].managed);
    PyMem_Free(f->items);
    f->items = NULL;
#if PY_VERSION_HEX >= 0x030C0000
    if (pending) PyErr_SetRaisedException(pending);
#else
    PyErr_Restore(type, pending, traceback);
#endif
}

typedef struct {
    uintptr_t start, end;
    int output;
} span;

/* End of the ascending run of s that starts at i. */
static Py_ssize_t run_end(const span *s, Py_ssize_t i, Py_ssize_t count) {
    while (i + 1 < count && s[i].start <= s[i + 1].start) ++i;
    return i + 1;
}

/* s sorted by start, with tmp (as long) as scratch: a natural merge sort, so lists whose tensors were
 * allocated in order (a few ascending runs) cost a pass or two. Returns s or tmp, whichever holds it. */
static span *sort_spans(span *s, span *tmp, Py_ssize_t count) {
    if (count < 2) {  /* already sorted; the loop below needs a run to count */
        for (Py_ssize_t i = 0; i < count; ++i) tmp[i] = s[i];
        return tmp;
    }
    for (;;) {
        Py_ssize_t i = 0, out = 0, runs = 0;
        while (i < count) {
            const Py_ssize_t mid = run_end(s, i, count), end = mid < count ? run_end(s, mid, count) : mid;
            Py_ssize_t x = i, y = mid;
            while (x < mid && y < end) tmp[out++] = s[y].start < s[x].start ? s[y++] : s[x++];
            while (x < mid) tmp[out++] = s[x++];
            while (y < end) tmp[out++] = s[y++];
            i = end;
            ++runs;
        }
        if (runs == 1) return tmp;
        span *swap = s;
        s = tmp;
        tmp = swap;
    }
}

/* Whether no output overlaps another item (as call_check_devices_and_overlap): 1 yes, 0 no, -1 no memory. */
int fast_lists_disjoint(const fast_lists *f, const view_role *roles) {
    const Py_ssize_t count = f->n * f->nlists;
    span *buffer = PyMem_Malloc(2 * (size_t)count * sizeof(span)), *s = buffer;
    if (!buffer) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; ++i) {
        const list_item *it = &f->items[i];
        s[i].start = (uintptr_t)it->data;
        s[i].end = s[i].start + (uintptr_t)it->numel * item_size(it->dtype);
        s[i].output = roles[i / f->n] != ROLE_INPUT;
    }
    s = sort_spans(s, buffer + count, count);
    uintptr_t end_all = 0, end_out = 0;
    int ok = 1;
    for (Py_ssize_t i = 0; i < count && ok; ++i) {
        ok = !(s[i].output && s[i].start < end_all) && !(s[i].start < end_out);
        if (s[i].end > end_all) end_all = s[i].end;
        if (s[i].output && s[i].end > end_out) end_out = s[i].end;
    }
    PyMem_Free(buffer);
    return ok;
}
