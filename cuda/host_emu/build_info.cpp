/* What this build of the kernels was compiled with, for the tests that vary it. */
#include "../cuda_common.cuh"

extern "C" int dipp_emu_threads_per_block(void) { return DIPP_CUDA_THREADS; }
