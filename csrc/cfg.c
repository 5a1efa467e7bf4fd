/* Classifier-free guidance combine D_uncond + omega (D_cond - D_uncond). */
#include "cpu_common.h"

DIPP_ALWAYS_INLINE void cfg_all(const dipp_cfg_args *a, int dt) {
    const int64_t n = a->n;
    const float omega = a->omega;
    DIPP_OMP_FOR
    for (int64_t i = 0; i < n; ++i)
        dipp_store(a->out, i, dt, dipp_cfg(dipp_load(a->uncond, i, dt), dipp_load(a->cond, i, dt), omega));
}

dipp_status dipp_cpu_cfg_combine(const dipp_cfg_args *args) {
#define CALL(DT) cfg_all(args, DT)
    DIPP_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return DIPP_OK;
}
