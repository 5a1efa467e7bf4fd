/* TA loss, DI++ generator gradient and DI* pseudo-Huber terms. */
#include "ops.h"

/* A batched float tensor with the shape and dtype of `like`. */
static tensor_view *batched_like(call_views *call, PyObject *obj, const char *name, view_role role,
                                 const tensor_view *like) {
    tensor_view *v = call_tensor(call, obj, name, role, DTYPES_FLOAT);
    if (!v || check_same_shape(like, v) < 0 || check_same_dtype(like, v) < 0) return NULL;
    return v;
}

static tensor_view *optional_batched_like(call_views *call, PyObject *obj, const char *name, view_role role,
                                          const tensor_view *like) {
    if (obj == Py_None) return NULL;
    return batched_like(call, obj, name, role, like);
}

/* An output with one value per sample of `of`. */
static tensor_view *per_sample(call_views *call, PyObject *obj, const char *name, unsigned dtypes, int64_t batch,
                               const char *of) {
    tensor_view *v = call_tensor(call, obj, name, ROLE_OUTPUT, dtypes);
    if (!v || check_per_sample(v, batch, of) < 0) return NULL;
    return v;
}

#define IN_BATCH {ROLE_INPUT, FAST_BATCH, 0, 0, DTYPES_FLOAT}
#define IN_LIKE {ROLE_INPUT, FAST_LIKE, 0, 0, DTYPES_FLOAT}
#define OUT_LIKE {ROLE_OUTPUT, FAST_LIKE, 0, 0, DTYPES_FLOAT}
#define OUT_SAMPLE {ROLE_OUTPUT, FAST_SAMPLE, 0, 0, DTYPES_F32}
#define OUT_COUNTS {ROLE_OUTPUT, FAST_SAMPLE, 0, 0, DTYPES_I64}
#define IN_SIGMA {ROLE_INPUT, FAST_SAMPLE, 0, 1, DTYPES_F32}

/* The fast path of ta_loss (tensors in kwlist order, a's scalars set): the kernel's result, or NotImplemented. */
static PyObject *ta_fast(PyObject *const *objs, dipp_ta_args *a, const list_exporter *ex) {
    static const fast_spec spec[6] = {IN_BATCH,
                                      IN_LIKE,
                                      OUT_SAMPLE,
                                      {ROLE_INPUT, FAST_SAMPLE, 1, 1, DTYPES_F32},
                                      {ROLE_OUTPUT, FAST_LIKE, 1, 0, DTYPES_FLOAT},
                                      {ROLE_OUTPUT, FAST_SAMPLE, 1, 0, DTYPES_I64}};
    list_item it[6];
    const int rc = fast_tensors(objs, spec, 6, ex, it);
    if (rc <= 0) return rc < 0 ? NULL : fast_not_taken();
    a->d_ta = it[0].data;
    a->x0 = it[1].data;
    a->loss_out = it[2].data;
    a->sigma = it[3].data;
    a->grad_out = it[4].data;
    a->nonfinite_out = it[5].data;
    FAST_GEOMETRY(a, it[0]);
    FAST_RETURN_RUN(dipp_cpu_ta_loss(a));
}

OP_DECLARE(ta_loss) {
    static char *kwlist[] = {"d_ta", "x0", "loss_out", "sigma", "grad_out", "nonfinite_out", "weighting",
                             "sigma_data", "reduction", "stream", "fast", NULL};
    static const char *const weightings[] = {"unit", "edm", NULL};
    static const char *const reductions[] = {"sum", "mean", NULL};
    PyObject *d_obj, *x0_obj, *loss_obj, *sigma_obj = Py_None, *grad_obj = Py_None, *bad_obj = Py_None;
    PyObject *weighting_obj = NULL, *sigma_data_obj = NULL, *reduction_obj = NULL, *stream_obj = NULL;
    PyObject *fast_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|OOOOOO$OO", kwlist, &d_obj, &x0_obj, &loss_obj, &sigma_obj,
                                     &grad_obj, &bad_obj, &weighting_obj, &sigma_data_obj, &reduction_obj,
                                     &stream_obj, &fast_obj))
        return NULL;
    list_exporter ex;
    const int fast = list_exporter_arg(fast_obj, &ex);
    if (fast < 0) return NULL;
    double sigma_data = 0.5;
    uint64_t stream = 0;
    int w = arg_choice(weighting_obj, "weighting", weightings, DIPP_TA_EDM);
    int r = w < 0 ? -1 : arg_choice(reduction_obj, "reduction", reductions, 1);
    if (r < 0 || arg_double(sigma_data_obj, "sigma_data", &sigma_data) < 0 ||
        arg_f32_positive("sigma_data", sigma_data) < 0 || arg_u64(stream_obj, "stream", &stream) < 0)
        return fast ? fast_not_taken() : NULL;
    if (w == DIPP_TA_EDM && sigma_obj == Py_None) {
        if (fast) return fast_not_taken();
        PyErr_SetString(PyExc_ValueError, "sigma is required with weighting='edm'");
        return NULL;
    }
    dipp_ta_args a = {0};
    a.weighting = w;
    a.sigma_data = (float)sigma_data;
    a.mean_over_elements = r;
    if (fast) {
        PyObject *const objs[6] = {d_obj, x0_obj, loss_obj, sigma_obj, grad_obj, bad_obj};
        return ta_fast(objs, &a, &ex);
    }
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_status status = DIPP_OK;
    tensor_view *d = call_tensor(&call, d_obj, "d_ta", ROLE_INPUT, DTYPES_FLOAT);
    if (!d || check_batched(d) < 0) goto done;
    int64_t batch = d->shape[0];
    tensor_view *x0 = batched_like(&call, x0_obj, "x0", ROLE_INPUT, d);
    if (!x0) goto done;
    tensor_view *loss = per_sample(&call, loss_obj, "loss_out", DTYPES_F32, batch, "d_ta");
    if (!loss) goto done;
    tensor_view *sigma = call_optional(&call, sigma_obj, "sigma", ROLE_INPUT, DTYPES_F32);
    if (PyErr_Occurred() || (sigma && (check_per_sample(sigma, batch, "d_ta") < 0 || check_sigma_values(sigma) < 0)))
        goto done;
    tensor_view *grad = optional_batched_like(&call, grad_obj, "grad_out", ROLE_OUTPUT, d);
    if (PyErr_Occurred()) goto done;
    tensor_view *bad =
        bad_obj == Py_None ? NULL : per_sample(&call, bad_obj, "nonfinite_out", DTYPES_I64, batch, "d_ta");
    if (PyErr_Occurred() || call_check_devices_and_overlap(&call) < 0) goto done;
    a.d_ta = d->data;
    a.x0 = x0->data;
    a.sigma = sigma ? sigma->data : NULL;
    a.grad_out = grad ? grad->data : NULL;
    a.loss_out = loss->data;
    a.nonfinite_out = bad ? bad->data : NULL;
    a.dtype = d->dtype;
    a.batch = batch;
    a.per_sample = d->numel / batch;
    RUN_KERNEL(module, d->device_type == kDLCUDA, ta_loss, a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    call_release(&call);
    return result;
}

/* The fast path of generator_grad (o: the 9 positional tensors; a's scalars set). */
static PyObject *gen_fast(PyObject *const *o, PyObject *uncond, PyObject *dr, dipp_gen_args *a,
                          const list_exporter *ex) {
    static const fast_spec spec[11] = {IN_BATCH,   IN_LIKE,    IN_LIKE,    {ROLE_INPUT, FAST_LIKE, 1, 0, DTYPES_FLOAT},
                                       {ROLE_INPUT, FAST_LIKE, 1, 0, DTYPES_FLOAT},
                                       OUT_LIKE,   OUT_SAMPLE, OUT_SAMPLE, OUT_SAMPLE, OUT_SAMPLE, OUT_COUNTS};
    PyObject *const objs[11] = {o[0], o[1], o[2], uncond, dr, o[3], o[4], o[5], o[6], o[7], o[8]};
    list_item it[11];
    const int rc = fast_tensors(objs, spec, 11, ex, it);
    if (rc <= 0) return rc < 0 ? NULL : fast_not_taken();
    a->x0 = it[0].data;
    a->d_ta = it[1].data;
    a->d_cond = it[2].data;
    a->d_uncond = it[3].data;
    a->dr = it[4].data;
    a->grad_out = it[5].data;
    a->weight_out = it[6].data;
    a->ref_dist_out = it[7].data;
    a->gap_out = it[8].data;
    a->surrogate_out = it[9].data;
    a->nonfinite_out = it[10].data;
    FAST_GEOMETRY(a, it[0]);
    FAST_RETURN_RUN(dipp_cpu_generator_grad(a));
}

OP_DECLARE(generator_grad) {
    static char *kwlist[] = {"x0",          "d_ta",   "d_cond", "grad_out",  "weight_out", "ref_dist_out",
                             "gap_out",     "surrogate_out", "nonfinite_out", "d_uncond", "omega", "dr",
                             "alpha",       "weighting", "min_norm", "stream", "fast", NULL};
    static const char *const weightings[] = {"unit", "normalized", NULL};
    PyObject *o[9], *uncond_obj = Py_None, *dr_obj = Py_None, *omega_obj = NULL, *alpha_obj = NULL;
    PyObject *weighting_obj = NULL, *min_norm_obj = NULL, *stream_obj = NULL, *fast_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOO|OOOOOO$OO", kwlist, &o[0], &o[1], &o[2], &o[3], &o[4],
                                     &o[5], &o[6], &o[7], &o[8], &uncond_obj, &omega_obj, &dr_obj, &alpha_obj,
                                     &weighting_obj, &min_norm_obj, &stream_obj, &fast_obj))
        return NULL;
    list_exporter ex;
    const int fast = list_exporter_arg(fast_obj, &ex);
    if (fast < 0) return NULL;
    double omega = 1.0, alpha = 0.0, min_norm = 1e-5;
    uint64_t stream = 0;
    int w = arg_choice(weighting_obj, "weighting", weightings, DIPP_W_NORMALIZED);
    if (w < 0 || arg_double(omega_obj, "omega", &omega) < 0 || arg_double(alpha_obj, "alpha", &alpha) < 0 ||
        arg_double(min_norm_obj, "min_norm", &min_norm) < 0 || arg_u64(stream_obj, "stream", &stream) < 0)
        return fast ? fast_not_taken() : NULL;
    if (arg_f32_finite("omega", omega) < 0 || arg_f32_finite("alpha", alpha) < 0 ||
        arg_f32_positive("min_norm", min_norm) < 0)
        return fast ? fast_not_taken() : NULL;
    dipp_gen_args a = {0};
    a.omega = (float)omega;
    a.alpha = (float)alpha;
    a.weighting = w;
    a.min_norm = (float)min_norm;
    if (fast && !(uncond_obj == Py_None && omega != 1.0)) return gen_fast(o, uncond_obj, dr_obj, &a, &ex);
    if (fast) return fast_not_taken();
    /* the kernel ignores omega without d_uncond; a guidance scale that silently acts as 1 is a bug */
    if (uncond_obj == Py_None && omega != 1.0) {
        raise_error(PyExc_ValueError,
                    "omega = %g needs d_uncond (the unconditional prediction for the CFG reference); "
                    "without d_uncond omega must be 1 (no guidance)",
                    omega);
        return NULL;
    }
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_status status = DIPP_OK;
    tensor_view *x0 = call_tensor(&call, o[0], "x0", ROLE_INPUT, DTYPES_FLOAT);
    if (!x0 || check_batched(x0) < 0) goto done;
    int64_t batch = x0->shape[0];
    tensor_view *ta = batched_like(&call, o[1], "d_ta", ROLE_INPUT, x0);
    tensor_view *cond = ta ? batched_like(&call, o[2], "d_cond", ROLE_INPUT, x0) : NULL;
    tensor_view *uncond = cond ? optional_batched_like(&call, uncond_obj, "d_uncond", ROLE_INPUT, x0) : NULL;
    if (!cond || PyErr_Occurred()) goto done;
    tensor_view *dr = optional_batched_like(&call, dr_obj, "dr", ROLE_INPUT, x0);
    if (PyErr_Occurred()) goto done;
    tensor_view *grad = batched_like(&call, o[3], "grad_out", ROLE_OUTPUT, x0);
    tensor_view *weight = grad ? per_sample(&call, o[4], "weight_out", DTYPES_F32, batch, "x0") : NULL;
    tensor_view *dist = weight ? per_sample(&call, o[5], "ref_dist_out", DTYPES_F32, batch, "x0") : NULL;
    tensor_view *gap = dist ? per_sample(&call, o[6], "gap_out", DTYPES_F32, batch, "x0") : NULL;
    tensor_view *sur = gap ? per_sample(&call, o[7], "surrogate_out", DTYPES_F32, batch, "x0") : NULL;
    tensor_view *bad = sur ? per_sample(&call, o[8], "nonfinite_out", DTYPES_I64, batch, "x0") : NULL;
    if (!bad || call_check_devices_and_overlap(&call) < 0) goto done;
    a.x0 = x0->data;
    a.d_ta = ta->data;
    a.d_cond = cond->data;
    a.d_uncond = uncond ? uncond->data : NULL;
    a.dr = dr ? dr->data : NULL;
    a.grad_out = grad->data;
    a.weight_out = weight->data;
    a.ref_dist_out = dist->data;
    a.gap_out = gap->data;
    a.surrogate_out = sur->data;
    a.nonfinite_out = bad->data;
    a.dtype = x0->dtype;
    a.batch = batch;
    a.per_sample = x0->numel / batch;
    RUN_KERNEL(module, x0->device_type == kDLCUDA, generator_grad, a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    call_release(&call);
    return result;
}

/* The fast path of huber_terms (o: its 12 tensors; a's scalars set). */
static PyObject *huber_fast(PyObject *const *o, dipp_huber_args *a, const list_exporter *ex) {
    static const fast_spec spec[12] = {IN_BATCH,   IN_LIKE,    IN_LIKE,    IN_SIGMA,   OUT_LIKE,   OUT_LIKE,
                                       OUT_LIKE,   OUT_SAMPLE, OUT_SAMPLE, OUT_SAMPLE, OUT_SAMPLE, OUT_COUNTS};
    list_item it[12];
    const int rc = fast_tensors(o, spec, 12, ex, it);
    if (rc <= 0) return rc < 0 ? NULL : fast_not_taken();
    a->x0 = it[0].data;
    a->d_p = it[1].data;
    a->d_q = it[2].data;
    a->sigma = it[3].data;
    a->a_out = it[4].data;
    a->b_out = it[5].data;
    a->dprime_out = it[6].data;
    a->ysq_out = it[7].data;
    a->yr_out = it[8].data;
    a->h_out = it[9].data;
    a->value_out = it[10].data;
    a->nonfinite_out = it[11].data;
    FAST_GEOMETRY(a, it[0]);
    FAST_RETURN_RUN(dipp_cpu_huber_terms(a));
}

OP_DECLARE(huber_terms) {
    static char *kwlist[] = {"x0",     "d_p",   "d_q",   "sigma",     "a_out",         "b_out",     "dprime_out",
                             "ysq_out", "yr_out", "h_out", "value_out", "nonfinite_out", "c",         "weighting",
                             "stream", "fast",  NULL};
    static const char *const weightings[] = {"unit", "sigma2", NULL};
    PyObject *o[12], *c_obj, *weighting_obj = NULL, *stream_obj = NULL, *fast_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOOOOO|O$OO", kwlist, &o[0], &o[1], &o[2], &o[3], &o[4],
                                     &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &c_obj, &weighting_obj,
                                     &stream_obj, &fast_obj))
        return NULL;
    list_exporter ex;
    const int fast = list_exporter_arg(fast_obj, &ex);
    if (fast < 0) return NULL;
    double c = 0.0;
    uint64_t stream = 0;
    int w = arg_choice(weighting_obj, "weighting", weightings, DIPP_HUBER_W_SIGMA2);
    if (w < 0 || arg_double(c_obj, "c", &c) < 0 || arg_f32_positive("c", c) < 0 ||
        arg_u64(stream_obj, "stream", &stream) < 0)
        return fast ? fast_not_taken() : NULL;
    dipp_huber_args a = {0};
    a.c = (float)c;
    a.weighting = w;
    if (fast) return huber_fast(o, &a, &ex);
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_status status = DIPP_OK;
    tensor_view *x0 = call_tensor(&call, o[0], "x0", ROLE_INPUT, DTYPES_FLOAT);
    if (!x0 || check_batched(x0) < 0) goto done;
    int64_t batch = x0->shape[0];
    tensor_view *dp = batched_like(&call, o[1], "d_p", ROLE_INPUT, x0);
    tensor_view *dq = dp ? batched_like(&call, o[2], "d_q", ROLE_INPUT, x0) : NULL;
    tensor_view *sigma = dq ? call_tensor(&call, o[3], "sigma", ROLE_INPUT, DTYPES_F32) : NULL;
    if (!sigma || check_per_sample(sigma, batch, "x0") < 0 || check_sigma_values(sigma) < 0) goto done;
    tensor_view *av = batched_like(&call, o[4], "a_out", ROLE_OUTPUT, x0);
    tensor_view *bv = av ? batched_like(&call, o[5], "b_out", ROLE_OUTPUT, x0) : NULL;
    tensor_view *dv = bv ? batched_like(&call, o[6], "dprime_out", ROLE_OUTPUT, x0) : NULL;
    tensor_view *ysq = dv ? per_sample(&call, o[7], "ysq_out", DTYPES_F32, batch, "x0") : NULL;
    tensor_view *yr = ysq ? per_sample(&call, o[8], "yr_out", DTYPES_F32, batch, "x0") : NULL;
    tensor_view *h = yr ? per_sample(&call, o[9], "h_out", DTYPES_F32, batch, "x0") : NULL;
    tensor_view *val = h ? per_sample(&call, o[10], "value_out", DTYPES_F32, batch, "x0") : NULL;
    tensor_view *bad = val ? per_sample(&call, o[11], "nonfinite_out", DTYPES_I64, batch, "x0") : NULL;
    if (!bad || call_check_devices_and_overlap(&call) < 0) goto done;
    a.x0 = x0->data;
    a.d_p = dp->data;
    a.d_q = dq->data;
    a.sigma = sigma->data;
    a.a_out = av->data;
    a.b_out = bv->data;
    a.dprime_out = dv->data;
    a.ysq_out = ysq->data;
    a.yr_out = yr->data;
    a.h_out = h->data;
    a.value_out = val->data;
    a.nonfinite_out = bad->data;
    a.dtype = x0->dtype;
    a.batch = batch;
    a.per_sample = x0->numel / batch;
    RUN_KERNEL(module, x0->device_type == kDLCUDA, huber_terms, a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    call_release(&call);
    return result;
}
