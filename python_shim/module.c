/* The extension module diffinstruct._core: method table and module state. */
#define PY_ARRAY_UNIQUE_SYMBOL DIPP_ARRAY_API
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include "ops.h"

#include <numpy/arrayobject.h>

#define METHOD(name, doc) {#name, OP_KW op_##name, METH_VARARGS | METH_KEYWORDS, doc}

static PyMethodDef methods[] = {
    METHOD(fill_uniform, "fill_uniform(out, seed, offset=0, *, stream=0, fast=None): Philox uniforms in the open "
                         "interval (0, 1) "
                         "in every dtype: >= 2**-24 and <= the dtype's largest value below 1."),
    METHOD(fill_normal, "fill_normal(out, seed, offset=0, *, stream=0, fast=None): Philox standard normals "
                        "(Box-Muller)."),
    METHOD(sample_sigma, "sample_sigma(sigma_out, seed, offset, p_mean, p_std, sigma_min, sigma_max, table=None, "
                         "index_out=None, snap=False): log-normal sigma per sample, clamped, optionally snapped."),
    METHOD(sigma_table, "sigma_table(kind, steps=1000, beta_start, beta_end, clip=1e-3) -> float64 array "
                        "ascending in timestep; kind 'iddpm_linear' or 'scaled_linear'."),
    METHOD(precond, "precond(sigma, c_skip, c_out, c_in, c_noise, weight, kind='edm', sigma_data=0.5)."),
    METHOD(add_noise, "add_noise(x0, sigma, xt_out, seed, offset=0, eps_out=None, flow=False, *, stream=0, "
                      "fast=None)."),
    METHOD(cfg_combine, "cfg_combine(uncond, cond, out, omega, *, stream=0, fast=None): uncond + omega "
                        "(cond - uncond); fast as in ema_update, for every tensor entry that takes it."),
    METHOD(ta_loss, "ta_loss(d_ta, x0, loss_out, sigma=None, grad_out=None, nonfinite_out=None, weighting='edm', "
                    "sigma_data=0.5, reduction='mean', *, stream=0, fast=None); nonfinite_out counts, per sample, "
                    "the elements with D_TA - x0 or the stored gradient non-finite."),
    METHOD(generator_grad, "generator_grad(x0, d_ta, d_cond, grad_out, weight_out, ref_dist_out, gap_out, "
                           "surrogate_out, nonfinite_out, d_uncond=None, omega=1, dr=None, alpha=0, "
                           "weighting='normalized', min_norm=1e-5, *, stream=0, fast=None); omega != 1 needs d_uncond; "
                           "nonfinite_out counts the elements with x0, D_TA - D_ref, dr or the stored G non-finite."),
    METHOD(huber_terms, "huber_terms(x0, d_p, d_q, sigma, a_out, b_out, dprime_out, ysq_out, yr_out, h_out, "
                        "value_out, nonfinite_out, c, weighting='sigma2', *, stream=0, fast=None); nonfinite_out "
                        "counts the elements with y, r or a stored a, b, d' non-finite."),
    METHOD(ema_update, "ema_update(ema, params, decay, *, stream=0, fast=None): ema <- decay ema + (1 - decay) "
                       "param; fast: (api, to_dlpack, is_neg, types) from the Python layer selects the whole-list "
                       "path, which returns NotImplemented, having written nothing, when an item needs the checked "
                       "path."),
    METHOD(adam_step, "adam_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, "
                      "step, decoupled=False, stream=0, fast=None); fast as in ema_update."),
    METHOD(stream_copy, "stream_copy(a, b): a[:] = b (bandwidth probe)."),
    METHOD(stream_triad, "stream_triad(a, b, c, scalar=3.0): a = b + scalar c (bandwidth probe)."),
    METHOD(threads, "threads() -> number of OpenMP threads the CPU kernels use."),
    METHOD(cuda_status, "cuda_status(load=False) -> (loaded, library_path, reason)."),
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *module) {
    module_state *state = PyModule_GetState(module);
    state->cuda.tried = 0;
    state->cuda.handle = NULL;
    if (PyModule_AddIntConstant(module, "REDUCTION_CHUNK", DIPP_RED_CHUNK) < 0) return -1;
    if (PyModule_AddIntConstant(module, "REDUCTION_LANES", DIPP_RED_LANES) < 0) return -1;
#ifdef _OPENMP
    if (PyModule_AddIntConstant(module, "OPENMP", 1) < 0) return -1;
#else
    if (PyModule_AddIntConstant(module, "OPENMP", 0) < 0) return -1;
#endif
    return 0;
}

static int module_init_numpy(void) {
    import_array1(-1);
    return 0;
}

static void module_free(void *module) {
    module_state *state = PyModule_GetState((PyObject *)module);
    if (state) cuda_backend_close(&state->cuda);
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, (void *)module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "diffinstruct._core",
    .m_doc = "Fused DI++ kernels (CPU, and CUDA when built) over NumPy arrays and DLPack tensors. Every bad "
             "argument raises TypeError, ValueError or BufferError naming it; float scalars must be representable "
             "in float32; lazily negated or conjugated torch views are refused (pass x.resolve_neg()).",
    .m_size = sizeof(module_state),
    .m_methods = methods,
    .m_slots = slots,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__core(void) {
    if (module_init_numpy() < 0) return NULL;
    return PyModuleDef_Init(&module_def);
}
