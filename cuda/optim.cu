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
        float p = dipp_adam(dipp_load(data, e, DT), dipp_load(list.src[k], e, GT), &list.exp_avg[k][e],
                            &list.exp_avg_sq[k][e], &c);
        dipp_store(data, e, DT, p);
    }
};

extern "C" dipp_status dipp_cuda_adam_step(const dipp_adam_args *args, void *stream) {
    /* constants on the host, by the same function optim.c uses */
    adam_op op = {dipp_adam_prepare(args->lr, args->beta1, args->beta2, args->eps, args->weight_decay,
                                    args->decoupled, args->step)};
    return dipp_mt_apply(args->tensors, args->count, op, dipp_cuda_stream(stream));
}
