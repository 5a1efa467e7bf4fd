/*
 * Standalone C11 tests of the DI++ core (the csrc/ sources), no Python involved.
 *
 * Every kernel is run on small inputs of several shapes (batch 1, per-sample
 * sizes that are not multiples of DIPP_RED_LANES or DIPP_RED_CHUNK, more than
 * one chunk) and compared with a computation written out here in double
 * precision from the formulas in dipp.h / dipp_math.h. Also: Random123
 * Philox4x32-10 known answers, float16/bfloat16 conversions at the special
 * values, and the sigma tables of PixArt (iddpm_linear) and SD1.5
 * (scaled_linear).
 *
 * Prints one line per failure and finally "N passed, M failed"; exits 1 when
 * anything failed. Built and run under valgrind by tests/c/run.sh.
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dipp.h"

/* ---------------------------------------------------------------- harness */

static int g_passed, g_failed;

__attribute__((format(printf, 3, 4))) static void check_at(int ok, int line, const char *format, ...) {
    if (ok) {
        ++g_passed;
        return;
    }
    ++g_failed;
    va_list args;
    va_start(args, format);
    printf("FAIL (test_core.c:%d): ", line);
    vprintf(format, args);
    printf("\n");
    va_end(args);
}

#define CHECK(cond, ...) check_at((cond) ? 1 : 0, __LINE__, __VA_ARGS__)

/* |got - want| <= atol + rtol |want|; NaN matches NaN, Inf matches the same Inf. */
static int near(double got, double want, double rtol, double atol) {
    if (isnan(want)) return isnan(got);
    if (isinf(want)) return got == want;
    return fabs(got - want) <= atol + rtol * fabs(want);
}

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static const char *dt_name(int dt) { return dt == DIPP_DT_F32 ? "f32" : dt == DIPP_DT_F16 ? "f16" : "bf16"; }
static size_t dt_size(int dt) { return dt == DIPP_DT_F32 ? 4 : 2; }

/* Relative tolerance of one rounding to the storage dtype (plus float32 arithmetic). */
static double dt_rtol(int dt) { return dt == DIPP_DT_F32 ? 2e-5 : dt == DIPP_DT_F16 ? 1.2e-3 : 9e-3; }

static const int DTYPES[3] = {DIPP_DT_F32, DIPP_DT_F16, DIPP_DT_BF16};

/* A buffer of n elements of dtype dt filled from f(i); returns it and, in exact[],
 * the values actually stored (after rounding to dt), for the hand computations. */
static void *make_input(int dt, int64_t n, double (*f)(int64_t, int), int salt, double *exact) {
    void *buf = xmalloc((size_t)n * dt_size(dt));
    for (int64_t i = 0; i < n; ++i) {
        dipp_store(buf, i, dt, (float)f(i, salt));
        exact[i] = dipp_load(buf, i, dt);
    }
    return buf;
}

/* Smooth, sign-changing test data, different per salt. */
static double wave(int64_t i, int salt) { return 0.75 * sin(0.37 * (double)i + 1.3 * salt) + 0.05 * salt; }

/* ---------------------------------------------------------------- reference Philox (hand-written) */

static void ref_philox(uint64_t seed, uint64_t block, uint32_t out[4]) {
    uint32_t c[4] = {(uint32_t)block, (uint32_t)(block >> 32), 0, 0};
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; ++r) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c[0], p1 = (uint64_t)0xCD9E8D57u * c[2];
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = (uint32_t)p1;
        c[2] = n2;
        c[3] = (uint32_t)p0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    memcpy(out, c, sizeof c);
}

/* u = ((bits >> 9) + 1/2) / 2^23: the top 23 bits, centred in their cell. */
static double ref_uniform(uint32_t bits) { return ((double)(bits >> 9) + 0.5) / 8388608.0; }

static double ref_bits_uniform(uint64_t seed, uint64_t offset, uint64_t i) {
    uint32_t w[4];
    ref_philox(seed, offset + i / 4, w);
    return ref_uniform(w[i % 4]);
}

/* Box-Muller on lane pairs (0,1), (2,3): even lane cos, odd lane sin. */
static double ref_normal(uint64_t seed, uint64_t offset, uint64_t i) {
    uint32_t w[4];
    ref_philox(seed, offset + i / 4, w);
    int lane = (int)(i % 4), pair = lane / 2;
    double u1 = ref_uniform(w[2 * pair]), u2 = ref_uniform(w[2 * pair + 1]);
    double radius = sqrt(-2.0 * log(u1)), angle = 2.0 * 3.14159265358979323846 * u2;
    return lane % 2 ? radius * sin(angle) : radius * cos(angle);
}

/* ---------------------------------------------------------------- Philox known answers */

static void test_philox(void) {
    static const uint32_t ctr[3][4] = {{0, 0, 0, 0},
                                       {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
                                       {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}};
    static const uint32_t key[3][2] = {{0, 0}, {0xffffffffu, 0xffffffffu}, {0xa4093822u, 0x299f31d0u}};
    static const uint32_t want[3][4] = {{0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
                                        {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu},
                                        {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}};
    for (int v = 0; v < 3; ++v) {
        uint32_t out[4];
        dipp_philox4x32_10(ctr[v], key[v], out);
        CHECK(memcmp(out, want[v], sizeof out) == 0, "Philox KAT %d: got %08x %08x %08x %08x", v, out[0], out[1],
              out[2], out[3]);
    }
    /* the stream layout: block number in counter words 0-1, seed in the key */
    uint32_t out[4], ref[4];
    dipp_philox_block(0, 0, out);
    CHECK(memcmp(out, want[0], sizeof out) == 0, "dipp_philox_block(0, 0) is the counter-0 key-0 KAT");
    dipp_philox_block(0x0123456789abcdefull, 0xfedcba9876543210ull, out);
    ref_philox(0x0123456789abcdefull, 0xfedcba9876543210ull, ref);
    CHECK(memcmp(out, ref, sizeof out) == 0, "dipp_philox_block splits 64-bit seed and block into 32-bit words");
}

/* ---------------------------------------------------------------- float16 / bfloat16 */

static float f32_of(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void test_half_conversions(void) {
    struct {
        float in;
        uint16_t want;
        const char *what;
    } f16[] = {
        {0.0f, 0x0000, "0"},
        {-0.0f, 0x8000, "-0"},
        {1.0f, 0x3c00, "1"},
        {-2.0f, 0xc000, "-2"},
        {65504.0f, 0x7bff, "65504 (max)"},
        {65519.99f, 0x7bff, "65519.99 rounds down to 65504"},
        {65520.0f, 0x7c00, "65520 ties to even: Inf"},
        {-65520.0f, 0xfc00, "-65520 -> -Inf"},
        {1e10f, 0x7c00, "1e10 overflows to Inf"},
        {INFINITY, 0x7c00, "Inf"},
        {-INFINITY, 0xfc00, "-Inf"},
        {5.9604644775390625e-08f, 0x0001, "2^-24 (smallest subnormal)"},
        {-5.9604644775390625e-08f, 0x8001, "-2^-24"},
        {6.097555160522461e-05f, 0x03ff, "largest subnormal"},
        {6.103515625e-05f, 0x0400, "2^-14 (smallest normal)"},
        {2.98023223876953125e-08f, 0x0000, "2^-25 ties to even: 0"},
        {4.470348358154297e-08f, 0x0001, "1.5 * 2^-25 rounds up to 2^-24"},
        {8.940696716308594e-08f, 0x0002, "1.5 * 2^-24 ties to even: 2 * 2^-24"},
        {1.00048828125f, 0x3c00, "1 + 2^-11 ties to even: 1"},
        {1.00146484375f, 0x3c02, "1 + 3 * 2^-11 ties to even: 1 + 2^-9"},
        {1e-9f, 0x0000, "1e-9 underflows to 0"},
    };
    for (size_t k = 0; k < sizeof f16 / sizeof f16[0]; ++k) {
        uint16_t got = dipp_f32_to_f16(f16[k].in);
        CHECK(got == f16[k].want, "f32->f16 %s: got 0x%04x want 0x%04x", f16[k].what, got, f16[k].want);
    }
    uint16_t nan16 = dipp_f32_to_f16(NAN);
    CHECK((nan16 & 0x7c00) == 0x7c00 && (nan16 & 0x03ff) != 0, "f32->f16 NaN stays NaN (got 0x%04x)", nan16);
    uint16_t snan16 = dipp_f32_to_f16(f32_of(0x7f800001u));
    CHECK((snan16 & 0x7c00) == 0x7c00 && (snan16 & 0x03ff) != 0, "f32->f16 NaN with a low payload stays NaN");
    CHECK(isnan(dipp_f16_to_f32(0x7e00)) && isnan(dipp_f16_to_f32(0xfc01)), "f16->f32 NaN");
    CHECK(dipp_f16_to_f32(0x7c00) == INFINITY && dipp_f16_to_f32(0xfc00) == -INFINITY, "f16->f32 Inf");
    CHECK(dipp_f16_to_f32(0x0001) == 5.9604644775390625e-08f, "f16->f32 smallest subnormal");
    CHECK(dipp_f16_to_f32(0x7bff) == 65504.0f, "f16->f32 65504");
    CHECK(signbit(dipp_f16_to_f32(0x8000)) && dipp_f16_to_f32(0x8000) == 0.0f, "f16->f32 -0 keeps its sign");

    /* every non-NaN half survives f16 -> f32 -> f16; every NaN stays NaN */
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000u; ++h) {
        float f = dipp_f16_to_f32((uint16_t)h);
        uint16_t back = dipp_f32_to_f16(f);
        int is_nan = (h & 0x7c00u) == 0x7c00u && (h & 0x03ffu);
        if (is_nan ? !(isnan(f) && (back & 0x7c00u) == 0x7c00u && (back & 0x03ffu)) : back != h) ++bad;
    }
    CHECK(bad == 0, "f16 round trip over all 65536 patterns: %d mismatches", bad);

    struct {
        uint32_t in;
        uint16_t want;
        const char *what;
    } bf16[] = {
        {0x00000000u, 0x0000, "0"},
        {0x80000000u, 0x8000, "-0"},
        {0x3f800000u, 0x3f80, "1"},
        {0x3f808000u, 0x3f80, "1 + 2^-8 ties to even: 1"},
        {0x3f818000u, 0x3f82, "1 + 3 * 2^-8 ties to even: up"},
        {0x3f808001u, 0x3f81, "just above the tie rounds up"},
        {0x3f807fffu, 0x3f80, "just below the tie rounds down"},
        {0x7f7fffffu, 0x7f80, "FLT_MAX rounds to Inf"},
        {0x7f800000u, 0x7f80, "Inf"},
        {0xff800000u, 0xff80, "-Inf"},
        {0x00000001u, 0x0000, "smallest f32 subnormal -> 0"},
        {0x00008000u, 0x0000, "subnormal tie to even: 0"},
        {0x00018000u, 0x0002, "subnormal tie to even: up"},
        {0x00010000u, 0x0001, "smallest bf16 subnormal"},
    };
    for (size_t k = 0; k < sizeof bf16 / sizeof bf16[0]; ++k) {
        uint16_t got = dipp_f32_to_bf16(f32_of(bf16[k].in));
        CHECK(got == bf16[k].want, "f32->bf16 %s: got 0x%04x want 0x%04x", bf16[k].what, got, bf16[k].want);
    }
    uint16_t nanb = dipp_f32_to_bf16(f32_of(0x7f800001u));
    CHECK((nanb & 0x7f80) == 0x7f80 && (nanb & 0x007f) != 0, "f32->bf16 NaN with a low payload stays NaN (0x%04x)",
          nanb);
    CHECK(isnan(dipp_bf16_to_f32(0x7fc0)) && dipp_bf16_to_f32(0xff80) == -INFINITY, "bf16->f32 NaN, -Inf");
    bad = 0;
    for (uint32_t h = 0; h < 0x10000u; ++h) {
        float f = dipp_bf16_to_f32((uint16_t)h);
        int is_nan = (h & 0x7f80u) == 0x7f80u && (h & 0x007fu);
        uint16_t back = dipp_f32_to_bf16(f);
        if (is_nan ? (!isnan(f) || !isnan(dipp_bf16_to_f32(back))) : back != h) ++bad;
    }
    CHECK(bad == 0, "bf16 round trip over all 65536 patterns: %d mismatches", bad);

    /* dipp_load / dipp_store dispatch on the dtype code */
    uint16_t h16[1];
    float f1[1];
    dipp_store(h16, 0, DIPP_DT_F16, 0.5f);
    dipp_store(f1, 0, DIPP_DT_F32, 0.1f);
    CHECK(h16[0] == 0x3800 && dipp_load(h16, 0, DIPP_DT_F16) == 0.5f && f1[0] == 0.1f, "dipp_load/dipp_store f16, f32");
    dipp_store(h16, 0, DIPP_DT_BF16, -3.0f);
    CHECK(h16[0] == 0xc040 && dipp_load(h16, 0, DIPP_DT_BF16) == -3.0f, "dipp_load/dipp_store bf16");
    CHECK(!dipp_is_finite(NAN) && !dipp_is_finite(-INFINITY) && dipp_is_finite(-0.0f) && dipp_is_finite(3e38f),
          "dipp_is_finite");
}

/* ---------------------------------------------------------------- sigma tables */

static void test_sigma_tables(void) {
    double *t = xmalloc(1000 * sizeof(double));
    CHECK(dipp_table_iddpm_linear(t, 1000, 1e-4, 0.02, 1e-3) == DIPP_OK, "iddpm_linear status");
    CHECK(fabs(t[0] - 0.0100) < 5e-5, "iddpm_linear sigma(t=0) = %.6f, want 0.0100", t[0]);
    CHECK(fabs(t[999] - 156.6155) < 5e-5, "iddpm_linear sigma(t=999) = %.6f, want 156.6155", t[999]);
    int ascending = 1;
    for (int i = 1; i < 1000; ++i) ascending &= t[i] > t[i - 1] && isfinite(t[i]);
    CHECK(ascending, "iddpm_linear is finite and strictly ascending");
    /* t = 0 entry by hand: u = sqrt(1 / (1 - beta_start) - 1) */
    CHECK(near(t[0], sqrt(1.0 / (1.0 - 1e-4) - 1.0), 1e-12, 0), "iddpm_linear t=0 by hand");

    CHECK(dipp_table_scaled_linear(t, 1000, 0.00085, 0.012) == DIPP_OK, "scaled_linear status");
    CHECK(fabs(t[0] - 0.0292) < 5e-5, "scaled_linear sigma(t=0) = %.6f, want 0.0292", t[0]);
    CHECK(fabs(t[999] - 14.6146) < 5e-5, "scaled_linear sigma(t=999) = %.6f, want 14.6146", t[999]);
    CHECK(fabs(t[625] - 2.5017) < 5e-5, "scaled_linear sigma(t=625) = %.6f, want 2.5017", t[625]);
    /* by hand: alpha_bar_t = prod (1 - beta_s), beta_s = (sqrt(b0) + s/999 (sqrt(b1) - sqrt(b0)))^2 */
    double abar = 1.0;
    for (int s = 0; s <= 625; ++s) {
        double root = sqrt(0.00085) + (sqrt(0.012) - sqrt(0.00085)) * s / 999.0;
        abar *= 1.0 - root * root;
    }
    CHECK(near(t[625], sqrt((1.0 - abar) / abar), 1e-12, 0), "scaled_linear t=625 by hand");

    CHECK(dipp_table_scaled_linear(t, 1, 0.00085, 0.012) == DIPP_ERR_ARGUMENT, "scaled_linear rejects steps=1");
    CHECK(dipp_table_iddpm_linear(NULL, 10, 1e-4, 0.02, 1e-3) == DIPP_ERR_ARGUMENT, "iddpm_linear rejects NULL");
    free(t);
}

/* ---------------------------------------------------------------- fills */

static const int64_t FILL_SIZES[] = {1, 3, 4, 5, 31, 33, 1023, 1024, 1025, 2500};
#define NFILL (sizeof FILL_SIZES / sizeof FILL_SIZES[0])

static void test_fills(void) {
    const uint64_t seeds[2] = {0, 0x0123456789abcdefull}, offsets[2] = {0, 7};
    for (int normal = 0; normal < 2; ++normal)
        for (size_t s = 0; s < NFILL; ++s)
            for (int d = 0; d < 3; ++d) {
                int dt = DTYPES[d];
                int64_t n = FILL_SIZES[s];
                uint64_t seed = seeds[s % 2], offset = offsets[(s / 2) % 2];
                void *out = xmalloc((size_t)n * dt_size(dt));
                dipp_fill_args a = {.out = out, .dtype = dt, .n = n, .seed = seed, .offset = offset};
                dipp_status st = normal ? dipp_cpu_fill_normal(&a) : dipp_cpu_fill_uniform(&a);
                double worst = 0;
                int ok = st == DIPP_OK, inside = 1;
                for (int64_t i = 0; i < n; ++i) {
                    double got = dipp_load(out, i, dt);
                    double want = normal ? ref_normal(seed, offset, (uint64_t)i) : ref_bits_uniform(seed, offset, i);
                    double tol = normal ? (dt == DIPP_DT_F32 ? 1e-5 * (1 + fabs(want)) : dt_rtol(dt) * (1 + fabs(want)))
                                        : (dt == DIPP_DT_F32 ? 0.0 : dt_rtol(dt) * want + 6e-8);
                    if (!(fabs(got - want) <= tol)) ok = 0;
                    if (fabs(got - want) > worst) worst = fabs(got - want);
                    if (!normal && !(got > 0.0 && got < 1.0)) inside = 0;
                }
                CHECK(ok && inside, "fill_%s n=%lld %s seed=%llx offset=%llu: worst |err| %.3g", normal ? "normal" : "uniform",
                      (long long)n, dt_name(dt), (unsigned long long)seed, (unsigned long long)offset, worst);
                free(out);
            }
    /* one value written out by hand: seed 0, offset 0, element 0 is lane 0 of the KAT block 0x6627e8d5 */
    float u[1];
    dipp_fill_args a = {.out = u, .dtype = DIPP_DT_F32, .n = 1, .seed = 0, .offset = 0};
    dipp_cpu_fill_uniform(&a);
    CHECK(u[0] == (float)((0x6627e8d5u >> 9) + 0.5) / 8388608.0f, "fill_uniform[0] of seed 0 = %.9g", u[0]);
    /* element 5 at offset 0 equals element 1 at offset 1 (offset counts blocks of four) */
    float v[6], w[2];
    dipp_fill_args b6 = {.out = v, .dtype = DIPP_DT_F32, .n = 6, .seed = 9, .offset = 0};
    dipp_fill_args b2 = {.out = w, .dtype = DIPP_DT_F32, .n = 2, .seed = 9, .offset = 1};
    dipp_cpu_fill_normal(&b6);
    dipp_cpu_fill_normal(&b2);
    CHECK(v[4] == w[0] && v[5] == w[1], "fill offset is in blocks of four elements");
    /* normal of lane 0: sqrt(-2 ln u1) cos(2 pi u2) from the KAT words */
    float z[1];
    dipp_fill_args c = {.out = z, .dtype = DIPP_DT_F32, .n = 1, .seed = 0, .offset = 0};
    dipp_cpu_fill_normal(&c);
    double z0 = sqrt(-2.0 * log(ref_uniform(0x6627e8d5u))) * cos(2.0 * 3.14159265358979323846 * ref_uniform(0xe169c58du));
    CHECK(near(z[0], z0, 1e-5, 1e-6), "fill_normal[0] of seed 0 = %.7f, by hand %.7f", z[0], z0);
}

/* fill_uniform stays inside (0, 1) after rounding to float16/bfloat16 (dipp_uniform_in). */
static void test_uniform_bounds(void) {
    /* the largest float32 draw rounds to 1.0 in the half types without the clamp */
    CHECK(dipp_f32_to_f16(DIPP_F32_BELOW_ONE) == 0x3c00 && dipp_f32_to_bf16(DIPP_F32_BELOW_ONE) == 0x3f80,
          "1 - 2^-24 rounds to 1.0 in float16 and bfloat16");
    CHECK(dipp_f32_to_f16(DIPP_F16_BELOW_ONE) == 0x3bff && dipp_f32_to_bf16(DIPP_BF16_BELOW_ONE) == 0x3f7f,
          "the clamp bounds are the largest float16/bfloat16 values below 1");
    for (int d = 0; d < 3; ++d) {
        int dt = DTYPES[d];
        uint16_t h[1];
        float f[1];
        void *one = dt == DIPP_DT_F32 ? (void *)f : (void *)h;
        dipp_store(one, 0, dt, dipp_uniform_in(DIPP_F32_BELOW_ONE, dt));
        double top = dipp_load(one, 0, dt);
        dipp_store(one, 0, dt, dipp_uniform_in(0.0f, dt));
        double bottom = dipp_load(one, 0, dt);
        CHECK(top < 1.0 && bottom > 0.0, "dipp_uniform_in %s: top %.9g bottom %.3g", dt_name(dt), top, bottom);
    }
    /* 2^20 draws: about 256 (float16) and 2048 (bfloat16) of them lie where rounding gives 1.0 */
    const int64_t n = 1 << 20;
    for (int d = 1; d < 3; ++d) {
        int dt = DTYPES[d];
        uint16_t *out = xmalloc((size_t)n * sizeof(uint16_t));
        dipp_fill_args a = {.out = out, .dtype = dt, .n = n, .seed = 12345, .offset = 0};
        int ok = dipp_cpu_fill_uniform(&a) == DIPP_OK;
        double lo = 1.0, hi = 0.0;
        int64_t at_top = 0;
        for (int64_t i = 0; i < n; ++i) {
            double v = dipp_load(out, i, dt);
            lo = fmin(lo, v);
            hi = fmax(hi, v);
            at_top += v == (dt == DIPP_DT_F16 ? DIPP_F16_BELOW_ONE : DIPP_BF16_BELOW_ONE);
        }
        CHECK(ok && lo > 0.0 && hi < 1.0 && at_top > 0, "fill_uniform %s: min %.3g max %.9g (%lld at the top)",
              dt_name(dt), lo, hi, (long long)at_top);
        free(out);
    }
}

/* dipp_store_finite: finiteness of the value as stored, not of the float32 argument. */
static void test_store_finite(void) {
    float f[1];
    uint16_t h[1];
    CHECK(dipp_store_finite(f, 0, DIPP_DT_F32, 3.0e38f) && !dipp_store_finite(f, 0, DIPP_DT_F32, INFINITY) &&
              !dipp_store_finite(f, 0, DIPP_DT_F32, NAN),
          "dipp_store_finite float32");
    CHECK(dipp_store_finite(h, 0, DIPP_DT_F16, 65504.0f) && h[0] == 0x7bff &&
              dipp_store_finite(h, 0, DIPP_DT_F16, 65519.0f) && !dipp_store_finite(h, 0, DIPP_DT_F16, 65520.0f) &&
              h[0] == 0x7c00 && !dipp_store_finite(h, 0, DIPP_DT_F16, -1e5f) && h[0] == 0xfc00 &&
              !dipp_store_finite(h, 0, DIPP_DT_F16, NAN) && dipp_store_finite(h, 0, DIPP_DT_F16, 1e-9f),
          "dipp_store_finite float16: overflow past 65504 is not finite, the stored bits are dipp_store's");
    CHECK(dipp_store_finite(h, 0, DIPP_DT_BF16, 3.0e38f) && !dipp_store_finite(h, 0, DIPP_DT_BF16, 3.4e38f) &&
              h[0] == 0x7f80 && !dipp_store_finite(h, 0, DIPP_DT_BF16, NAN),
          "dipp_store_finite bfloat16: FLT_MAX rounds past bfloat16's largest value");
}

/* Non-finite outputs from finite inputs are counted (float16 overflow), each element once, on both
 * CPU paths: batch 1 spreads a sample over the threads, batch 3 runs sample by sample. Every third
 * element (e % 3 == 0) overflows; the rest stay finite. */
static void test_output_overflow_counts(void) {
    const int64_t batches[2] = {1, 3}, sizes[2] = {5, 2500};
    for (int kb = 0; kb < 2; ++kb)
        for (int kn = 0; kn < 2; ++kn) {
            const int64_t B = batches[kb], N = sizes[kn], n = B * N;
            const int dt = DIPP_DT_F16;
            uint16_t *x0 = xcalloc((size_t)n, 2), *ta = xcalloc((size_t)n, 2), *cond = xcalloc((size_t)n, 2);
            uint16_t *dr = xcalloc((size_t)n, 2), *g = xcalloc((size_t)n, 2), *g2 = xcalloc((size_t)n, 2);
            uint16_t *g3 = xcalloc((size_t)n, 2);
            float sigma[3], loss[3], w[3], dist[3], gap[3], sur[3], ysq[3], yr[3], hh[3], val[3];
            int64_t bad[3], want[3];
            for (int64_t b = 0; b < B; ++b) {
                sigma[b] = 1e-3f;
                want[b] = 0;
            }
            for (int64_t e = 0; e < n; ++e) {
                int hot = e % 3 == 0;
                dipp_store(ta, e, dt, hot ? 1.0f : 0.0f);
                dipp_store(dr, e, dt, hot ? -100.0f : 0.0f);
                want[e / N] += hot;
            }
            /* TA: lambda(1e-3) ~ 1e6 and sum reduction, so 2 lambda d / B overflows float16 where d = 1 */
            dipp_ta_args ta_a = {.d_ta = ta, .x0 = x0, .sigma = sigma, .grad_out = g, .loss_out = loss,
                                 .nonfinite_out = bad, .dtype = dt, .batch = B, .per_sample = N,
                                 .weighting = DIPP_TA_EDM, .sigma_data = 0.5f, .mean_over_elements = 0};
            int ok = dipp_cpu_ta_loss(&ta_a) == DIPP_OK;
            for (int64_t b = 0; b < B; ++b) ok &= bad[b] == want[b];
            ok &= !dipp_is_finite(dipp_load(g, 0, dt)) && dipp_load(g, 1, dt) == 0.0f;
            ta_a.nonfinite_out = NULL; /* no diagnostics: still fine */
            ok &= dipp_cpu_ta_loss(&ta_a) == DIPP_OK;
            CHECK(ok, "ta_loss counts float16 gradient overflow B=%lld N=%lld: %lld (want %lld)", (long long)B,
                  (long long)N, (long long)bad[0], (long long)want[0]);
            /* generator, normalized: mean |x0 - D_cond| = 0, so W_b = 1 / min_norm = 1e6 and G = W d / B overflows */
            dipp_gen_args ga = {.x0 = x0, .d_ta = ta, .d_cond = cond, .grad_out = g2, .weight_out = w,
                                .ref_dist_out = dist, .gap_out = gap, .surrogate_out = sur, .nonfinite_out = bad,
                                .dtype = dt, .batch = B, .per_sample = N, .omega = 1.0f,
                                .weighting = DIPP_W_NORMALIZED, .min_norm = 1e-6f};
            ok = dipp_cpu_generator_grad(&ga) == DIPP_OK;
            for (int64_t b = 0; b < B; ++b) ok &= bad[b] == want[b];
            CHECK(ok, "generator_grad counts float16 G overflow at the W floor B=%lld N=%lld: %lld (want %lld)",
                  (long long)B, (long long)N, (long long)bad[0], (long long)want[0]);
            /* generator, unit weighting with a reward: G = -alpha dr / B = 1e6 / B overflows where dr = -100;
             * a NaN x0 on such an element is counted once, not once as input and again as output */
            dipp_store(x0, 0, dt, NAN);
            ga.weighting = DIPP_W_UNIT;
            ga.dr = dr;
            ga.alpha = 1e4f;
            ok = dipp_cpu_generator_grad(&ga) == DIPP_OK;
            for (int64_t b = 0; b < B; ++b) ok &= bad[b] == want[b];
            CHECK(ok, "generator_grad counts an element with a NaN x0 and an overflowed G once B=%lld N=%lld: %lld "
                      "(want %lld)", (long long)B, (long long)N, (long long)bad[0], (long long)want[0]);
            /* huber: y = 0, r = 1 where D_q = 1, h = c = 1e-6: b = r / (c B) overflows, and a with it */
            dipp_store(x0, 0, dt, 0.0f);
            for (int64_t b = 0; b < B; ++b) sigma[b] = 1.0f;
            dipp_huber_args ha = {.x0 = x0, .d_p = ta, .d_q = ta, .sigma = sigma, .a_out = g, .b_out = g2,
                                  .dprime_out = g3, .ysq_out = ysq, .yr_out = yr, .h_out = hh, .value_out = val,
                                  .nonfinite_out = bad, .dtype = dt, .batch = B, .per_sample = N, .c = 1e-6f,
                                  .weighting = DIPP_HUBER_W_UNIT};
            ok = dipp_cpu_huber_terms(&ha) == DIPP_OK;
            for (int64_t b = 0; b < B; ++b) ok &= bad[b] == want[b];
            ok &= !dipp_is_finite(dipp_load(g2, 0, dt)) && dipp_load(g3, 0, dt) == 0.0f;
            CHECK(ok, "huber_terms counts float16 overflow of b B=%lld N=%lld: %lld (want %lld)", (long long)B,
                  (long long)N, (long long)bad[0], (long long)want[0]);
            free(x0);
            free(ta);
            free(cond);
            free(dr);
            free(g);
            free(g2);
            free(g3);
        }
}

/* ---------------------------------------------------------------- sample_sigma */

static void test_sample_sigma(void) {
    const int64_t batches[] = {1, 3, 37};
    double *tab64 = xmalloc(1000 * sizeof(double));
    float *table = xmalloc(1000 * sizeof(float));
    dipp_table_iddpm_linear(tab64, 1000, 1e-4, 0.02, 1e-3);
    for (int i = 0; i < 1000; ++i) table[i] = (float)tab64[i];
    for (size_t k = 0; k < sizeof batches / sizeof batches[0]; ++k) {
        int64_t batch = batches[k];
        float *s = xmalloc((size_t)batch * sizeof(float)), *snapped = xmalloc((size_t)batch * sizeof(float));
        int64_t *index = xmalloc((size_t)batch * sizeof(int64_t));
        dipp_sigma_args a = {.sigma_out = s, .batch = batch, .seed = 42, .offset = 3, .p_mean = -1.2f, .p_std = 1.2f,
                             .sigma_min = 0.002f, .sigma_max = 80.0f};
        CHECK(dipp_cpu_sample_sigma(&a) == DIPP_OK, "sample_sigma status");
        int ok = 1;
        for (int64_t b = 0; b < batch; ++b) {
            double want = exp(-1.2 + 1.2 * ref_normal(42, 3, (uint64_t)b));
            want = want < 0.002 ? 0.002 : want > 80.0 ? 80.0 : want;
            ok &= near(s[b], want, 3e-5, 0);
        }
        CHECK(ok, "sample_sigma batch=%lld: exp(p_mean + p_std z_b) clamped", (long long)batch);
        /* with the table: nearest index (ties to the lower one), and snap */
        dipp_sigma_args t = a;
        t.sigma_out = snapped;
        t.index_out = index;
        t.table = table;
        t.table_len = 1000;
        t.snap = 1;
        CHECK(dipp_cpu_sample_sigma(&t) == DIPP_OK, "sample_sigma(table) status");
        ok = 1;
        for (int64_t b = 0; b < batch; ++b) {
            int64_t best = 0;
            for (int64_t j = 1; j < 1000; ++j)
                if (fabs((double)table[j] - s[b]) < fabs((double)table[best] - s[b])) best = j;
            ok &= index[b] == best && snapped[b] == table[best];
        }
        CHECK(ok, "sample_sigma batch=%lld: nearest table index and snapped value", (long long)batch);
        free(s);
        free(snapped);
        free(index);
    }
    /* p_std = 0: every sigma is exp(p_mean), here clamped to sigma_max */
    float s2[2];
    dipp_sigma_args c = {.sigma_out = s2, .batch = 2, .seed = 1, .p_mean = 5.0f, .p_std = 0.0f, .sigma_min = 0.002f,
                         .sigma_max = 80.0f};
    dipp_cpu_sample_sigma(&c);
    CHECK(s2[0] == 80.0f && s2[1] == 80.0f, "sample_sigma clamps exp(5) to sigma_max");
    c.p_mean = -10.0f;
    dipp_cpu_sample_sigma(&c);
    CHECK(s2[0] == 0.002f, "sample_sigma clamps exp(-10) to sigma_min");
    c.p_mean = 0.0f;
    dipp_cpu_sample_sigma(&c);
    CHECK(s2[1] == 1.0f, "sample_sigma p_mean=0 p_std=0 gives 1");
    free(tab64);
    free(table);
}

/* ---------------------------------------------------------------- batched kernels */

typedef struct {
    int64_t batch, per_sample;
} shape_t;

static const shape_t SHAPES[] = {{1, 1}, {1, 33}, {3, 5}, {2, 31}, {2, 1000}, {2, 1025}, {1, 2100}};
#define NSHAPES (sizeof SHAPES / sizeof SHAPES[0])

static float sigma_of(int64_t b) { return 0.25f + 0.5f * (float)b; } /* 0.25, 0.75, 1.25: exact */

static void test_add_noise(void) {
    for (size_t k = 0; k < NSHAPES; ++k)
        for (int d = 0; d < 3; ++d)
            for (int flow = 0; flow < 2; ++flow) {
                int dt = DTYPES[d];
                int64_t B = SHAPES[k].batch, N = SHAPES[k].per_sample, n = B * N;
                double *x0v = xmalloc((size_t)n * sizeof(double));
                void *x0 = make_input(dt, n, wave, 1, x0v);
                void *xt = xmalloc((size_t)n * dt_size(dt)), *eps = xmalloc((size_t)n * dt_size(dt));
                float sigma[3];
                for (int64_t b = 0; b < B; ++b) sigma[b] = flow ? 0.2f * (float)(b + 1) : sigma_of(b);
                uint64_t offset = (uint64_t)(5 * k);
                dipp_noise_args a = {.x0 = x0, .xt = xt, .eps_out = eps, .sigma = sigma, .dtype = dt, .batch = B,
                                     .per_sample = N, .seed = 11, .offset = offset, .flow = flow};
                int ok = dipp_cpu_add_noise(&a) == DIPP_OK;
                for (int64_t e = 0; e < n; ++e) {
                    double z = ref_normal(11, offset, (uint64_t)e), s = sigma[e / N];
                    double want = flow ? (1.0 - s) * x0v[e] + s * z : x0v[e] + s * z;
                    double rt = dt_rtol(dt);
                    ok &= near(dipp_load(eps, e, dt), z, rt, 2e-5 * (1 + fabs(z)));
                    ok &= near(dipp_load(xt, e, dt), want, rt, 3e-5 * (1 + fabs(z) + fabs(x0v[e])));
                }
                /* eps_out = NULL gives the same x_t */
                void *xt2 = xmalloc((size_t)n * dt_size(dt));
                a.xt = xt2;
                a.eps_out = NULL;
                ok &= dipp_cpu_add_noise(&a) == DIPP_OK && memcmp(xt, xt2, (size_t)n * dt_size(dt)) == 0;
                CHECK(ok, "add_noise B=%lld N=%lld %s flow=%d", (long long)B, (long long)N, dt_name(dt), flow);
                free(x0v);
                free(x0);
                free(xt);
                free(xt2);
                free(eps);
            }
}

static void test_cfg(void) {
    const int64_t sizes[] = {1, 7, 1025};
    for (size_t k = 0; k < 3; ++k)
        for (int d = 0; d < 3; ++d) {
            int dt = DTYPES[d];
            int64_t n = sizes[k];
            double *uv = xmalloc((size_t)n * sizeof(double)), *cv = xmalloc((size_t)n * sizeof(double));
            void *u = make_input(dt, n, wave, 2, uv), *c = make_input(dt, n, wave, 3, cv);
            void *out = xmalloc((size_t)n * dt_size(dt));
            dipp_cfg_args a = {.uncond = u, .cond = c, .out = out, .dtype = dt, .n = n, .omega = 2.5f};
            int ok = dipp_cpu_cfg_combine(&a) == DIPP_OK;
            for (int64_t i = 0; i < n; ++i) {
                double want = uv[i] + 2.5 * (cv[i] - uv[i]);
                ok &= near(dipp_load(out, i, dt), want, dt_rtol(dt), 1e-6 + dt_rtol(dt) * 2.5 * fabs(cv[i] - uv[i]));
            }
            CHECK(ok, "cfg_combine n=%lld %s", (long long)n, dt_name(dt));
            free(uv);
            free(cv);
            free(u);
            free(c);
            free(out);
        }
    float u = 1.0f, c = 3.0f, out;
    dipp_cfg_args a = {.uncond = &u, .cond = &c, .out = &out, .dtype = DIPP_DT_F32, .n = 1, .omega = 2.5f};
    dipp_cpu_cfg_combine(&a);
    CHECK(out == 6.0f, "cfg_combine 1 + 2.5 (3 - 1) = 6, got %g", out);
}

static void test_ta_loss(void) {
    for (size_t k = 0; k < NSHAPES; ++k)
        for (int d = 0; d < 3; ++d)
            for (int variant = 0; variant < 3; ++variant) {
                /* 0: edm + mean, 1: unit + sum, 2: edm + sum with a NaN and an Inf */
                int dt = DTYPES[d];
                int64_t B = SHAPES[k].batch, N = SHAPES[k].per_sample, n = B * N;
                double *dv = xmalloc((size_t)n * sizeof(double)), *xv = xmalloc((size_t)n * sizeof(double));
                void *dta = make_input(dt, n, wave, 4, dv), *x0 = make_input(dt, n, wave, 5, xv);
                if (variant == 2) {
                    dipp_store(dta, n - 1, dt, NAN);
                    dv[n - 1] = NAN;
                    dipp_store(x0, 0, dt, INFINITY);
                    xv[0] = INFINITY;
                }
                int edm = variant != 1, mean = variant == 0;
                float sigma[3], loss[3];
                int64_t bad[3];
                for (int64_t b = 0; b < B; ++b) sigma[b] = sigma_of(b);
                void *grad = xmalloc((size_t)n * dt_size(dt));
                dipp_ta_args a = {.d_ta = dta, .x0 = x0, .sigma = edm ? sigma : NULL, .grad_out = grad,
                                  .loss_out = loss, .nonfinite_out = bad, .dtype = dt, .batch = B, .per_sample = N,
                                  .weighting = edm ? DIPP_TA_EDM : DIPP_TA_UNIT, .sigma_data = 0.5f,
                                  .mean_over_elements = mean};
                int ok = dipp_cpu_ta_loss(&a) == DIPP_OK;
                for (int64_t b = 0; b < B; ++b) {
                    double s = sigma[b], lam = edm ? (s * s + 0.25) / (s * s * 0.25) : 1.0;
                    double scale = mean ? 1.0 / (double)N : 1.0, sum = 0;
                    int64_t nonfinite = 0;
                    for (int64_t i = b * N; i < (b + 1) * N; ++i) {
                        double diff = dv[i] - xv[i];
                        sum += diff * diff;
                        nonfinite += !isfinite(diff);
                        double g = 2.0 * lam * scale / (double)B * diff;
                        ok &= near(dipp_load(grad, i, dt), g, dt_rtol(dt), 1e-6 * fabs(2.0 * lam * scale / B));
                    }
                    ok &= near(loss[b], lam * scale * sum, 3e-5, 0) && bad[b] == nonfinite;
                }
                CHECK(ok, "ta_loss B=%lld N=%lld %s variant=%d", (long long)B, (long long)N, dt_name(dt), variant);
                free(dv);
                free(xv);
                free(dta);
                free(x0);
                free(grad);
            }
    /* by hand: B=1, N=2, D_TA = (1, 2), x0 = (0, 0), sigma = 0.5, sd = 0.5: lambda = 0.5/0.0625 = 8,
     * mean loss = 8 * (1 + 4) / 2 = 20, grad = 2 * 8 / 2 * (1, 2) = (8, 16); no nonfinite_out */
    float d2[2] = {1, 2}, z2[2] = {0, 0}, s1 = 0.5f, l1, g2[2];
    dipp_ta_args h = {.d_ta = d2, .x0 = z2, .sigma = &s1, .grad_out = g2, .loss_out = &l1, .dtype = DIPP_DT_F32,
                      .batch = 1, .per_sample = 2, .weighting = DIPP_TA_EDM, .sigma_data = 0.5f,
                      .mean_over_elements = 1};
    dipp_cpu_ta_loss(&h);
    CHECK(l1 == 20.0f && g2[0] == 8.0f && g2[1] == 16.0f, "ta_loss by hand: loss %g grad %g %g", l1, g2[0], g2[1]);
    h.grad_out = NULL;
    l1 = 0;
    CHECK(dipp_cpu_ta_loss(&h) == DIPP_OK && l1 == 20.0f, "ta_loss without grad_out");
}

static void test_generator_grad(void) {
    for (size_t k = 0; k < NSHAPES; ++k)
        for (int d = 0; d < 3; ++d)
            for (int variant = 0; variant < 3; ++variant) {
                /* 0: normalized, CFG and reward; 1: unit, D_cond only; 2: normalized, CFG, tiny distances (floor) */
                int dt = DTYPES[d];
                int64_t B = SHAPES[k].batch, N = SHAPES[k].per_sample, n = B * N;
                double *xv = xmalloc((size_t)n * sizeof(double)), *tv = xmalloc((size_t)n * sizeof(double));
                double *cv = xmalloc((size_t)n * sizeof(double)), *uv = xmalloc((size_t)n * sizeof(double));
                double *rv = xmalloc((size_t)n * sizeof(double));
                void *x0 = make_input(dt, n, wave, 6, xv), *ta = make_input(dt, n, wave, 7, tv);
                void *cond = make_input(dt, n, wave, 8, cv), *unc = make_input(dt, n, wave, 9, uv);
                void *dr = make_input(dt, n, wave, 10, rv);
                int use_cfg = variant != 1, normalized = variant != 1;
                float omega = 3.0f, alpha = variant == 0 ? 0.25f : 0.0f, floor_value = variant == 2 ? 1e3f : 1e-5f;
                float weight[3], dist[3], gap[3], sur[3];
                int64_t bad[3];
                void *grad = xmalloc((size_t)n * dt_size(dt));
                dipp_gen_args a = {.x0 = x0, .d_ta = ta, .d_cond = cond, .d_uncond = use_cfg ? unc : NULL,
                                   .dr = variant == 0 ? dr : NULL, .grad_out = grad, .weight_out = weight,
                                   .ref_dist_out = dist, .gap_out = gap, .surrogate_out = sur, .nonfinite_out = bad,
                                   .dtype = dt, .batch = B, .per_sample = N, .omega = omega, .alpha = alpha,
                                   .weighting = normalized ? DIPP_W_NORMALIZED : DIPP_W_UNIT, .min_norm = floor_value};
                int ok = dipp_cpu_generator_grad(&a) == DIPP_OK;
                for (int64_t b = 0; b < B; ++b) {
                    double sd = 0, sg = 0, ss = 0, sa = 0;
                    for (int64_t i = b * N; i < (b + 1) * N; ++i) {
                        double ref = use_cfg ? uv[i] + omega * (cv[i] - uv[i]) : cv[i];
                        sd += fabs(xv[i] - ref);
                        sg += fabs(tv[i] - ref);
                        ss += (tv[i] - ref) * xv[i];
                        sa += fabs((tv[i] - ref) * xv[i]);
                    }
                    double mean_dist = sd / (double)N;
                    double w = normalized ? 1.0 / (mean_dist > floor_value ? mean_dist : floor_value) : 1.0;
                    ok &= near(dist[b], mean_dist, 3e-5, 1e-6) && near(gap[b], sg / (double)N, 3e-5, 1e-6);
                    ok &= near(weight[b], w, 3e-5, 0) && near(sur[b], w * ss, 3e-5, 3e-5 * w * sa) && bad[b] == 0;
                    for (int64_t i = b * N; i < (b + 1) * N; ++i) {
                        double ref = use_cfg ? uv[i] + omega * (cv[i] - uv[i]) : cv[i];
                        double g = (w * (tv[i] - ref) - (variant == 0 ? alpha * rv[i] : 0.0)) / (double)B;
                        double scale = (w * (fabs(tv[i]) + fabs(ref)) + alpha * fabs(rv[i])) / (double)B;
                        ok &= near(dipp_load(grad, i, dt), g, dt_rtol(dt), 3e-6 * scale + dt_rtol(dt) * scale);
                    }
                }
                CHECK(ok, "generator_grad B=%lld N=%lld %s variant=%d", (long long)B, (long long)N, dt_name(dt),
                      variant);
                free(xv);
                free(tv);
                free(cv);
                free(uv);
                free(rv);
                free(x0);
                free(ta);
                free(cond);
                free(unc);
                free(dr);
                free(grad);
            }
    /* by hand: B=1, N=2, x0 = (1, -1), D_TA = (2, 0), D_cond = (0, 0), normalized: mean |x0 - 0| = 1, W = 1,
     * gap = mean |D_TA| = 1, surrogate = 2*1 + 0*(-1) = 2, G = D_TA - D_cond = (2, 0); NaN in x0 is counted */
    float x0[2] = {1, -1}, ta[2] = {2, 0}, cond[2] = {0, 0}, g[2], w, dist, gap, sur;
    int64_t bad;
    dipp_gen_args h = {.x0 = x0, .d_ta = ta, .d_cond = cond, .grad_out = g, .weight_out = &w, .ref_dist_out = &dist,
                       .gap_out = &gap, .surrogate_out = &sur, .nonfinite_out = &bad, .dtype = DIPP_DT_F32,
                       .batch = 1, .per_sample = 2, .omega = 1.0f, .weighting = DIPP_W_NORMALIZED, .min_norm = 1e-5f};
    dipp_cpu_generator_grad(&h);
    CHECK(w == 1.0f && dist == 1.0f && gap == 1.0f && sur == 2.0f && g[0] == 2.0f && g[1] == 0.0f && bad == 0,
          "generator_grad by hand: W %g dist %g gap %g surrogate %g G %g %g", w, dist, gap, sur, g[0], g[1]);
    x0[1] = NAN;
    dipp_cpu_generator_grad(&h);
    /* both elements: x0[1] is NaN, and G[0] is NaN through W (non-finite outputs count too) */
    CHECK(bad == 2 && isnan(w) && isnan(g[0]), "generator_grad counts a NaN and what it poisons through W: %lld",
          (long long)bad);
}

static void test_huber(void) {
    for (size_t k = 0; k < NSHAPES; ++k)
        for (int d = 0; d < 3; ++d)
            for (int weighting = 0; weighting < 2; ++weighting) {
                int dt = DTYPES[d];
                int64_t B = SHAPES[k].batch, N = SHAPES[k].per_sample, n = B * N;
                double *xv = xmalloc((size_t)n * sizeof(double)), *pv = xmalloc((size_t)n * sizeof(double));
                double *qv = xmalloc((size_t)n * sizeof(double));
                void *x0 = make_input(dt, n, wave, 11, xv), *dp = make_input(dt, n, wave, 12, pv);
                void *dq = make_input(dt, n, wave, 13, qv);
                void *av = xmalloc((size_t)n * dt_size(dt)), *bv = xmalloc((size_t)n * dt_size(dt));
                void *dv = xmalloc((size_t)n * dt_size(dt));
                float sigma[3], ysq[3], yr[3], h[3], val[3];
                int64_t bad[3];
                for (int64_t b = 0; b < B; ++b) sigma[b] = sigma_of(b) + 0.25f; /* 0.5, 1, 1.5 */
                const float c = 0.3f;
                dipp_huber_args a = {.x0 = x0, .d_p = dp, .d_q = dq, .sigma = sigma, .a_out = av, .b_out = bv,
                                     .dprime_out = dv, .ysq_out = ysq, .yr_out = yr, .h_out = h, .value_out = val,
                                     .nonfinite_out = bad, .dtype = dt, .batch = B, .per_sample = N, .c = c,
                                     .weighting = weighting ? DIPP_HUBER_W_SIGMA2 : DIPP_HUBER_W_UNIT};
                int ok = dipp_cpu_huber_terms(&a) == DIPP_OK;
                for (int64_t b = 0; b < B; ++b) {
                    double s2 = (double)sigma[b] * sigma[b], sy = 0, syr = 0, sr = 0;
                    for (int64_t i = b * N; i < (b + 1) * N; ++i) {
                        double y = (pv[i] - qv[i]) / s2, r = (qv[i] - xv[i]) / s2;
                        sy += y * y;
                        syr += y * r;
                        sr += r * r;
                    }
                    double hh = sqrt(sy + (double)c * c), w = weighting ? s2 : 1.0, scale = w / (s2 * (double)B);
                    ok &= near(ysq[b], sy, 5e-5, 1e-6) && near(yr[b], syr, 5e-5, 5e-5 * sqrt(sy * sr) + 1e-6);
                    ok &= near(h[b], hh, 5e-5, 0) && near(val[b], w * (hh - c), 1e-4, 5e-5 * w * hh) && bad[b] == 0;
                    double vmax = 0;
                    for (int64_t i = b * N; i < (b + 1) * N; ++i) {
                        double y = (pv[i] - qv[i]) / s2, r = (qv[i] - xv[i]) / s2;
                        vmax = fmax(vmax, scale * (fabs(y) + fabs(r) + fabs(y * syr) / (hh * hh)) / hh);
                    }
                    for (int64_t i = b * N; i < (b + 1) * N; ++i) {
                        double y = (pv[i] - qv[i]) / s2, r = (qv[i] - xv[i]) / s2;
                        double dprime = scale * y / hh, bb = scale * (r - y * syr / (hh * hh)) / hh;
                        double tol = (5e-5 + dt_rtol(dt)) * vmax;
                        ok &= near(dipp_load(dv, i, dt), dprime, dt_rtol(dt), tol);
                        ok &= near(dipp_load(bv, i, dt), bb, dt_rtol(dt), tol);
                        ok &= near(dipp_load(av, i, dt), dprime + bb, dt_rtol(dt), 2 * tol);
                    }
                }
                CHECK(ok, "huber_terms B=%lld N=%lld %s weighting=%d", (long long)B, (long long)N, dt_name(dt),
                      weighting);
                free(xv);
                free(pv);
                free(qv);
                free(x0);
                free(dp);
                free(dq);
                free(av);
                free(bv);
                free(dv);
            }
    /* by hand: B=1, N=1, sigma=1, c=3/... : x0=0, D_q=0, D_p=4 -> y=4, r=0, |y|^2=16, c=3, h=5,
     * value (sigma2, w=1) = 5-3 = 2, d' = 4/5, b = 0, a = 4/5; scale = w/(sigma^2 B) = 1 */
    float x0 = 0, dp = 4, dq = 0, s = 1, a1, b1, d1, ysq, yr, h, val;
    int64_t bad;
    dipp_huber_args hh = {.x0 = &x0, .d_p = &dp, .d_q = &dq, .sigma = &s, .a_out = &a1, .b_out = &b1,
                          .dprime_out = &d1, .ysq_out = &ysq, .yr_out = &yr, .h_out = &h, .value_out = &val,
                          .nonfinite_out = &bad, .dtype = DIPP_DT_F32, .batch = 1, .per_sample = 1, .c = 3.0f,
                          .weighting = DIPP_HUBER_W_SIGMA2};
    dipp_cpu_huber_terms(&hh);
    CHECK(ysq == 16.0f && yr == 0.0f && h == 5.0f && val == 2.0f && d1 == 0.8f && b1 == 0.0f && a1 == 0.8f && bad == 0,
          "huber by hand: ysq %g yr %g h %g value %g a %g b %g d' %g", ysq, yr, h, val, a1, b1, d1);
    dq = INFINITY;
    dipp_cpu_huber_terms(&hh);
    CHECK(bad == 1 && !isfinite(ysq), "huber counts an Inf input once and propagates it");
}

/* ---------------------------------------------------------------- EMA and Adam */

static void test_ema(void) {
    /* four tensors in one call, mixed dtypes, sizes across chunk boundaries */
    const int64_t sizes[4] = {1, 1000, 1025, 3000};
    const int data_dt[4] = {DIPP_DT_F32, DIPP_DT_F16, DIPP_DT_F32, DIPP_DT_BF16};
    const int src_dt[4] = {DIPP_DT_F32, DIPP_DT_F32, DIPP_DT_BF16, DIPP_DT_BF16};
    dipp_tensor_pair t[4];
    double *ev[4], *pv[4];
    for (int k = 0; k < 4; ++k) {
        ev[k] = xmalloc((size_t)sizes[k] * sizeof(double));
        pv[k] = xmalloc((size_t)sizes[k] * sizeof(double));
        t[k] = (dipp_tensor_pair){.data = make_input(data_dt[k], sizes[k], wave, 20 + k, ev[k]),
                                  .src = make_input(src_dt[k], sizes[k], wave, 30 + k, pv[k]),
                                  .dtype = data_dt[k],
                                  .src_dtype = src_dt[k],
                                  .n = sizes[k]};
    }
    dipp_ema_args a = {.tensors = t, .count = 4, .decay = 0.9};
    CHECK(dipp_cpu_ema_update(&a) == DIPP_OK, "ema_update status");
    for (int k = 0; k < 4; ++k) {
        int ok = 1;
        for (int64_t i = 0; i < sizes[k]; ++i)
            ok &= near(dipp_load(t[k].data, i, data_dt[k]), 0.9 * ev[k][i] + 0.1 * pv[k][i], dt_rtol(data_dt[k]), 1e-6);
        CHECK(ok, "ema_update tensor %d n=%lld %s <- %s", k, (long long)sizes[k], dt_name(data_dt[k]),
              dt_name(src_dt[k]));
        free((void *)t[k].data);
        free((void *)t[k].src);
        free(ev[k]);
        free(pv[k]);
    }
    float e = 2.0f, p = 4.0f;
    dipp_tensor_pair one = {.data = &e, .src = &p, .dtype = DIPP_DT_F32, .src_dtype = DIPP_DT_F32, .n = 1};
    dipp_ema_args b = {.tensors = &one, .count = 1, .decay = 0.75};
    dipp_cpu_ema_update(&b);
    CHECK(e == 2.5f, "ema by hand: 0.75 * 2 + 0.25 * 4 = 2.5, got %g", e);
    b.decay = 1.0;
    dipp_cpu_ema_update(&b);
    CHECK(e == 2.5f, "ema with decay 1 keeps the average");
}

/* torch.optim.Adam / AdamW for one element, in double */
static double ref_adam(double p, double g, double *m, double *v, double lr, double b1, double b2, double eps,
                       double wd, int decoupled, int step) {
    if (wd != 0) {
        if (decoupled) p *= 1 - lr * wd;
        else g += wd * p;
    }
    *m = b1 * *m + (1 - b1) * g;
    *v = b2 * *v + (1 - b2) * g * g;
    double bc1 = 1 - pow(b1, step), bc2 = 1 - pow(b2, step);
    return p - lr / bc1 * (*m / (sqrt(*v) / sqrt(bc2) + eps));
}

static void test_adam(void) {
    for (int variant = 0; variant < 3; ++variant) {
        /* 0: Adam, L2 decay; 1: AdamW; 2: beta1 = 0 (m = grad exactly), bf16 params with f16 grads */
        const int64_t sizes[2] = {5, 1030};
        int pdt = variant == 2 ? DIPP_DT_BF16 : DIPP_DT_F32, gdt = variant == 2 ? DIPP_DT_F16 : DIPP_DT_F32;
        double lr = 1e-2, b1 = variant == 2 ? 0.0 : 0.9, b2 = 0.999, eps = 1e-8, wd = 0.05;
        int decoupled = variant == 1;
        dipp_tensor_pair t[2];
        double *pv[2], *gv[2], *mv[2], *vv[2];
        for (int k = 0; k < 2; ++k) {
            int64_t n = sizes[k];
            pv[k] = xmalloc((size_t)n * sizeof(double));
            gv[k] = xmalloc((size_t)n * sizeof(double));
            mv[k] = xcalloc((size_t)n, sizeof(double));
            vv[k] = xcalloc((size_t)n, sizeof(double));
            t[k] = (dipp_tensor_pair){.data = make_input(pdt, n, wave, 40 + k, pv[k]),
                                      .src = make_input(gdt, n, wave, 50 + k, gv[k]),
                                      .exp_avg = xcalloc((size_t)n, sizeof(float)),
                                      .exp_avg_sq = xcalloc((size_t)n, sizeof(float)),
                                      .dtype = pdt,
                                      .src_dtype = gdt,
                                      .n = n};
        }
        int ok = 1;
        for (int step = 1; step <= 3; ++step) {
            dipp_adam_args a = {.tensors = t, .count = 2, .lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps,
                                .weight_decay = wd, .decoupled = decoupled, .step = step};
            ok &= dipp_cpu_adam_step(&a) == DIPP_OK;
            for (int k = 0; k < 2; ++k)
                for (int64_t i = 0; i < sizes[k]; ++i) {
                    double want = ref_adam(pv[k][i], gv[k][i], &mv[k][i], &vv[k][i], lr, b1, b2, eps, wd, decoupled,
                                           step);
                    double got = dipp_load(t[k].data, i, pdt);
                    ok &= near(got, want, dt_rtol(pdt), 2e-6);
                    ok &= near(t[k].exp_avg[i], mv[k][i], 1e-5, 1e-7) && near(t[k].exp_avg_sq[i], vv[k][i], 1e-5, 1e-9);
                    if (b1 == 0.0) /* m = grad + wd p exactly, in float as the kernel forms it */
                        ok &= t[k].exp_avg[i] == (float)gv[k][i] + (float)wd * (float)pv[k][i];
                    pv[k][i] = got; /* the next step starts from the stored parameter */
                }
        }
        CHECK(ok, "adam_step variant %d (%s params, %s grads), 3 steps over 2 tensors", variant, dt_name(pdt),
              dt_name(gdt));
        for (int k = 0; k < 2; ++k) {
            free((void *)t[k].data);
            free((void *)t[k].src);
            free(t[k].exp_avg);
            free(t[k].exp_avg_sq);
            free(pv[k]);
            free(gv[k]);
            free(mv[k]);
            free(vv[k]);
        }
    }
    /* by hand, step 1 without decay: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2,
     * p <- p - lr g / (|g| + eps) = 1 - 0.1 * 2 / (2 + 1e-8) ~ 0.9 */
    float p = 1.0f, g = 2.0f, m = 0.0f, v = 0.0f;
    dipp_tensor_pair one = {.data = &p, .src = &g, .exp_avg = &m, .exp_avg_sq = &v, .dtype = DIPP_DT_F32,
                            .src_dtype = DIPP_DT_F32, .n = 1};
    dipp_adam_args a = {.tensors = &one, .count = 1, .lr = 0.1, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8,
                        .weight_decay = 0.0, .decoupled = 0, .step = 1};
    dipp_cpu_adam_step(&a);
    CHECK(near(p, 0.9, 1e-6, 0) && near(m, 0.2, 1e-6, 0) && near(v, 0.004, 1e-5, 0),
          "adam by hand: p %.7f (0.9), m %.7f (0.2), v %.7g (0.004)", p, m, v);
}

/* exp_avg NULL (no first moment, beta1 = 0): bitwise the same parameters and v as
 * keeping m; with beta1 != 0 it is an argument error and nothing is written. */
static void test_adam_without_first_moment(void) {
    enum { N = 1030 };
    float p1[N], p2[N], g[N], m[N], v1[N], v2[N];
    for (int i = 0; i < N; ++i) {
        p1[i] = p2[i] = 0.01f * (float)(i % 97) - 0.4f;
        g[i] = 0.003f * (float)(i % 13) - 0.02f;
        m[i] = v1[i] = v2[i] = 0.0f;
    }
    dipp_tensor_pair with_m = {.data = p1, .src = g, .exp_avg = m, .exp_avg_sq = v1, .dtype = DIPP_DT_F32,
                               .src_dtype = DIPP_DT_F32, .n = N};
    dipp_tensor_pair without_m = with_m;
    without_m.data = p2;
    without_m.exp_avg = NULL;
    without_m.exp_avg_sq = v2;
    int ok = 1;
    for (int step = 1; step <= 3; ++step) {
        dipp_adam_args a = {.tensors = &with_m, .count = 1, .lr = 1e-2, .beta1 = 0.0, .beta2 = 0.999, .eps = 1e-8,
                            .weight_decay = 0.05, .decoupled = 1, .step = step};
        ok &= dipp_cpu_adam_step(&a) == DIPP_OK;
        a.tensors = &without_m;
        ok &= dipp_cpu_adam_step(&a) == DIPP_OK;
    }
    ok &= memcmp(p1, p2, sizeof p1) == 0 && memcmp(v1, v2, sizeof v1) == 0;
    CHECK(ok, "adam_step without exp_avg equals beta1 = 0 with it, bitwise");
    float before = p2[0];
    dipp_adam_args bad = {.tensors = &without_m, .count = 1, .lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8,
                          .weight_decay = 0.0, .decoupled = 0, .step = 4};
    CHECK(dipp_cpu_adam_step(&bad) == DIPP_ERR_ARGUMENT && p2[0] == before,
          "adam_step without exp_avg and beta1 = 0.9 is DIPP_ERR_ARGUMENT, nothing written");
}

/* ---------------------------------------------------------------- STREAM probes, threads, status */

static void test_misc(void) {
    const int64_t sizes[] = {1, 1000, 4097};
    for (size_t k = 0; k < 3; ++k) {
        int64_t n = sizes[k];
        float *a = xmalloc((size_t)n * sizeof(float)), *b = xmalloc((size_t)n * sizeof(float));
        float *c = xmalloc((size_t)n * sizeof(float));
        for (int64_t i = 0; i < n; ++i) {
            b[i] = (float)i;
            c[i] = 0.5f * (float)i;
        }
        int ok = dipp_cpu_stream_copy(a, b, n) == DIPP_OK;
        for (int64_t i = 0; i < n; ++i) ok &= a[i] == (float)i;
        CHECK(ok, "stream_copy n=%lld", (long long)n);
        ok = dipp_cpu_stream_triad(a, b, c, 3.0f, n) == DIPP_OK;
        for (int64_t i = 0; i < n; ++i) ok &= a[i] == 2.5f * (float)i;
        CHECK(ok, "stream_triad n=%lld: b + 3 c", (long long)n);
        free(a);
        free(b);
        free(c);
    }
    int threads = dipp_cpu_threads();
    const char *env = getenv("OMP_NUM_THREADS");
    CHECK(threads >= 1 && (!env || threads == atoi(env)), "dipp_cpu_threads() = %d (OMP_NUM_THREADS=%s)", threads,
          env ? env : "unset");

    const dipp_status all[4] = {DIPP_OK, DIPP_ERR_NOMEM, DIPP_ERR_ARGUMENT, DIPP_ERR_CUDA};
    int distinct = 1;
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < i; ++j) distinct &= strcmp(dipp_status_message(all[i]), dipp_status_message(all[j])) != 0;
    CHECK(distinct && strcmp(dipp_status_message((dipp_status)99), "unknown status") == 0, "dipp_status_message");

    /* an unknown dtype code is refused, not guessed */
    float buf[4] = {0}, s = 1.0f, l;
    dipp_fill_args f = {.out = buf, .dtype = 7, .n = 4};
    dipp_noise_args nz = {.x0 = buf, .xt = buf, .sigma = &s, .dtype = 7, .batch = 1, .per_sample = 4};
    dipp_cfg_args cf = {.uncond = buf, .cond = buf, .out = buf, .dtype = 9, .n = 4};
    dipp_ta_args ta = {.d_ta = buf, .x0 = buf, .loss_out = &l, .dtype = 3, .batch = 1, .per_sample = 4};
    dipp_gen_args gg = {.dtype = -1, .batch = 1, .per_sample = 4};
    dipp_huber_args hb = {.dtype = 5, .batch = 1, .per_sample = 4};
    CHECK(dipp_cpu_fill_uniform(&f) == DIPP_ERR_ARGUMENT && dipp_cpu_fill_normal(&f) == DIPP_ERR_ARGUMENT &&
              dipp_cpu_add_noise(&nz) == DIPP_ERR_ARGUMENT && dipp_cpu_cfg_combine(&cf) == DIPP_ERR_ARGUMENT &&
              dipp_cpu_ta_loss(&ta) == DIPP_ERR_ARGUMENT && dipp_cpu_generator_grad(&gg) == DIPP_ERR_ARGUMENT &&
              dipp_cpu_huber_terms(&hb) == DIPP_ERR_ARGUMENT,
          "kernels refuse an unknown dtype code with DIPP_ERR_ARGUMENT");
}

int main(void) {
    test_philox();
    test_half_conversions();
    test_sigma_tables();
    test_fills();
    test_uniform_bounds();
    test_store_finite();
    test_output_overflow_counts();
    test_sample_sigma();
    test_add_noise();
    test_cfg();
    test_ta_loss();
    test_generator_grad();
    test_huber();
    test_ema();
    test_adam();
    test_adam_without_first_moment();
    test_misc();
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
