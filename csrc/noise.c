/* Fused forward noising: eps drawn in place from Philox, x_t written in one pass. */
#include "philox_cpu.h"

/* Elements [e0, e1) of sample noise: eps of element e is lane e % 4 of block offset + e / 4. */
DIPP_ALWAYS_INLINE void noise_range(const dipp_noise_args *a, int64_t e0, int64_t e1, float sigma, int dt, int flow,
                                    int write_eps) {
    for (int64_t base = e0 / 4 * 4; base < e1; base += 4 * DIPP_PHILOX_GROUP) {
        float eps[4 * DIPP_PHILOX_GROUP];
        dipp_philox_values(a->seed, a->offset + (uint64_t)base / 4u, 1, dt, eps);
        const int64_t lo = base < e0 ? e0 : base, hi = dipp_min64(base + 4 * DIPP_PHILOX_GROUP, e1);
        for (int64_t e = lo; e < hi; ++e) {
            const float x0 = dipp_load(a->x0, e, dt), z = eps[e - base];
            dipp_store(a->xt, e, dt, flow ? dipp_noise_flow(x0, sigma, z) : dipp_noise_ve(x0, sigma, z));
            if (write_eps) dipp_store(a->eps_out, e, dt, z);
        }
    }
}

typedef void (*noise_fn)(const dipp_noise_args *a);

#define DEFINE_NOISE(NAME, DT, FLOW, EPS)                                                             \
    DIPP_HOT static void noise_tasks_##NAME(const dipp_noise_args *a, int64_t chunks, int64_t begin,  \
                                            int64_t end) {                                            \
        for (int64_t task = begin; task < end; ++task) {                                              \
            const int64_t b = task / chunks, c = task % chunks;                                       \
            const int64_t e0 = b * a->per_sample + c * DIPP_RED_CHUNK;                                \
            const int64_t e1 = b * a->per_sample + dipp_min64((c + 1) * DIPP_RED_CHUNK, a->per_sample); \
            noise_range(a, e0, e1, a->sigma[b], DT, FLOW, EPS);                                       \
        }                                                                                             \
    }                                                                                                 \
    static void noise_##NAME(const dipp_noise_args *a) {                                              \
        const int64_t chunks = dipp_chunk_count(a->per_sample);                                       \
        DIPP_PARALLEL_TASKS(a->batch * a->per_sample, a->batch * chunks,                              \
                            noise_tasks_##NAME(a, chunks, begin, end));                               \
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
