/* Exhaustive check of Box-Muller's elementary functions (csrc/dipp_math.h): dipp_log_unit and
 * dipp_sincos are correctly rounded to float on every input the fills can produce, the 2^23 uniforms
 * u = (k + 1/2) 2^-23 and their float angles 2 pi u, against long double logl/sinl/cosl (64-bit
 * significands: a double rounding to float could only differ within 2^-40 of a half-way point, which
 * the check reports as a mismatch rather than hides). Run natively by tests/c/run.sh (no valgrind:
 * pure arithmetic, 2^24 evaluations). */
#include <math.h>
#include <stdio.h>

#include "dipp_math.h"

int main(void) {
    long bad_log = 0, bad_sin = 0, bad_cos = 0;
    for (uint32_t k = 0; k < (1u << 23); ++k) {
        const uint32_t bits = k << 9; /* dipp_uniform_open keeps the top 23 bits */
        const float u = dipp_uniform_open(bits);
        const float angle = DIPP_TWO_PI_F * u;
        float s, c;
        dipp_sincos(angle, &s, &c);
        if (dipp_log_unit(u) != (float)logl((long double)u)) {
            if (bad_log++ < 5) printf("log: u = %a gives %a, want %a\n", u, dipp_log_unit(u), (float)logl(u));
        }
        if (s != (float)sinl((long double)angle)) {
            if (bad_sin++ < 5) printf("sin: x = %a gives %a, want %a\n", angle, s, (float)sinl(angle));
        }
        if (c != (float)cosl((long double)angle)) {
            if (bad_cos++ < 5) printf("cos: x = %a gives %a, want %a\n", angle, c, (float)cosl(angle));
        }
    }
    printf("tests/c/test_box_muller: %ld log, %ld sin, %ld cos results not correctly rounded over 2^23 inputs\n",
           bad_log, bad_sin, bad_cos);
    return bad_log || bad_sin || bad_cos;
}
