/* Fused noising and the CFG combine. */
#include "ops.h"

/* The fast path of add_noise (objs: x0, sigma, xt_out, eps_out; a's scalars set). */
static PyObject *noise_fast(PyObject *const *objs, dipp_noise_args *a, const list_exporter *ex) {
    static const fast_spec spec[4] = {{ROLE_INPUT, FAST_BATCH, 0, 0, DTYPES_FLOAT},
                                      {ROLE_INPUT, FAST_SAMPLE, 0, 1, DTYPES_F32},
                                      {ROLE_OUTPUT, FAST_LIKE, 0, 0, DTYPES_FLOAT},
                                      {ROLE_OUTPUT, FAST_LIKE, 1, 0, DTYPES_FLOAT}};
    list_item it[4];
    const int rc = fast_tensors(objs, spec, 4, ex, it);
    if (rc <= 0) return rc < 0 ? NULL : fast_not_taken();
    a->x0 = it[0].data;
    a->sigma = it[1].data;
    a->xt = it[2].data;
    a->eps_out = it[3].data;
    FAST_GEOMETRY(a, it[0]);
    FAST_RETURN_RUN(dipp_cpu_add_noise(a));
}

OP_DECLARE(add_noise) {
    static char *kwlist[] = {"x0", "sigma", "xt_out", "seed", "offset", "eps_out", "flow", "stream", "fast", NULL};
    PyObject *x0_obj, *sigma_obj, *xt_obj, *seed_obj, *offset_obj = NULL, *eps_obj = Py_None, *flow_obj = NULL;
    PyObject *stream_obj = NULL, *fast_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|OOO$OO", kwlist, &x0_obj, &sigma_obj, &xt_obj, &seed_obj,
                                     &offset_obj, &eps_obj, &flow_obj, &stream_obj, &fast_obj))
        return NULL;
    list_exporter ex;
    const int fast = list_exporter_arg(fast_obj, &ex);
    if (fast < 0) return NULL;
    dipp_noise_args a = {0};
    int flow = 0;
    uint64_t stream = 0;
    if (arg_u64(seed_obj, "seed", &a.seed) < 0 || arg_u64(offset_obj, "offset", &a.offset) < 0 ||
        arg_bool(flow_obj, "flow", &flow) < 0 || arg_u64(stream_obj, "stream", &stream) < 0)
        return fast ? fast_not_taken() : NULL;
    a.flow = flow;
    if (fast) {
        PyObject *const objs[4] = {x0_obj, sigma_obj, xt_obj, eps_obj};
        return noise_fast(objs, &a, &ex);
    }
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_status status = DIPP_OK;
    tensor_view *x0 = call_tensor(&call, x0_obj, "x0", ROLE_INPUT, DTYPES_FLOAT);
    if (!x0 || check_batched(x0) < 0) goto done;
    tensor_view *sigma = call_tensor(&call, sigma_obj, "sigma", ROLE_INPUT, DTYPES_F32);
    if (!sigma || check_per_sample(sigma, x0->shape[0], "x0") < 0 || check_sigma_values(sigma) < 0) goto done;
    tensor_view *xt = call_tensor(&call, xt_obj, "xt_out", ROLE_OUTPUT, DTYPES_FLOAT);
    if (!xt || check_same_shape(x0, xt) < 0 || check_same_dtype(x0, xt) < 0) goto done;
    tensor_view *eps = call_optional(&call, eps_obj, "eps_out", ROLE_OUTPUT, DTYPES_FLOAT);
    if (PyErr_Occurred() || (eps && (check_same_shape(x0, eps) < 0 || check_same_dtype(x0, eps) < 0))) goto done;
    if (call_check_devices_and_overlap(&call) < 0) goto done;
    a.x0 = x0->data;
    a.xt = xt->data;
    a.eps_out = eps ? eps->data : NULL;
    a.sigma = sigma->data;
    a.dtype = x0->dtype;
    a.batch = x0->shape[0];
    a.per_sample = x0->numel / a.batch;
    RUN_KERNEL(module, x0->device_type == kDLCUDA, add_noise, a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    call_release(&call);
    return result;
}

/* The fast path of cfg_combine (objs: uncond, cond, out). */
static PyObject *cfg_fast(PyObject *const *objs, double omega, const list_exporter *ex) {
    static const fast_spec spec[3] = {{ROLE_INPUT, FAST_ANY, 0, 0, DTYPES_FLOAT},
                                      {ROLE_INPUT, FAST_LIKE, 0, 0, DTYPES_FLOAT},
                                      {ROLE_OUTPUT, FAST_LIKE, 0, 0, DTYPES_FLOAT}};
    list_item it[3];
    const int rc = fast_tensors(objs, spec, 3, ex, it);
    if (rc <= 0) return rc < 0 ? NULL : fast_not_taken();
    dipp_cfg_args a = {it[0].data, it[1].data, it[2].data, it[0].dtype, it[0].numel, (float)omega};
    FAST_RETURN_RUN(dipp_cpu_cfg_combine(&a));
}

OP_DECLARE(cfg_combine) {
    static char *kwlist[] = {"uncond", "cond", "out", "omega", "stream", "fast", NULL};
    PyObject *u_obj, *c_obj, *out_obj, *omega_obj, *stream_obj = NULL, *fast_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|$OO", kwlist, &u_obj, &c_obj, &out_obj, &omega_obj,
                                     &stream_obj, &fast_obj))
        return NULL;
    list_exporter ex;
    const int fast = list_exporter_arg(fast_obj, &ex);
    if (fast < 0) return NULL;
    double omega = 1.0;
    uint64_t stream = 0;
    if (arg_double(omega_obj, "omega", &omega) < 0 || arg_f32_finite("omega", omega) < 0 ||
        arg_u64(stream_obj, "stream", &stream) < 0)
        return fast ? fast_not_taken() : NULL;
    if (fast) {
        PyObject *const objs[3] = {u_obj, c_obj, out_obj};
        return cfg_fast(objs, omega, &ex);
    }
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_status status = DIPP_OK;
    tensor_view *u = call_tensor(&call, u_obj, "uncond", ROLE_INPUT, DTYPES_FLOAT);
    if (!u) goto done;
    tensor_view *c = call_tensor(&call, c_obj, "cond", ROLE_INPUT, DTYPES_FLOAT);
    if (!c || check_same_shape(u, c) < 0 || check_same_dtype(u, c) < 0) goto done;
    tensor_view *out = call_tensor(&call, out_obj, "out", ROLE_OUTPUT, DTYPES_FLOAT);
    if (!out || check_same_shape(u, out) < 0 || check_same_dtype(u, out) < 0) goto done;
    if (call_check_devices_and_overlap(&call) < 0) goto done;
    dipp_cfg_args a = {u->data, c->data, out->data, u->dtype, u->numel, (float)omega};
    RUN_KERNEL(module, u->device_type == kDLCUDA, cfg_combine, a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    call_release(&call);
    return result;
}
