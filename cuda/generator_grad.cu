/*
 * DI++ generator gradient G = (W_b (D_TA - D_ref^w) - alpha dr/dx0) / B.
 * Pass 1 reduces per sample (normaliser, gap, surrogate, non-finite count),
 * a per-sample kernel derives W_b and the diagnostics, pass 2 writes G.
 */
#include "chunk_reduce.cuh"

enum { GEN_REF_DIST, GEN_GAP, GEN_SURROGATE, GEN_BAD, GEN_NQ };

template <int DT>
__device__ __forceinline__ float gen_ref(const dipp_gen_args &a, int64_t e) {
    float cond = dipp_load(a.d_cond, e, DT);
    return a.d_uncond ? dipp_cfg(dipp_load(a.d_uncond, e, DT), cond, a.omega) : cond;
}

template <int DT>
struct gen_reduce_op {
    dipp_gen_args a;
    __device__ __forceinline__ int prepare(int64_t) const { return 0; }
    __device__ __forceinline__ void operator()(const int &, int64_t e, float (&acc)[GEN_NQ]) const {
        float x0 = dipp_load(a.x0, e, DT);
        float ta = dipp_load(a.d_ta, e, DT);
        float ref = gen_ref<DT>(a, e);
        float diff = ta - ref;
        float dr = a.dr ? dipp_load(a.dr, e, DT) : 0.0f;
        acc[GEN_REF_DIST] += fabsf(x0 - ref);
        acc[GEN_GAP] += fabsf(diff);
        acc[GEN_SURROGATE] += diff * x0;
        acc[GEN_BAD] += (dipp_is_finite(x0) && dipp_is_finite(diff) && dipp_is_finite(dr)) ? 0.0f : 1.0f;
    }
};

struct gen_grad_consts {
    float w_over_b;
    int64_t *nonfinite; /* this sample's count */
};

/* Writes G and counts its elements that came out non-finite although x0, D_TA - D_ref and dr
 * are finite (the others were counted in pass 1), as the CPU's gen_write_range; x0 is only
 * read for such elements. */
template <int DT>
struct gen_grad_op {
    dipp_gen_args a;
    float a_over_b; /* alpha / (float)batch, computed on the host as the CPU does */
    __device__ __forceinline__ gen_grad_consts prepare(int64_t b) const {
        gen_grad_consts k;
        k.w_over_b = a.weight_out[b] / (float)a.batch;
        k.nonfinite = a.nonfinite_out + b;
        return k;
    }
    __device__ __forceinline__ void apply(const gen_grad_consts &k, int64_t e) const {
        const float dr = a.dr ? dipp_load(a.dr, e, DT) : 0.0f;
        const float ta = dipp_load(a.d_ta, e, DT), ref = gen_ref<DT>(a, e);
        const float g = dipp_generator_grad(ta, ref, dr, k.w_over_b, a_over_b);
        if (!dipp_store_finite(a.grad_out, e, DT, g) && dipp_is_finite(ta - ref) && dipp_is_finite(dr) &&
            dipp_is_finite(dipp_load(a.x0, e, DT)))
            dipp_cuda_count_one(k.nonfinite);
    }
};

/* One thread per sample: W_b and the per-sample diagnostics. */
__global__ void __launch_bounds__(DIPP_CUDA_THREADS)
dipp_gen_finalize_kernel(const dipp_gen_args a, const int64_t chunks, const float *__restrict__ partial) {
    for (int64_t b = dipp_cuda_thread_index(); b < a.batch; b += dipp_cuda_thread_stride()) {
        double sums[GEN_NQ];
        dipp_cuda_combine_chunks<GEN_NQ>(partial, b, chunks, sums);
        float ref_dist = dipp_mean_from_sum(sums[GEN_REF_DIST], a.per_sample);
        float weight = dipp_generator_weight(ref_dist, a.weighting == DIPP_W_NORMALIZED, a.min_norm);
        a.weight_out[b] = weight;
        a.ref_dist_out[b] = ref_dist;
        a.gap_out[b] = dipp_mean_from_sum(sums[GEN_GAP], a.per_sample);
        a.surrogate_out[b] = (float)((double)weight * sums[GEN_SURROGATE]);
        a.nonfinite_out[b] = (int64_t)sums[GEN_BAD];
    }
}

template <int DT>
static dipp_status gen_launch(const dipp_gen_args *a, int64_t chunks, float *partial, cudaStream_t stream) {
    DIPP_TRY((dipp_cuda_chunk_reduce<GEN_NQ>(gen_reduce_op<DT>{*a}, a->batch, a->per_sample, chunks, partial,
                                             stream)));
    DIPP_CUDA_LAUNCH(dipp_cuda_sample_blocks(a->batch), DIPP_CUDA_THREADS, stream, dipp_gen_finalize_kernel)(
        *a, chunks, partial);
    DIPP_CUDA_LAUNCH_CHECK();
    const float a_over_b = a->alpha / (float)a->batch;
    DIPP_TRY(dipp_cuda_chunk_apply(gen_grad_op<DT>{*a, a_over_b}, a->batch, a->per_sample, chunks, stream));
    return DIPP_OK;
}

template <int DT>
static dipp_status gen_run(const dipp_gen_args *a, cudaStream_t stream) {
    if (a->batch < 0 || a->per_sample < 0) return DIPP_ERR_ARGUMENT;
    if (a->batch == 0) return DIPP_OK;
    const int64_t chunks = dipp_cuda_chunk_count(a->per_sample);
    void *scratch = NULL;
    DIPP_TRY(dipp_cuda_scratch_alloc(&scratch, (size_t)(a->batch * chunks) * GEN_NQ * sizeof(float), stream));
    dipp_status status = gen_launch<DT>(a, chunks, (float *)scratch, stream);
    return dipp_cuda_scratch_free(scratch, stream, status);
}

extern "C" dipp_status dipp_cuda_generator_grad(const dipp_gen_args *args, void *stream) {
    dipp_status status = DIPP_OK;
#define CALL(DT) status = gen_run<DT>(args, dipp_cuda_stream(stream))
    DIPP_CUDA_DISPATCH_DTYPE(args->dtype, CALL);
#undef CALL
    return status;
}
