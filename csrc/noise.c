/* Fused forward noising: eps drawn in place from Philox, x_t written in one pass. */
#include "cpu_common.h"

DIPP_ALWAYS_INLINE void noise_chunk(const dipp_noise_args *a, int64_t e0, int64_t e1, float sigma, int dt) {
    for (int64_t e = e0; e < e1;) {
        uint32_t bits[4];
        float eps[4];
        dipp_philox_block(a->seed, a->offset + (uint64_t)e / 4u, bits);
        dipp_normal4(bits, eps);
        for (int lane = (int)(e % 4); lane < 4 && e < e1; ++lane, ++e) {
            float x0 = dipp_load(a->x0, e, dt);
            float xt = a->flow ? dipp_noise_flow(x0, sigma, eps[lane]) : dipp_noise_ve(x0, sigma, eps[lane]);
            dipp_store(a->xt, e, dt, xt);
            if (a->eps_out) dipp_store(a->eps_out, e, dt, eps[lane]);
        }
    }
}

DIPP_ALWAYS_INLINE void noise_all(const dipp_noise_args *a, int dt) {
    int64_t chunks = dipp_chunk_count(a->per_sample);
    int64_t total = a->batch * chunks;
    DIPP_OMP_FOR
    for (int64_t task = 0; task < total; ++task) {
        int64_t b = task / chunks, c = task % chunks;
        int64_t e0 = b * a->per_sample + c * DIPP_RED_CHUNK;
        int64_t e1 = b * a->per_sample + dipp_min64((c + 1) * DIPP_RED_CHUNK, a->per_sample);
        noise_chunk(a, e0, e1, a->sigma[b], dt);
    }
}

dipp_status dipp_cpu_add_noise(const dipp_noise_args *args) {
#define CALL(DT) noise_all(args, DT)
    DIPP_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return DIPP_OK;
}
