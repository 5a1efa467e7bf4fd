/*
 * Shared scaffolding of the CUDA kernels: error checks, stream handling, grid
 * sizing, dtype dispatch and stream-ordered scratch memory. No global state.
 */
#ifndef DIPP_CUDA_COMMON_CUH
#define DIPP_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "dipp.h"

/* Threads per block of every kernel (a multiple of the warp size). Overridable so that the
 * tests can build the kernels for other block sizes (cuda/host_emu) and check the results
 * do not depend on it; release builds keep 256. */
#ifndef DIPP_CUDA_THREADS
#define DIPP_CUDA_THREADS 256
#endif
#if DIPP_CUDA_THREADS % 32 != 0 || DIPP_CUDA_THREADS < 32 || DIPP_CUDA_THREADS > 1024
#error "DIPP_CUDA_THREADS must be a multiple of 32 in [32, 1024]"
#endif
#define DIPP_CUDA_WARPS_PER_BLOCK (DIPP_CUDA_THREADS / 32)
/* Upper bound of blocks per launch; grid-stride loops cover the rest. */
#ifndef DIPP_CUDA_MAX_BLOCKS
#define DIPP_CUDA_MAX_BLOCKS 8192
#endif

/*
 * Launches kernel(args...) on `grid` blocks of `block` threads on `stream`, written
 *     DIPP_CUDA_LAUNCH(grid, block, stream, kernel)(args...);
 * with the kernel last because template arguments contain commas. nvcc sees a plain
 * <<<grid, block, 0, stream>>>; a g++ build against cuda/host_emu runs the same kernel
 * body on the CPU runtime there, which is how the tests execute the kernels without a GPU.
 */
#if defined(__CUDACC__)
#define DIPP_CUDA_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#elif defined(DIPP_HOST_EMU)
#define DIPP_CUDA_LAUNCH(grid, block, stream, ...) DIPP_EMU_LAUNCH(grid, block, stream, #__VA_ARGS__, __VA_ARGS__)
#else
#error "cuda/*.cu compile with nvcc, or with g++ -I cuda/host_emu (the CPU runtime of the tests)"
#endif

/* Returns DIPP_ERR_CUDA from the enclosing function when a runtime call fails. */
#define DIPP_CUDA_TRY(expr)                                   \
    do {                                                      \
        cudaError_t dipp_cuda_err_ = (expr);                  \
        if (dipp_cuda_err_ != cudaSuccess) return DIPP_ERR_CUDA; \
    } while (0)

/* Checks the launch just issued (configuration errors, missing kernel image). */
#define DIPP_CUDA_LAUNCH_CHECK() DIPP_CUDA_TRY(cudaGetLastError())

/* Propagates a non-OK dipp_status. */
#define DIPP_TRY(expr)                               \
    do {                                             \
        dipp_status dipp_status_ = (expr);           \
        if (dipp_status_ != DIPP_OK) return dipp_status_; \
    } while (0)

/* Calls CALL(DT) with DT a compile-time dtype constant; unknown codes are argument errors. */
#define DIPP_CUDA_DISPATCH_DTYPE(dtype, CALL)         \
    do {                                              \
        switch (dtype) {                              \
        case DIPP_DT_F32: CALL(DIPP_DT_F32); break;   \
        case DIPP_DT_F16: CALL(DIPP_DT_F16); break;   \
        case DIPP_DT_BF16: CALL(DIPP_DT_BF16); break; \
        default: return DIPP_ERR_ARGUMENT;            \
        }                                             \
    } while (0)

static inline cudaStream_t dipp_cuda_stream(void *stream) { return (cudaStream_t)stream; }

static inline int64_t dipp_cuda_chunk_count(int64_t per_sample) {
    return (per_sample + DIPP_RED_CHUNK - 1) / DIPP_RED_CHUNK;
}

/* Blocks for `items` work items handled `per_block` at a time (items > 0). */
static inline unsigned int dipp_cuda_blocks(int64_t items, int64_t per_block) {
    int64_t blocks = (items + per_block - 1) / per_block;
    if (blocks > DIPP_CUDA_MAX_BLOCKS) blocks = DIPP_CUDA_MAX_BLOCKS;
    if (blocks < 1) blocks = 1;
    return (unsigned int)blocks;
}

/* Stream-ordered scratch; out of memory maps to DIPP_ERR_NOMEM. */
static inline dipp_status dipp_cuda_scratch_alloc(void **ptr, size_t bytes, cudaStream_t stream) {
    *ptr = NULL;
    if (bytes == 0) bytes = 16;
    cudaError_t err = cudaMallocAsync(ptr, bytes, stream);
    if (err != cudaSuccess) {
        *ptr = NULL;
        (void)cudaGetLastError(); /* do not leave a stale error for the caller's next check */
        return err == cudaErrorMemoryAllocation ? DIPP_ERR_NOMEM : DIPP_ERR_CUDA;
    }
    return DIPP_OK;
}

/* Frees scratch on the stream; returns `status` unless it was OK and the free failed. */
static inline dipp_status dipp_cuda_scratch_free(void *ptr, cudaStream_t stream, dipp_status status) {
    if (!ptr) return status;
    cudaError_t err = cudaFreeAsync(ptr, stream);
    if (status != DIPP_OK) return status;
    return err == cudaSuccess ? DIPP_OK : DIPP_ERR_CUDA;
}

/* Bytes rounded up to a multiple of 16, to place several arrays in one scratch block. */
static inline size_t dipp_cuda_align16(size_t bytes) { return (bytes + 15u) & ~(size_t)15u; }

/* Global thread index and stride of a 1-D grid-stride loop, in int64. */
__device__ __forceinline__ int64_t dipp_cuda_thread_index() {
    return (int64_t)blockIdx.x * (int64_t)blockDim.x + (int64_t)threadIdx.x;
}

__device__ __forceinline__ int64_t dipp_cuda_thread_stride() { return (int64_t)gridDim.x * (int64_t)blockDim.x; }

/* Adds one to a per-sample non-finite count from pass 2 (the per-sample finalize kernel wrote
 * the count before, in stream order). Integer atomics commute, so the count stays deterministic,
 * and they run only for elements whose output came out non-finite, which are rare. */
__device__ __forceinline__ void dipp_cuda_count_one(int64_t *count) {
    atomicAdd(reinterpret_cast<unsigned long long *>(count), 1ull);
}

#endif /* DIPP_CUDA_COMMON_CUH */
