/* Philox fills, sigma sampling, sigma tables and preconditioning coefficients. */
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL DIPP_ARRAY_API
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include "ops.h"

/* The fast path of the fills (a's seed and offset set). */
static PyObject *fill_fast(PyObject *out_obj, dipp_fill_args *a, int normal, const list_exporter *ex) {
    static const fast_spec spec[1] = {{ROLE_OUTPUT, FAST_ANY, 0, 0, DTYPES_FLOAT}};
    list_item it[1];
    const int rc = fast_tensors(&out_obj, spec, 1, ex, it);
    if (rc <= 0) return rc < 0 ? NULL : fast_not_taken();
    a->out = it[0].data;
    a->dtype = it[0].dtype;
    a->n = it[0].numel;
    FAST_RETURN_RUN(normal ? dipp_cpu_fill_normal(a) : dipp_cpu_fill_uniform(a));
}

static PyObject *fill(PyObject *module, PyObject *args, PyObject *kwargs, int normal) {
    static char *kwlist[] = {"out", "seed", "offset", "stream", "fast", NULL};
    PyObject *out_obj, *seed_obj, *offset_obj = NULL, *stream_obj = NULL, *fast_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O$OO", kwlist, &out_obj, &seed_obj, &offset_obj, &stream_obj,
                                     &fast_obj))
        return NULL;
    list_exporter ex;
    const int fast = list_exporter_arg(fast_obj, &ex);
    if (fast < 0) return NULL;
    dipp_fill_args a = {0};
    uint64_t stream = 0;
    if (arg_u64(seed_obj, "seed", &a.seed) < 0 || arg_u64(offset_obj, "offset", &a.offset) < 0 ||
        arg_u64(stream_obj, "stream", &stream) < 0)
        return fast ? fast_not_taken() : NULL;
    if (fast) return fill_fast(out_obj, &a, normal, &ex);
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_status status = DIPP_OK;
    tensor_view *out = call_tensor(&call, out_obj, "out", ROLE_OUTPUT, DTYPES_FLOAT);
    if (!out || call_check_devices_and_overlap(&call) < 0) goto done;
    a.out = out->data;
    a.dtype = out->dtype;
    a.n = out->numel;
    if (normal) RUN_KERNEL(module, out->device_type == kDLCUDA, fill_normal, a, stream, status, done);
    else RUN_KERNEL(module, out->device_type == kDLCUDA, fill_uniform, a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    call_release(&call);
    return result;
}

OP_DECLARE(fill_uniform) { return fill(module, args, kwargs, 0); }
OP_DECLARE(fill_normal) { return fill(module, args, kwargs, 1); }

/* Ascending, finite, positive: what the binary search needs. */
static int check_table(const tensor_view *t) {
    if (t->ndim != 1 || t->numel < 1) {
        PyErr_SetString(PyExc_ValueError, "table: expected a non-empty 1-D sigma table");
        return -1;
    }
    if (t->device_type != kDLCPU) return 0; /* checked by the Python layer for CUDA tables */
    const float *v = t->data;
    for (int64_t i = 0; i < t->numel; ++i) {
        if (!(isfinite(v[i]) && v[i] >= 0.0f)) {
            raise_error(PyExc_ValueError, "table[%lld] must be finite and >= 0, got %g", (long long)i, (double)v[i]);
            return -1;
        }
        if (i > 0 && !(v[i] > v[i - 1])) {
            raise_error(PyExc_ValueError, "table must be strictly ascending, but table[%lld]=%g <= table[%lld]=%g",
                        (long long)i, (double)v[i], (long long)(i - 1), (double)v[i - 1]);
            return -1;
        }
    }
    return 0;
}

OP_DECLARE(sample_sigma) {
    static char *kwlist[] = {"sigma_out", "seed", "offset", "p_mean", "p_std", "sigma_min", "sigma_max",
                             "table",     "index_out", "snap", "stream", NULL};
    PyObject *out_obj, *seed_obj, *offset_obj, *p_mean_obj, *p_std_obj, *min_obj, *max_obj;
    PyObject *table_obj = Py_None, *index_obj = Py_None, *snap_obj = NULL, *stream_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOO|OOO$O", kwlist, &out_obj, &seed_obj, &offset_obj,
                                     &p_mean_obj, &p_std_obj, &min_obj, &max_obj, &table_obj, &index_obj, &snap_obj,
                                     &stream_obj))
        return NULL;
    dipp_sigma_args a = {0};
    double p_mean = 0, p_std = 0, sigma_min = 0, sigma_max = 0;
    int snap = 0;
    uint64_t stream = 0;
    if (arg_u64(seed_obj, "seed", &a.seed) < 0 || arg_u64(offset_obj, "offset", &a.offset) < 0 ||
        arg_double(p_mean_obj, "p_mean", &p_mean) < 0 || arg_double(p_std_obj, "p_std", &p_std) < 0 ||
        arg_double(min_obj, "sigma_min", &sigma_min) < 0 || arg_double(max_obj, "sigma_max", &sigma_max) < 0 ||
        arg_bool(snap_obj, "snap", &snap) < 0 || arg_u64(stream_obj, "stream", &stream) < 0)
        return NULL;
    if (arg_f32_finite("p_mean", p_mean) < 0 || arg_in_range("p_std", p_std, 0.0, 1e6, 0, 0) < 0 ||
        arg_f32_positive("sigma_min", sigma_min) < 0 || arg_f32_positive("sigma_max", sigma_max) < 0)
        return NULL;
    if (sigma_max < sigma_min) {
        raise_error(PyExc_ValueError, "sigma_max (%g) must be >= sigma_min (%g)", sigma_max, sigma_min);
        return NULL;
    }
    if (snap && table_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError, "snap=True needs a sigma table");
        return NULL;
    }
    if (index_obj != Py_None && table_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError, "index_out needs a sigma table");
        return NULL;
    }
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    dipp_status status = DIPP_OK;
    tensor_view *out = call_tensor(&call, out_obj, "sigma_out", ROLE_OUTPUT, DTYPES_F32);
    if (!out || check_per_sample(out, out->numel, NULL) < 0) goto done;
    tensor_view *table = call_optional(&call, table_obj, "table", ROLE_INPUT, DTYPES_F32);
    if (PyErr_Occurred() || (table && check_table(table) < 0)) goto done;
    tensor_view *index = call_optional(&call, index_obj, "index_out", ROLE_OUTPUT, DTYPES_I64);
    if (PyErr_Occurred() || (index && check_per_sample(index, out->numel, "sigma_out") < 0)) goto done;
    if (call_check_devices_and_overlap(&call) < 0) goto done;
    a.sigma_out = out->data;
    a.index_out = index ? index->data : NULL;
    a.batch = out->numel;
    a.p_mean = (float)p_mean;
    a.p_std = (float)p_std;
    a.sigma_min = (float)sigma_min;
    a.sigma_max = (float)sigma_max;
    a.table = table ? table->data : NULL;
    a.table_len = table ? table->numel : 0;
    a.snap = snap;
    RUN_KERNEL(module, out->device_type == kDLCUDA, sample_sigma, a, stream, status, done);
    if (raise_status(status) == 0) result = Py_NewRef(Py_None);
done:
    call_release(&call);
    return result;
}

OP_DECLARE(sigma_table) {
    static char *kwlist[] = {"kind", "steps", "beta_start", "beta_end", "clip", NULL};
    static const char *const kinds[] = {"iddpm_linear", "scaled_linear", NULL};
    PyObject *kind_obj, *steps_obj = NULL, *start_obj = Py_None, *end_obj = Py_None, *clip_obj = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|OOOO", kwlist, &kind_obj, &steps_obj, &start_obj, &end_obj,
                                     &clip_obj))
        return NULL;
    (void)module;
    int which = arg_choice(kind_obj, "kind", kinds, 0);
    if (which < 0) return NULL;
    /* None (or not given) picks the schedule's default; anything else is range-checked
     * below, so a negative beta is an error instead of silently becoming the default */
    double beta_start = which == 0 ? 1e-4 : 0.00085, beta_end = which == 0 ? 0.02 : 0.012, clip = 1e-3;
    int64_t steps = 1000;
    if (arg_i64(steps_obj, "steps", 2, 100000000, &steps) < 0 ||
        arg_double(start_obj == Py_None ? NULL : start_obj, "beta_start", &beta_start) < 0 ||
        arg_double(end_obj == Py_None ? NULL : end_obj, "beta_end", &beta_end) < 0 ||
        arg_double(clip_obj, "clip", &clip) < 0)
        return NULL;
    if (arg_in_range("beta_start", beta_start, 0.0, 1.0, 1, 1) < 0 ||
        arg_in_range("beta_end", beta_end, 0.0, 1.0, 1, 1) < 0 || arg_in_range("clip", clip, 0.0, 1.0, 1, 0) < 0)
        return NULL;
    npy_intp dims[1] = {(npy_intp)steps};
    PyObject *out = PyArray_SimpleNew(1, dims, NPY_FLOAT64);
    if (!out) return NULL;
    double *data = PyArray_DATA((PyArrayObject *)out);
    dipp_status status = which == 0 ? dipp_table_iddpm_linear(data, steps, beta_start, beta_end, clip)
                                    : dipp_table_scaled_linear(data, steps, beta_start, beta_end);
    if (raise_status(status) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* Per-sample c_skip, c_out, c_in, c_noise and the EDM loss weight, on the CPU. */
OP_DECLARE(precond) {
    static char *kwlist[] = {"sigma", "c_skip", "c_out", "c_in", "c_noise", "weight", "kind", "sigma_data", NULL};
    static const char *const kinds[] = {"edm", "eps", "v", NULL};
    PyObject *objs[6], *kind_obj = NULL, *sigma_data_obj = NULL;
    double sigma_data = 0.5;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|OO", kwlist, &objs[0], &objs[1], &objs[2], &objs[3],
                                     &objs[4], &objs[5], &kind_obj, &sigma_data_obj))
        return NULL;
    (void)module;
    int which = arg_choice(kind_obj, "kind", kinds, 0);
    if (which < 0 || arg_double(sigma_data_obj, "sigma_data", &sigma_data) < 0 ||
        arg_f32_positive("sigma_data", sigma_data) < 0)
        return NULL;
    static const char *const names[6] = {"sigma", "c_skip", "c_out", "c_in", "c_noise", "weight"};
    call_views call;
    call_init(&call);
    PyObject *result = NULL;
    tensor_view *v[6];
    for (int i = 0; i < 6; ++i) {
        v[i] = call_tensor(&call, objs[i], names[i], i ? ROLE_OUTPUT : ROLE_INPUT, DTYPES_F32);
        if (!v[i] || check_per_sample(v[i], v[0]->numel, i ? "sigma" : NULL) < 0) goto done;
    }
    if (call_check_devices_and_overlap(&call) < 0) goto done;
    if (v[0]->device_type != kDLCPU) {
        PyErr_SetString(PyExc_ValueError, "precond runs on the CPU (per-sample vectors); pass CPU tensors");
        goto done;
    }
    if (check_sigma_values(v[0]) < 0) goto done;
    const float *sigma = v[0]->data;
    for (int64_t b = 0; b < v[0]->numel; ++b) {
        dipp_precond_t p = which == 0 ? dipp_precond_edm(sigma[b], (float)sigma_data)
                                      : dipp_precond_vp(sigma[b], which == 2);
        ((float *)v[1]->data)[b] = p.c_skip;
        ((float *)v[2]->data)[b] = p.c_out;
        ((float *)v[3]->data)[b] = p.c_in;
        ((float *)v[4]->data)[b] = p.c_noise;
        ((float *)v[5]->data)[b] = p.weight;
    }
    result = Py_NewRef(Py_None);
done:
    call_release(&call);
    return result;
}
