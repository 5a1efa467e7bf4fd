/* How many threads the CPU kernels run on. */
#include "cpu_common.h"

int dipp_cpu_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
