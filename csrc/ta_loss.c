/* TA (fake-score) denoising loss per sample and its gradient w.r.t. the TA output. */
#include <stdlib.h>

#include "cpu_common.h"

enum { TA_NQ = 3 }; /* per chunk: sum of squares, non-finite inputs, non-finite stored gradients */

DIPP_ALWAYS_INLINE void ta_accumulate(const dipp_ta_args *a, int64_t e, int dt, float *sq, float *bad) {
    float d = dipp_load(a->d_ta, e, dt) - dipp_load(a->x0, e, dt);
    *sq += d * d;
    *bad += dipp_is_finite(d) ? 0.0f : 1.0f;
}

DIPP_ALWAYS_INLINE void ta_chunk_sums(const dipp_ta_args *a, int64_t base, int64_t len, int dt, float *out) {
    float sq[DIPP_RED_LANES] = {0}, bad[DIPP_RED_LANES] = {0};
    const int64_t rows = len / DIPP_RED_LANES;
    const int rem = (int)(len % DIPP_RED_LANES);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t e = base + r * DIPP_RED_LANES;
        for (int l = 0; l < DIPP_RED_LANES; ++l) ta_accumulate(a, e + l, dt, &sq[l], &bad[l]);
    }
    const int64_t e = base + rows * DIPP_RED_LANES;
    for (int l = 0; l < rem; ++l) ta_accumulate(a, e + l, dt, &sq[l], &bad[l]);
    out[0] = dipp_fold_lanes32(sq);
    out[1] = dipp_fold_lanes32(bad);
}

/* Per-sample loss and count from the chunk partials of sample b: [sum of squares, non-finite inputs,
 * non-finite stored gradients from finite inputs] per chunk. */
static void ta_finish_sample(const dipp_ta_args *a, const float *partial, int64_t chunks, int64_t b) {
    double sums[TA_NQ];
    dipp_combine_chunks(partial + b * chunks * TA_NQ, chunks, TA_NQ, sums);
    float weight = dipp_ta_weight(a->sigma ? a->sigma[b] : 1.0f, a->weighting == DIPP_TA_EDM, a->sigma_data);
    a->loss_out[b] = dipp_ta_sample_loss(weight, sums[0], a->per_sample, a->mean_over_elements);
    if (a->nonfinite_out) a->nonfinite_out[b] = (int64_t)sums[1] + dipp_chunk_count_sum(partial, chunks, TA_NQ, 2, b);
}

/* Gradient elements of [e0, e1) stored non-finite from a finite D_TA - x0 (the sums counted the others):
 * the slow path of the count, run only for chunks where dipp_any_nonfinite found an overflow. */
static int ta_recount(const dipp_ta_args *a, int64_t e0, int64_t e1, int dt) {
    int bad = 0;
    for (int64_t e = e0; e < e1; ++e)
        bad += !dipp_is_finite(dipp_load(a->grad_out, e, dt)) &&
               dipp_is_finite(dipp_load(a->d_ta, e, dt) - dipp_load(a->x0, e, dt));
    return bad;
}

/* One pass: the gradient's factor depends on sigma only, so each chunk's sums and its gradient are made
 * back to back, the second read of the chunk coming from L1. Chunk sums and their order are those of a
 * separate reduction pass, so every bit is too. */
#define DEFINE_TA(SUFFIX, DT)                                                                             \
    DIPP_HOT static void ta_range_##SUFFIX(const dipp_ta_args *a, const float *factor, float *partial,       \
                                           int64_t chunks, int64_t begin, int64_t end) {                  \
        const int64_t n = a->per_sample;                                                                  \
        for (int64_t task = begin; task < end; ++task) {                                                  \
            const int64_t b = task / chunks, c = task % chunks;                                           \
            const int64_t e0 = b * n + c * DIPP_RED_CHUNK;                                                \
            const int64_t e1 = e0 + dipp_min64(DIPP_RED_CHUNK, n - c * DIPP_RED_CHUNK);                   \
            ta_chunk_sums(a, e0, e1 - e0, DT, partial + task * TA_NQ);                                    \
            partial[task * TA_NQ + 2] = 0.0f;                                                             \
            if (!a->grad_out) continue;                                                                   \
            const float f = factor[b];                                                                    \
            for (int64_t e = e0; e < e1; ++e) {                                                           \
                const float d_ta = dipp_load(a->d_ta, e, DT), x0 = dipp_load(a->x0, e, DT);               \
                dipp_store(a->grad_out, e, DT, dipp_ta_grad(d_ta, x0, f));                                \
            }                                                                                             \
            if (dipp_any_nonfinite(a->grad_out, e0, e1, DT))                                              \
                partial[task * TA_NQ + 2] = (float)ta_recount(a, e0, e1, DT);                             \
        }                                                                                                 \
    }                                                                                                     \
    static void ta_pass_##SUFFIX(const dipp_ta_args *a, const float *factor, float *partial, int64_t chunks) { \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch * chunks,                                  \
                            ta_range_##SUFFIX(a, factor, partial, chunks, begin, end));                   \
    }
DIPP_FOR_EACH_DTYPE(DEFINE_TA)

typedef void (*ta_pass_fn)(const dipp_ta_args *, const float *, float *, int64_t);
static const ta_pass_fn ta_pass[3] = {ta_pass_f32, ta_pass_f16, ta_pass_bf16};

dipp_status dipp_cpu_ta_loss(const dipp_ta_args *a) {
    if (a->dtype < DIPP_DT_F32 || a->dtype > DIPP_DT_BF16) return DIPP_ERR_ARGUMENT;
    const int64_t chunks = dipp_chunk_count(a->per_sample);
    float *partial = malloc((size_t)(a->batch * chunks) * TA_NQ * sizeof(float));
    float *factor = malloc((size_t)a->batch * sizeof(float));
    if (!partial || !factor) {
        free(partial);
        free(factor);
        return DIPP_ERR_NOMEM;
    }
    for (int64_t b = 0; b < a->batch; ++b) {
        float weight = dipp_ta_weight(a->sigma ? a->sigma[b] : 1.0f, a->weighting == DIPP_TA_EDM, a->sigma_data);
        factor[b] = dipp_ta_grad_factor(weight, a->per_sample, a->batch, a->mean_over_elements);
    }
    ta_pass[a->dtype](a, factor, partial, chunks);
    for (int64_t b = 0; b < a->batch; ++b) ta_finish_sample(a, partial, chunks, b);
    free(partial);
    free(factor);
    return DIPP_OK;
}
