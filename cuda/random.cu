/* Philox4x32-10 fills (uniform, normal) and per-sample log-normal sigma draws. */
#include "cuda_common.cuh"

/* One thread per Philox block q: elements 4q..4q+3 (element e is lane e % 4 of block offset + e / 4). */
template <int DT, bool NORMAL>
__global__ void __launch_bounds__(DIPP_CUDA_THREADS) dipp_fill_kernel(const dipp_fill_args a) {
    const int64_t blocks = (a.n + 3) / 4;
    for (int64_t q = dipp_cuda_thread_index(); q < blocks; q += dipp_cuda_thread_stride()) {
        uint32_t bits[4];
        float values[4];
        dipp_philox_block(a.seed, a.offset + (uint64_t)q, bits);
        if constexpr (NORMAL) dipp_normal4(bits, values);
        else
            for (int lane = 0; lane < 4; ++lane) values[lane] = dipp_uniform_in(dipp_uniform_open(bits[lane]), DT);
        const int64_t e0 = q * 4;
        for (int lane = 0; lane < 4 && e0 + lane < a.n; ++lane) dipp_store(a.out, e0 + lane, DT, values[lane]);
    }
}

template <int DT, bool NORMAL>
static dipp_status fill_run(const dipp_fill_args *a, cudaStream_t stream) {
    if (a->n < 0) return DIPP_ERR_ARGUMENT;
    if (a->n == 0) return DIPP_OK;
    const int64_t blocks = (a->n + 3) / 4;
    DIPP_CUDA_LAUNCH(dipp_cuda_blocks(blocks, DIPP_CUDA_THREADS), DIPP_CUDA_THREADS, stream,
                     dipp_fill_kernel<DT, NORMAL>)(*a);
    DIPP_CUDA_LAUNCH_CHECK();
    return DIPP_OK;
}

extern "C" dipp_status dipp_cuda_fill_uniform(const dipp_fill_args *args, void *stream) {
    dipp_status status = DIPP_OK;
#define CALL(DT) status = fill_run<DT, false>(args, dipp_cuda_stream(stream))
    DIPP_CUDA_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return status;
}

extern "C" dipp_status dipp_cuda_fill_normal(const dipp_fill_args *args, void *stream) {
    dipp_status status = DIPP_OK;
#define CALL(DT) status = fill_run<DT, true>(args, dipp_cuda_stream(stream))
    DIPP_CUDA_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return status;
}

/* One thread per sample; the table (if any) is device memory. */
__global__ void __launch_bounds__(DIPP_CUDA_THREADS) dipp_sigma_kernel(const dipp_sigma_args a) {
    for (int64_t b = dipp_cuda_thread_index(); b < a.batch; b += dipp_cuda_thread_stride()) {
        float n = dipp_normal_at(a.seed, a.offset, (uint64_t)b);
        float s = dipp_lognormal_sigma(n, a.p_mean, a.p_std, a.sigma_min, a.sigma_max);
        if (a.table) {
            int64_t j = dipp_nearest_index(a.table, a.table_len, s);
            if (a.index_out) a.index_out[b] = j;
            if (a.snap) s = a.table[j];
        }
        a.sigma_out[b] = s;
    }
}

extern "C" dipp_status dipp_cuda_sample_sigma(const dipp_sigma_args *args, void *stream) {
    if (args->batch < 0) return DIPP_ERR_ARGUMENT;
    if (args->batch == 0) return DIPP_OK;
    DIPP_CUDA_LAUNCH(dipp_cuda_blocks(args->batch, DIPP_CUDA_THREADS), DIPP_CUDA_THREADS, dipp_cuda_stream(stream),
                     dipp_sigma_kernel)(*args);
    DIPP_CUDA_LAUNCH_CHECK();
    return DIPP_OK;
}
