/* Classifier-free guidance combine D_uncond + omega (D_cond - D_uncond). */
#include "cpu_common.h"

#define DEFINE_CFG(SUFFIX, DT)                                                                      \
    DIPP_HOT static void cfg_range_##SUFFIX(const dipp_cfg_args *a, int64_t begin, int64_t end) {   \
        const void *uncond = a->uncond, *cond = a->cond;                                            \
        void *out = a->out;                                                                         \
        const float omega = a->omega;                                                               \
        for (int64_t i = begin; i < end; ++i)                                                       \
            dipp_store(out, i, DT, dipp_cfg(dipp_load(uncond, i, DT), dipp_load(cond, i, DT), omega)); \
    }                                                                                               \
    static void cfg_##SUFFIX(const dipp_cfg_args *a) {                                              \
        DIPP_PARALLEL_TASKS(a->n, a->n, cfg_range_##SUFFIX(a, begin, end));                         \
    }
DIPP_FOR_EACH_DTYPE(DEFINE_CFG)

dipp_status dipp_cpu_cfg_combine(const dipp_cfg_args *args) {
#define CALL(DT) (DT == DIPP_DT_F32 ? cfg_f32 : DT == DIPP_DT_F16 ? cfg_f16 : cfg_bf16)(args)
    DIPP_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return DIPP_OK;
}
