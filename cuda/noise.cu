/* Fused forward noising: eps drawn from Philox (flat element index), x_t written in one pass. */
#include "cuda_common.cuh"

/* One thread per Philox block q, i.e. flat elements 4q..4q+3 (they may span two or more samples). */
template <int DT>
__global__ void __launch_bounds__(DIPP_CUDA_THREADS) dipp_noise_kernel(const dipp_noise_args a, const int64_t n) {
    const int64_t blocks = (n + 3) / 4;
    for (int64_t q = dipp_cuda_thread_index(); q < blocks; q += dipp_cuda_thread_stride()) {
        uint32_t bits[4];
        float eps[4];
        dipp_philox_block(a.seed, a.offset + (uint64_t)q, bits);
        dipp_normal4(bits, eps);
        const int64_t e0 = q * 4;
        int64_t b = e0 / a.per_sample;
        int64_t next = (b + 1) * a.per_sample; /* first element of sample b + 1 */
#pragma unroll
        for (int lane = 0; lane < 4; ++lane) { /* unrolled so eps[] stays in registers */
            const int64_t e = e0 + lane;
            if (e < n) {
                while (e >= next) { /* per_sample < 4 can skip several samples */
                    ++b;
                    next += a.per_sample;
                }
                const float sigma = a.sigma[b];
                const float x0 = dipp_load(a.x0, e, DT);
                const float xt =
                    a.flow ? dipp_noise_flow(x0, sigma, eps[lane]) : dipp_noise_ve(x0, sigma, eps[lane]);
                dipp_store(a.xt, e, DT, xt);
                if (a.eps_out) dipp_store(a.eps_out, e, DT, eps[lane]);
            }
        }
    }
}

template <int DT>
static dipp_status noise_run(const dipp_noise_args *a, cudaStream_t stream) {
    if (a->batch < 0 || a->per_sample < 0) return DIPP_ERR_ARGUMENT;
    const int64_t n = a->batch * a->per_sample;
    if (n == 0) return DIPP_OK;
    DIPP_CUDA_LAUNCH(dipp_cuda_blocks((n + 3) / 4, DIPP_CUDA_THREADS), DIPP_CUDA_THREADS, stream,
                     dipp_noise_kernel<DT>)(*a, n);
    DIPP_CUDA_LAUNCH_CHECK();
    return DIPP_OK;
}

extern "C" dipp_status dipp_cuda_add_noise(const dipp_noise_args *args, void *stream) {
    dipp_status status = DIPP_OK;
#define CALL(DT) status = noise_run<DT>(args, dipp_cuda_stream(stream))
    DIPP_CUDA_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return status;
}
