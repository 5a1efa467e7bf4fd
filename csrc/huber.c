/*
 * DI* pseudo-Huber pieces: per-sample |y|^2, y.r, h, d(y), and the scaled
 * vectors a = d' + d''r, b = d''r, d' that the surrogate loss needs.
 */
#include <stdlib.h>

#include "cpu_common.h"

enum { HUB_YSQ, HUB_YR, HUB_BAD, HUB_NQ };

DIPP_ALWAYS_INLINE void huber_chunk_sums(const dipp_huber_args *a, int64_t base, int64_t len, float inv_s2, int dt,
                                         float *out) {
    float ysq[DIPP_RED_LANES] = {0}, yr[DIPP_RED_LANES] = {0}, bad[DIPP_RED_LANES] = {0};
    int64_t rows = len / DIPP_RED_LANES, rem = len % DIPP_RED_LANES;
    for (int64_t r = 0; r <= rows; ++r) {
        int width = r < rows ? DIPP_RED_LANES : (int)rem;
        int64_t e = base + r * DIPP_RED_LANES;
        for (int l = 0; l < width; ++l) {
            float y, res;
            dipp_huber_y_r(dipp_load(a->d_p, e + l, dt), dipp_load(a->d_q, e + l, dt), dipp_load(a->x0, e + l, dt),
                           inv_s2, &y, &res);
            ysq[l] += y * y;
            yr[l] += y * res;
            bad[l] += (dipp_is_finite(y) && dipp_is_finite(res)) ? 0.0f : 1.0f;
        }
    }
    out[HUB_YSQ] = dipp_fold_lanes32(ysq);
    out[HUB_YR] = dipp_fold_lanes32(yr);
    out[HUB_BAD] = dipp_fold_lanes32(bad);
}

DIPP_ALWAYS_INLINE dipp_status huber_all(const dipp_huber_args *a, int dt) {
    const int64_t chunks = dipp_chunk_count(a->per_sample), total = a->batch * chunks;
    float *partial = malloc((size_t)total * HUB_NQ * sizeof(float));
    dipp_huber_sample_t *per = malloc((size_t)a->batch * sizeof(dipp_huber_sample_t));
    if (!partial || !per) {
        free(partial);
        free(per);
        return DIPP_ERR_NOMEM;
    }
    DIPP_OMP_FOR
    for (int64_t task = 0; task < total; ++task) {
        int64_t b = task / chunks, c = task % chunks;
        int64_t len = dipp_min64(DIPP_RED_CHUNK, a->per_sample - c * DIPP_RED_CHUNK);
        float inv_s2 = 1.0f / (a->sigma[b] * a->sigma[b]);
        huber_chunk_sums(a, b * a->per_sample + c * DIPP_RED_CHUNK, len, inv_s2, dt, partial + task * HUB_NQ);
    }
    for (int64_t b = 0; b < a->batch; ++b) {
        double sums[HUB_NQ];
        dipp_combine_chunks(partial + b * chunks * HUB_NQ, chunks, HUB_NQ, sums);
        per[b] = dipp_huber_sample(sums[HUB_YSQ], sums[HUB_YR], a->c, a->sigma[b],
                                   a->weighting == DIPP_HUBER_W_SIGMA2, a->batch);
        a->ysq_out[b] = (float)sums[HUB_YSQ];
        a->yr_out[b] = (float)sums[HUB_YR];
        a->h_out[b] = per[b].h;
        a->value_out[b] = per[b].value;
        a->nonfinite_out[b] = (int64_t)sums[HUB_BAD];
    }
    DIPP_OMP_FOR
    for (int64_t task = 0; task < total; ++task) {
        int64_t b = task / chunks, c = task % chunks;
        int64_t e0 = b * a->per_sample + c * DIPP_RED_CHUNK;
        int64_t e1 = e0 + dipp_min64(DIPP_RED_CHUNK, a->per_sample - c * DIPP_RED_CHUNK);
        const dipp_huber_sample_t s = per[b];
        float inv_s2 = 1.0f / (a->sigma[b] * a->sigma[b]);
        for (int64_t e = e0; e < e1; ++e) {
            float y, res, va, vb, vd;
            dipp_huber_y_r(dipp_load(a->d_p, e, dt), dipp_load(a->d_q, e, dt), dipp_load(a->x0, e, dt), inv_s2, &y,
                           &res);
            dipp_huber_vectors(y, res, s.inv_h, s.yr_over_h2, &va, &vb, &vd);
            dipp_store(a->a_out, e, dt, s.scale * va);
            dipp_store(a->b_out, e, dt, s.scale * vb);
            dipp_store(a->dprime_out, e, dt, s.scale * vd);
        }
    }
    free(partial);
    free(per);
    return DIPP_OK;
}

dipp_status dipp_cpu_huber_terms(const dipp_huber_args *args) {
    dipp_status status = DIPP_OK;
#define CALL(DT) status = huber_all(args, DT)
    DIPP_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return status;
}
