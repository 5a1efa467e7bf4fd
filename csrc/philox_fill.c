/* Uniform and standard-normal fills from Philox4x32-10, keyed by (seed, offset). */
#include "cpu_common.h"

DIPP_ALWAYS_INLINE void fill_range(const dipp_fill_args *a, int64_t e0, int64_t e1, int normal, int dt) {
    for (int64_t e = e0; e < e1;) {
        uint32_t bits[4];
        float values[4];
        dipp_philox_block(a->seed, a->offset + (uint64_t)e / 4u, bits);
        if (normal) dipp_normal4(bits, values);
        else for (int lane = 0; lane < 4; ++lane) values[lane] = dipp_uniform_open(bits[lane]);
        for (int lane = (int)(e % 4); lane < 4 && e < e1; ++lane, ++e) dipp_store(a->out, e, dt, values[lane]);
    }
}

DIPP_ALWAYS_INLINE void fill_all(const dipp_fill_args *a, int normal, int dt) {
    int64_t chunks = dipp_chunk_count(a->n);
    DIPP_OMP_FOR
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t e0 = c * DIPP_RED_CHUNK;
        fill_range(a, e0, dipp_min64(e0 + DIPP_RED_CHUNK, a->n), normal, dt);
    }
}

dipp_status dipp_cpu_fill_uniform(const dipp_fill_args *args) {
#define CALL(DT) fill_all(args, 0, DT)
    DIPP_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return DIPP_OK;
}

dipp_status dipp_cpu_fill_normal(const dipp_fill_args *args) {
#define CALL(DT) fill_all(args, 1, DT)
    DIPP_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return DIPP_OK;
}
