/*
 * Test-side controls of the CPU CUDA runtime (plain C, for ctypes): streams that
 * record what ran on them and can be told to fail or to shrink grids.
 */
#ifndef DIPP_HOST_EMU_DIPP_EMU_H
#define DIPP_HOST_EMU_DIPP_EMU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DIPP_EMU_API __attribute__((visibility("default")))

/* Per-kernel record of a stream; `name` is the kernel as the launch site wrote it. */
#define DIPP_EMU_MAX_KERNELS 32
typedef struct {
    char name[96];
    int64_t launches;
    uint32_t min_grid, max_grid; /* blocks actually run (after max_grid) */
    uint32_t block;              /* threads per block of the last launch */
} dipp_emu_kernel_stat;

typedef struct {
    int64_t launches;       /* kernels run to completion */
    int64_t failed;         /* launches refused or aborted */
    int64_t threads;        /* CUDA threads run */
    int64_t shuffles;       /* warp-wide __shfl_down_sync exchanges */
    int64_t allocs, frees;  /* cudaMallocAsync / cudaFreeAsync that succeeded */
    int64_t live_bytes, peak_bytes;
    int32_t kernel_count;
    dipp_emu_kernel_stat kernels[DIPP_EMU_MAX_KERNELS];
    char message[256]; /* the last failure, in words */
} dipp_emu_stats;

/*
 * The machine the runtime simulates, read from the environment at each query, so that a test can
 * play the failures a real machine has (dipp_cuda_device_check must turn each into a reason):
 *   DIPP_EMU_DEVICES=n            cudaGetDeviceCount reports n devices (default 1; 0: cudaErrorNoDevice)
 *   DIPP_EMU_DRIVER_VERSION=v     cudaDriverGetVersion reports v (default: the runtime's, 13000)
 *   DIPP_EMU_NO_KERNEL_IMAGE=1    cudaFuncGetAttributes: cudaErrorNoKernelImageForDevice
 */

/*
 * A new stream (free with dipp_emu_stream_destroy), NULL when out of memory.
 * max_grid: 0 runs every launch as issued; n > 0 runs at most n blocks in x, which
 *   grid-stride kernels must tolerate: it checks that results do not depend on the grid.
 * fail_alloc_at / fail_launch_at: 0, or the 1-based count of the cudaMallocAsync
 *   (cudaErrorMemoryAllocation) or kernel launch (cudaErrorLaunchFailure) that fails.
 */
DIPP_EMU_API void *dipp_emu_stream_create(uint32_t max_grid, int64_t fail_alloc_at, int64_t fail_launch_at);
DIPP_EMU_API void dipp_emu_stream_destroy(void *stream);
/* Copies the stream's record; -1 for a pointer that is no stream of this runtime. */
DIPP_EMU_API int dipp_emu_stream_stats(void *stream, dipp_emu_stats *out);
/* The last failure on this host thread, in words ("" when none). */
DIPP_EMU_API const char *dipp_emu_last_message(void);
/* Threads per block the kernels were compiled for (DIPP_CUDA_THREADS of this build). */
DIPP_EMU_API int dipp_emu_threads_per_block(void);

#ifdef __cplusplus
}
#endif

#endif /* DIPP_HOST_EMU_DIPP_EMU_H */
