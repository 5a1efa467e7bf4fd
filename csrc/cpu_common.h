/* Shared scaffolding of the CPU kernels: OpenMP pragmas, dtype dispatch, chunking. */
#ifndef DIPP_CPU_COMMON_H
#define DIPP_CPU_COMMON_H

#include "dipp.h"

#ifdef _OPENMP
#include <omp.h>
#define DIPP_OMP_FOR _Pragma("omp parallel for schedule(static)")
#else
#define DIPP_OMP_FOR
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

#endif /* DIPP_CPU_COMMON_H */
