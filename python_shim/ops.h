/* Entry points of the extension module and the plumbing they share. */
#ifndef DIPP_OPS_H
#define DIPP_OPS_H

#include "cuda_backend.h"
#include "tensor_arg.h"

typedef struct {
    cuda_backend cuda;
} module_state;

#define OP_KW (PyCFunction)(void (*)(void))
#define OP_DECLARE(name) PyObject *op_##name(PyObject *module, PyObject *args, PyObject *kwargs)

OP_DECLARE(fill_uniform);
OP_DECLARE(fill_normal);
OP_DECLARE(sample_sigma);
OP_DECLARE(sigma_table);
OP_DECLARE(precond);
OP_DECLARE(add_noise);
OP_DECLARE(cfg_combine);
OP_DECLARE(ta_loss);
OP_DECLARE(generator_grad);
OP_DECLARE(huber_terms);
OP_DECLARE(ema_update);
OP_DECLARE(adam_step);
OP_DECLARE(stream_copy);
OP_DECLARE(stream_triad);
OP_DECLARE(threads);
OP_DECLARE(cuda_status);

/* Raises the Python exception of a failed kernel; 0 when status is DIPP_OK. */
int raise_status(dipp_status status);

/*
 * Runs dipp_cpu_<name>(&ARGS) or, for CUDA views, the lazily loaded
 * dipp_cuda_<name>(&ARGS, STREAM) with the GIL released; sets STATUS, or
 * jumps to FAIL with an exception set when the CUDA backend is missing.
 */
#define RUN_KERNEL(MODULE, ON_CUDA, NAME, ARGS, STREAM, STATUS, FAIL)                              \
    do {                                                                                          \
        if (ON_CUDA) {                                                                            \
            module_state *state_ = PyModule_GetState(MODULE);                                     \
            const cuda_kernels *k_ = cuda_backend_get(&state_->cuda, MODULE);                     \
            if (!k_) goto FAIL;                                                                   \
            Py_BEGIN_ALLOW_THREADS STATUS = k_->NAME(&(ARGS), (void *)(uintptr_t)(STREAM));       \
            Py_END_ALLOW_THREADS                                                                  \
        } else {                                                                                  \
            Py_BEGIN_ALLOW_THREADS STATUS = dipp_cpu_##NAME(&(ARGS));                             \
            Py_END_ALLOW_THREADS                                                                  \
        }                                                                                         \
    } while (0)

/* A fast path's batch geometry, from its leading (per-sample) tensor's list_item. */
#define FAST_GEOMETRY(A, ITEM)                          \
    do {                                                \
        (A)->dtype = (ITEM).dtype;                      \
        (A)->batch = (ITEM).shape[0];                   \
        (A)->per_sample = (ITEM).numel / (A)->batch;    \
    } while (0)

/* A fast path's last step: CALL (a CPU kernel) with the GIL released, then returns None or raises its status. */
#define FAST_RETURN_RUN(CALL)                                             \
    do {                                                                  \
        dipp_status status_;                                              \
        Py_BEGIN_ALLOW_THREADS status_ = (CALL);                          \
        Py_END_ALLOW_THREADS                                              \
        return raise_status(status_) == 0 ? Py_NewRef(Py_None) : NULL;    \
    } while (0)

#endif /* DIPP_OPS_H */
