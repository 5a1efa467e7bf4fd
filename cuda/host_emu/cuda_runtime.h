/*
 * CPU stand-in for the part of the CUDA runtime that the kernels in cuda/ use, so that the
 * unmodified kernel bodies compile with g++ and run in the tests on machines
 * without a GPU. Build: g++ -x c++ -I cuda/host_emu (this directory first, so
 * that the kernels' `#include <cuda_runtime.h>` lands here) the .cu files, runtime.cpp.
 *
 * The subset, and nothing more, so a kernel that starts using anything else
 * fails to compile here instead of being emulated wrongly:
 *   - launches through DIPP_CUDA_LAUNCH (cuda_common.cuh), 1-3 D grids and blocks,
 *     threadIdx / blockIdx / blockDim / gridDim;
 *   - __shfl_down_sync with the 32 lanes of a warp in lockstep: every lane is a
 *     fiber that runs until its next shuffle, the exchange happens once all 32
 *     have arrived; a lane that exits (or was never launched) while others wait,
 *     a partial mask, or lanes at different shuffle counts fail the launch
 *     (cudaErrorLaunchFailure) instead of returning made-up values;
 *   - atomicAdd on unsigned long long; cudaMallocAsync / cudaFreeAsync (host
 *     memory, each block carrying a header so that a foreign or double free is
 *     an error, not heap corruption); cudaGetLastError / cudaPeekAtLastError /
 *     cudaGetErrorString; streams created by dipp_emu_stream_create (NULL is the
 *     default stream).
 * Deviations a test must know: launches run to completion before the launch call
 * returns (so stream order is trivially kept), blocks and warps run one after
 * another on the calling thread, a kernel-time failure is reported by the next
 * cudaGetLastError rather than at a later synchronisation, "device" pointers are
 * host pointers, and out-of-bounds accesses are not trapped.
 */
#ifndef DIPP_HOST_EMU_CUDA_RUNTIME_H
#define DIPP_HOST_EMU_CUDA_RUNTIME_H

#if defined(__CUDACC__)
#error "cuda/host_emu replaces the CUDA runtime for g++ builds only; nvcc must use its own cuda_runtime.h"
#endif

#define DIPP_HOST_EMU 1

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "dipp_emu.h"

/* Qualifiers mean nothing on the host; __launch_bounds__ is checked by nvcc builds only. */
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorNoKernelImageForDevice = 209,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
} cudaError_t;

typedef struct CUstream_st *cudaStream_t;

/* The fields of CUDA's struct that a caller may read here. */
struct cudaFuncAttributes {
    int maxThreadsPerBlock;
    int numRegs;
};

/* The version this runtime claims, CUDA's encoding (1000 major + 10 minor). */
#define DIPP_EMU_RUNTIME_VERSION 13000

extern "C" {
cudaError_t cudaMallocAsync(void **ptr, size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void *ptr, cudaStream_t stream);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t error);
/* The machine a test simulates (dipp_emu.h: DIPP_EMU_DEVICES, DIPP_EMU_DRIVER_VERSION, DIPP_EMU_NO_KERNEL_IMAGE). */
cudaError_t cudaRuntimeGetVersion(int *version);
cudaError_t cudaDriverGetVersion(int *version);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaFuncGetAttributesOf(cudaFuncAttributes *attributes, const void *kernel);
}

/* CUDA's template form, taking the kernel itself. */
template <class... P>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes *attributes, void (*kernel)(P...)) {
    return cudaFuncGetAttributesOf(attributes, reinterpret_cast<const void *>(kernel));
}

namespace dipp_emu {

/* The indices of one CUDA thread; `current()` is the lane running on this OS thread. */
struct thread_ctx {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
};

const thread_ctx *current();

/* Runs the kernel once for the thread current() describes. */
typedef void (*body_fn)(const void *closure);

void launch(const char *name, dim3 grid, dim3 block, cudaStream_t stream, body_fn body, const void *closure);

/* The exchange of one __shfl_down_sync, on the value's bits (suspends this lane until the warp arrives);
 * file and line name the call, so that lanes meeting at different shuffles are caught. */
uint64_t shfl_down(unsigned int mask, uint64_t bits, unsigned int delta, int width, const char *file, int line);

/*
 * `kernel(args...)` at `launch`: the arguments are converted to the kernel's parameter
 * types once, as a <<<>>> launch copies them into its parameter buffer, and every
 * thread's call copies them from there.
 */
template <class... P>
struct kernel_launch {
    const char *name;
    dim3 grid, block;
    cudaStream_t stream;
    void (*kernel)(P...);

    template <class... A>
    void operator()(A &&...args) const {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
        const std::tuple<P...> params(std::forward<A>(args)...);
        struct closure_t {
            void (*kernel)(P...);
            const std::tuple<P...> *params;
        } closure = {kernel, &params};
        launch(name, grid, block, stream,
               [](const void *p) {
                   const closure_t *c = static_cast<const closure_t *>(p);
                   std::apply(c->kernel, *c->params);
               },
               &closure);
    }
};

template <class... P>
kernel_launch<P...> make_launch(const char *name, dim3 grid, dim3 block, cudaStream_t stream, void (*kernel)(P...)) {
    return kernel_launch<P...>{name, grid, block, stream, kernel};
}

} // namespace dipp_emu

#define threadIdx (::dipp_emu::current()->thread_idx)
#define blockIdx (::dipp_emu::current()->block_idx)
#define blockDim (::dipp_emu::current()->block_dim)
#define gridDim (::dipp_emu::current()->grid_dim)

/* DIPP_CUDA_LAUNCH's g++ expansion; `name` is the kernel as written, for diagnostics. */
#define DIPP_EMU_LAUNCH(grid, block, stream, name, ...) \
    ::dipp_emu::make_launch(name, (grid), (block), (stream), __VA_ARGS__)

/* The last two parameters are not CUDA's: they capture the call site (g++ builtins). */
template <class T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32,
                          const char *site_file = __builtin_FILE(), int site_line = __builtin_LINE()) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "__shfl_down_sync moves up to 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof(T));
    bits = ::dipp_emu::shfl_down(mask, bits, delta, width, site_file, site_line);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

/* Atomic although warps run one at a time, so that running blocks on several host threads stays correct. */
inline unsigned long long atomicAdd(unsigned long long *address, unsigned long long value) {
    return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

#endif /* DIPP_HOST_EMU_CUDA_RUNTIME_H */
