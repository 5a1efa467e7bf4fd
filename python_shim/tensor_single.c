/* The single-tensor kernels' fast path: the tensor arguments of one call checked against a static
 * table (fast_spec) without a view, label or Python object per tensor. It takes exactly the calls
 * the checked path (call_tensor and the entry's checks) would run, and hands back every other one. */
#include "tensor_arg.h"

#include <math.h>
#include <string.h>

PyObject *fast_not_taken(void) {
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception) || PyErr_ExceptionMatches(PyExc_MemoryError)) return NULL;
        PyErr_Clear();
    }
    return Py_NewRef(Py_NotImplemented);
}

/* As check_sigma_values, without raising: 1 when every value is finite and > 0. */
static int sigma_ok(const list_item *it) {
    if (it->dtype != VIEW_F32) return 0;
    const float *s = it->data;
    for (int64_t i = 0; i < it->numel; ++i)
        if (!(isfinite(s[i]) && s[i] > 0.0f)) return 0;
    return 1;
}

/* The shape rule of spec against the lead (items[0], already taken): 1 holds, 0 not. */
static int shape_ok(const list_item *it, const fast_spec *spec, const list_item *lead) {
    switch (spec->shape) {
    case FAST_BATCH: return it->ndim >= 1;
    case FAST_LIKE:
        return it->dtype == lead->dtype && it->ndim == lead->ndim &&
               memcmp(it->shape, lead->shape, (size_t)it->ndim * sizeof(int64_t)) == 0;
    case FAST_SAMPLE: return lead->ndim >= 1 && it->ndim == 1 && it->shape[0] == lead->shape[0];
    default: return 1;
    }
}

int fast_tensors(PyObject *const *objs, const fast_spec *spec, int count, const list_exporter *ex,
                 list_item *items) {
    enum { MAX_TENSORS = 16 };
    view_role roles[MAX_TENSORS];
    if (count > MAX_TENSORS) return 0;
    for (int k = 0; k < count; ++k) {
        list_item *it = &items[k];
        memset(it, 0, sizeof *it);
        roles[k] = (view_role)spec[k].role;
        if (!objs[k] || objs[k] == Py_None) {
            if (spec[k].optional && k > 0) continue;
            return 0;
        }
        int rc = fast_item(objs[k], it, roles[k], spec[k].dtypes, ex);
        if (rc <= 0) return rc;
        if (!shape_ok(it, &spec[k], &items[0]) || (spec[k].sigma && !sigma_ok(it))) return 0;
    }
    return fast_items_disjoint(items, roles, count);
}
