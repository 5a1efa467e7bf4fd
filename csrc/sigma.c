/* Per-sample noise levels: log-normal draws, clamping, snapping to a sigma table. */
#include <math.h>

#include "cpu_common.h"

dipp_status dipp_cpu_sample_sigma(const dipp_sigma_args *a) {
    for (int64_t b = 0; b < a->batch; ++b) {
        float n = dipp_normal_at(a->seed, a->offset, (uint64_t)b);
        float s = dipp_lognormal_sigma(n, a->p_mean, a->p_std, a->sigma_min, a->sigma_max);
        if (a->table) {
            int64_t j = dipp_nearest_index(a->table, a->table_len, s);
            if (a->index_out) a->index_out[b] = j;
            if (a->snap) s = a->table[j];
        }
        a->sigma_out[b] = s;
    }
    return DIPP_OK;
}

/* sigma_t = sqrt((1 - abar_t) / abar_t) from a beta schedule, in double. */
static void sigmas_from_betas(double *out, int64_t steps, double beta_start, double beta_end, int scaled) {
    double abar = 1.0;
    for (int64_t t = 0; t < steps; ++t) {
        double frac = steps > 1 ? (double)t / (double)(steps - 1) : 0.0;
        double beta;
        if (scaled) {
            double root = sqrt(beta_start) + (sqrt(beta_end) - sqrt(beta_start)) * frac;
            beta = root * root;
        } else {
            beta = beta_start + (beta_end - beta_start) * frac;
        }
        abar *= 1.0 - beta;
        out[t] = sqrt((1.0 - abar) / abar);
    }
}

dipp_status dipp_table_scaled_linear(double *out, int64_t steps, double beta_start, double beta_end) {
    if (!out || steps < 2) return DIPP_ERR_ARGUMENT;
    sigmas_from_betas(out, steps, beta_start, beta_end, 1);
    return DIPP_OK;
}

/*
 * The EDM/iDDPM table used by PixArt-alpha's EDM wrapper: u_M = 0 and
 * u_{j-1} = sqrt((u_j^2 + 1) / max(1 - beta(j), clip) - 1), beta(j) linear in j.
 * Returned by timestep t = M - 1 - j, so it ascends like the other tables.
 */
dipp_status dipp_table_iddpm_linear(double *out, int64_t steps, double beta_start, double beta_end, double clip) {
    if (!out || steps < 2) return DIPP_ERR_ARGUMENT;
    double u = 0.0;
    for (int64_t j = steps; j > 0; --j) {
        double beta = beta_end + (beta_start - beta_end) * (double)j / (double)steps;
        double keep = 1.0 - beta;
        if (keep < clip) keep = clip;
        u = sqrt((u * u + 1.0) / keep - 1.0);
        out[steps - j] = u; /* u_{j-1} sits at t = M - 1 - (j - 1) = M - j */
    }
    return DIPP_OK;
}
