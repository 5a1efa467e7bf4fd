/*
 * DI* pseudo-Huber pieces: per-sample |y|^2, y.r, h, d(y), and the scaled
 * vectors a = d' + d''r, b = d''r, d' that the surrogate loss needs.
 */
#include <stdlib.h>

#include "cpu_common.h"

enum { HUB_YSQ, HUB_YR, HUB_BAD, HUB_NQ };

DIPP_ALWAYS_INLINE void huber_accumulate(const dipp_huber_args *a, int64_t e, float inv_s2, int dt, float *ysq,
                                         float *yr, float *bad) {
    float y, r;
    dipp_huber_y_r(dipp_load(a->d_p, e, dt), dipp_load(a->d_q, e, dt), dipp_load(a->x0, e, dt), inv_s2, &y, &r);
    *ysq += y * y;
    *yr += y * r;
    *bad += (dipp_is_finite(y) && dipp_is_finite(r)) ? 0.0f : 1.0f;
}

DIPP_ALWAYS_INLINE void huber_chunk_sums(const dipp_huber_args *a, int64_t base, int64_t len, float inv_s2, int dt,
                                         float *out) {
    float ysq[DIPP_RED_LANES] = {0}, yr[DIPP_RED_LANES] = {0}, bad[DIPP_RED_LANES] = {0};
    const int64_t rows = len / DIPP_RED_LANES;
    const int rem = (int)(len % DIPP_RED_LANES);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t e = base + r * DIPP_RED_LANES;
        for (int l = 0; l < DIPP_RED_LANES; ++l) huber_accumulate(a, e + l, inv_s2, dt, &ysq[l], &yr[l], &bad[l]);
    }
    const int64_t e = base + rows * DIPP_RED_LANES;
    for (int l = 0; l < rem; ++l) huber_accumulate(a, e + l, inv_s2, dt, &ysq[l], &yr[l], &bad[l]);
    out[HUB_YSQ] = dipp_fold_lanes32(ysq);
    out[HUB_YR] = dipp_fold_lanes32(yr);
    out[HUB_BAD] = dipp_fold_lanes32(bad);
}

/* Elements of [e0, e1) with a non-finite a, b or d' although y and r are finite (pass 1 counted the
 * others). The slow path of pass 2's count: it runs only for chunks where dipp_any_nonfinite found an
 * output that overflowed. */
static int huber_recount(const dipp_huber_args *a, int64_t e0, int64_t e1, float inv_s2, int dt) {
    int bad = 0;
    for (int64_t e = e0; e < e1; ++e) {
        float y, r;
        dipp_huber_y_r(dipp_load(a->d_p, e, dt), dipp_load(a->d_q, e, dt), dipp_load(a->x0, e, dt), inv_s2, &y, &r);
        const int stored = dipp_is_finite(dipp_load(a->a_out, e, dt)) && dipp_is_finite(dipp_load(a->b_out, e, dt)) &&
                           dipp_is_finite(dipp_load(a->dprime_out, e, dt));
        bad += !stored && dipp_is_finite(y) && dipp_is_finite(r);
    }
    return bad;
}

/* a, b, d' of [e0, e1) given the sample's factors. The pointers are restrict (dipp.h: outputs never
 * overlap inputs) parameters of a function that is not inlined (GCC drops restrict when it inlines):
 * with six streams read through the argument struct the loop stayed scalar (too many run-time
 * alias checks); so it vectorises in every dtype. */
DIPP_ALWAYS_INLINE void huber_store_chunk(const void *restrict d_p, const void *restrict d_q, const void *restrict x0,
                                          void *restrict a_out, void *restrict b_out, void *restrict d_out,
                                          int64_t e0, int64_t e1, float inv_s2, const dipp_huber_sample_t *sp,
                                          int dt) {
    const float inv_h = sp->inv_h, yr_over_h2 = sp->yr_over_h2, scale = sp->scale;
    for (int64_t e = e0; e < e1; ++e) {
        float y, r, va, vb, vd;
        dipp_huber_y_r(dipp_load(d_p, e, dt), dipp_load(d_q, e, dt), dipp_load(x0, e, dt), inv_s2, &y, &r);
        dipp_huber_vectors(y, r, inv_h, yr_over_h2, &va, &vb, &vd);
        dipp_store(a_out, e, dt, scale * va);
        dipp_store(b_out, e, dt, scale * vb);
        dipp_store(d_out, e, dt, scale * vd);
    }
}

/* Per-sample factors and outputs from the chunk sums of sample b. */
static void huber_finish_sample(const dipp_huber_args *a, const float *partial, int64_t chunks,
                                dipp_huber_sample_t *per, int64_t b) {
    double sums[HUB_NQ];
    dipp_combine_chunks(partial + b * chunks * HUB_NQ, chunks, HUB_NQ, sums);
    per[b] = dipp_huber_sample(sums[HUB_YSQ], sums[HUB_YR], a->c, a->sigma[b], a->weighting == DIPP_HUBER_W_SIGMA2,
                               a->batch);
    a->ysq_out[b] = (float)sums[HUB_YSQ];
    a->yr_out[b] = (float)sums[HUB_YR];
    a->h_out[b] = per[b].h;
    a->value_out[b] = per[b].value;
    a->nonfinite_out[b] = (int64_t)sums[HUB_BAD];
}

#define DEFINE_HUBER(SUFFIX, DT)                                                                          \
    DIPP_HOT static void huber_store_##SUFFIX(const void *restrict d_p, const void *restrict d_q,              \
                                              const void *restrict x0, void *restrict a_out,                   \
                                              void *restrict b_out, void *restrict d_out, int64_t e0,          \
                                              int64_t e1, float inv_s2, const dipp_huber_sample_t *sp) {       \
        huber_store_chunk(d_p, d_q, x0, a_out, b_out, d_out, e0, e1, inv_s2, sp, DT);                          \
    }                                                                                                     \
    DIPP_HOT static void huber_sums_range_##SUFFIX(const dipp_huber_args *a, float *partial, int64_t chunks,  \
                                                   int64_t begin, int64_t end) {                          \
        const int64_t n = a->per_sample;                                                                  \
        for (int64_t task = begin; task < end; ++task) {                                                  \
            const int64_t b = task / chunks, c = task % chunks;                                           \
            const float inv_s2 = 1.0f / (a->sigma[b] * a->sigma[b]);                                      \
            huber_chunk_sums(a, b * n + c * DIPP_RED_CHUNK, dipp_min64(DIPP_RED_CHUNK, n - c * DIPP_RED_CHUNK), \
                             inv_s2, DT, partial + task * HUB_NQ);                                        \
        }                                                                                                 \
    }                                                                                                     \
    /* Also leaves in partial[task * HUB_NQ + HUB_BAD] the chunk's elements whose a, b or d'      \
     * came out non-finite from a finite y and r (pass 1 counted the others). */                  \
    DIPP_HOT static void huber_write_range_##SUFFIX(const dipp_huber_args *a, const dipp_huber_sample_t *per, \
                                                    float *partial, int64_t chunks, int64_t begin,        \
                                                    int64_t end) {                                        \
        const int64_t n = a->per_sample;                                                                  \
        for (int64_t task = begin; task < end; ++task) {                                                  \
            const int64_t b = task / chunks, c = task % chunks;                                           \
            const int64_t e0 = b * n + c * DIPP_RED_CHUNK;                                                \
            const int64_t e1 = e0 + dipp_min64(DIPP_RED_CHUNK, n - c * DIPP_RED_CHUNK);                   \
            const dipp_huber_sample_t s = per[b];                                                         \
            const float inv_s2 = 1.0f / (a->sigma[b] * a->sigma[b]);                                      \
            huber_store_##SUFFIX(a->d_p, a->d_q, a->x0, a->a_out, a->b_out, a->dprime_out, e0, e1, inv_s2, &s); \
            const int any = dipp_any_nonfinite(a->a_out, e0, e1, DT) |                                    \
                            dipp_any_nonfinite(a->b_out, e0, e1, DT) |                                    \
                            dipp_any_nonfinite(a->dprime_out, e0, e1, DT);                                \
            partial[task * HUB_NQ + HUB_BAD] = any ? (float)huber_recount(a, e0, e1, inv_s2, DT) : 0.0f;  \
        }                                                                                                 \
    }                                                                                                     \
    static void huber_sums_##SUFFIX(const dipp_huber_args *a, float *partial, int64_t chunks) {           \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch * chunks,                                  \
                            huber_sums_range_##SUFFIX(a, partial, chunks, begin, end));                   \
    }                                                                                                     \
    static void huber_write_##SUFFIX(const dipp_huber_args *a, const dipp_huber_sample_t *per, float *partial, \
                                     int64_t chunks) {                                                    \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch * chunks,                                  \
                            huber_write_range_##SUFFIX(a, per, partial, chunks, begin, end));             \
    }                                                                                                     \
    static void huber_by_sample_##SUFFIX(const dipp_huber_args *a, float *partial, dipp_huber_sample_t *per, \
                                         int64_t chunks) {                                                \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch,                                           \
                            for (int64_t b = begin; b < end; ++b) {                                       \
                                huber_sums_range_##SUFFIX(a, partial, chunks, b * chunks, (b + 1) * chunks); \
                                huber_finish_sample(a, partial, chunks, per, b);                          \
                                huber_write_range_##SUFFIX(a, per, partial, chunks, b * chunks,           \
                                                           (b + 1) * chunks);                             \
                                a->nonfinite_out[b] += dipp_chunk_count_sum(partial, chunks, HUB_NQ, HUB_BAD, b); \
                            });                                                                           \
    }
DIPP_FOR_EACH_DTYPE(DEFINE_HUBER)

typedef void (*huber_sums_fn)(const dipp_huber_args *, float *, int64_t);
typedef void (*huber_write_fn)(const dipp_huber_args *, const dipp_huber_sample_t *, float *, int64_t);
static const huber_sums_fn huber_sums[3] = {huber_sums_f32, huber_sums_f16, huber_sums_bf16};
static const huber_write_fn huber_write[3] = {huber_write_f32, huber_write_f16, huber_write_bf16};
typedef void (*huber_by_sample_fn)(const dipp_huber_args *, float *, dipp_huber_sample_t *, int64_t);
static const huber_by_sample_fn huber_by_sample[3] = {huber_by_sample_f32, huber_by_sample_f16, huber_by_sample_bf16};

dipp_status dipp_cpu_huber_terms(const dipp_huber_args *a) {
    if (a->dtype < DIPP_DT_F32 || a->dtype > DIPP_DT_BF16) return DIPP_ERR_ARGUMENT;
    const int64_t chunks = dipp_chunk_count(a->per_sample);
    float *partial = malloc((size_t)(a->batch * chunks) * HUB_NQ * sizeof(float));
    dipp_huber_sample_t *per = malloc((size_t)a->batch * sizeof(dipp_huber_sample_t));
    if (!partial || !per) {
        free(partial);
        free(per);
        return DIPP_ERR_NOMEM;
    }
    if (dipp_sample_major(a->batch, a->per_sample * 6 * (a->dtype == DIPP_DT_F32 ? 4 : 2))) {
        huber_by_sample[a->dtype](a, partial, per, chunks);
    } else {
        huber_sums[a->dtype](a, partial, chunks);
        for (int64_t b = 0; b < a->batch; ++b) huber_finish_sample(a, partial, chunks, per, b);
        huber_write[a->dtype](a, per, partial, chunks);
        for (int64_t b = 0; b < a->batch; ++b)
            a->nonfinite_out[b] += dipp_chunk_count_sum(partial, chunks, HUB_NQ, HUB_BAD, b);
    }
    free(partial);
    free(per);
    return DIPP_OK;
}
