/* TA (fake-score) denoising loss per sample and its gradient w.r.t. the TA output. */
#include "chunk_reduce.cuh"

enum { TA_SQ, TA_BAD, TA_NQ };

template <int DT>
struct ta_reduce_op {
    const void *d_ta, *x0;
    __device__ __forceinline__ int prepare(int64_t) const { return 0; }
    __device__ __forceinline__ void operator()(const int &, int64_t e, float (&acc)[TA_NQ]) const {
        float d = dipp_load(d_ta, e, DT) - dipp_load(x0, e, DT);
        acc[TA_SQ] += d * d;
        acc[TA_BAD] += dipp_is_finite(d) ? 0.0f : 1.0f;
    }
};

struct ta_grad_consts {
    float factor;
    int64_t *nonfinite; /* this sample's count, or NULL */
};

/* Writes the gradient and counts its elements that came out non-finite from a finite
 * D_TA - x0 (the others were counted in pass 1), as the CPU's ta_write_range. */
template <int DT>
struct ta_grad_op {
    const void *d_ta, *x0;
    void *grad_out;
    const float *factor;
    int64_t *nonfinite_out;
    __device__ __forceinline__ ta_grad_consts prepare(int64_t b) const {
        ta_grad_consts k;
        k.factor = factor[b];
        k.nonfinite = nonfinite_out ? nonfinite_out + b : NULL;
        return k;
    }
    __device__ __forceinline__ void apply(const ta_grad_consts &k, int64_t e) const {
        const float ta = dipp_load(d_ta, e, DT), x = dipp_load(x0, e, DT);
        const int stored = dipp_store_finite(grad_out, e, DT, dipp_ta_grad(ta, x, k.factor));
        if (!stored && k.nonfinite && dipp_is_finite(ta - x)) dipp_cuda_count_one(k.nonfinite);
    }
};

/* One thread per sample: loss, non-finite count, gradient factor. */
__global__ void __launch_bounds__(DIPP_CUDA_THREADS)
dipp_ta_finalize_kernel(const dipp_ta_args a, const int64_t chunks, const float *__restrict__ partial,
                        float *__restrict__ factor) {
    for (int64_t b = dipp_cuda_thread_index(); b < a.batch; b += dipp_cuda_thread_stride()) {
        double sums[TA_NQ];
        dipp_cuda_combine_chunks<TA_NQ>(partial, b, chunks, sums);
        float weight = dipp_ta_weight(a.sigma ? a.sigma[b] : 1.0f, a.weighting == DIPP_TA_EDM, a.sigma_data);
        a.loss_out[b] = dipp_ta_sample_loss(weight, sums[TA_SQ], a.per_sample, a.mean_over_elements);
        if (a.nonfinite_out) a.nonfinite_out[b] = (int64_t)sums[TA_BAD];
        factor[b] = dipp_ta_grad_factor(weight, a.per_sample, a.batch, a.mean_over_elements);
    }
}

template <int DT>
static dipp_status ta_launch(const dipp_ta_args *a, int64_t chunks, float *partial, float *factor,
                             cudaStream_t stream) {
    DIPP_TRY((dipp_cuda_chunk_reduce<TA_NQ>(ta_reduce_op<DT>{a->d_ta, a->x0}, a->batch, a->per_sample, chunks,
                                            partial, stream)));
    DIPP_CUDA_LAUNCH(dipp_cuda_sample_blocks(a->batch), DIPP_CUDA_THREADS, stream, dipp_ta_finalize_kernel)(
        *a, chunks, partial, factor);
    DIPP_CUDA_LAUNCH_CHECK();
    if (a->grad_out)
        DIPP_TRY(dipp_cuda_chunk_apply(ta_grad_op<DT>{a->d_ta, a->x0, a->grad_out, factor, a->nonfinite_out},
                                       a->batch, a->per_sample, chunks, stream));
    return DIPP_OK;
}

template <int DT>
static dipp_status ta_run(const dipp_ta_args *a, cudaStream_t stream) {
    if (a->batch < 0 || a->per_sample < 0) return DIPP_ERR_ARGUMENT;
    if (a->batch == 0) return DIPP_OK;
    const int64_t chunks = dipp_cuda_chunk_count(a->per_sample);
    const size_t partial_bytes = dipp_cuda_align16((size_t)(a->batch * chunks) * TA_NQ * sizeof(float));
    const size_t factor_bytes = (size_t)a->batch * sizeof(float);
    void *scratch = NULL;
    DIPP_TRY(dipp_cuda_scratch_alloc(&scratch, partial_bytes + factor_bytes, stream));
    float *partial = (float *)scratch;
    float *factor = (float *)((char *)scratch + partial_bytes);
    dipp_status status = ta_launch<DT>(a, chunks, partial, factor, stream);
    return dipp_cuda_scratch_free(scratch, stream, status);
}

extern "C" dipp_status dipp_cuda_ta_loss(const dipp_ta_args *args, void *stream) {
    dipp_status status = DIPP_OK;
#define CALL(DT) status = ta_run<DT>(args, dipp_cuda_stream(stream))
    DIPP_CUDA_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return status;
}
