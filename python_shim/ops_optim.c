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

OP_DECLARE(ema_update) {
    static char *kwlist[] = {"ema", "params", "decay", "stream", NULL};
    PyObject *ema_obj, *param_obj, *decay_obj, *stream_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$O", kwlist, &ema_obj, &param_obj, &decay_obj, &stream_obj))
        return NULL;
    double decay = 0.0;
    uint64_t stream = 0;
    if (arg_double(decay_obj, "decay", &decay) < 0 || arg_in_range("decay", decay, 0.0, 1.0, 0, 0) < 0 ||
        arg_u64(stream_obj, "stream", &stream) < 0)
        return NULL;
    PyObject *emas = tensor_list(ema_obj, "ema"), *params = emas ? tensor_list(param_obj, "params") : NULL;
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_tensor_pair *pairs = NULL;
    dipp_status status = DIPP_OK;
    if (!params || check_lengths(emas, "ema", params, "params") < 0) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(emas);
    if (n == 0) {
        PyErr_SetString(PyExc_ValueError, "ema: the list of tensors is empty");
        goto done;
    }
    pairs = PyMem_Calloc((size_t)n, sizeof(dipp_tensor_pair));
    if (!pairs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
        tensor_view *e = item(&call, emas, "ema", i, ROLE_INOUT, DTYPES_FLOAT);
        tensor_view *p = e ? item(&call, params, "params", i, ROLE_INPUT, DTYPES_FLOAT) : NULL;
        if (!p || check_same_shape(e, p) < 0) goto done;
        pairs[i] = (dipp_tensor_pair){e->data, p->data, NULL, NULL, e->dtype, p->dtype, e->numel};
    }
    if (call_check_devices_and_overlap(&call) < 0) goto done;
    dipp_ema_args a = {pairs, n, decay};
    RUN_KERNEL(module, call.views[0]->device_type == kDLCUDA, ema_update, a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    PyMem_Free(pairs);
    call_release(&call);
    Py_XDECREF(emas);
    Py_XDECREF(params);
    return result;
}

OP_DECLARE(adam_step) {
    static char *kwlist[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "lr",       "beta1",  "beta2",
                             "eps",    "weight_decay", "step", "decoupled",   "stream", NULL};
    PyObject *objs[4], *lr_obj, *beta1_obj, *beta2_obj, *eps_obj, *wd_obj, *step_obj, *decoupled_obj = NULL;
    PyObject *stream_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOO|O$O", kwlist, &objs[0], &objs[1], &objs[2], &objs[3],
                                     &lr_obj, &beta1_obj, &beta2_obj, &eps_obj, &wd_obj, &step_obj, &decoupled_obj,
                                     &stream_obj))
        return NULL;
    double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
    int64_t step = 0;
    int decoupled = 0;
    uint64_t stream = 0;
    if (arg_double(lr_obj, "lr", &lr) < 0 || arg_double(beta1_obj, "beta1", &beta1) < 0 ||
        arg_double(beta2_obj, "beta2", &beta2) < 0 || arg_double(eps_obj, "eps", &eps) < 0 ||
        arg_double(wd_obj, "weight_decay", &weight_decay) < 0 || arg_i64(step_obj, "step", 1, INT64_MAX, &step) < 0 ||
        arg_bool(decoupled_obj, "decoupled", &decoupled) < 0 || arg_u64(stream_obj, "stream", &stream) < 0)
        return NULL;
    if (arg_in_range("lr", lr, 0.0, 1e6, 0, 0) < 0 || arg_in_range("beta1", beta1, 0.0, 1.0, 0, 1) < 0 ||
        arg_in_range("beta2", beta2, 0.0, 1.0, 0, 1) < 0 || arg_f32_positive("eps", eps) < 0 ||
        arg_in_range("weight_decay", weight_decay, 0.0, 1e6, 0, 0) < 0)
        return NULL;
    static const char *const names[4] = {"params", "grads", "exp_avgs", "exp_avg_sqs"};
    PyObject *seqs[4] = {NULL, NULL, NULL, NULL};
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_tensor_pair *pairs = NULL;
    dipp_status status = DIPP_OK;
    /* exp_avgs = None keeps no first moment; torch's m is the gradient when beta1 = 0 */
    const int has_m = objs[2] != Py_None;
    if (!has_m && beta1 != 0.0) {
        char text[32];
        snprintf(text, sizeof text, "%g", beta1); /* PyErr_Format has no float conversions */
        PyErr_Format(PyExc_ValueError, "exp_avgs may be None only when beta1 == 0 (got beta1 = %s)", text);
        return NULL;
    }
    for (int k = 0; k < 4; ++k) {
        if (k == 2 && !has_m) continue;
        seqs[k] = tensor_list(objs[k], names[k]);
        if (!seqs[k] || (k && check_lengths(seqs[0], names[0], seqs[k], names[k]) < 0)) goto done;
    }
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
    dipp_adam_args a = {pairs, n, lr, beta1, beta2, eps, weight_decay, decoupled, step};
    RUN_KERNEL(module, call.views[0]->device_type == kDLCUDA, adam_step, a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    PyMem_Free(pairs);
    call_release(&call);
    for (int k = 0; k < 4; ++k) Py_XDECREF(seqs[k]);
    return result;
}
