/* Shared scaffolding of the CPU kernels: OpenMP pragmas, dtype dispatch, chunking. */
#ifndef DIPP_CPU_COMMON_H
#define DIPP_CPU_COMMON_H

#include "dipp.h"

/* Below this many elements a kernel stays on the calling thread: waking the team costs
 * more than it saves there (toy problems, small batches). Every parallel loop declares
 * `const int dipp_parallel = dipp_worth_threads(elements);` right before DIPP_OMP_FOR. */
#define DIPP_PARALLEL_MIN_ELEMENTS 32768

static inline int dipp_worth_threads(int64_t elements) { return elements >= DIPP_PARALLEL_MIN_ELEMENTS; }

#ifdef _OPENMP
#include <omp.h>
#define DIPP_OMP_FOR _Pragma("omp parallel for schedule(static) if(dipp_parallel)")
#else
#define DIPP_OMP_FOR (void)dipp_parallel;
#endif

/* Forces dtype specialisation: callers pass a literal dtype, inlining folds the loads. */
#define DIPP_ALWAYS_INLINE static inline __attribute__((always_inline))

#define DIPP_DISPATCH_DTYPE(dtype, CALL)      \
    do {                                      \
        switch (dtype) {                      \
        case DIPP_DT_F32: CALL(DIPP_DT_F32); break;  \
        case DIPP_DT_F16: CALL(DIPP_DT_F16); break;  \
        case DIPP_DT_BF16: CALL(DIPP_DT_BF16); break; \
        default: return DIPP_ERR_ARGUMENT;    \
        }                                     \
    } while (0)

/* Instantiates DEF(suffix, dtype) once per kernel dtype. A parallel loop must sit in
 * such an instance, not in an inlined helper: OpenMP outlines the loop body before
 * inlining, which would otherwise leave a runtime dtype switch in every element. */
#define DIPP_FOR_EACH_DTYPE(DEF) DEF(f32, DIPP_DT_F32) DEF(f16, DIPP_DT_F16) DEF(bf16, DIPP_DT_BF16)

/* Hot loops get AVX-512 (x86-64-v4) and AVX2 clones on x86-64, chosen once at load time
 * (ifunc). Results are bitwise identical to the baseline build: no FMA contraction, fixed
 * lane order, only exact conversions and IEEE operations. The clone must be a real function
 * called from inside the parallel region, since OpenMP outlines loop bodies before target
 * cloning happens. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(DIPP_NO_CLONES)
#define DIPP_HOT __attribute__((noinline, target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define DIPP_HOT __attribute__((noinline))
#endif

/* The share [begin, end) of `total` tasks that thread `index` of `count` runs (static schedule). */
static inline void dipp_thread_share(int64_t total, int index, int count, int64_t *begin, int64_t *end) {
    int64_t base = total / count, extra = total % count;
    *begin = index * base + (index < extra ? index : extra);
    *end = *begin + base + (index < extra ? 1 : 0);
}

#ifdef _OPENMP
#define DIPP_THREAD_INDEX omp_get_thread_num()
#define DIPP_THREAD_COUNT omp_get_num_threads()
#else
#define DIPP_THREAD_INDEX 0
#define DIPP_THREAD_COUNT 1
#endif

/* Runs RANGE_FN(args..., begin, end) over `total` tasks, split across the team. */
#ifdef _OPENMP
#define DIPP_PARALLEL_TASKS(ELEMENTS, TOTAL, CALL)                                      \
    do {                                                                                \
        const int dipp_parallel = dipp_worth_threads(ELEMENTS);                         \
        _Pragma("omp parallel if(dipp_parallel)")                                       \
        {                                                                               \
            int64_t begin, end;                                                         \
            dipp_thread_share((TOTAL), DIPP_THREAD_INDEX, DIPP_THREAD_COUNT, &begin, &end); \
            CALL;                                                                       \
        }                                                                               \
    } while (0)
#else
#define DIPP_PARALLEL_TASKS(ELEMENTS, TOTAL, CALL) \
    do {                                           \
        int64_t begin = 0, end = (TOTAL);          \
        CALL;                                      \
    } while (0)
#endif

/* Two-pass kernels run sample by sample (both passes back to back, the second from cache)
 * when every thread gets a sample and one sample's operands fit a cache slice; otherwise
 * each pass spreads over all threads. The reduction order, and so every bit, is the same. */
#define DIPP_SAMPLE_CACHE_BYTES (4 << 20)

int dipp_cpu_threads(void);

static inline int dipp_sample_major(int64_t batch, int64_t sample_bytes) {
    return batch >= dipp_cpu_threads() && sample_bytes <= DIPP_SAMPLE_CACHE_BYTES;
}

static inline int64_t dipp_chunk_count(int64_t per_sample) {
    return (per_sample + DIPP_RED_CHUNK - 1) / DIPP_RED_CHUNK;
}

static inline int64_t dipp_min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Adds chunk sums of one sample in chunk order: partial[c * nq + q]. */
static inline void dipp_combine_chunks(const float *partial, int64_t chunks, int nq, double *sums) {
    for (int q = 0; q < nq; ++q) sums[q] = 0.0;
    for (int64_t c = 0; c < chunks; ++c)
        for (int q = 0; q < nq; ++q) sums[q] += (double)partial[c * nq + q];
}

/* Sum over the chunks of sample b of the count pass 2 left in slot q (exact: a chunk holds
 * at most DIPP_RED_CHUNK elements, far below float's 2^24 integer range). */
static inline int64_t dipp_chunk_count_sum(const float *partial, int64_t chunks, int nq, int q, int64_t b) {
    int64_t total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += (int64_t)partial[(b * chunks + c) * nq + q];
    return total;
}

/* Whether any element of base[e0, e1) is stored non-finite (exponent all ones). A separate scan of
 * what the store loop just wrote (still in L1: a chunk is at most DIPP_RED_CHUNK elements): a plain
 * integer OR that vectorises, where a flag kept inside the store loop slowed it down by up to 60 %. */
static inline int dipp_any_nonfinite(const void *base, int64_t e0, int64_t e1, int dtype) {
    unsigned any = 0;
    if (dtype == DIPP_DT_F32) {
        const uint32_t *u = (const uint32_t *)base;
        for (int64_t e = e0; e < e1; ++e) any |= (u[e] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint16_t *u = (const uint16_t *)base;
        const uint16_t mask = dtype == DIPP_DT_BF16 ? 0x7f80u : 0x7c00u;
        for (int64_t e = e0; e < e1; ++e) any |= (uint16_t)(u[e] & mask) == mask;
    }
    return any != 0;
}

#endif /* DIPP_CPU_COMMON_H */
