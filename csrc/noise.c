/* Fused forward noising: eps drawn in place from Philox, x_t written in one pass. */
#include "cpu_common.h"

DIPP_ALWAYS_INLINE void noise_range(const dipp_noise_args *a, int64_t e0, int64_t e1, float sigma, int dt, int flow,
                                    int write_eps) {
    for (int64_t e = e0; e < e1;) {
        uint32_t bits[4];
        float eps[4];
        dipp_philox_block(a->seed, a->offset + (uint64_t)e / 4u, bits);
        dipp_normal4(bits, eps);
        for (int lane = (int)(e % 4); lane < 4 && e < e1; ++lane, ++e) {
            float x0 = dipp_load(a->x0, e, dt);
            float xt = flow ? dipp_noise_flow(x0, sigma, eps[lane]) : dipp_noise_ve(x0, sigma, eps[lane]);
            dipp_store(a->xt, e, dt, xt);
            if (write_eps) dipp_store(a->eps_out, e, dt, eps[lane]);
        }
    }
}

typedef void (*noise_fn)(const dipp_noise_args *a);

#define DEFINE_NOISE(NAME, DT, FLOW, EPS)                                                           \
    static void noise_##NAME(const dipp_noise_args *a) {                                            \
        const int64_t chunks = dipp_chunk_count(a->per_sample), total = a->batch * chunks;          \
        const int dipp_parallel = dipp_worth_threads(a->batch * a->per_sample);                     \
        DIPP_OMP_FOR                                                                                \
        for (int64_t task = 0; task < total; ++task) {                                              \
            const int64_t b = task / chunks, c = task % chunks;                                     \
            const int64_t e0 = b * a->per_sample + c * DIPP_RED_CHUNK;                              \
            const int64_t e1 = b * a->per_sample + dipp_min64((c + 1) * DIPP_RED_CHUNK, a->per_sample); \
            noise_range(a, e0, e1, a->sigma[b], DT, FLOW, EPS);                                     \
        }                                                                                           \
    }
#define DEFINE_NOISE_FLAGS(SUFFIX, DT)      \
    DEFINE_NOISE(SUFFIX##_00, DT, 0, 0)     \
    DEFINE_NOISE(SUFFIX##_01, DT, 0, 1)     \
    DEFINE_NOISE(SUFFIX##_10, DT, 1, 0)     \
    DEFINE_NOISE(SUFFIX##_11, DT, 1, 1)
DIPP_FOR_EACH_DTYPE(DEFINE_NOISE_FLAGS)

#define NOISE_ROW(SUFFIX) {{noise_##SUFFIX##_00, noise_##SUFFIX##_01}, {noise_##SUFFIX##_10, noise_##SUFFIX##_11}}
static const noise_fn noise_table[3][2][2] = {NOISE_ROW(f32), NOISE_ROW(f16), NOISE_ROW(bf16)};

dipp_status dipp_cpu_add_noise(const dipp_noise_args *args) {
    if (args->dtype < DIPP_DT_F32 || args->dtype > DIPP_DT_BF16) return DIPP_ERR_ARGUMENT;
    noise_table[args->dtype][args->flow != 0][args->eps_out != NULL](args);
    return DIPP_OK;
}
