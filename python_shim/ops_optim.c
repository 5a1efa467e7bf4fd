/* Multi-tensor EMA and Adam/AdamW: many tensors, one call, one parallel loop. */
#include "ops.h"

#include <stdio.h>

/* A list or tuple of tensors as a new reference to a tuple snapshot; NULL on error.
 * A snapshot, not the list itself: a __dlpack__ method may mutate the caller's list
 * while the items are acquired, and the items must stay alive and in bounds. */
static PyObject *tensor_list(PyObject *obj, const char *name) {
    if (!PyList_Check(obj) && !PyTuple_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a list or tuple of tensors, got %s", name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return PySequence_Tuple(obj);
}

static int check_lengths(PyObject *a, const char *an, PyObject *b, const char *bn) {
    if (PySequence_Fast_GET_SIZE(a) == PySequence_Fast_GET_SIZE(b)) return 0;
    PyErr_Format(PyExc_ValueError, "%s has %zd tensors but %s has %zd", bn, PySequence_Fast_GET_SIZE(b), an,
                 PySequence_Fast_GET_SIZE(a));
    return -1;
}

static tensor_view *item(call_views *call, PyObject *seq, const char *name, Py_ssize_t i, view_role role,
                         unsigned dtypes) {
    char label[64];
    snprintf(label, sizeof label, "%s[%zd]", name, i);
    return call_tensor(call, PySequence_Fast_GET_ITEM(seq, i), label, role, dtypes);
}

/* With fast=: the call is handed back to the Python layer's checked path (NotImplemented), which
 * raises its own error in its own order; errors that are not an Exception propagate. */
static PyObject *not_fast(void) {
    if (PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_Exception) || PyErr_ExceptionMatches(PyExc_MemoryError)) return NULL;
        PyErr_Clear();
    }
    return Py_NewRef(Py_NotImplemented);
}

/* The kernel on the parsed lists, when they are disjoint: 1 ran (status set), 0 overlap, -1 error. */
static int run_fast_lists(fast_lists *f, const view_role *roles, int adam, void *args, dipp_status *status) {
    int rc = fast_lists_disjoint(f, roles);
    if (rc <= 0) return rc;
    dipp_tensor_pair *pairs = PyMem_Malloc((size_t)f->n * sizeof(dipp_tensor_pair));
    if (!pairs) {
        PyErr_NoMemory();
        return -1;
    }
    const Py_ssize_t n = f->n;
    for (Py_ssize_t i = 0; i < n; ++i) {
        const list_item *a = &f->items[i], *b = &f->items[n + i];
        float *m = adam && f->nlists == 4 ? f->items[2 * n + i].data : NULL;
        float *v = adam ? f->items[(f->nlists - 1) * n + i].data : NULL;
        pairs[i] = (dipp_tensor_pair){a->data, b->data, m, v, a->dtype, b->dtype, a->numel};
    }
    if (adam) {
        dipp_adam_args *a = args;
        a->tensors = pairs;
        a->count = n;
        Py_BEGIN_ALLOW_THREADS *status = dipp_cpu_adam_step(a);
        Py_END_ALLOW_THREADS
    } else {
        dipp_ema_args *a = args;
        a->tensors = pairs;
        a->count = n;
        Py_BEGIN_ALLOW_THREADS *status = dipp_cpu_ema_update(a);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(pairs);
    return 1;
}

/* The fast path of one call: 1 done (status set), 0 take the checked path, -1 error. */
static int fast_call(PyObject *const *seqs, const view_role *roles, const unsigned *dtypes, int nlists,
                     const list_exporter *ex, int adam, void *args, dipp_status *status) {
    fast_lists f;
    int rc = fast_lists_parse(&f, seqs, roles, dtypes, nlists, ex);
    if (rc > 0) rc = run_fast_lists(&f, roles, adam, args, status);
    fast_lists_release(&f);
    return rc;
}

OP_DECLARE(ema_update) {
    static char *kwlist[] = {"ema", "params", "decay", "stream", "fast", NULL};
    PyObject *ema_obj, *param_obj, *decay_obj, *stream_obj = NULL, *fast_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$OO", kwlist, &ema_obj, &param_obj, &decay_obj, &stream_obj,
                                     &fast_obj))
        return NULL;
    list_exporter ex;
    const int fast = list_exporter_arg(fast_obj, &ex);
    if (fast < 0) return NULL;
    double decay = 0.0;
    uint64_t stream = 0;
    if (arg_double(decay_obj, "decay", &decay) < 0 || arg_in_range("decay", decay, 0.0, 1.0, 0, 0) < 0 ||
        arg_u64(stream_obj, "stream", &stream) < 0)
        return fast ? not_fast() : NULL;
    PyObject *seqs[2] = {tensor_list(ema_obj, "ema"), NULL};
    seqs[1] = seqs[0] ? tensor_list(param_obj, "params") : NULL;
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_tensor_pair *pairs = NULL;
    dipp_status status = DIPP_OK;
    static const view_role roles[2] = {ROLE_INOUT, ROLE_INPUT};
    static const unsigned dtypes[2] = {DTYPES_FLOAT, DTYPES_FLOAT};
    dipp_ema_args a = {NULL, 0, decay};
    if (fast && seqs[1]) {
        int rc = fast_call(seqs, roles, dtypes, 2, &ex, 0, &a, &status);
        result = rc < 0 ? NULL : rc == 0 ? not_fast() : raise_status(status) == 0 ? Py_NewRef(Py_None) : NULL;
        goto done;
    }
    if (fast) {
        result = not_fast();
        goto done;
    }
    if (!seqs[1] || check_lengths(seqs[0], "ema", seqs[1], "params") < 0) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seqs[0]);
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "ema: the list of tensors is empty");
        goto done;
    }
    int rc = fast_call(seqs, roles, dtypes, 2, NULL, 0, &a, &status); /* NumPy lists */
    if (rc != 0) {
        if (rc > 0 && raise_status(status) == 0) result = Py_NewRef(Py_None);
        goto done;
    }
    pairs = PyMem_Calloc((size_t)n, sizeof(dipp_tensor_pair));
    if (!pairs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
        tensor_view *e = item(&call, seqs[0], "ema", i, ROLE_INOUT, DTYPES_FLOAT);
        tensor_view *p = e ? item(&call, seqs[1], "params", i, ROLE_INPUT, DTYPES_FLOAT) : NULL;
        if (!p || check_same_shape(e, p) < 0) goto done;
        pairs[i] = (dipp_tensor_pair){e->data, p->data, NULL, NULL, e->dtype, p->dtype, e->numel};
    }
    if (call_check_devices_and_overlap(&call) < 0) goto done;
    a.tensors = pairs;
    a.count = n;
    RUN_KERNEL(module, call.views[0]->device_type == kDLCUDA, ema_update, a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    PyMem_Free(pairs);
    call_release(&call);
    Py_XDECREF(seqs[0]);
    Py_XDECREF(seqs[1]);
    return result;
}

/* The scalars of adam_step, checked, into *a (tensors not set); 0 or -1. */
static int adam_scalars(PyObject *const *o, dipp_adam_args *a) {
    a->lr = a->beta1 = a->beta2 = a->eps = a->weight_decay = 0.0;
    a->step = 0;
    a->decoupled = 0;
    if (arg_double(o[0], "lr", &a->lr) < 0 || arg_double(o[1], "beta1", &a->beta1) < 0 ||
        arg_double(o[2], "beta2", &a->beta2) < 0 || arg_double(o[3], "eps", &a->eps) < 0 ||
        arg_double(o[4], "weight_decay", &a->weight_decay) < 0 || arg_i64(o[5], "step", 1, INT64_MAX, &a->step) < 0 ||
        arg_bool(o[6], "decoupled", &a->decoupled) < 0)
        return -1;
    if (arg_in_range("lr", a->lr, 0.0, 1e6, 0, 0) < 0 || arg_in_range("beta1", a->beta1, 0.0, 1.0, 0, 1) < 0 ||
        arg_in_range("beta2", a->beta2, 0.0, 1.0, 0, 1) < 0 || arg_f32_positive("eps", a->eps) < 0 ||
        arg_in_range("weight_decay", a->weight_decay, 0.0, 1e6, 0, 0) < 0)
        return -1;
    return 0;
}

/* The checked path of adam_step over the list snapshots (seqs[2] NULL: no first moment). */
static PyObject *adam_checked(PyObject *module, PyObject *const *seqs, dipp_adam_args *a, uint64_t stream) {
    const int has_m = seqs[2] != NULL;
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_tensor_pair *pairs = NULL;
    dipp_status status = DIPP_OK;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seqs[0]);
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "params: the list of tensors is empty");
        goto done;
    }
    pairs = PyMem_Calloc((size_t)n, sizeof(dipp_tensor_pair));
    if (!pairs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
        tensor_view *p = item(&call, seqs[0], "params", i, ROLE_INOUT, DTYPES_FLOAT);
        tensor_view *g = p ? item(&call, seqs[1], "grads", i, ROLE_INPUT, DTYPES_FLOAT) : NULL;
        tensor_view *m = g && has_m ? item(&call, seqs[2], "exp_avgs", i, ROLE_INOUT, DTYPES_F32) : NULL;
        tensor_view *v = g && (m || !has_m) ? item(&call, seqs[3], "exp_avg_sqs", i, ROLE_INOUT, DTYPES_F32) : NULL;
        if (!v || check_same_shape(p, g) < 0 || (m && check_same_shape(p, m) < 0) || check_same_shape(p, v) < 0)
            goto done;
        pairs[i] = (dipp_tensor_pair){p->data, g->data, m ? m->data : NULL, v->data, p->dtype, g->dtype, p->numel};
    }
    if (call_check_devices_and_overlap(&call) < 0) goto done;
    a->tensors = pairs;
    a->count = n;
    RUN_KERNEL(module, call.views[0]->device_type == kDLCUDA, adam_step, *a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    PyMem_Free(pairs);
    call_release(&call);
    return result;
}

static const view_role adam_roles[4] = {ROLE_INOUT, ROLE_INPUT, ROLE_INOUT, ROLE_INOUT};
static const unsigned adam_dtypes[4] = {DTYPES_FLOAT, DTYPES_FLOAT, DTYPES_F32, DTYPES_F32};
/* the same without exp_avgs: params, grads, exp_avg_sqs */
static const view_role adam_roles_v[3] = {ROLE_INOUT, ROLE_INPUT, ROLE_INOUT};
static const unsigned adam_dtypes_v[3] = {DTYPES_FLOAT, DTYPES_FLOAT, DTYPES_F32};

/* The list snapshots of adam_step into seqs (exp_avgs None: seqs[2] NULL); 0 or -1. */
static int adam_lists(PyObject *const *objs, PyObject **seqs) {
    static const char *const names[4] = {"params", "grads", "exp_avgs", "exp_avg_sqs"};
    for (int k = 0; k < 4; ++k) {
        if (k == 2 && objs[2] == Py_None) continue;
        seqs[k] = tensor_list(objs[k], names[k]);
        if (!seqs[k] || (k && check_lengths(seqs[0], names[0], seqs[k], names[k]) < 0)) return -1;
    }
    return 0;
}

OP_DECLARE(adam_step) {
    static char *kwlist[] = {"params", "grads",        "exp_avgs", "exp_avg_sqs", "lr",     "beta1", "beta2",
                             "eps",    "weight_decay", "step",     "decoupled",   "stream", "fast",  NULL};
    PyObject *objs[4], *sc[7] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL}, *stream_obj = NULL, *fast_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOO|O$OO", kwlist, &objs[0], &objs[1], &objs[2], &objs[3],
                                     &sc[0], &sc[1], &sc[2], &sc[3], &sc[4], &sc[5], &sc[6], &stream_obj, &fast_obj))
        return NULL;
    list_exporter ex;
    const int fast = list_exporter_arg(fast_obj, &ex);
    if (fast < 0) return NULL;
    dipp_adam_args a;
    uint64_t stream = 0;
    if (adam_scalars(sc, &a) < 0 || arg_u64(stream_obj, "stream", &stream) < 0) return fast ? not_fast() : NULL;
    /* exp_avgs = None keeps no first moment; torch's m is the gradient when beta1 = 0 */
    if (objs[2] == Py_None && a.beta1 != 0.0) {
        if (fast) return not_fast();
        char text[32];
        snprintf(text, sizeof text, "%g", a.beta1); /* PyErr_Format has no float conversions */
        PyErr_Format(PyExc_ValueError, "exp_avgs may be None only when beta1 == 0 (got beta1 = %s)", text);
        return NULL;
    }
    PyObject *seqs[4] = {NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    const int listed = adam_lists(objs, seqs);
    const int has_m = seqs[2] != NULL;
    PyObject *const fast_seqs[4] = {seqs[0], seqs[1], has_m ? seqs[2] : seqs[3], seqs[3]};
    dipp_status status = DIPP_OK;
    if (fast || listed == 0) {
        int rc = listed < 0 ? 0
                            : fast_call(fast_seqs, has_m ? adam_roles : adam_roles_v, has_m ? adam_dtypes : adam_dtypes_v,
                                        has_m ? 4 : 3, fast ? &ex : NULL, 1, &a, &status);
        if (rc > 0) result = raise_status(status) == 0 ? Py_NewRef(Py_None) : NULL;
        else if (fast && rc == 0) result = not_fast();
        else if (rc == 0) result = adam_checked(module, seqs, &a, stream);
    }
    for (int k = 0; k < 4; ++k) Py_XDECREF(seqs[k]);
    return result;
}
