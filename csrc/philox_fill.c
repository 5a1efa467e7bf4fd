/* Uniform and standard-normal fills from Philox4x32-10, keyed by (seed, offset). */
#include "cpu_common.h"

DIPP_ALWAYS_INLINE void fill_range(const dipp_fill_args *a, int64_t e0, int64_t e1, int normal, int dt) {
    for (int64_t e = e0; e < e1;) {
        uint32_t bits[4];
        float values[4];
        dipp_philox_block(a->seed, a->offset + (uint64_t)e / 4u, bits);
        if (normal) dipp_normal4(bits, values);
        else for (int lane = 0; lane < 4; ++lane) values[lane] = dipp_uniform_in(dipp_uniform_open(bits[lane]), dt);
        for (int lane = (int)(e % 4); lane < 4 && e < e1; ++lane, ++e) dipp_store(a->out, e, dt, values[lane]);
    }
}

typedef void (*fill_fn)(const dipp_fill_args *a);

#define DEFINE_FILL(NAME, DT, NORMAL)                                           \
    static void fill_##NAME(const dipp_fill_args *a) {                          \
        const int64_t chunks = dipp_chunk_count(a->n);                          \
        const int dipp_parallel = dipp_worth_threads(a->n);                                         \
        DIPP_OMP_FOR                                                            \
        for (int64_t c = 0; c < chunks; ++c) {                                  \
            const int64_t e0 = c * DIPP_RED_CHUNK;                              \
            fill_range(a, e0, dipp_min64(e0 + DIPP_RED_CHUNK, a->n), NORMAL, DT); \
        }                                                                       \
    }
#define DEFINE_FILL_KINDS(SUFFIX, DT) DEFINE_FILL(SUFFIX##_u, DT, 0) DEFINE_FILL(SUFFIX##_n, DT, 1)
DIPP_FOR_EACH_DTYPE(DEFINE_FILL_KINDS)

static const fill_fn fill_table[3][2] = {{fill_f32_u, fill_f32_n}, {fill_f16_u, fill_f16_n}, {fill_bf16_u, fill_bf16_n}};

dipp_status dipp_cpu_fill_uniform(const dipp_fill_args *args) {
    if (args->dtype < DIPP_DT_F32 || args->dtype > DIPP_DT_BF16) return DIPP_ERR_ARGUMENT;
    fill_table[args->dtype][0](args);
    return DIPP_OK;
}

dipp_status dipp_cpu_fill_normal(const dipp_fill_args *args) {
    if (args->dtype < DIPP_DT_F32 || args->dtype > DIPP_DT_BF16) return DIPP_ERR_ARGUMENT;
    fill_table[args->dtype][1](args);
    return DIPP_OK;
}
