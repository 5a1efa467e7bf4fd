/*
 * DI* pseudo-Huber pieces: per-sample |y|^2, y.r, h, d(y), and the scaled
 * vectors a = d' + d''r, b = d''r, d' that the surrogate loss needs.
 */
#include "chunk_reduce.cuh"

enum { HUB_YSQ, HUB_YR, HUB_BAD, HUB_NQ };

/* 1 / sigma_b^2 in float, as the CPU computes it per task. */
__device__ __forceinline__ float huber_inv_s2(const float *sigma, int64_t b) { return 1.0f / (sigma[b] * sigma[b]); }

template <int DT>
struct huber_reduce_op {
    const void *x0, *d_p, *d_q;
    const float *sigma;
    __device__ __forceinline__ float prepare(int64_t b) const { return huber_inv_s2(sigma, b); }
    __device__ __forceinline__ void operator()(const float &inv_s2, int64_t e, float (&acc)[HUB_NQ]) const {
        float y, res;
        dipp_huber_y_r(dipp_load(d_p, e, DT), dipp_load(d_q, e, DT), dipp_load(x0, e, DT), inv_s2, &y, &res);
        acc[HUB_YSQ] += y * y;
        acc[HUB_YR] += y * res;
        acc[HUB_BAD] += (dipp_is_finite(y) && dipp_is_finite(res)) ? 0.0f : 1.0f;
    }
};

struct huber_sample_consts {
    dipp_huber_sample_t s;
    float inv_s2;
    int64_t *nonfinite; /* this sample's count */
};

template <int DT>
struct huber_vector_op {
    const void *x0, *d_p, *d_q;
    const float *sigma;
    void *a_out, *b_out, *dprime_out;
    const dipp_huber_sample_t *per;
    int64_t *nonfinite_out;
    __device__ __forceinline__ huber_sample_consts prepare(int64_t b) const {
        huber_sample_consts k;
        k.s = per[b];
        k.inv_s2 = huber_inv_s2(sigma, b);
        k.nonfinite = nonfinite_out + b;
        return k;
    }
    /* Also counts the elements whose a, b or d' came out non-finite from a finite y and r
     * (pass 1 counted the others), as the CPU's huber_write_range. */
    __device__ __forceinline__ void apply(const huber_sample_consts &k, int64_t e) const {
        float y, res, va, vb, vd;
        dipp_huber_y_r(dipp_load(d_p, e, DT), dipp_load(d_q, e, DT), dipp_load(x0, e, DT), k.inv_s2, &y, &res);
        dipp_huber_vectors(y, res, k.s.inv_h, k.s.yr_over_h2, &va, &vb, &vd);
        const int stored = dipp_store_finite(a_out, e, DT, k.s.scale * va) &
                           dipp_store_finite(b_out, e, DT, k.s.scale * vb) &
                           dipp_store_finite(dprime_out, e, DT, k.s.scale * vd);
        if (!stored && dipp_is_finite(y) && dipp_is_finite(res)) dipp_cuda_count_one(k.nonfinite);
    }
};

/* One thread per sample: h, value, scale and the diagnostics. */
__global__ void __launch_bounds__(DIPP_CUDA_THREADS)
dipp_huber_finalize_kernel(const dipp_huber_args a, const int64_t chunks, const float *__restrict__ partial,
                           dipp_huber_sample_t *__restrict__ per) {
    for (int64_t b = dipp_cuda_thread_index(); b < a.batch; b += dipp_cuda_thread_stride()) {
        double sums[HUB_NQ];
        dipp_cuda_combine_chunks<HUB_NQ>(partial, b, chunks, sums);
        dipp_huber_sample_t s = dipp_huber_sample(sums[HUB_YSQ], sums[HUB_YR], a.c, a.sigma[b],
                                                  a.weighting == DIPP_HUBER_W_SIGMA2, a.batch);
        per[b] = s;
        a.ysq_out[b] = (float)sums[HUB_YSQ];
        a.yr_out[b] = (float)sums[HUB_YR];
        a.h_out[b] = s.h;
        a.value_out[b] = s.value;
        a.nonfinite_out[b] = (int64_t)sums[HUB_BAD];
    }
}

template <int DT>
static dipp_status huber_launch(const dipp_huber_args *a, int64_t chunks, float *partial, dipp_huber_sample_t *per,
                                cudaStream_t stream) {
    DIPP_TRY((dipp_cuda_chunk_reduce<HUB_NQ>(huber_reduce_op<DT>{a->x0, a->d_p, a->d_q, a->sigma}, a->batch,
                                             a->per_sample, chunks, partial, stream)));
    DIPP_CUDA_LAUNCH(dipp_cuda_sample_blocks(a->batch), DIPP_CUDA_THREADS, stream, dipp_huber_finalize_kernel)(
        *a, chunks, partial, per);
    DIPP_CUDA_LAUNCH_CHECK();
    DIPP_TRY(dipp_cuda_chunk_apply(huber_vector_op<DT>{a->x0, a->d_p, a->d_q, a->sigma, a->a_out, a->b_out,
                                                       a->dprime_out, per, a->nonfinite_out},
                                   a->batch, a->per_sample, chunks, stream));
    return DIPP_OK;
}

template <int DT>
static dipp_status huber_run(const dipp_huber_args *a, cudaStream_t stream) {
    if (a->batch < 0 || a->per_sample < 0) return DIPP_ERR_ARGUMENT;
    if (a->batch == 0) return DIPP_OK;
    const int64_t chunks = dipp_cuda_chunk_count(a->per_sample);
    const size_t partial_bytes = dipp_cuda_align16((size_t)(a->batch * chunks) * HUB_NQ * sizeof(float));
    const size_t per_bytes = (size_t)a->batch * sizeof(dipp_huber_sample_t);
    void *scratch = NULL;
    DIPP_TRY(dipp_cuda_scratch_alloc(&scratch, partial_bytes + per_bytes, stream));
    float *partial = (float *)scratch;
    dipp_huber_sample_t *per = (dipp_huber_sample_t *)((char *)scratch + partial_bytes);
    dipp_status status = huber_launch<DT>(a, chunks, partial, per, stream);
    return dipp_cuda_scratch_free(scratch, stream, status);
}

extern "C" dipp_status dipp_cuda_huber_terms(const dipp_huber_args *args, void *stream) {
    dipp_status status = DIPP_OK;
#define CALL(DT) status = huber_run<DT>(args, dipp_cuda_stream(stream))
    DIPP_CUDA_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return status;
}
