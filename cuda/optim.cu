/* Multi-tensor EMA and Adam/AdamW updates, in place. */
#include <math.h>

#include "multi_tensor.cuh"

struct ema_op {
    float decay, keep;
    template <int DT, int ST>
    __device__ __forceinline__ void run(const dipp_mt_list &list, int k, int64_t e) const {
        void *data = list.data[k];
        dipp_store(data, e, DT, dipp_ema(dipp_load(data, e, DT), dipp_load(list.src[k], e, ST), decay, keep));
    }
};

extern "C" dipp_status dipp_cuda_ema_update(const dipp_ema_args *args, void *stream) {
    return dipp_mt_apply(args->tensors, args->count, ema_op{(float)args->decay, dipp_one_minus(args->decay)}, dipp_cuda_stream(stream));
}

struct adam_op {
    dipp_adam_consts c;
    template <int DT, int GT>
    __device__ __forceinline__ void run(const dipp_mt_list &list, int k, int64_t e) const {
        void *data = list.data[k];
        float *m = list.exp_avg[k] ? &list.exp_avg[k][e] : nullptr; /* no state: beta1 = 0 */
        float p = dipp_adam(dipp_load(data, e, DT), dipp_load(list.src[k], e, GT), m, &list.exp_avg_sq[k][e], &c);
        dipp_store(data, e, DT, p);
    }
};

extern "C" dipp_status dipp_cuda_adam_step(const dipp_adam_args *args, void *stream) {
    for (int64_t k = 0; k < args->count; ++k)
        if (!args->tensors[k].exp_avg && args->beta1 != 0.0) return DIPP_ERR_ARGUMENT;
    /* constants on the host, by the same function optim.c uses */
    adam_op op = {dipp_adam_prepare(args->lr, args->beta1, args->beta2, args->eps, args->weight_decay,
                                    args->decoupled, args->step)};
    return dipp_mt_apply(args->tensors, args->count, op, dipp_cuda_stream(stream));
}
