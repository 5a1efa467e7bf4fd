/* TA (fake-score) denoising loss per sample and its gradient w.r.t. the TA output. */
#include <stdlib.h>

#include "cpu_common.h"

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

/* Per-sample loss, count and gradient factor from the chunk sums of sample b. */
static void ta_finish_sample(const dipp_ta_args *a, const float *partial, int64_t chunks, float *factor, int64_t b) {
    double sums[2];
    dipp_combine_chunks(partial + b * chunks * 2, chunks, 2, sums);
    float weight = dipp_ta_weight(a->sigma ? a->sigma[b] : 1.0f, a->weighting == DIPP_TA_EDM, a->sigma_data);
    a->loss_out[b] = dipp_ta_sample_loss(weight, sums[0], a->per_sample, a->mean_over_elements);
    if (a->nonfinite_out) a->nonfinite_out[b] = (int64_t)sums[1];
    factor[b] = dipp_ta_grad_factor(weight, a->per_sample, a->batch, a->mean_over_elements);
}

static void ta_add_output_counts(const dipp_ta_args *a, const float *partial, int64_t chunks, int64_t b) {
    if (a->nonfinite_out) a->nonfinite_out[b] += dipp_chunk_count_sum(partial, chunks, 2, 1, b);
}

/* Gradient elements of [e0, e1) stored non-finite from a finite D_TA - x0 (pass 1 counted the others):
 * the slow path of pass 2's count, run only for chunks where dipp_any_nonfinite found an overflow. */
static int ta_recount(const dipp_ta_args *a, int64_t e0, int64_t e1, int dt) {
    int bad = 0;
    for (int64_t e = e0; e < e1; ++e)
        bad += !dipp_is_finite(dipp_load(a->grad_out, e, dt)) &&
               dipp_is_finite(dipp_load(a->d_ta, e, dt) - dipp_load(a->x0, e, dt));
    return bad;
}

#define DEFINE_TA(SUFFIX, DT)                                                                             \
    DIPP_HOT static void ta_sums_range_##SUFFIX(const dipp_ta_args *a, float *partial, int64_t chunks,        \
                                                int64_t begin, int64_t end) {                             \
        const int64_t n = a->per_sample;                                                                  \
        for (int64_t task = begin; task < end; ++task) {                                                  \
            const int64_t b = task / chunks, c = task % chunks;                                           \
            ta_chunk_sums(a, b * n + c * DIPP_RED_CHUNK, dipp_min64(DIPP_RED_CHUNK, n - c * DIPP_RED_CHUNK), DT, \
                          partial + task * 2);                                                            \
        }                                                                                                 \
    }                                                                                                     \
    /* Also leaves in partial[task * 2 + 1] how many gradient elements of the chunk came out    \
     * non-finite from a finite D_TA - x0 (those with a non-finite one were counted in pass 1). */  \
    DIPP_HOT static void ta_write_range_##SUFFIX(const dipp_ta_args *a, const float *factor, float *partial,  \
                                                 int64_t chunks, int64_t begin, int64_t end) {            \
        const int64_t n = a->per_sample;                                                                  \
        for (int64_t task = begin; task < end; ++task) {                                                  \
            const int64_t b = task / chunks, c = task % chunks;                                           \
            const int64_t e0 = b * n + c * DIPP_RED_CHUNK;                                                \
            const int64_t e1 = e0 + dipp_min64(DIPP_RED_CHUNK, n - c * DIPP_RED_CHUNK);                   \
            const float f = factor[b];                                                                    \
            for (int64_t e = e0; e < e1; ++e) {                                                           \
                const float d_ta = dipp_load(a->d_ta, e, DT), x0 = dipp_load(a->x0, e, DT);               \
                dipp_store(a->grad_out, e, DT, dipp_ta_grad(d_ta, x0, f));                                \
            }                                                                                             \
            partial[task * 2 + 1] =                                                                       \
                dipp_any_nonfinite(a->grad_out, e0, e1, DT) ? (float)ta_recount(a, e0, e1, DT) : 0.0f;    \
        }                                                                                                 \
    }                                                                                                     \
    static void ta_sums_##SUFFIX(const dipp_ta_args *a, float *partial, int64_t chunks) {                 \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch * chunks,                                  \
                            ta_sums_range_##SUFFIX(a, partial, chunks, begin, end));                      \
    }                                                                                                     \
    static void ta_write_##SUFFIX(const dipp_ta_args *a, const float *factor, float *partial, int64_t chunks) { \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch * chunks,                                  \
                            ta_write_range_##SUFFIX(a, factor, partial, chunks, begin, end));             \
    }                                                                                                     \
    static void ta_by_sample_##SUFFIX(const dipp_ta_args *a, float *partial, float *factor, int64_t chunks) { \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch,                                           \
                            for (int64_t b = begin; b < end; ++b) {                                       \
                                ta_sums_range_##SUFFIX(a, partial, chunks, b * chunks, (b + 1) * chunks); \
                                ta_finish_sample(a, partial, chunks, factor, b);                          \
                                if (a->grad_out) {                                                        \
                                    ta_write_range_##SUFFIX(a, factor, partial, chunks, b * chunks,       \
                                                            (b + 1) * chunks);                            \
                                    ta_add_output_counts(a, partial, chunks, b);                          \
                                }                                                                         \
                            });                                                                           \
    }
DIPP_FOR_EACH_DTYPE(DEFINE_TA)

typedef void (*ta_sums_fn)(const dipp_ta_args *, float *, int64_t);
typedef void (*ta_write_fn)(const dipp_ta_args *, const float *, float *, int64_t);
static const ta_sums_fn ta_sums[3] = {ta_sums_f32, ta_sums_f16, ta_sums_bf16};
static const ta_write_fn ta_write[3] = {ta_write_f32, ta_write_f16, ta_write_bf16};
typedef void (*ta_by_sample_fn)(const dipp_ta_args *, float *, float *, int64_t);
static const ta_by_sample_fn ta_by_sample[3] = {ta_by_sample_f32, ta_by_sample_f16, ta_by_sample_bf16};

dipp_status dipp_cpu_ta_loss(const dipp_ta_args *a) {
    if (a->dtype < DIPP_DT_F32 || a->dtype > DIPP_DT_BF16) return DIPP_ERR_ARGUMENT;
    const int64_t chunks = dipp_chunk_count(a->per_sample);
    float *partial = malloc((size_t)(a->batch * chunks) * 2 * sizeof(float));
    float *factor = malloc((size_t)a->batch * sizeof(float));
    if (!partial || !factor) {
        free(partial);
        free(factor);
        return DIPP_ERR_NOMEM;
    }
    if (dipp_sample_major(a->batch, a->per_sample * 3 * (a->dtype == DIPP_DT_F32 ? 4 : 2))) {
        ta_by_sample[a->dtype](a, partial, factor, chunks);
    } else {
        ta_sums[a->dtype](a, partial, chunks);
        for (int64_t b = 0; b < a->batch; ++b) ta_finish_sample(a, partial, chunks, factor, b);
        if (a->grad_out) {
            ta_write[a->dtype](a, factor, partial, chunks);
            for (int64_t b = 0; b < a->batch; ++b) ta_add_output_counts(a, partial, chunks, b);
        }
    }
    free(partial);
    free(factor);
    return DIPP_OK;
}
