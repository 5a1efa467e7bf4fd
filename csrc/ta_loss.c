/* TA (fake-score) denoising loss per sample and its gradient w.r.t. the TA output. */
#include <stdlib.h>

#include "cpu_common.h"

DIPP_ALWAYS_INLINE void ta_chunk_sums(const dipp_ta_args *a, int64_t base, int64_t len, int dt, float *out) {
    float sq[DIPP_RED_LANES] = {0}, bad[DIPP_RED_LANES] = {0};
    int64_t rows = len / DIPP_RED_LANES, rem = len % DIPP_RED_LANES;
    for (int64_t r = 0; r <= rows; ++r) {
        int width = r < rows ? DIPP_RED_LANES : (int)rem;
        int64_t e = base + r * DIPP_RED_LANES;
        for (int l = 0; l < width; ++l) {
            float d = dipp_load(a->d_ta, e + l, dt) - dipp_load(a->x0, e + l, dt);
            sq[l] += d * d;
            bad[l] += dipp_is_finite(d) ? 0.0f : 1.0f;
        }
    }
    out[0] = dipp_fold_lanes32(sq);
    out[1] = dipp_fold_lanes32(bad);
}

DIPP_ALWAYS_INLINE dipp_status ta_all(const dipp_ta_args *a, int dt) {
    const int64_t chunks = dipp_chunk_count(a->per_sample), total = a->batch * chunks;
    float *partial = malloc((size_t)total * 2 * sizeof(float));
    float *factor = malloc((size_t)a->batch * sizeof(float));
    if (!partial || !factor) {
        free(partial);
        free(factor);
        return DIPP_ERR_NOMEM;
    }
    DIPP_OMP_FOR
    for (int64_t task = 0; task < total; ++task) {
        int64_t b = task / chunks, c = task % chunks;
        int64_t len = dipp_min64(DIPP_RED_CHUNK, a->per_sample - c * DIPP_RED_CHUNK);
        ta_chunk_sums(a, b * a->per_sample + c * DIPP_RED_CHUNK, len, dt, partial + task * 2);
    }
    for (int64_t b = 0; b < a->batch; ++b) {
        double sums[2];
        dipp_combine_chunks(partial + b * chunks * 2, chunks, 2, sums);
        float weight = dipp_ta_weight(a->sigma ? a->sigma[b] : 1.0f, a->weighting == DIPP_TA_EDM, a->sigma_data);
        a->loss_out[b] = dipp_ta_sample_loss(weight, sums[0], a->per_sample, a->mean_over_elements);
        if (a->nonfinite_out) a->nonfinite_out[b] = (int64_t)sums[1];
        factor[b] = dipp_ta_grad_factor(weight, a->per_sample, a->batch, a->mean_over_elements);
    }
    if (a->grad_out) {
        DIPP_OMP_FOR
        for (int64_t task = 0; task < total; ++task) {
            int64_t b = task / chunks, c = task % chunks;
            int64_t e0 = b * a->per_sample + c * DIPP_RED_CHUNK;
            int64_t e1 = e0 + dipp_min64(DIPP_RED_CHUNK, a->per_sample - c * DIPP_RED_CHUNK);
            float f = factor[b];
            for (int64_t e = e0; e < e1; ++e)
                dipp_store(a->grad_out, e, dt, dipp_ta_grad(dipp_load(a->d_ta, e, dt), dipp_load(a->x0, e, dt), f));
        }
    }
    free(partial);
    free(factor);
    return DIPP_OK;
}

dipp_status dipp_cpu_ta_loss(const dipp_ta_args *args) {
    dipp_status status = DIPP_OK;
#define CALL(DT) status = ta_all(args, DT)
    DIPP_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return status;
}
