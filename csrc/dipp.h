/*
 * Public C interface of the DI++ core: status codes, argument structs and the
 * kernels, once for the CPU (dipp_cpu_*) and once for CUDA (dipp_cuda_*,
 * built into a separate library only when nvcc exists).
 *
 * Conventions every kernel relies on (the binding checks them first):
 * - tensors are dense, C-contiguous, non-empty, and the large ones of one call
 *   share a dtype (DIPP_DT_F32/F16/BF16); arithmetic and accumulation are float32;
 * - a "batched" tensor has `batch` samples of `per_sample` elements each;
 *   per-sample vectors (sigma, diagnostics) are float32 of length `batch`;
 * - outputs never overlap inputs (optimiser state is updated in place);
 * - NaN/Inf inside tensors propagate. Kernels with a nonfinite_out diagnostic count,
 *   per sample, the elements at which an input term or an element-wise output, as
 *   stored in the output dtype, is non-finite; each element counts once. So a float16
 *   or bfloat16 output that overflows to Inf from finite inputs is counted too, and
 *   zero means every element-wise output of the sample is finite. Per-sample outputs
 *   (losses, W_b, sums) are not counted: they are returned for the caller to check.
 */
#ifndef DIPP_H
#define DIPP_H

#include <stddef.h>
#include <stdint.h>

#include "dipp_math.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    DIPP_OK = 0,
    DIPP_ERR_NOMEM = 1,     /* an allocation failed */
    DIPP_ERR_ARGUMENT = 2,  /* a value the binding should have caught */
    DIPP_ERR_CUDA = 3,      /* a CUDA runtime call failed */
} dipp_status;

const char *dipp_status_message(dipp_status status);

/* Per-sample reductions: lanes accumulate strided elements of a chunk, then a
 * fixed tree folds the lanes (the order a CUDA warp's shuffle-down uses), then
 * chunk sums are added in chunk order in double. Thread count never matters. */
#define DIPP_RED_LANES 32
#define DIPP_RED_CHUNK 1024

/* ------------------------------------------------------------------ random */
/* fill_uniform: values strictly inside (0, 1) in every dtype, at least 2^-24 and at most
 * the dtype's largest value below 1 (1 - 2^-24, 1 - 2^-11, 1 - 2^-8 for float32, float16,
 * bfloat16; see dipp_uniform_in). fill_normal: Box-Muller on float32 uniforms. */
typedef struct {
    void *out;
    int dtype;
    int64_t n;
    uint64_t seed;
    uint64_t offset; /* in Philox blocks of four elements */
} dipp_fill_args;

/* ------------------------------------------------------------------ sigma */
typedef struct {
    float *sigma_out;        /* [batch] */
    int64_t *index_out;      /* [batch] or NULL; nearest table index */
    int64_t batch;
    uint64_t seed;
    uint64_t offset;
    float p_mean, p_std, sigma_min, sigma_max;
    const float *table;      /* ascending, or NULL */
    int64_t table_len;
    int snap;                /* nonzero: sigma_out takes the table value */
} dipp_sigma_args;

/* Sigma tables indexed by timestep t (ascending in t); out has `steps` entries. */
dipp_status dipp_table_iddpm_linear(double *out, int64_t steps, double beta_start, double beta_end, double clip);
dipp_status dipp_table_scaled_linear(double *out, int64_t steps, double beta_start, double beta_end);

/* ------------------------------------------------------------------ noise, CFG */
typedef struct {
    const void *x0;
    void *xt;
    void *eps_out;           /* or NULL */
    const float *sigma;      /* [batch] */
    int dtype;
    int64_t batch, per_sample;
    uint64_t seed, offset;
    int flow;                /* 0: x0 + s eps; 1: (1 - s) x0 + s eps */
} dipp_noise_args;

typedef struct {
    const void *uncond, *cond;
    void *out;
    int dtype;
    int64_t n;
    float omega;
} dipp_cfg_args;

/* ------------------------------------------------------------------ TA loss */
enum { DIPP_TA_UNIT = 0, DIPP_TA_EDM = 1 };

typedef struct {
    const void *d_ta, *x0;
    const float *sigma;      /* [batch]; may be NULL with DIPP_TA_UNIT */
    void *grad_out;          /* d(mean_b loss_b)/d(D_TA), or NULL */
    float *loss_out;         /* [batch]: lambda_b * scale * sum_i (D_TA - x0)^2 */
    int64_t *nonfinite_out;  /* [batch] or NULL; elements with D_TA - x0 or the stored gradient non-finite */
    int dtype;
    int64_t batch, per_sample;
    int weighting;
    float sigma_data;
    int mean_over_elements;  /* scale = 1/per_sample if nonzero, else 1 */
} dipp_ta_args;

/* ------------------------------------------------------------------ generator gradient */
enum { DIPP_W_UNIT = 0, DIPP_W_NORMALIZED = 1 };

typedef struct {
    const void *x0, *d_ta, *d_cond;
    const void *d_uncond;    /* NULL: omega ignored, D_ref = D_cond */
    const void *dr;          /* NULL: no reward term */
    void *grad_out;          /* G, dtype of the inputs */
    float *weight_out;       /* [batch] W_b */
    float *ref_dist_out;     /* [batch] mean |x0 - D_ref| */
    float *gap_out;          /* [batch] mean |D_TA - D_ref| */
    float *surrogate_out;    /* [batch] W_b <D_TA - D_ref, x0> */
    int64_t *nonfinite_out;  /* [batch] elements with x0, D_TA - D_ref, dr or the stored G non-finite */
    int dtype;
    int64_t batch, per_sample;
    float omega, alpha;
    int weighting;
    float min_norm;          /* floor of the normaliser, 1e-5 by default */
} dipp_gen_args;

/* ------------------------------------------------------------------ DI* pseudo-Huber */
enum { DIPP_HUBER_W_UNIT = 0, DIPP_HUBER_W_SIGMA2 = 1 };

typedef struct {
    const void *x0, *d_p, *d_q;
    const float *sigma;      /* [batch] */
    void *a_out, *b_out, *dprime_out; /* scaled by w(sigma_b) / (sigma_b^2 batch) */
    float *ysq_out, *yr_out, *h_out, *value_out; /* [batch]; value = w (h - c) */
    int64_t *nonfinite_out;  /* [batch] elements with y, r or a stored a, b, d' non-finite */
    int dtype;
    int64_t batch, per_sample;
    float c;
    int weighting;
} dipp_huber_args;

/* ------------------------------------------------------------------ EMA, Adam */
typedef struct {
    void *data;
    const void *src;         /* EMA: the parameter; Adam: the gradient */
    float *exp_avg, *exp_avg_sq; /* Adam only, float32; exp_avg NULL: no first moment (beta1 = 0) */
    int dtype, src_dtype;
    int64_t n;
} dipp_tensor_pair;

typedef struct {
    dipp_tensor_pair *tensors;
    int64_t count;
    double decay;            /* double: 1 - decay must not inherit float rounding */
} dipp_ema_args;

typedef struct {
    dipp_tensor_pair *tensors;
    int64_t count;
    double lr, beta1, beta2, eps, weight_decay; /* double, as torch.optim keeps them */
    int decoupled;           /* AdamW */
    int64_t step;            /* 1-based, after increment */
} dipp_adam_args;

/* ------------------------------------------------------------------ kernels */
#define DIPP_KERNELS(X)                                    \
    X(fill_uniform, const dipp_fill_args)                  \
    X(fill_normal, const dipp_fill_args)                   \
    X(sample_sigma, const dipp_sigma_args)                 \
    X(add_noise, const dipp_noise_args)                    \
    X(cfg_combine, const dipp_cfg_args)                    \
    X(ta_loss, const dipp_ta_args)                         \
    X(generator_grad, const dipp_gen_args)                 \
    X(huber_terms, const dipp_huber_args)                  \
    X(ema_update, const dipp_ema_args)                     \
    X(adam_step, const dipp_adam_args)

#define DIPP_DECLARE_CPU(name, argtype) dipp_status dipp_cpu_##name(argtype *args);
#define DIPP_DECLARE_CUDA(name, argtype) dipp_status dipp_cuda_##name(argtype *args, void *stream);
DIPP_KERNELS(DIPP_DECLARE_CPU)
DIPP_KERNELS(DIPP_DECLARE_CUDA)

/* Threads the CPU kernels use (OpenMP), 1 without OpenMP. */
int dipp_cpu_threads(void);

/* Memory-bandwidth probes for the benchmark (STREAM copy and triad), float32. */
dipp_status dipp_cpu_stream_copy(float *dst, const float *src, int64_t n);
dipp_status dipp_cpu_stream_triad(float *a, const float *b, const float *c, float scalar, int64_t n);

#ifdef __cplusplus
}
#endif

#endif /* DIPP_H */
