/*
 * The CPU CUDA runtime (see cuda_runtime.h): launches, warps of fibers in lockstep
 * at every shuffle, stream-ordered scratch and error state.
 *
 * State lives where CUDA keeps it: the last error and the running lane are per host
 * thread (thread_local, as cudaGetLastError is per thread and a lane is what a host
 * thread is executing), everything else in the stream objects. Nothing is global.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include "cuda_runtime.h"

struct CUstream_st {
    uint64_t magic;
    uint32_t max_grid;
    int64_t fail_alloc_at, fail_launch_at;
    int64_t alloc_calls, launch_calls; /* attempts, for the fault counters */
    pthread_mutex_t lock;              /* the record is written by whichever host thread launches */
    dipp_emu_stats stats;
};

namespace {

constexpr uint64_t kStreamMagic = 0x6469707065D5u;
constexpr uint64_t kBlockMagic = 0x6469707061u;
constexpr uint64_t kFreedMagic = 0x64697070FEu;
constexpr size_t kHeaderBytes = 256; /* keeps the 256-byte alignment cudaMalloc gives */
constexpr int kWarp = 32;
/* Kernel frames are small (a few float accumulators, a <4 KiB parameter copy); the
 * guard page below each stack turns an overflow into a crash rather than corruption. */
constexpr size_t kStackBytes = 256 * 1024;

/* Header in front of every cudaMallocAsync block. */
struct alloc_header {
    uint64_t magic;
    size_t bytes;
    CUstream_st *stream; /* whose record counts the bytes; NULL for the default stream */
};

enum lane_state { LANE_RUNNABLE, LANE_AT_SHUFFLE, LANE_DONE };

struct lane {
    ucontext_t ctx;
    dipp_emu::thread_ctx ids;
    lane_state state;
    int64_t shuffles; /* shuffles this lane has passed, to detect lanes at different ones */
    uint64_t value, result;
    unsigned int mask, delta;
    int width;
    const char *file; /* the shuffle's call site */
    int line;
};

struct warp {
    ucontext_t home; /* the scheduler, resumed whenever a lane suspends or returns */
    lane lanes[kWarp];
    int count;
    lane *running;
    dipp_emu::body_fn body;
    const void *closure;
};

thread_local cudaError_t tls_last_error = cudaSuccess;
thread_local warp *tls_warp = nullptr;
thread_local char tls_message[256];

CUstream_st *checked_stream(cudaStream_t stream) {
    return stream && stream->magic == kStreamMagic ? stream : nullptr;
}

void fail(cudaError_t error, CUstream_st *stream, const char *format, ...) __attribute__((format(printf, 3, 4)));

/* Records a failure for cudaGetLastError (first error sticks, as CUDA's sticky errors do until read). */
void fail(cudaError_t error, CUstream_st *stream, const char *format, ...) {
    if (tls_last_error == cudaSuccess) tls_last_error = error;
    va_list args;
    va_start(args, format);
    vsnprintf(tls_message, sizeof tls_message, format, args);
    va_end(args);
    if (stream) {
        pthread_mutex_lock(&stream->lock);
        stream->stats.failed += 1;
        memcpy(stream->stats.message, tls_message, sizeof stream->stats.message);
        pthread_mutex_unlock(&stream->lock);
    }
}

void lane_main() {
    warp *w = tls_warp;
    w->body(w->closure);
    w->running->state = LANE_DONE;
    /* returning resumes uc_link, the scheduler */
}

/* Stacks for the 32 lanes of one warp, reused by every warp of a launch. */
struct stacks {
    char *base = nullptr;
    size_t stride = 0;
    bool map() {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        stride = kStackBytes + page;
        void *p = mmap(nullptr, stride * kWarp, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return false;
        base = static_cast<char *>(p);
        for (int l = 0; l < kWarp; ++l)
            if (mprotect(base + l * stride, page, PROT_NONE) != 0) return false;
        return true;
    }
    char *stack(int l) const { return base + l * stride + (stride - kStackBytes); }
    ~stacks() {
        if (base) munmap(base, stride * kWarp);
    }
};

/* Lanes of one shuffle agree on the call (same count, full mask) and are all present. */
bool check_arrivals(const warp &w, const dipp_emu::thread_ctx &first, const char *name, CUstream_st *stream) {
    int waiting = 0, done = 0;
    for (int l = 0; l < w.count; ++l) {
        waiting += w.lanes[l].state == LANE_AT_SHUFFLE;
        done += w.lanes[l].state == LANE_DONE;
    }
    const unsigned int warp_index =
        (first.thread_idx.x + first.block_dim.x * (first.thread_idx.y + first.block_dim.y * first.thread_idx.z)) /
        kWarp;
    if (waiting != kWarp) {
        fail(cudaErrorLaunchFailure, stream,
             "%s: block (%u,%u,%u) warp %u: %d lanes wait at __shfl_down_sync while %d exited and %d were never "
             "launched (the full mask names all 32)",
             name, first.block_idx.x, first.block_idx.y, first.block_idx.z, warp_index, waiting, done,
             kWarp - w.count);
        return false;
    }
    for (int l = 0; l < kWarp; ++l) {
        const lane &x = w.lanes[l];
        if (x.mask != 0xffffffffu) {
            fail(cudaErrorLaunchFailure, stream, "%s: __shfl_down_sync mask 0x%08x: only the full mask is supported",
                 name, x.mask);
            return false;
        }
        if (x.line != w.lanes[0].line || strcmp(x.file, w.lanes[0].file) != 0) {
            fail(cudaErrorLaunchFailure, stream,
                 "%s: block (%u,%u,%u) warp %u: lane %d waits at the shuffle of %s:%d, lane 0 at %s:%d "
                 "(divergent warp)",
                 name, first.block_idx.x, first.block_idx.y, first.block_idx.z, warp_index, l, x.file, x.line,
                 w.lanes[0].file, w.lanes[0].line);
            return false;
        }
        if (x.shuffles != w.lanes[0].shuffles) {
            fail(cudaErrorLaunchFailure, stream,
                 "%s: block (%u,%u,%u) warp %u: lane %d is at its shuffle %lld, lane 0 at %lld (divergent warp)", name,
                 first.block_idx.x, first.block_idx.y, first.block_idx.z, warp_index, l, (long long)x.shuffles,
                 (long long)w.lanes[0].shuffles);
            return false;
        }
        if (x.width <= 0 || x.width > kWarp || (x.width & (x.width - 1)) != 0) {
            fail(cudaErrorLaunchFailure, stream, "%s: __shfl_down_sync width %d is not a power of two up to 32",
                 name, x.width);
            return false;
        }
    }
    return true;
}

/* Runs the lanes [first, first + count) of a block as one warp; false when the warp failed. */
bool run_warp(warp &w, const stacks &st, const dipp_emu::thread_ctx &block, unsigned int first, int count,
              const char *name, CUstream_st *stream, int64_t *shuffles) {
    w.count = count;
    for (int l = 0; l < count; ++l) {
        lane &x = w.lanes[l];
        const unsigned int t = first + (unsigned int)l;
        x.ids = block;
        x.ids.thread_idx.x = t % block.block_dim.x;
        x.ids.thread_idx.y = (t / block.block_dim.x) % block.block_dim.y;
        x.ids.thread_idx.z = t / (block.block_dim.x * block.block_dim.y);
        x.state = LANE_RUNNABLE;
        x.shuffles = 0;
        if (getcontext(&x.ctx) != 0) {
            fail(cudaErrorLaunchOutOfResources, stream, "%s: getcontext failed (errno %d)", name, errno);
            return false;
        }
        x.ctx.uc_stack.ss_sp = st.stack(l);
        x.ctx.uc_stack.ss_size = kStackBytes;
        x.ctx.uc_link = &w.home;
        makecontext(&x.ctx, lane_main, 0);
    }
    for (;;) {
        for (int l = 0; l < count; ++l) {
            lane &x = w.lanes[l];
            if (x.state != LANE_RUNNABLE) continue;
            w.running = &x;
            if (swapcontext(&w.home, &x.ctx) != 0) {
                fail(cudaErrorLaunchOutOfResources, stream, "%s: swapcontext failed (errno %d)", name, errno);
                return false;
            }
        }
        bool any_waiting = false;
        for (int l = 0; l < count; ++l) any_waiting = any_waiting || w.lanes[l].state == LANE_AT_SHUFFLE;
        if (!any_waiting) return true;
        /* the abandoned lanes of a failed warp hold no resources: kernels keep only plain data on their stacks */
        if (!check_arrivals(w, w.lanes[0].ids, name, stream)) return false;
        for (int l = 0; l < kWarp; ++l) {
            lane &x = w.lanes[l];
            const unsigned int in_segment = (unsigned int)l % (unsigned int)x.width;
            x.result = in_segment + x.delta < (unsigned int)x.width ? w.lanes[l + (int)x.delta].value : x.value;
        }
        for (int l = 0; l < kWarp; ++l) {
            w.lanes[l].state = LANE_RUNNABLE;
            w.lanes[l].shuffles += 1;
        }
        *shuffles += 1;
    }
}

bool valid_config(dim3 grid, dim3 block) {
    const uint64_t threads = (uint64_t)block.x * block.y * block.z;
    return threads >= 1 && threads <= 1024 && block.z <= 64 && grid.x >= 1 && grid.x <= 0x7fffffffu &&
           grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535;
}

void record_launch(CUstream_st *s, const char *name, dim3 grid, dim3 block, int64_t threads, int64_t shuffles) {
    pthread_mutex_lock(&s->lock);
    dipp_emu_stats &st = s->stats;
    st.launches += 1;
    st.threads += threads;
    st.shuffles += shuffles;
    int k = 0;
    while (k < st.kernel_count && strncmp(st.kernels[k].name, name, sizeof st.kernels[k].name - 1) != 0) ++k;
    if (k == st.kernel_count && k < DIPP_EMU_MAX_KERNELS) {
        snprintf(st.kernels[k].name, sizeof st.kernels[k].name, "%s", name);
        st.kernels[k].min_grid = grid.x;
        st.kernel_count += 1;
    }
    if (k < st.kernel_count) {
        dipp_emu_kernel_stat &ks = st.kernels[k];
        ks.launches += 1;
        if (grid.x < ks.min_grid) ks.min_grid = grid.x;
        if (grid.x > ks.max_grid) ks.max_grid = grid.x;
        ks.block = block.x * block.y * block.z;
    }
    pthread_mutex_unlock(&s->lock);
}

} // namespace

namespace dipp_emu {

const thread_ctx *current() { return tls_warp ? &tls_warp->running->ids : nullptr; }

uint64_t shfl_down(unsigned int mask, uint64_t bits, unsigned int delta, int width, const char *file, int line) {
    warp *w = tls_warp;
    lane *x = w->running;
    x->file = file;
    x->line = line;
    x->value = bits;
    x->mask = mask;
    x->delta = delta;
    x->width = width;
    x->state = LANE_AT_SHUFFLE;
    swapcontext(&x->ctx, &w->home); /* resumed by the scheduler once the whole warp has arrived */
    return x->result;
}

void launch(const char *name, dim3 grid, dim3 block, cudaStream_t handle, body_fn body, const void *closure) {
    CUstream_st *stream = checked_stream(handle);
    if (handle && !stream) {
        fail(cudaErrorInvalidResourceHandle, nullptr, "%s: launched on %p, which is no stream of this runtime", name,
             (void *)handle);
        return;
    }
    if (tls_warp) {
        fail(cudaErrorLaunchFailure, stream, "%s: launched from inside a kernel (dynamic parallelism is not emulated)",
             name);
        return;
    }
    if (!valid_config(grid, block)) {
        fail(cudaErrorInvalidConfiguration, stream, "%s: invalid configuration grid (%u,%u,%u) block (%u,%u,%u)", name,
             grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return;
    }
    if (stream) {
        pthread_mutex_lock(&stream->lock);
        const int64_t call = ++stream->launch_calls;
        const uint32_t cap = stream->max_grid;
        const bool inject = stream->fail_launch_at == call;
        pthread_mutex_unlock(&stream->lock);
        if (inject) {
            fail(cudaErrorLaunchFailure, stream, "%s: launch %lld failed as the stream was told to", name,
                 (long long)call);
            return;
        }
        if (cap && grid.x > cap) grid.x = cap;
    }
    stacks st;
    if (!st.map()) {
        fail(cudaErrorLaunchOutOfResources, stream, "%s: no memory for the lane stacks (errno %d)", name, errno);
        return;
    }
    warp w;
    w.body = body;
    w.closure = closure;
    const unsigned int per_block = block.x * block.y * block.z;
    int64_t shuffles = 0;
    bool ok = true;
    tls_warp = &w;
    for (unsigned int bz = 0; ok && bz < grid.z; ++bz)
        for (unsigned int by = 0; ok && by < grid.y; ++by)
            for (unsigned int bx = 0; ok && bx < grid.x; ++bx) {
                thread_ctx ids;
                ids.block_idx = {bx, by, bz};
                ids.block_dim = block;
                ids.grid_dim = grid;
                ids.thread_idx = {0, 0, 0};
                for (unsigned int first = 0; ok && first < per_block; first += kWarp) {
                    const int count = per_block - first < (unsigned int)kWarp ? (int)(per_block - first) : kWarp;
                    ok = run_warp(w, st, ids, first, count, name, stream, &shuffles);
                }
            }
    tls_warp = nullptr;
    if (ok && stream)
        record_launch(stream, name, grid, block, (int64_t)grid.x * grid.y * grid.z * per_block, shuffles);
}

} // namespace dipp_emu

extern "C" {

cudaError_t cudaMallocAsync(void **ptr, size_t bytes, cudaStream_t handle) {
    if (!ptr) {
        fail(cudaErrorInvalidValue, nullptr, "cudaMallocAsync: NULL result pointer");
        return cudaErrorInvalidValue;
    }
    *ptr = nullptr;
    CUstream_st *stream = checked_stream(handle);
    if (handle && !stream) {
        fail(cudaErrorInvalidResourceHandle, nullptr, "cudaMallocAsync: %p is no stream of this runtime",
             (void *)handle);
        return cudaErrorInvalidResourceHandle;
    }
    if (stream) {
        pthread_mutex_lock(&stream->lock);
        const bool inject = stream->fail_alloc_at == ++stream->alloc_calls;
        pthread_mutex_unlock(&stream->lock);
        if (inject) {
            fail(cudaErrorMemoryAllocation, stream, "cudaMallocAsync of %zu bytes failed as the stream was told to",
                 bytes);
            return cudaErrorMemoryAllocation;
        }
    }
    if (bytes > SIZE_MAX - 2 * kHeaderBytes) {
        fail(cudaErrorMemoryAllocation, stream, "cudaMallocAsync: %zu bytes", bytes);
        return cudaErrorMemoryAllocation;
    }
    const size_t total = (kHeaderBytes + bytes + kHeaderBytes - 1) / kHeaderBytes * kHeaderBytes;
    void *block = aligned_alloc(kHeaderBytes, total);
    if (!block) {
        fail(cudaErrorMemoryAllocation, stream, "cudaMallocAsync: out of host memory for %zu bytes", bytes);
        return cudaErrorMemoryAllocation;
    }
    alloc_header *h = static_cast<alloc_header *>(block);
    h->magic = kBlockMagic;
    h->bytes = bytes;
    h->stream = stream;
    if (stream) {
        pthread_mutex_lock(&stream->lock);
        stream->stats.allocs += 1;
        stream->stats.live_bytes += (int64_t)bytes;
        if (stream->stats.live_bytes > stream->stats.peak_bytes) stream->stats.peak_bytes = stream->stats.live_bytes;
        pthread_mutex_unlock(&stream->lock);
    }
    *ptr = static_cast<char *>(block) + kHeaderBytes;
    return cudaSuccess;
}

cudaError_t cudaFreeAsync(void *ptr, cudaStream_t handle) {
    if (!ptr) return cudaSuccess;
    if (handle && !checked_stream(handle)) {
        fail(cudaErrorInvalidResourceHandle, nullptr, "cudaFreeAsync: %p is no stream of this runtime",
             (void *)handle);
        return cudaErrorInvalidResourceHandle;
    }
    if (((uintptr_t)ptr % kHeaderBytes) != 0) {
        fail(cudaErrorInvalidValue, checked_stream(handle), "cudaFreeAsync: %p was not allocated by cudaMallocAsync",
             ptr);
        return cudaErrorInvalidValue;
    }
    alloc_header *h = reinterpret_cast<alloc_header *>(static_cast<char *>(ptr) - kHeaderBytes);
    if (h->magic != kBlockMagic) {
        fail(cudaErrorInvalidValue, checked_stream(handle), "cudaFreeAsync: %p is %s", ptr,
             h->magic == kFreedMagic ? "freed already" : "not from cudaMallocAsync");
        return cudaErrorInvalidValue;
    }
    h->magic = kFreedMagic;
    if (h->stream) {
        pthread_mutex_lock(&h->stream->lock);
        h->stream->stats.frees += 1;
        h->stream->stats.live_bytes -= (int64_t)h->bytes;
        pthread_mutex_unlock(&h->stream->lock);
    }
    free(h);
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
    const cudaError_t error = tls_last_error;
    tls_last_error = cudaSuccess;
    return error;
}

cudaError_t cudaPeekAtLastError(void) { return tls_last_error; }

const char *cudaGetErrorString(cudaError_t error) {
    switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorNoKernelImageForDevice: return "no kernel image is available for execution on the device";
    }
    return "unrecognized error code";
}

void *dipp_emu_stream_create(uint32_t max_grid, int64_t fail_alloc_at, int64_t fail_launch_at) {
    CUstream_st *s = static_cast<CUstream_st *>(calloc(1, sizeof(CUstream_st)));
    if (!s) return nullptr;
    if (pthread_mutex_init(&s->lock, nullptr) != 0) {
        free(s);
        return nullptr;
    }
    s->magic = kStreamMagic;
    s->max_grid = max_grid;
    s->fail_alloc_at = fail_alloc_at;
    s->fail_launch_at = fail_launch_at;
    return s;
}

void dipp_emu_stream_destroy(void *stream) {
    CUstream_st *s = checked_stream(static_cast<cudaStream_t>(stream));
    if (!s) return;
    s->magic = 0;
    pthread_mutex_destroy(&s->lock);
    free(s);
}

int dipp_emu_stream_stats(void *stream, dipp_emu_stats *out) {
    CUstream_st *s = checked_stream(static_cast<cudaStream_t>(stream));
    if (!s || !out) return -1;
    pthread_mutex_lock(&s->lock);
    *out = s->stats;
    pthread_mutex_unlock(&s->lock);
    return 0;
}

const char *dipp_emu_last_message(void) { return tls_message; }

static int env_int(const char *name, int fallback) {
    const char *text = getenv(name);
    if (!text || !text[0]) return fallback;
    char *end = nullptr;
    const long value = strtol(text, &end, 10);
    return *end == '\0' ? (int)value : fallback;
}

cudaError_t cudaRuntimeGetVersion(int *version) {
    if (!version) return cudaErrorInvalidValue;
    *version = DIPP_EMU_RUNTIME_VERSION;
    return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int *version) {
    if (!version) return cudaErrorInvalidValue;
    *version = env_int("DIPP_EMU_DRIVER_VERSION", DIPP_EMU_RUNTIME_VERSION);
    return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int *count) {
    if (!count) return cudaErrorInvalidValue;
    *count = env_int("DIPP_EMU_DEVICES", 1);
    if (*count > 0) return cudaSuccess;
    *count = 0;
    fail(cudaErrorNoDevice, nullptr, "cudaGetDeviceCount: no device (DIPP_EMU_DEVICES)");
    return cudaErrorNoDevice;
}

cudaError_t cudaFuncGetAttributesOf(cudaFuncAttributes *attributes, const void *kernel) {
    if (!attributes || !kernel) return cudaErrorInvalidValue;
    if (env_int("DIPP_EMU_NO_KERNEL_IMAGE", 0)) {
        fail(cudaErrorNoKernelImageForDevice, nullptr,
             "cudaFuncGetAttributes: no kernel image (DIPP_EMU_NO_KERNEL_IMAGE)");
        return cudaErrorNoKernelImageForDevice;
    }
    attributes->maxThreadsPerBlock = 1024;
    attributes->numRegs = 0;
    return cudaSuccess;
}

} // extern "C"
