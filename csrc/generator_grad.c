/*
 * DI++ generator gradient G = (W_b (D_TA - D_ref^w) - alpha dr/dx0) / B.
 * Pass 1 reduces per sample (normaliser, gap, surrogate, non-finite count);
 * pass 2 writes G. Two reads of the inputs, one write. Each (dtype, CFG?, reward?)
 * combination is its own instance so the element loops carry no branches.
 */
#include <stdlib.h>

#include "cpu_common.h"

enum { GEN_REF_DIST, GEN_GAP, GEN_SURROGATE, GEN_BAD, GEN_NQ };

DIPP_ALWAYS_INLINE float gen_ref(const dipp_gen_args *a, int64_t e, int dt, int cfg) {
    float cond = dipp_load(a->d_cond, e, dt);
    return cfg ? dipp_cfg(dipp_load(a->d_uncond, e, dt), cond, a->omega) : cond;
}

DIPP_ALWAYS_INLINE void gen_accumulate(const dipp_gen_args *a, int64_t e, int dt, int cfg, int reward, float *dist,
                                       float *gap, float *sur, float *bad) {
    float x0 = dipp_load(a->x0, e, dt);
    float diff = dipp_load(a->d_ta, e, dt) - gen_ref(a, e, dt, cfg);
    float dr = reward ? dipp_load(a->dr, e, dt) : 0.0f;
    *dist += fabsf(x0 - gen_ref(a, e, dt, cfg));
    *gap += fabsf(diff);
    *sur += diff * x0;
    *bad += (dipp_is_finite(x0) && dipp_is_finite(diff) && dipp_is_finite(dr)) ? 0.0f : 1.0f;
}

DIPP_ALWAYS_INLINE void gen_chunk_sums(const dipp_gen_args *a, int64_t base, int64_t len, int dt, int cfg,
                                       int reward, float *out) {
    float dist[DIPP_RED_LANES] = {0}, gap[DIPP_RED_LANES] = {0}, sur[DIPP_RED_LANES] = {0},
          bad[DIPP_RED_LANES] = {0};
    const int64_t rows = len / DIPP_RED_LANES;
    const int rem = (int)(len % DIPP_RED_LANES);
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t e = base + r * DIPP_RED_LANES;
        for (int l = 0; l < DIPP_RED_LANES; ++l)
            gen_accumulate(a, e + l, dt, cfg, reward, &dist[l], &gap[l], &sur[l], &bad[l]);
    }
    const int64_t e = base + rows * DIPP_RED_LANES;
    for (int l = 0; l < rem; ++l) gen_accumulate(a, e + l, dt, cfg, reward, &dist[l], &gap[l], &sur[l], &bad[l]);
    out[GEN_REF_DIST] = dipp_fold_lanes32(dist);
    out[GEN_GAP] = dipp_fold_lanes32(gap);
    out[GEN_SURROGATE] = dipp_fold_lanes32(sur);
    out[GEN_BAD] = dipp_fold_lanes32(bad);
}

/* Elements of [e0, e1) whose stored G is non-finite although x0, D_TA - D_ref and dr are all
 * finite. The slow path of pass 2's count: it runs only for chunks where G overflowed. */
static int gen_recount(const dipp_gen_args *a, int64_t e0, int64_t e1, int dt, int cfg, int reward) {
    int bad = 0;
    for (int64_t e = e0; e < e1; ++e) {
        const float dr = reward ? dipp_load(a->dr, e, dt) : 0.0f;
        const float diff = dipp_load(a->d_ta, e, dt) - gen_ref(a, e, dt, cfg);
        bad += !dipp_is_finite(dipp_load(a->grad_out, e, dt)) && dipp_is_finite(dipp_load(a->x0, e, dt)) &&
               dipp_is_finite(diff) && dipp_is_finite(dr);
    }
    return bad;
}

/* G over [e0, e1). Restrict parameters (dipp.h: outputs never overlap inputs) of a function that is
 * not inlined (GCC drops restrict when it inlines), so the loop vectorises without run-time alias
 * checks over five streams. */
DIPP_ALWAYS_INLINE void gen_store_chunk(const void *restrict d_ta, const void *restrict d_cond,
                                        const void *restrict d_unc, const void *restrict d_r, void *restrict g_out,
                                        int64_t e0, int64_t e1, float omega, float w_over_b, float a_over_b, int dt,
                                        int cfg, int reward) {
    for (int64_t e = e0; e < e1; ++e) {
        const float dr = reward ? dipp_load(d_r, e, dt) : 0.0f;
        const float cond = dipp_load(d_cond, e, dt);
        const float ref = cfg ? dipp_cfg(dipp_load(d_unc, e, dt), cond, omega) : cond;
        dipp_store(g_out, e, dt, dipp_generator_grad(dipp_load(d_ta, e, dt), ref, dr, w_over_b, a_over_b));
    }
}

typedef void (*gen_pass_fn)(const dipp_gen_args *a, float *partial, int64_t chunks);

/* Per-sample outputs from the chunk sums of sample b (identical whatever ran the chunks). */
static void gen_finish_sample(const dipp_gen_args *a, const float *partial, int64_t chunks, int64_t b) {
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

#define DEFINE_GEN(NAME, DT, CFG, REWARD)                                                                 \
    DIPP_HOT static void gen_store_##NAME(const void *restrict d_ta, const void *restrict d_cond,             \
                                          const void *restrict d_unc, const void *restrict d_r,              \
                                          void *restrict g_out, int64_t e0, int64_t e1, float omega,         \
                                          float w_over_b, float a_over_b) {                                  \
        gen_store_chunk(d_ta, d_cond, d_unc, d_r, g_out, e0, e1, omega, w_over_b, a_over_b, DT, CFG, REWARD); \
    }                                                                                                     \
    DIPP_HOT static void gen_sums_range_##NAME(const dipp_gen_args *a, float *partial, int64_t chunks,        \
                                               int64_t begin, int64_t end) {                                  \
        const int64_t n = a->per_sample;                                                                  \
        for (int64_t task = begin; task < end; ++task) {                                                  \
            const int64_t b = task / chunks, c = task % chunks;                                           \
            gen_chunk_sums(a, b * n + c * DIPP_RED_CHUNK, dipp_min64(DIPP_RED_CHUNK, n - c * DIPP_RED_CHUNK), \
                           DT, CFG, REWARD, partial + task * GEN_NQ);                                      \
        }                                                                                                 \
    }                                                                                                     \
    /* Also leaves in partial[task * GEN_NQ + GEN_BAD] how many G elements of the chunk came out      \
     * non-finite from finite inputs (pass 1 counted the others). */                              \
    DIPP_HOT static void gen_write_range_##NAME(const dipp_gen_args *a, float *partial, int64_t chunks,      \
                                                int64_t begin, int64_t end) {                             \
        const int64_t n = a->per_sample;                                                                  \
        const float a_over_b = a->alpha / (float)a->batch;                                                \
        for (int64_t task = begin; task < end; ++task) {                                                  \
            const int64_t b = task / chunks, c = task % chunks;                                           \
            const int64_t e0 = b * n + c * DIPP_RED_CHUNK;                                                \
            const int64_t e1 = e0 + dipp_min64(DIPP_RED_CHUNK, n - c * DIPP_RED_CHUNK);                   \
            const float w_over_b = a->weight_out[b] / (float)a->batch;                                    \
            gen_store_##NAME(a->d_ta, a->d_cond, a->d_uncond, a->dr, a->grad_out, e0, e1, a->omega, w_over_b, \
                             a_over_b);                                                                   \
            /* plain stores above (they vectorise, a count kept in the loop did not in bfloat16); a   \
             * scan of the chunk just written flags overflow, and only then is it recounted */         \
            const int any = dipp_any_nonfinite(a->grad_out, e0, e1, DT);                                  \
            partial[task * GEN_NQ + GEN_BAD] = any ? (float)gen_recount(a, e0, e1, DT, CFG, REWARD) : 0.0f; \
        }                                                                                                 \
    }                                                                                                     \
    static void gen_sums_##NAME(const dipp_gen_args *a, float *partial, int64_t chunks) {                 \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch * chunks,                                  \
                            gen_sums_range_##NAME(a, partial, chunks, begin, end));                       \
    }                                                                                                     \
    static void gen_write_##NAME(const dipp_gen_args *a, float *partial, int64_t chunks) {                \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch * chunks,                                  \
                            gen_write_range_##NAME(a, partial, chunks, begin, end));                      \
    }                                                                                                     \
    /* sample-major: both passes over one sample back to back, the second one from cache */              \
    static void gen_by_sample_##NAME(const dipp_gen_args *a, float *partial, int64_t chunks) {            \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch,                                           \
                            for (int64_t b = begin; b < end; ++b) {                                       \
                                gen_sums_range_##NAME(a, partial, chunks, b * chunks, (b + 1) * chunks);  \
                                gen_finish_sample(a, partial, chunks, b);                                 \
                                gen_write_range_##NAME(a, partial, chunks, b * chunks, (b + 1) * chunks); \
                                a->nonfinite_out[b] += dipp_chunk_count_sum(partial, chunks, GEN_NQ, GEN_BAD, b); \
                            });                                                                           \
    }

#define DEFINE_GEN_FLAGS(SUFFIX, DT)         \
    DEFINE_GEN(SUFFIX##_00, DT, 0, 0)        \
    DEFINE_GEN(SUFFIX##_01, DT, 0, 1)        \
    DEFINE_GEN(SUFFIX##_10, DT, 1, 0)        \
    DEFINE_GEN(SUFFIX##_11, DT, 1, 1)
DIPP_FOR_EACH_DTYPE(DEFINE_GEN_FLAGS)

#define GEN_ROW(PASS, SUFFIX) {{PASS##_##SUFFIX##_00, PASS##_##SUFFIX##_01}, {PASS##_##SUFFIX##_10, PASS##_##SUFFIX##_11}}
static const gen_pass_fn gen_sums[3][2][2] = {GEN_ROW(gen_sums, f32), GEN_ROW(gen_sums, f16), GEN_ROW(gen_sums, bf16)};
static const gen_pass_fn gen_write[3][2][2] = {GEN_ROW(gen_write, f32), GEN_ROW(gen_write, f16),
                                               GEN_ROW(gen_write, bf16)};
static const gen_pass_fn gen_by_sample[3][2][2] = {GEN_ROW(gen_by_sample, f32), GEN_ROW(gen_by_sample, f16),
                                                   GEN_ROW(gen_by_sample, bf16)};

dipp_status dipp_cpu_generator_grad(const dipp_gen_args *a) {
    if (a->dtype < DIPP_DT_F32 || a->dtype > DIPP_DT_BF16) return DIPP_ERR_ARGUMENT;
    const int cfg = a->d_uncond != NULL, reward = a->dr != NULL;
    const int64_t chunks = dipp_chunk_count(a->per_sample);
    float *partial = malloc((size_t)(a->batch * chunks) * GEN_NQ * sizeof(float));
    if (!partial) return DIPP_ERR_NOMEM;
    if (dipp_sample_major(a->batch, a->per_sample * (4 + cfg + reward) * (a->dtype == DIPP_DT_F32 ? 4 : 2))) {
        gen_by_sample[a->dtype][cfg][reward](a, partial, chunks);
    } else { /* few large samples: spread each pass over all threads */
        gen_sums[a->dtype][cfg][reward](a, partial, chunks);
        for (int64_t b = 0; b < a->batch; ++b) gen_finish_sample(a, partial, chunks, b);
        gen_write[a->dtype][cfg][reward](a, partial, chunks);
        for (int64_t b = 0; b < a->batch; ++b)
            a->nonfinite_out[b] += dipp_chunk_count_sum(partial, chunks, GEN_NQ, GEN_BAD, b);
    }
    free(partial);
    return DIPP_OK;
}
