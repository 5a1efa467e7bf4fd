/* Philox4x32-10 and Box-Muller over groups of consecutive blocks, lane-major so that the rounds and the
 * normals vectorise (CPU only). Bit for bit dipp_philox_block and dipp_normal4 of dipp_math.h, which
 * the CUDA kernels call one block at a time: the same integer rounds and the same float/double
 * operations per element, only laid out across DIPP_PHILOX_GROUP blocks. */
#ifndef DIPP_PHILOX_CPU_H
#define DIPP_PHILOX_CPU_H

#include "cpu_common.h"

#define DIPP_PHILOX_GROUP 16 /* blocks per group: 64 elements */

/* Word w[lane][j] of block first + j under key seed. */
DIPP_ALWAYS_INLINE void dipp_philox_group(uint64_t seed, uint64_t first, uint32_t w[4][DIPP_PHILOX_GROUP]) {
    uint32_t c0[DIPP_PHILOX_GROUP], c1[DIPP_PHILOX_GROUP], c2[DIPP_PHILOX_GROUP], c3[DIPP_PHILOX_GROUP];
    for (int j = 0; j < DIPP_PHILOX_GROUP; ++j) {
        const uint64_t block = first + (uint64_t)j;
        c0[j] = (uint32_t)block;
        c1[j] = (uint32_t)(block >> 32);
        c2[j] = 0u;
        c3[j] = 0u;
    }
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int round = 0; round < 10; ++round) {
#pragma GCC unroll 1 /* a loop for the vectoriser, not straight-line code for SLP */
        for (int j = 0; j < DIPP_PHILOX_GROUP; ++j) {
            /* high and low words as separate expressions: GCC vectorises the high one as a
             * multiply-high (vpmuludq on even and odd lanes), not the 64-bit product */
            const uint32_t a = c0[j], b = c2[j];
            const uint32_t hi0 = (uint32_t)(((uint64_t)DIPP_PHILOX_M0 * a) >> 32), lo0 = DIPP_PHILOX_M0 * a;
            const uint32_t hi1 = (uint32_t)(((uint64_t)DIPP_PHILOX_M1 * b) >> 32), lo1 = DIPP_PHILOX_M1 * b;
            c0[j] = hi1 ^ c1[j] ^ k0;
            c1[j] = lo1;
            c2[j] = hi0 ^ c3[j] ^ k1;
            c3[j] = lo0;
        }
        k0 += DIPP_PHILOX_W0;
        k1 += DIPP_PHILOX_W1;
    }
    for (int j = 0; j < DIPP_PHILOX_GROUP; ++j) {
        w[0][j] = c0[j];
        w[1][j] = c1[j];
        w[2][j] = c2[j];
        w[3][j] = c3[j];
    }
}

/* The group's values in element order, z[4 j + lane] for block first + j: normals (dipp_normal4) or
 * uniforms kept inside (0, 1) in dtype dt (dipp_uniform_in). */
DIPP_ALWAYS_INLINE void dipp_philox_values(uint64_t seed, uint64_t first, int normal, int dt,
                                           float z[4 * DIPP_PHILOX_GROUP]) {
    uint32_t w[4][DIPP_PHILOX_GROUP];
    float v[4][DIPP_PHILOX_GROUP];
    dipp_philox_group(seed, first, w);
    if (normal) {
        for (int j = 0; j < DIPP_PHILOX_GROUP; ++j) dipp_box_muller(w[0][j], w[1][j], &v[0][j], &v[1][j]);
        for (int j = 0; j < DIPP_PHILOX_GROUP; ++j) dipp_box_muller(w[2][j], w[3][j], &v[2][j], &v[3][j]);
    } else {
        for (int lane = 0; lane < 4; ++lane)
            for (int j = 0; j < DIPP_PHILOX_GROUP; ++j) v[lane][j] = dipp_uniform_in(dipp_uniform_open(w[lane][j]), dt);
    }
    for (int j = 0; j < DIPP_PHILOX_GROUP; ++j)
        for (int lane = 0; lane < 4; ++lane) z[4 * j + lane] = v[lane][j];
}

#endif /* DIPP_PHILOX_CPU_H */
