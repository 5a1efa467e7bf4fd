/*
 * Kernels that exercise the CPU runtime of cuda/host_emu itself (tests/test_host_emu.py):
 * indices, shuffle semantics and lockstep, the failures it must report, scratch memory.
 * Each probe_* entry launches once and returns cudaGetLastError().
 */
#include <cuda_runtime.h>

#include "chunk_reduce.cuh"

#define PROBE extern "C" __attribute__((visibility("default")))

__global__ void ids_kernel(unsigned int *out) {
    const unsigned int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned int per_block = blockDim.x * blockDim.y * blockDim.z;
    const unsigned int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned int *o = out + 12 * (block * per_block + t);
    const unsigned int v[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                                blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
    for (int i = 0; i < 12; ++i) o[i] = v[i];
}

PROBE int probe_ids(unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, unsigned int by,
                    unsigned int bz, unsigned int *out, void *stream) {
    DIPP_CUDA_LAUNCH(dim3(gx, gy, gz), dim3(bx, by, bz), (cudaStream_t)stream, ids_kernel)(out);
    return cudaGetLastError();
}

__global__ void shfl_kernel(const float *in, const unsigned int *delta, float *out, int width) {
    const unsigned int g = blockIdx.x * blockDim.x + threadIdx.x;
    out[g] = __shfl_down_sync(0xffffffffu, in[g], delta[g], width);
}

PROBE int probe_shfl(unsigned int blocks, unsigned int threads, const float *in, const unsigned int *delta,
                     float *out, int width, void *stream) {
    DIPP_CUDA_LAUNCH(blocks, threads, (cudaStream_t)stream, shfl_kernel)(in, delta, out, width);
    return cudaGetLastError();
}

/* Every lane writes, all meet at a shuffle, then each reads its neighbour's write: only a
 * warp in lockstep has every write done before any lane passes the shuffle. */
__global__ void lockstep_kernel(int *mem, int *seen) {
    const unsigned int g = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x & 31u;
    mem[g] = (int)g + 1;
    (void)__shfl_down_sync(0xffffffffu, 0, 1);
    seen[g] = mem[g - lane + ((lane + 1u) & 31u)];
}

PROBE int probe_lockstep(unsigned int blocks, unsigned int threads, int *mem, int *seen, void *stream) {
    DIPP_CUDA_LAUNCH(blocks, threads, (cudaStream_t)stream, lockstep_kernel)(mem, seen);
    return cudaGetLastError();
}

/* The kernels' own warp fold (chunk_reduce.cuh) on one float per lane; every lane's value after it. */
__global__ void fold_kernel(const float *in, float *out) {
    const unsigned int g = blockIdx.x * blockDim.x + threadIdx.x;
    float acc[2] = {in[g], -in[g]};
    dipp_cuda_warp_fold<2>(acc);
    out[2 * g] = acc[0];
    out[2 * g + 1] = acc[1];
}

PROBE int probe_fold(unsigned int blocks, unsigned int threads, const float *in, float *out, void *stream) {
    DIPP_CUDA_LAUNCH(blocks, threads, (cudaStream_t)stream, fold_kernel)(in, out);
    return cudaGetLastError();
}

/* Lanes >= exit_from return before a full-mask shuffle (undefined on a GPU; must fail here). */
__global__ void early_exit_kernel(float *out, int exit_from) {
    const unsigned int lane = threadIdx.x & 31u;
    if ((int)lane >= exit_from) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

PROBE int probe_early_exit(unsigned int threads, float *out, int exit_from, void *stream) {
    DIPP_CUDA_LAUNCH(1, threads, (cudaStream_t)stream, early_exit_kernel)(out, exit_from);
    return cudaGetLastError();
}

/* The same launch, leaving its error for the caller to read. */
PROBE void probe_launch_early_exit(unsigned int threads, float *out, int exit_from, void *stream) {
    DIPP_CUDA_LAUNCH(1, threads, (cudaStream_t)stream, early_exit_kernel)(out, exit_from);
}

/* Lane 0 meets the others at a different shuffle call. */
__global__ void two_sites_kernel(float *out) {
    if (threadIdx.x == 0) out[0] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
    else out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 2.0f, 1);
}

PROBE int probe_two_sites(float *out, void *stream) {
    DIPP_CUDA_LAUNCH(1, 32, (cudaStream_t)stream, two_sites_kernel)(out);
    return cudaGetLastError();
}

__global__ void partial_mask_kernel(float *out) { out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 1); }

PROBE int probe_partial_mask(float *out, void *stream) {
    DIPP_CUDA_LAUNCH(1, 32, (cudaStream_t)stream, partial_mask_kernel)(out);
    return cudaGetLastError();
}

__global__ void atomic_kernel(unsigned long long *count) { atomicAdd(count, 1ull + (threadIdx.x & 1u)); }

PROBE int probe_atomic(unsigned int blocks, unsigned int threads, unsigned long long *count, void *stream) {
    DIPP_CUDA_LAUNCH(blocks, threads, (cudaStream_t)stream, atomic_kernel)(count);
    return cudaGetLastError();
}

PROBE int probe_malloc(void **ptr, size_t bytes, void *stream) {
    return cudaMallocAsync(ptr, bytes, (cudaStream_t)stream);
}

PROBE int probe_free(void *ptr, void *stream) { return cudaFreeAsync(ptr, (cudaStream_t)stream); }

PROBE int probe_peek(void) { return cudaPeekAtLastError(); }

PROBE int probe_last(void) { return cudaGetLastError(); }

PROBE const char *probe_error_string(int error) { return cudaGetErrorString((cudaError_t)error); }
