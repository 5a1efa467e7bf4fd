/*
 * DI++ generator gradient G = (W_b (D_TA - D_ref^w) - alpha dr/dx0) / B.
 * Pass 1 reduces per sample (normaliser, gap, surrogate, non-finite count);
 * pass 2 writes G. Two reads of the inputs, one write.
 */
#include <stdlib.h>

#include "cpu_common.h"

enum { GEN_REF_DIST, GEN_GAP, GEN_SURROGATE, GEN_BAD, GEN_NQ };

DIPP_ALWAYS_INLINE float gen_ref(const dipp_gen_args *a, int64_t e, int dt) {
    float cond = dipp_load(a->d_cond, e, dt);
    return a->d_uncond ? dipp_cfg(dipp_load(a->d_uncond, e, dt), cond, a->omega) : cond;
}

DIPP_ALWAYS_INLINE void gen_chunk_sums(const dipp_gen_args *a, int64_t base, int64_t len, int dt, float *out) {
    float dist[DIPP_RED_LANES] = {0}, gap[DIPP_RED_LANES] = {0}, sur[DIPP_RED_LANES] = {0},
          bad[DIPP_RED_LANES] = {0};
    int64_t rows = len / DIPP_RED_LANES, rem = len % DIPP_RED_LANES;
    for (int64_t r = 0; r <= rows; ++r) {
        int width = r < rows ? DIPP_RED_LANES : (int)rem;
        int64_t e = base + r * DIPP_RED_LANES;
        for (int l = 0; l < width; ++l) {
            float x0 = dipp_load(a->x0, e + l, dt);
            float ta = dipp_load(a->d_ta, e + l, dt);
            float ref = gen_ref(a, e + l, dt);
            float diff = ta - ref;
            float dr = a->dr ? dipp_load(a->dr, e + l, dt) : 0.0f;
            dist[l] += fabsf(x0 - ref);
            gap[l] += fabsf(diff);
            sur[l] += diff * x0;
            bad[l] += (dipp_is_finite(x0) && dipp_is_finite(diff) && dipp_is_finite(dr)) ? 0.0f : 1.0f;
        }
    }
    out[GEN_REF_DIST] = dipp_fold_lanes32(dist);
    out[GEN_GAP] = dipp_fold_lanes32(gap);
    out[GEN_SURROGATE] = dipp_fold_lanes32(sur);
    out[GEN_BAD] = dipp_fold_lanes32(bad);
}

DIPP_ALWAYS_INLINE dipp_status gen_all(const dipp_gen_args *a, int dt) {
    const int64_t chunks = dipp_chunk_count(a->per_sample), total = a->batch * chunks;
    float *partial = malloc((size_t)total * GEN_NQ * sizeof(float));
    if (!partial) return DIPP_ERR_NOMEM;
    DIPP_OMP_FOR
    for (int64_t task = 0; task < total; ++task) {
        int64_t b = task / chunks, c = task % chunks;
        int64_t len = dipp_min64(DIPP_RED_CHUNK, a->per_sample - c * DIPP_RED_CHUNK);
        gen_chunk_sums(a, b * a->per_sample + c * DIPP_RED_CHUNK, len, dt, partial + task * GEN_NQ);
    }
    for (int64_t b = 0; b < a->batch; ++b) {
        double sums[GEN_NQ];
        dipp_combine_chunks(partial + b * chunks * GEN_NQ, chunks, GEN_NQ, sums);
        float ref_dist = dipp_mean_from_sum(sums[GEN_REF_DIST], a->per_sample);
        float weight = dipp_generator_weight(ref_dist, a->weighting == DIPP_W_NORMALIZED, a->min_norm);
        a->weight_out[b] = weight;
        a->ref_dist_out[b] = ref_dist;
        a->gap_out[b] = dipp_mean_from_sum(sums[GEN_GAP], a->per_sample);
        a->surrogate_out[b] = (float)((double)weight * sums[GEN_SURROGATE]);
        a->nonfinite_out[b] = (int64_t)sums[GEN_BAD];
    }
    const float a_over_b = a->alpha / (float)a->batch;
    DIPP_OMP_FOR
    for (int64_t task = 0; task < total; ++task) {
        int64_t b = task / chunks, c = task % chunks;
        int64_t e0 = b * a->per_sample + c * DIPP_RED_CHUNK;
        int64_t e1 = e0 + dipp_min64(DIPP_RED_CHUNK, a->per_sample - c * DIPP_RED_CHUNK);
        float w_over_b = a->weight_out[b] / (float)a->batch;
        for (int64_t e = e0; e < e1; ++e) {
            float dr = a->dr ? dipp_load(a->dr, e, dt) : 0.0f;
            float g = dipp_generator_grad(dipp_load(a->d_ta, e, dt), gen_ref(a, e, dt), dr, w_over_b, a_over_b);
            dipp_store(a->grad_out, e, dt, g);
        }
    }
    free(partial);
    return DIPP_OK;
}

dipp_status dipp_cpu_generator_grad(const dipp_gen_args *args) {
    dipp_status status = DIPP_OK;
#define CALL(DT) status = gen_all(args, DT)
    DIPP_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return status;
}
