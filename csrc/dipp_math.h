/*
 * Per-element and per-sample math of DI++, shared verbatim by the CPU loops
 * (csrc/) and the CUDA kernels (cuda/). Every function is static inline and
 * marked host+device so that the CPU tests exercise the exact arithmetic the
 * GPU runs. Keep this header free of OpenMP, allocation and I/O.
 *
 * Floating-point contract: both backends build with FMA contraction off, so
 * a*b+c rounds twice everywhere and CPU/CUDA agree bit for bit on the
 * arithmetic below (libm calls such as logf/cosf may differ by an ulp).
 */
#ifndef DIPP_MATH_H
#define DIPP_MATH_H

#include <stdint.h>
#include <math.h>

#if defined(__CUDACC__)
#define DIPP_HD __host__ __device__ __forceinline__
#else
#define DIPP_HD static inline
#endif

/* ---------------------------------------------------------------- dtypes */

/* float <-> bits without type punning through pointers (valid in C and CUDA). */
DIPP_HD uint32_t dipp_f32_bits(float f) {
    union { float f; uint32_t u; } v;
    v.f = f;
    return v.u;
}

DIPP_HD float dipp_bits_f32(uint32_t u) {
    union { float f; uint32_t u; } v;
    v.u = u;
    return v.f;
}

/* The low 32 bits of a double's representation. */
DIPP_HD uint32_t dipp_f64_low_bits(double d) {
    union { double d; uint64_t u; } v;
    v.d = d;
    return (uint32_t)v.u;
}

DIPP_HD float dipp_bf16_to_f32(uint16_t h) { return dipp_bits_f32((uint32_t)h << 16); }

/* Round to nearest even; NaN stays a (quiet) NaN instead of rounding to Inf.
 * Written as a select, not a branch, so CPU loops vectorise. */
DIPP_HD uint16_t dipp_f32_to_bf16(float f) {
    uint32_t u = dipp_f32_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x0040u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? quiet_nan : rounded);
}

DIPP_HD float dipp_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) return dipp_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp != 0) return dipp_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
    /* subnormal half: value = man * 2^-24, exact in float */
    float mag = (float)man * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
}

/* IEEE binary16 with round to nearest even, overflow to Inf, NaN kept. */
DIPP_HD uint16_t dipp_f32_to_f16(float f) {
    uint32_t u = dipp_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t absu = u & 0x7fffffffu;
    if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
    if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (absu < 0x38800000u) {
        /* result is subnormal or zero: scale to units of 2^-24 and round */
        if (absu < 0x33000000u) return sign; /* below half of the smallest subnormal */
        uint32_t exp = absu >> 23;
        uint32_t man = (absu & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - exp; /* 14..24 */
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1u);
        uint32_t mid = 1u << (shift - 1u);
        if (rem > mid || (rem == mid && (half & 1u))) half += 1u;
        return (uint16_t)(sign | half);
    }
    uint32_t rounded = absu + 0xfffu + ((absu >> 13) & 1u);
    return (uint16_t)(sign | (((rounded >> 13) - (112u << 10)) & 0x7fffu));
}

/* dtype codes shared with the public header */
enum { DIPP_DT_F32 = 0, DIPP_DT_F16 = 1, DIPP_DT_BF16 = 2 };

DIPP_HD float dipp_load(const void *base, int64_t i, int dtype) {
    if (dtype == DIPP_DT_F32) return ((const float *)base)[i];
    if (dtype == DIPP_DT_BF16) return dipp_bf16_to_f32(((const uint16_t *)base)[i]);
    return dipp_f16_to_f32(((const uint16_t *)base)[i]);
}

DIPP_HD void dipp_store(void *base, int64_t i, int dtype, float v) {
    if (dtype == DIPP_DT_F32) ((float *)base)[i] = v;
    else if (dtype == DIPP_DT_BF16) ((uint16_t *)base)[i] = dipp_f32_to_bf16(v);
    else ((uint16_t *)base)[i] = dipp_f32_to_f16(v);
}

DIPP_HD int dipp_is_finite(float v) { return (dipp_f32_bits(v) & 0x7f800000u) != 0x7f800000u; }

/* dipp_store, returning whether the stored value is finite: a finite float32 result can
 * still overflow to Inf in float16 (above 65504) or bfloat16, and the non-finite
 * diagnostics must count what the caller reads back, not the float32 intermediate. */
DIPP_HD int dipp_store_finite(void *base, int64_t i, int dtype, float v) {
    if (dtype == DIPP_DT_F32) {
        ((float *)base)[i] = v;
        return dipp_is_finite(v);
    }
    uint16_t h = dtype == DIPP_DT_BF16 ? dipp_f32_to_bf16(v) : dipp_f32_to_f16(v);
    ((uint16_t *)base)[i] = h;
    uint16_t exp_mask = dtype == DIPP_DT_BF16 ? 0x7f80u : 0x7c00u;
    return (h & exp_mask) != exp_mask;
}

/* ---------------------------------------------------------------- Philox */

#define DIPP_PHILOX_M0 0xD2511F53u
#define DIPP_PHILOX_M1 0xCD9E8D57u
#define DIPP_PHILOX_W0 0x9E3779B9u
#define DIPP_PHILOX_W1 0xBB67AE85u

DIPP_HD void dipp_mulhilo32(uint32_t a, uint32_t b, uint32_t *hi, uint32_t *lo) {
    uint64_t p = (uint64_t)a * (uint64_t)b;
    *hi = (uint32_t)(p >> 32);
    *lo = (uint32_t)p;
}

/* Philox4x32 with 10 rounds (Salmon et al. 2011, Random123). */
DIPP_HD void dipp_philox4x32_10(const uint32_t ctr_in[4], const uint32_t key_in[2], uint32_t out[4]) {
    uint32_t c0 = ctr_in[0], c1 = ctr_in[1], c2 = ctr_in[2], c3 = ctr_in[3];
    uint32_t k0 = key_in[0], k1 = key_in[1];
    for (int round = 0; round < 10; ++round) {
        uint32_t hi0, lo0, hi1, lo1;
        dipp_mulhilo32(DIPP_PHILOX_M0, c0, &hi0, &lo0);
        dipp_mulhilo32(DIPP_PHILOX_M1, c2, &hi1, &lo1);
        uint32_t n0 = hi1 ^ c1 ^ k0;
        uint32_t n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
        k0 += DIPP_PHILOX_W0;
        k1 += DIPP_PHILOX_W1;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/*
 * The stream of a (seed, offset) pair: element i of a fill is lane i % 4 of
 * block (offset + i / 4), block number in counter words 0-1, seed in the key.
 * The map depends on i alone, never on threads or launch shape.
 */
DIPP_HD void dipp_philox_block(uint64_t seed, uint64_t block, uint32_t out[4]) {
    uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), 0u, 0u};
    uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    dipp_philox4x32_10(ctr, key, out);
}

/* Top 23 bits, centred in their cell: k + 0.5 with k < 2^23 is exact in float,
 * so u is exactly ((bits >> 9) + 0.5) / 2^23, strictly inside (0, 1). */
DIPP_HD float dipp_uniform_open(uint32_t bits) {
    return ((float)(bits >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

/* A uniform of dipp_uniform_open kept inside (0, 1) once stored in `dtype`. The float32
 * value can lie within half a spacing of 1 in float16 (spacing 2^-11 below 1) or bfloat16
 * (2^-8), where rounding to nearest would give exactly 1.0, so it is clamped to the
 * dtype's largest value below 1; that top value then also takes the draws that would have
 * rounded to 1 (probability 2^-12 in float16, 2^-9 in bfloat16). The lower end needs no
 * clamp in practice, the smallest draw 2^-24 being float16's smallest subnormal, but
 * the bound is kept explicit so that no dtype can ever produce 0. */
#define DIPP_UNIFORM_MIN 5.9604644775390625e-08f  /* 2^-24 */
#define DIPP_F32_BELOW_ONE 0.999999940395355225f  /* 1 - 2^-24 */
#define DIPP_F16_BELOW_ONE 0.99951171875f         /* 1 - 2^-11 */
#define DIPP_BF16_BELOW_ONE 0.99609375f           /* 1 - 2^-8 */

DIPP_HD float dipp_uniform_in(float u, int dtype) {
    float hi = dtype == DIPP_DT_F16    ? DIPP_F16_BELOW_ONE
               : dtype == DIPP_DT_BF16 ? DIPP_BF16_BELOW_ONE
                                       : DIPP_F32_BELOW_ONE;
    return u < DIPP_UNIFORM_MIN ? DIPP_UNIFORM_MIN : (u > hi ? hi : u);
}

#define DIPP_TWO_PI_F 6.28318530717958647692f

/*
 * Box-Muller's logarithm, sine and cosine, correctly rounded to float on their whole input range
 * (2^23 values each: u = (k + 1/2) 2^-23 and its float product with 2 pi), checked exhaustively
 * against long double in tests/c. Evaluated in double with +, -, *, / and bit operations only (no
 * libm, no branch): bit-identical on the CPU, vectorised there, and on CUDA (FMA contraction off),
 * and independent of the C library (glibc's logf/sinf/cosf are not correctly rounded: 61,192,
 * 108,552 and 108,902 of those inputs come out one ulp off, and differ between its FMA and
 * non-FMA variants).
 */
#define DIPP_LN2_HI 0x1.62e42fefa3800p-1  /* ln 2 to 42 bits: e * DIPP_LN2_HI is exact */
#define DIPP_LN2_LO 0x1.ef35793c76730p-45
#define DIPP_PIO2_1 0x1.921fb54400000p+0  /* pi/2 in three parts of 33, 33 and 53 bits */
#define DIPP_PIO2_2 0x1.0b4611a600000p-34
#define DIPP_PIO2_3 0x1.3198a2e037073p-69
#define DIPP_TWO_OVER_PI 0x1.45f306dc9c883p-1
#define DIPP_ROUND_MAGIC 0x1.8p52         /* x + 1.5 2^52 - 1.5 2^52 rounds |x| < 2^51 to an integer */

/* ln u for a normal float u > 0 below 2: u = 2^e m with m in [sqrt(1/2), sqrt(2)], ln m = 2 atanh(s),
 * s = (m - 1)/(m + 1), |s| < 0.172, the series to s^21 (truncation below 2^-60 relative). */
DIPP_HD float dipp_log_unit(float u) {
    uint32_t ix = dipp_f32_bits(u);
    uint32_t mb = (ix & 0x7fffffu) | 0x3f800000u;
    int32_t big = mb > 0x3fb504f3u ? 1 : 0; /* m > sqrt(2): halve it */
    int32_t e = (int32_t)(ix >> 23) - 127 + big;
    double m = (double)dipp_bits_f32(mb - (uint32_t)big * 0x00800000u);
    double s = (m - 1.0) / (m + 1.0), s2 = s * s;
    double p = 1.0 / 21.0;
    p = p * s2 + 1.0 / 19.0;
    p = p * s2 + 1.0 / 17.0;
    p = p * s2 + 1.0 / 15.0;
    p = p * s2 + 1.0 / 13.0;
    p = p * s2 + 1.0 / 11.0;
    p = p * s2 + 1.0 / 9.0;
    p = p * s2 + 1.0 / 7.0;
    p = p * s2 + 1.0 / 5.0;
    p = p * s2 + 1.0 / 3.0;
    double ed = (double)e;
    double log_m = 2.0 * s + 2.0 * s * (s2 * p);
    return (float)(ed * DIPP_LN2_HI + (log_m + ed * DIPP_LN2_LO));
}

/* sin and cos of a float angle in [0, 2 pi] (Box-Muller's): q = nearest integer of 2x/pi, r = x - q pi/2 in three
 * steps (the first two exact), Taylor polynomials on |r| <= pi/4 (to r^19 and r^18), quadrant q mod 4. */
DIPP_HD void dipp_sincos(float angle, float *sin_out, float *cos_out) {
    double x = (double)angle;
    double t = x * DIPP_TWO_OVER_PI + DIPP_ROUND_MAGIC;
    uint32_t q = (uint32_t)(dipp_f64_low_bits(t) & 3u);
    double qd = t - DIPP_ROUND_MAGIC;
    double r = ((x - qd * DIPP_PIO2_1) - qd * DIPP_PIO2_2) - qd * DIPP_PIO2_3;
    double r2 = r * r;
    double ps = -1.0 / 121645100408832000.0;            /* -1/19! */
    ps = ps * r2 + 1.0 / 355687428096000.0;             /* 1/17! */
    ps = ps * r2 - 1.0 / 1307674368000.0;               /* 1/15! */
    ps = ps * r2 + 1.0 / 6227020800.0;                  /* 1/13! */
    ps = ps * r2 - 1.0 / 39916800.0;                    /* 1/11! */
    ps = ps * r2 + 1.0 / 362880.0;                      /* 1/9! */
    ps = ps * r2 - 1.0 / 5040.0;                        /* 1/7! */
    ps = ps * r2 + 1.0 / 120.0;                         /* 1/5! */
    ps = ps * r2 - 1.0 / 6.0;                           /* 1/3! */
    double pc = 1.0 / 6402373705728000.0;               /* 1/18! */
    pc = pc * r2 - 1.0 / 20922789888000.0;              /* 1/16! */
    pc = pc * r2 + 1.0 / 87178291200.0;                 /* 1/14! */
    pc = pc * r2 - 1.0 / 479001600.0;                   /* 1/12! */
    pc = pc * r2 + 1.0 / 3628800.0;                     /* 1/10! */
    pc = pc * r2 - 1.0 / 40320.0;                       /* 1/8! */
    pc = pc * r2 + 1.0 / 720.0;                         /* 1/6! */
    pc = pc * r2 - 1.0 / 24.0;                          /* 1/4! */
    double sr = r + r * (r2 * ps);
    double cr = 1.0 - 0.5 * r2 - r2 * (r2 * pc);
    double sv = (q & 1u) ? cr : sr, cv = (q & 1u) ? sr : cr;
    *sin_out = (float)((q & 2u) ? -sv : sv);
    *cos_out = (float)(((q + 1u) & 2u) ? -cv : cv);
}

/* Box-Muller on one pair of uniforms' bits: z0 = rho cos(theta), z1 = rho sin(theta). */
DIPP_HD void dipp_box_muller(uint32_t bits_u1, uint32_t bits_u2, float *z0, float *z1) {
    float radius = sqrtf(-2.0f * dipp_log_unit(dipp_uniform_open(bits_u1)));
    float s, c;
    dipp_sincos(DIPP_TWO_PI_F * dipp_uniform_open(bits_u2), &s, &c);
    *z0 = radius * c;
    *z1 = radius * s;
}

/* Box-Muller on lanes (0,1) and (2,3) of one Philox block: four normals. */
DIPP_HD void dipp_normal4(const uint32_t bits[4], float z[4]) {
    dipp_box_muller(bits[0], bits[1], &z[0], &z[1]);
    dipp_box_muller(bits[2], bits[3], &z[2], &z[3]);
}

/* Single normal of element index i (used for per-sample draws such as sigma). */
DIPP_HD float dipp_normal_at(uint64_t seed, uint64_t offset, uint64_t i) {
    uint32_t bits[4];
    float z[4];
    dipp_philox_block(seed, offset + i / 4u, bits);
    dipp_normal4(bits, z);
    return z[i % 4u];
}

/* ---------------------------------------------------------------- sigma */

DIPP_HD float dipp_lognormal_sigma(float normal, float p_mean, float p_std, float sigma_min, float sigma_max) {
    float s = expf(p_mean + p_std * normal);
    return s < sigma_min ? sigma_min : (s > sigma_max ? sigma_max : s);
}

/* Nearest entry of an ascending table (ties go to the lower index). */
DIPP_HD int64_t dipp_nearest_index(const float *table, int64_t n, float x) {
    int64_t lo = 0, hi = n - 1;
    if (x <= table[0]) return 0;
    if (x >= table[hi]) return hi;
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        if (table[mid] <= x) lo = mid; else hi = mid;
    }
    return (x - table[lo] <= table[hi] - x) ? lo : hi;
}

/* EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2. */
DIPP_HD float dipp_edm_lambda(float sigma, float sigma_data) {
    float s2 = sigma * sigma, d2 = sigma_data * sigma_data;
    return (s2 + d2) / (s2 * d2);
}

/* Preconditioning D = c_skip x + c_out F(c_in x, c_noise), plus the loss weight.
 * EDM: c_noise = ln(sigma)/4. eps/v (VP) models: c_noise is sigma itself, the
 * network's timestep comes from the table index; sigma_data is 1 for them. */
typedef struct {
    float c_skip, c_out, c_in, c_noise, weight;
} dipp_precond_t;

DIPP_HD dipp_precond_t dipp_precond_edm(float sigma, float sigma_data) {
    dipp_precond_t p;
    float s2 = sigma * sigma, d2 = sigma_data * sigma_data;
    float root = sqrtf(s2 + d2);
    p.c_skip = d2 / (s2 + d2);
    p.c_out = sigma * sigma_data / root;
    p.c_in = 1.0f / root;
    p.c_noise = 0.25f * logf(sigma);
    p.weight = dipp_edm_lambda(sigma, sigma_data);
    return p;
}

DIPP_HD dipp_precond_t dipp_precond_vp(float sigma, int v_prediction) {
    dipp_precond_t p;
    float s2 = sigma * sigma;
    float root = sqrtf(s2 + 1.0f);
    p.c_skip = v_prediction ? 1.0f / (s2 + 1.0f) : 1.0f;
    p.c_out = v_prediction ? -sigma / root : -sigma;
    p.c_in = 1.0f / root;
    p.c_noise = sigma;
    p.weight = dipp_edm_lambda(sigma, 1.0f);
    return p;
}

/* ---------------------------------------------------------------- element-wise terms */

DIPP_HD float dipp_noise_ve(float x0, float sigma, float eps) { return x0 + sigma * eps; }

DIPP_HD float dipp_noise_flow(float x0, float sigma, float eps) { return (1.0f - sigma) * x0 + sigma * eps; }

/* omega = 1 means no guidance. */
DIPP_HD float dipp_cfg(float uncond, float cond, float omega) { return uncond + omega * (cond - uncond); }

/* d(loss_b)/d(D_TA) for loss_b = weight * scale * sum (D_TA - x0)^2, divided by batch. */
DIPP_HD float dipp_ta_grad(float d_ta, float x0, float weight_over_batch) {
    return 2.0f * weight_over_batch * (d_ta - x0);
}

/* G = (W_b (D_TA - D_ref^w) - alpha dr/dx0) / B, with w_over_b = W_b / B, a_over_b = alpha / B. */
DIPP_HD float dipp_generator_grad(float d_ta, float d_ref, float dr, float w_over_b, float a_over_b) {
    return w_over_b * (d_ta - d_ref) - a_over_b * dr;
}

/*
 * DI* pseudo-Huber pieces, per element, given the per-sample reductions:
 * y = (D_p - D_q)/sigma^2, r = (D_q - x0)/sigma^2, h = sqrt(|y|^2 + c^2),
 * d'(y) = y/h, d''(y) r = (r - y (y.r)/h^2)/h, a = d' + d'' r, b = d'' r.
 */
DIPP_HD void dipp_huber_vectors(float y, float r, float inv_h, float yr_over_h2, float *a, float *b, float *dprime) {
    float dp = y * inv_h;
    float ddr = (r - y * yr_over_h2) * inv_h;
    *dprime = dp;
    *b = ddr;
    *a = dp + ddr;
}

/* ---------------------------------------------------------------- per-sample scalars */
/* Both backends derive per-sample factors from the double-precision sums with
 * these functions, so the factors agree bit for bit. */

DIPP_HD float dipp_mean_from_sum(double sum, int64_t n) { return (float)(sum / (double)n); }

/* TA: lambda(sigma) ("edm") or 1 ("unit"); weighting codes as in dipp.h. */
DIPP_HD float dipp_ta_weight(float sigma, int edm, float sigma_data) {
    return edm ? dipp_edm_lambda(sigma, sigma_data) : 1.0f;
}

/* Generator: W_b = 1 / max(mean |x0 - D_ref|, floor) ("normalized") or 1 ("unit"). */
DIPP_HD float dipp_generator_weight(float mean_ref_dist, int normalized, float floor_value) {
    if (!normalized) return 1.0f;
    float d = mean_ref_dist > floor_value ? mean_ref_dist : floor_value;
    if (mean_ref_dist != mean_ref_dist) d = mean_ref_dist; /* NaN propagates */
    return 1.0f / d;
}

/* y and r of DI* at one element (score units). */
DIPP_HD void dipp_huber_y_r(float d_p, float d_q, float x0, float inv_sigma2, float *y, float *r) {
    *y = (d_p - d_q) * inv_sigma2;
    *r = (d_q - x0) * inv_sigma2;
}

/* TA gradient factor: weight * (1/N if averaging over elements) / batch. */
DIPP_HD float dipp_ta_grad_factor(float weight, int64_t per_sample, int64_t batch, int mean_over_elements) {
    double scale = mean_over_elements ? 1.0 / (double)per_sample : 1.0;
    return (float)((double)weight * scale / (double)batch);
}

DIPP_HD float dipp_ta_sample_loss(float weight, double sum_sq, int64_t per_sample, int mean_over_elements) {
    double scale = mean_over_elements ? 1.0 / (double)per_sample : 1.0;
    return (float)((double)weight * scale * sum_sq);
}

/* DI* per-sample factors from |y|^2 and y.r (see dipp_huber_args). */
typedef struct {
    float h, inv_h, yr_over_h2, value, scale;
} dipp_huber_sample_t;

DIPP_HD dipp_huber_sample_t dipp_huber_sample(double ysq, double yr, float c, float sigma, int sigma2_weight,
                                              int64_t batch) {
    dipp_huber_sample_t s;
    double h = sqrt(ysq + (double)c * (double)c);
    float w = sigma2_weight ? sigma * sigma : 1.0f;
    s.h = (float)h;
    s.inv_h = (float)(1.0 / h);
    s.yr_over_h2 = (float)(yr / (h * h));
    s.value = (float)((double)w * (h - (double)c));
    s.scale = (float)((double)w / ((double)sigma * (double)sigma * (double)batch));
    return s;
}

/* Fold DIPP_RED_LANES partial sums in the order of a warp's shuffle-down tree. */
DIPP_HD float dipp_fold_lanes32(float lanes[32]) {
    for (int width = 16; width > 0; width >>= 1)
        for (int lane = 0; lane < width; ++lane) lanes[lane] = lanes[lane] + lanes[lane + width];
    return lanes[0];
}

/* ---------------------------------------------------------------- optimiser */

/* ema <- decay ema + (1 - decay) value; one_minus_decay comes from dipp_one_minus. */
DIPP_HD float dipp_ema(float ema, float value, float decay, float one_minus_decay) {
    return decay * ema + one_minus_decay * value;
}

/* 1 - x formed in double, as Python forms it before torch sees a float scalar. */
DIPP_HD float dipp_one_minus(double x) { return (float)(1.0 - x); }

/* Per-step Adam constants, derived on the host in double like torch.optim.Adam. */
typedef struct {
    float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, step_size, bc2_sqrt;
    float decay_factor; /* AdamW: 1 - lr * weight_decay */
    int decoupled;
} dipp_adam_consts;

DIPP_HD dipp_adam_consts dipp_adam_prepare(double lr, double beta1, double beta2, double eps, double weight_decay,
                                           int decoupled, int64_t step) {
    dipp_adam_consts c;
    double bc1 = 1.0 - pow(beta1, (double)step);
    double bc2 = 1.0 - pow(beta2, (double)step);
    c.lr = (float)lr;
    c.beta1 = (float)beta1;
    c.beta2 = (float)beta2;
    c.one_minus_beta1 = dipp_one_minus(beta1);
    c.one_minus_beta2 = dipp_one_minus(beta2);
    c.eps = (float)eps;
    c.weight_decay = (float)weight_decay;
    c.step_size = (float)(lr / bc1);
    c.bc2_sqrt = (float)sqrt(bc2);
    c.decay_factor = (float)(1.0 - lr * weight_decay);
    c.decoupled = decoupled;
    return c;
}

/* How weight decay enters an Adam step; chosen once per call, not per element. */
enum { DIPP_WD_NONE = 0, DIPP_WD_L2 = 1, DIPP_WD_DECOUPLED = 2 };

DIPP_HD int dipp_adam_wd_mode(const dipp_adam_consts *c) {
    if (c->weight_decay == 0.0f) return DIPP_WD_NONE;
    return c->decoupled ? DIPP_WD_DECOUPLED : DIPP_WD_L2;
}

/* The first moment: none (beta1 = 0 and no state kept: m = grad), or torch's lerp,
 * which takes its first form for weights below 0.5. */
enum { DIPP_M_NONE = 0, DIPP_M_LERP_SMALL = 1, DIPP_M_LERP_LARGE = 2 };

DIPP_HD int dipp_adam_m_mode(const dipp_adam_consts *c, int has_exp_avg) {
    if (!has_exp_avg) return DIPP_M_NONE;
    return c->one_minus_beta1 < 0.5f ? DIPP_M_LERP_SMALL : DIPP_M_LERP_LARGE;
}

/* One Adam/AdamW element step in torch.optim.Adam's order of operations, with the
 * per-call choices passed in: CPU loops call it with constants so the compiler
 * removes the branches and vectorises every dtype instance. exp_avg is not
 * touched (and may be NULL) for DIPP_M_NONE: with beta1 = 0 torch's m equals the
 * gradient, so keeping it would only cost 8 bytes of traffic per element. */
DIPP_HD float dipp_adam_with(float param, float grad, float *exp_avg, float *exp_avg_sq, const dipp_adam_consts *c,
                             int wd_mode, int m_mode) {
    if (wd_mode == DIPP_WD_DECOUPLED) param = param * c->decay_factor;
    else if (wd_mode == DIPP_WD_L2) grad = grad + c->weight_decay * param;
    float w = c->one_minus_beta1, m = grad;
    if (m_mode == DIPP_M_LERP_SMALL) m = *exp_avg + w * (grad - *exp_avg);
    else if (m_mode == DIPP_M_LERP_LARGE) m = grad - (grad - *exp_avg) * (1.0f - w);
    float v = c->beta2 * *exp_avg_sq + c->one_minus_beta2 * grad * grad;
    if (m_mode != DIPP_M_NONE) *exp_avg = m;
    *exp_avg_sq = v;
    float denom = sqrtf(v) / c->bc2_sqrt + c->eps;
    return param - c->step_size * (m / denom);
}

/* exp_avg == NULL: no first-moment state (only valid with beta1 = 0). */
DIPP_HD float dipp_adam(float param, float grad, float *exp_avg, float *exp_avg_sq, const dipp_adam_consts *c) {
    return dipp_adam_with(param, grad, exp_avg, exp_avg_sq, c, dipp_adam_wd_mode(c),
                          dipp_adam_m_mode(c, exp_avg != 0));
}

#endif /* DIPP_MATH_H */
