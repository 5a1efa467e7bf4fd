/* Multi-tensor EMA and Adam/AdamW updates, in place. */
#include <math.h>

#include "multi_tensor.h"

DIPP_ALWAYS_INLINE void ema_range(const dipp_tensor_pair *t, int64_t e0, int64_t e1, float decay, int dt, int st) {
    for (int64_t e = e0; e < e1; ++e)
        dipp_store(t->data, e, dt, dipp_ema(dipp_load(t->data, e, dt), dipp_load(t->src, e, st), decay));
}

dipp_status dipp_cpu_ema_update(const dipp_ema_args *a) {
    int64_t *first = dipp_task_prefix(a->tensors, a->count);
    if (!first) return DIPP_ERR_NOMEM;
    const int64_t total = first[a->count];
    DIPP_OMP_FOR
    for (int64_t task = 0; task < total; ++task) {
        int64_t k = dipp_task_owner(first, a->count, task);
        const dipp_tensor_pair *t = &a->tensors[k];
        int64_t e0 = (task - first[k]) * DIPP_RED_CHUNK, e1 = dipp_min64(e0 + DIPP_RED_CHUNK, t->n);
        if (t->dtype == DIPP_DT_F32 && t->src_dtype == DIPP_DT_F32) ema_range(t, e0, e1, a->decay, DIPP_DT_F32, DIPP_DT_F32);
        else ema_range(t, e0, e1, a->decay, t->dtype, t->src_dtype);
    }
    free(first);
    return DIPP_OK;
}

typedef struct {
    float lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt;
    int decoupled;
} adam_consts;

DIPP_ALWAYS_INLINE void adam_range(const dipp_tensor_pair *t, int64_t e0, int64_t e1, const adam_consts *h, int dt,
                                   int gt) {
    for (int64_t e = e0; e < e1; ++e) {
        float p = dipp_adam(dipp_load(t->data, e, dt), dipp_load(t->src, e, gt), &t->exp_avg[e], &t->exp_avg_sq[e],
                            h->lr, h->beta1, h->beta2, h->eps, h->weight_decay, h->decoupled, h->step_size,
                            h->bc2_sqrt);
        dipp_store(t->data, e, dt, p);
    }
}

dipp_status dipp_cpu_adam_step(const dipp_adam_args *a) {
    /* bias corrections in double, as torch.optim.Adam computes them in Python */
    double bc1 = 1.0 - pow((double)a->beta1, (double)a->step);
    double bc2 = 1.0 - pow((double)a->beta2, (double)a->step);
    adam_consts h = {a->lr, a->beta1, a->beta2, a->eps, a->weight_decay, (float)((double)a->lr / bc1),
                     (float)sqrt(bc2), a->decoupled};
    int64_t *first = dipp_task_prefix(a->tensors, a->count);
    if (!first) return DIPP_ERR_NOMEM;
    const int64_t total = first[a->count];
    DIPP_OMP_FOR
    for (int64_t task = 0; task < total; ++task) {
        int64_t k = dipp_task_owner(first, a->count, task);
        const dipp_tensor_pair *t = &a->tensors[k];
        int64_t e0 = (task - first[k]) * DIPP_RED_CHUNK, e1 = dipp_min64(e0 + DIPP_RED_CHUNK, t->n);
        if (t->dtype == DIPP_DT_F32 && t->src_dtype == DIPP_DT_F32) adam_range(t, e0, e1, &h, DIPP_DT_F32, DIPP_DT_F32);
        else adam_range(t, e0, e1, &h, t->dtype, t->src_dtype);
    }
    free(first);
    return DIPP_OK;
}
