/*
 * Per-sample reductions in the order the CPU kernels use (see dipp.h):
 * one warp per DIPP_RED_CHUNK-element chunk, lane l sums elements l, l+32, ...
 * of the chunk in float, the warp folds with shuffle-down (16, 8, 4, 2, 1, as
 * dipp_fold_lanes32), chunk sums go to `partial[task * NQ + q]` with
 * task = b * chunks + c, and per sample the chunk sums are added in double in
 * chunk order (as dipp_combine_chunks).
 *
 * A reduction op provides
 *   __device__ P prepare(int64_t b) const;                       per-sample constants
 *   __device__ void operator()(const P &p, int64_t e, float (&acc)[NQ]) const;
 * where e is the flat element index and the op adds its terms to acc.
 * An apply op provides prepare(b) and apply(const P &p, int64_t e) for pass 2.
 */
#ifndef DIPP_CUDA_CHUNK_REDUCE_CUH
#define DIPP_CUDA_CHUNK_REDUCE_CUH

#include "cuda_common.cuh"

/* Shuffle-down tree: lane[l] = lane[l] + lane[l + width], width 16..1; lane 0 holds the sum. */
template <int NQ>
__device__ __forceinline__ void dipp_cuda_warp_fold(float (&acc)[NQ]) {
    for (int width = 16; width > 0; width >>= 1)
        for (int q = 0; q < NQ; ++q) acc[q] = acc[q] + __shfl_down_sync(0xffffffffu, acc[q], width);
}

/* Pass 1: one warp per (sample, chunk) task. The task loop is warp-uniform, so
 * all 32 lanes reach every shuffle. */
template <int NQ, class Op>
__global__ void __launch_bounds__(DIPP_CUDA_THREADS)
dipp_cuda_chunk_reduce_kernel(const Op op, const int64_t batch, const int64_t per_sample, const int64_t chunks,
                              float *__restrict__ partial) {
    const int lane = (int)(threadIdx.x & 31u);
    const int64_t total = batch * chunks;
    const int64_t warp_stride = (int64_t)gridDim.x * DIPP_CUDA_WARPS_PER_BLOCK;
    for (int64_t task = (int64_t)blockIdx.x * DIPP_CUDA_WARPS_PER_BLOCK + (int64_t)(threadIdx.x >> 5); task < total;
         task += warp_stride) {
        const int64_t b = task / chunks, c = task % chunks;
        const int64_t chunk_start = c * DIPP_RED_CHUNK;
        const int64_t rest = per_sample - chunk_start; /* >= 1 */
        const int64_t len = rest < DIPP_RED_CHUNK ? rest : DIPP_RED_CHUNK;
        const int64_t base = b * per_sample + chunk_start;
        const auto p = op.prepare(b);
        float acc[NQ];
        for (int q = 0; q < NQ; ++q) acc[q] = 0.0f;
        /* lane l: rows r with l + 32 r < len, i.e. lanes >= len % 32 skip the partial last row */
        for (int64_t i = lane; i < len; i += DIPP_RED_LANES) op(p, base + i, acc);
        dipp_cuda_warp_fold<NQ>(acc);
        if (lane == 0)
            for (int q = 0; q < NQ; ++q) partial[task * NQ + q] = acc[q];
    }
}

/* Chunk sums of sample b added in chunk order, in double (dipp_combine_chunks). */
template <int NQ>
__device__ __forceinline__ void dipp_cuda_combine_chunks(const float *__restrict__ partial, int64_t b, int64_t chunks,
                                                         double (&sums)[NQ]) {
    const float *p = partial + b * chunks * NQ;
    for (int q = 0; q < NQ; ++q) sums[q] = 0.0;
    for (int64_t c = 0; c < chunks; ++c)
        for (int q = 0; q < NQ; ++q) sums[q] += (double)p[c * NQ + q];
}

/* Pass 2: one block per (sample, chunk) task, threads stride over the chunk. */
template <class Op>
__global__ void __launch_bounds__(DIPP_CUDA_THREADS)
dipp_cuda_chunk_apply_kernel(const Op op, const int64_t batch, const int64_t per_sample, const int64_t chunks) {
    const int64_t total = batch * chunks;
    for (int64_t task = blockIdx.x; task < total; task += gridDim.x) {
        const int64_t b = task / chunks, c = task % chunks;
        const int64_t chunk_start = c * DIPP_RED_CHUNK;
        const int64_t rest = per_sample - chunk_start;
        const int64_t len = rest < DIPP_RED_CHUNK ? rest : DIPP_RED_CHUNK;
        const int64_t base = b * per_sample + chunk_start;
        const auto p = op.prepare(b);
        for (int64_t i = threadIdx.x; i < len; i += blockDim.x) op.apply(p, base + i);
    }
}

/* Launches pass 1 when there is work (per_sample may be 0: then no chunks). */
template <int NQ, class Op>
static inline dipp_status dipp_cuda_chunk_reduce(const Op &op, int64_t batch, int64_t per_sample, int64_t chunks,
                                                 float *partial, cudaStream_t stream) {
    const int64_t total = batch * chunks;
    if (total <= 0) return DIPP_OK;
    DIPP_CUDA_LAUNCH(dipp_cuda_blocks(total, DIPP_CUDA_WARPS_PER_BLOCK), DIPP_CUDA_THREADS, stream,
                     dipp_cuda_chunk_reduce_kernel<NQ, Op>)(op, batch, per_sample, chunks, partial);
    DIPP_CUDA_LAUNCH_CHECK();
    return DIPP_OK;
}

template <class Op>
static inline dipp_status dipp_cuda_chunk_apply(const Op &op, int64_t batch, int64_t per_sample, int64_t chunks,
                                                cudaStream_t stream) {
    const int64_t total = batch * chunks;
    if (total <= 0) return DIPP_OK;
    DIPP_CUDA_LAUNCH(dipp_cuda_blocks(total, 1), DIPP_CUDA_THREADS, stream, dipp_cuda_chunk_apply_kernel<Op>)(
        op, batch, per_sample, chunks);
    DIPP_CUDA_LAUNCH_CHECK();
    return DIPP_OK;
}

/* Threads-per-sample launches of the finalize kernels. */
static inline unsigned int dipp_cuda_sample_blocks(int64_t batch) { return dipp_cuda_blocks(batch, DIPP_CUDA_THREADS); }

#endif /* DIPP_CUDA_CHUNK_REDUCE_CUH */
