/* Multi-tensor EMA and Adam/AdamW updates, in place. */
#include "multi_tensor.h"

/* The list kernels' own thresholds (elements of the whole list) for spreading over the threads. Their
 * work per element is tiny (EMA: 3 accesses and 3 flops; Adam: a few more flops), so a LoRA-sized list
 * (~131072 elements) is done in tens of microseconds on one thread, where a second thread saves a few
 * but waits for the whole call at the barrier whenever another process holds its core (measured: ~8 ms
 * per call). Above these the list runs in one parallel region, as before. */
#define DIPP_EMA_PARALLEL_MIN_ELEMENTS (1 << 20)
#define DIPP_ADAM_PARALLEL_MIN_ELEMENTS (1 << 19)

/* The list's element count, which DIPP_PARALLEL_TASKS compares with its threshold: 0 (one thread) below
 * `min`. Counted per tensor, not as tasks times the chunk size, so a list of many small tensors is not
 * mistaken for a large one. */
static inline int64_t list_elements(const dipp_tensor_pair *tensors, int64_t count, int64_t min) {
    int64_t elements = 0;
    for (int64_t k = 0; k < count; ++k) elements += tensors[k].n;
    return elements >= min ? elements : 0;
}

DIPP_ALWAYS_INLINE void ema_range(const dipp_tensor_pair *t, int64_t e0, int64_t e1, float decay, float keep, int dt,
                                  int st) {
    for (int64_t e = e0; e < e1; ++e)
        dipp_store(t->data, e, dt, dipp_ema(dipp_load(t->data, e, dt), dipp_load(t->src, e, st), decay, keep));
}

/* Tasks [begin, end) of all tensors; float32 pairs take a branch-free instance. */
DIPP_HOT static void ema_tasks(const dipp_ema_args *a, const int64_t *first, int64_t begin, int64_t end) {
    const float decay = (float)a->decay, keep = dipp_one_minus(a->decay);
    for (int64_t task = begin; task < end; ++task) {
        const int64_t k = dipp_task_owner(first, a->count, task);
        const dipp_tensor_pair *t = &a->tensors[k];
        const int64_t e0 = (task - first[k]) * DIPP_RED_CHUNK, e1 = dipp_min64(e0 + DIPP_RED_CHUNK, t->n);
        if (t->dtype == DIPP_DT_F32 && t->src_dtype == DIPP_DT_F32)
            ema_range(t, e0, e1, decay, keep, DIPP_DT_F32, DIPP_DT_F32);
        else if (t->dtype == DIPP_DT_BF16 && t->src_dtype == DIPP_DT_BF16)
            ema_range(t, e0, e1, decay, keep, DIPP_DT_BF16, DIPP_DT_BF16);
        else if (t->dtype == DIPP_DT_F32 && t->src_dtype == DIPP_DT_BF16)
            ema_range(t, e0, e1, decay, keep, DIPP_DT_F32, DIPP_DT_BF16);
        else
            ema_range(t, e0, e1, decay, keep, t->dtype, t->src_dtype);
    }
}

dipp_status dipp_cpu_ema_update(const dipp_ema_args *a) {
    int64_t *first = dipp_task_prefix(a->tensors, a->count);
    if (!first) return DIPP_ERR_NOMEM;
    const int64_t total = first[a->count];
    DIPP_PARALLEL_TASKS(list_elements(a->tensors, a->count, DIPP_EMA_PARALLEL_MIN_ELEMENTS), total,
                        ema_tasks(a, first, begin, end));
    free(first);
    return DIPP_OK;
}

DIPP_ALWAYS_INLINE void adam_loop(const dipp_tensor_pair *t, int64_t e0, int64_t e1, const dipp_adam_consts *hp,
                                  int dt, int gt, int wd_mode, int m_mode) {
    /* local copies: stores through the float pointers cannot alias them, so the
     * loop vectorises */
    const dipp_adam_consts h = *hp;
    void *data = t->data;
    const void *grad = t->src;
    float *exp_avg = t->exp_avg, *exp_avg_sq = t->exp_avg_sq;
    for (int64_t e = e0; e < e1; ++e) {
        float *m = m_mode == DIPP_M_NONE ? exp_avg : &exp_avg[e];
        float p = dipp_adam_with(dipp_load(data, e, dt), dipp_load(grad, e, gt), m, &exp_avg_sq[e], &h, wd_mode,
                                 m_mode);
        dipp_store(data, e, dt, p);
    }
}

#define ADAM_WITH_M(WD)                                                                            \
    do {                                                                                           \
        if (m_mode == DIPP_M_NONE) adam_loop(t, e0, e1, h, dt, gt, WD, DIPP_M_NONE);               \
        else if (m_mode == DIPP_M_LERP_SMALL) adam_loop(t, e0, e1, h, dt, gt, WD, DIPP_M_LERP_SMALL); \
        else adam_loop(t, e0, e1, h, dt, gt, WD, DIPP_M_LERP_LARGE);                               \
    } while (0)

/* The per-call branches unswitched by hand: GCC does it for some dtype instances
 * only (bf16 stayed scalar, ~4x slower per byte). */
DIPP_ALWAYS_INLINE void adam_range(const dipp_tensor_pair *t, int64_t e0, int64_t e1, const dipp_adam_consts *h,
                                   int dt, int gt) {
    const int m_mode = dipp_adam_m_mode(h, t->exp_avg != NULL);
    switch (dipp_adam_wd_mode(h)) {
    case DIPP_WD_NONE: ADAM_WITH_M(DIPP_WD_NONE); break;
    case DIPP_WD_L2: ADAM_WITH_M(DIPP_WD_L2); break;
    default: ADAM_WITH_M(DIPP_WD_DECOUPLED); break;
    }
}

#undef ADAM_WITH_M

DIPP_HOT static void adam_tasks(const dipp_adam_args *a, const dipp_adam_consts *h, const int64_t *first,
                                int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
        const int64_t k = dipp_task_owner(first, a->count, task);
        const dipp_tensor_pair *t = &a->tensors[k];
        const int64_t e0 = (task - first[k]) * DIPP_RED_CHUNK, e1 = dipp_min64(e0 + DIPP_RED_CHUNK, t->n);
        /* common pairs get constant dtypes (vectorised); the rest take the generic loop */
        if (t->dtype == DIPP_DT_F32 && t->src_dtype == DIPP_DT_F32)
            adam_range(t, e0, e1, h, DIPP_DT_F32, DIPP_DT_F32);
        else if (t->dtype == DIPP_DT_BF16 && t->src_dtype == DIPP_DT_BF16)
            adam_range(t, e0, e1, h, DIPP_DT_BF16, DIPP_DT_BF16);
        else if (t->dtype == DIPP_DT_F32 && t->src_dtype == DIPP_DT_BF16)
            adam_range(t, e0, e1, h, DIPP_DT_F32, DIPP_DT_BF16);
        else
            adam_range(t, e0, e1, h, t->dtype, t->src_dtype);
    }
}

dipp_status dipp_cpu_adam_step(const dipp_adam_args *a) {
    for (int64_t k = 0; k < a->count; ++k)
        if (!a->tensors[k].exp_avg && a->beta1 != 0.0) return DIPP_ERR_ARGUMENT;
    const dipp_adam_consts h = dipp_adam_prepare(a->lr, a->beta1, a->beta2, a->eps, a->weight_decay, a->decoupled,
                                                 a->step);
    int64_t *first = dipp_task_prefix(a->tensors, a->count);
    if (!first) return DIPP_ERR_NOMEM;
    const int64_t total = first[a->count];
    DIPP_PARALLEL_TASKS(list_elements(a->tensors, a->count, DIPP_ADAM_PARALLEL_MIN_ELEMENTS), total,
                        adam_tasks(a, &h, first, begin, end));
    free(first);
    return DIPP_OK;
}
