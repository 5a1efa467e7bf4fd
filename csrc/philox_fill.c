/* Uniform and standard-normal fills from Philox4x32-10, keyed by (seed, offset). */
#include "philox_cpu.h"

/* Elements [e0, e1) of the fill: element e is lane e % 4 of block offset + e / 4. */
DIPP_ALWAYS_INLINE void fill_range(const dipp_fill_args *a, int64_t e0, int64_t e1, int normal, int dt) {
    for (int64_t base = e0 / 4 * 4; base < e1; base += 4 * DIPP_PHILOX_GROUP) {
        float values[4 * DIPP_PHILOX_GROUP];
        dipp_philox_values(a->seed, a->offset + (uint64_t)base / 4u, normal, dt, values);
        const int64_t lo = base < e0 ? e0 : base, hi = dipp_min64(base + 4 * DIPP_PHILOX_GROUP, e1);
        for (int64_t e = lo; e < hi; ++e) dipp_store(a->out, e, dt, values[e - base]);
    }
}

typedef void (*fill_fn)(const dipp_fill_args *a);

#define DEFINE_FILL(NAME, DT, NORMAL)                                                              \
    DIPP_HOT static void fill_chunks_##NAME(const dipp_fill_args *a, int64_t begin, int64_t end) { \
        for (int64_t c = begin; c < end; ++c) {                                                    \
            const int64_t e0 = c * DIPP_RED_CHUNK;                                                 \
            fill_range(a, e0, dipp_min64(e0 + DIPP_RED_CHUNK, a->n), NORMAL, DT);                  \
        }                                                                                          \
    }                                                                                              \
    static void fill_##NAME(const dipp_fill_args *a) {                                             \
        DIPP_PARALLEL_TASKS(a->n, dipp_chunk_count(a->n), fill_chunks_##NAME(a, begin, end));      \
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
