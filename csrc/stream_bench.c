/* STREAM-style copy and triad, the bandwidth yardsticks of the benchmark. */
#include "cpu_common.h"

dipp_status dipp_cpu_stream_copy(float *dst, const float *src, int64_t n) {
    const int dipp_parallel = dipp_worth_threads(n);
    DIPP_OMP_FOR
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
    return DIPP_OK;
}

dipp_status dipp_cpu_stream_triad(float *a, const float *b, const float *c, float scalar, int64_t n) {
    const int dipp_parallel = dipp_worth_threads(n);
    DIPP_OMP_FOR
    for (int64_t i = 0; i < n; ++i) a[i] = b[i] + scalar * c[i];
    return DIPP_OK;
}
