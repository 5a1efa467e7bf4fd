/* Classifier-free guidance combine D_uncond + omega (D_cond - D_uncond). */
#include "cpu_common.h"

#define DEFINE_CFG(SUFFIX, DT)                                                                      \
    static void cfg_##SUFFIX(const dipp_cfg_args *a) {                                              \
        const void *uncond = a->uncond, *cond = a->cond;                                            \
        void *out = a->out;                                                                         \
        const int64_t n = a->n;                                                                     \
        const float omega = a->omega;                                                               \
        const int dipp_parallel = dipp_worth_threads(n);                                            \
        DIPP_OMP_FOR                                                                                \
        for (int64_t i = 0; i < n; ++i)                                                             \
            dipp_store(out, i, DT, dipp_cfg(dipp_load(uncond, i, DT), dipp_load(cond, i, DT), omega)); \
    }
DIPP_FOR_EACH_DTYPE(DEFINE_CFG)

dipp_status dipp_cpu_cfg_combine(const dipp_cfg_args *args) {
#define CALL(DT) (DT == DIPP_DT_F32 ? cfg_f32 : DT == DIPP_DT_F16 ? cfg_f16 : cfg_bf16)(args)
    DIPP_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return DIPP_OK;
}
