/* Multi-tensor EMA and Adam/AdamW updates, in place. */
#include <math.h>

#include "multi_tensor.cuh"

struct ema_op {
    float decay;
    template <int DT, int ST>
    __device__ __forceinline__ void run(const dipp_mt_list &list, int k, int64_t e) const {
        void *data = list.data[k];
        dipp_store(data, e, DT, dipp_ema(dipp_load(data, e, DT), dipp_load(list.src[k], e, ST), decay));
    }
};

extern "C" dipp_status dipp_cuda_ema_update(const dipp_ema_args *args, void *stream) {
    return dipp_mt_apply(args->tensors, args->count, ema_op{args->decay}, dipp_cuda_stream(stream));
}

struct adam_op {
    float lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt;
    int decoupled;
    template <int DT, int GT>
    __device__ __forceinline__ void run(const dipp_mt_list &list, int k, int64_t e) const {
        void *data = list.data[k];
        float p = dipp_adam(dipp_load(data, e, DT), dipp_load(list.src[k], e, GT), &list.exp_avg[k][e],
                            &list.exp_avg_sq[k][e], lr, beta1, beta2, eps, weight_decay, decoupled, step_size,
                            bc2_sqrt);
        dipp_store(data, e, DT, p);
    }
};

extern "C" dipp_status dipp_cuda_adam_step(const dipp_adam_args *args, void *stream) {
    /* bias corrections on the host in double, exactly as optim.c (torch computes them in Python) */
    double bc1 = 1.0 - pow((double)args->beta1, (double)args->step);
    double bc2 = 1.0 - pow((double)args->beta2, (double)args->step);
    adam_op op = {args->lr,           args->beta1, args->beta2, args->eps, args->weight_decay,
                  (float)((double)args->lr / bc1), (float)sqrt(bc2), args->decoupled};
    return dipp_mt_apply(args->tensors, args->count, op, dipp_cuda_stream(stream));
}
