/* Classifier-free guidance combine D_uncond + omega (D_cond - D_uncond). */
#include "cuda_common.cuh"

template <int DT>
__global__ void __launch_bounds__(DIPP_CUDA_THREADS) dipp_cfg_kernel(const dipp_cfg_args a) {
    for (int64_t i = dipp_cuda_thread_index(); i < a.n; i += dipp_cuda_thread_stride())
        dipp_store(a.out, i, DT, dipp_cfg(dipp_load(a.uncond, i, DT), dipp_load(a.cond, i, DT), a.omega));
}

template <int DT>
static dipp_status cfg_run(const dipp_cfg_args *a, cudaStream_t stream) {
    if (a->n < 0) return DIPP_ERR_ARGUMENT;
    if (a->n == 0) return DIPP_OK;
    DIPP_CUDA_LAUNCH(dipp_cuda_blocks(a->n, DIPP_CUDA_THREADS), DIPP_CUDA_THREADS, stream, dipp_cfg_kernel<DT>)(
        *a);
    DIPP_CUDA_LAUNCH_CHECK();
    return DIPP_OK;
}

extern "C" dipp_status dipp_cuda_cfg_combine(const dipp_cfg_args *args, void *stream) {
    dipp_status status = DIPP_OK;
#define CALL(DT) status = cfg_run<DT>(args, dipp_cuda_stream(stream))
    DIPP_CUDA_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return status;
}
