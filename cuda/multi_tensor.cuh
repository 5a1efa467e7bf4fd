/*
 * Multi-tensor launches (apex multi_tensor_apply style) without host-to-device
 * copies: the tensor list (host memory, device data pointers) is packed into
 * kernel parameters, up to DIPP_MT_MAX_TENSORS tensors per launch (one launch
 * for most models, more only for long lists). Every tensor is cut into
 * DIPP_RED_CHUNK-element tasks as on the CPU; one block per task, blocks
 * stride over the tasks of the launch, the owner of a task is found by binary
 * search over the task prefix.
 */
#ifndef DIPP_CUDA_MULTI_TENSOR_CUH
#define DIPP_CUDA_MULTI_TENSOR_CUH

#include "cuda_common.cuh"

#define DIPP_MT_MAX_TENSORS 64

typedef struct {
    void *data[DIPP_MT_MAX_TENSORS];
    const void *src[DIPP_MT_MAX_TENSORS];
    float *exp_avg[DIPP_MT_MAX_TENSORS];
    float *exp_avg_sq[DIPP_MT_MAX_TENSORS];
    int64_t n[DIPP_MT_MAX_TENSORS];
    int64_t first[DIPP_MT_MAX_TENSORS + 1]; /* tasks before tensor k within this launch */
    unsigned char dtype[DIPP_MT_MAX_TENSORS], src_dtype[DIPP_MT_MAX_TENSORS];
    int count;
} dipp_mt_list;

/* Stay well inside the classic 4 KiB kernel-parameter limit (list + op constants). */
static_assert(sizeof(dipp_mt_list) <= 3584, "multi-tensor list too large for kernel parameters");

/* Tensor owning a task: the last k with first[k] <= task (as dipp_task_owner). */
__device__ __forceinline__ int dipp_mt_owner(const dipp_mt_list &list, int64_t task) {
    int lo = 0, hi = list.count - 1;
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;
        if (list.first[mid] <= task) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/*
 * Op provides  template <int DT, int ST> __device__ void run(const dipp_mt_list &, int k, int64_t e) const;
 * called for every element e of tensor k; the dtype pair is dispatched to constants per task.
 */
template <class Op>
__global__ void __launch_bounds__(DIPP_CUDA_THREADS) dipp_mt_kernel(const dipp_mt_list list, const Op op) {
    const int64_t total = list.first[list.count];
    for (int64_t task = blockIdx.x; task < total; task += gridDim.x) {
        const int k = dipp_mt_owner(list, task);
        const int64_t e0 = (task - list.first[k]) * DIPP_RED_CHUNK;
        const int64_t e1 = e0 + DIPP_RED_CHUNK < list.n[k] ? e0 + DIPP_RED_CHUNK : list.n[k];
        const int64_t start = e0 + (int64_t)threadIdx.x, step = blockDim.x;
        switch (list.dtype[k] * 3 + list.src_dtype[k]) {
#define DIPP_MT_CASE(DT, ST)                                                          \
    case DT * 3 + ST:                                                                 \
        for (int64_t e = start; e < e1; e += step) op.template run<DT, ST>(list, k, e); \
        break;
            DIPP_MT_CASE(DIPP_DT_F32, DIPP_DT_F32)
            DIPP_MT_CASE(DIPP_DT_F32, DIPP_DT_F16)
            DIPP_MT_CASE(DIPP_DT_F32, DIPP_DT_BF16)
            DIPP_MT_CASE(DIPP_DT_F16, DIPP_DT_F32)
            DIPP_MT_CASE(DIPP_DT_F16, DIPP_DT_F16)
            DIPP_MT_CASE(DIPP_DT_F16, DIPP_DT_BF16)
            DIPP_MT_CASE(DIPP_DT_BF16, DIPP_DT_F32)
            DIPP_MT_CASE(DIPP_DT_BF16, DIPP_DT_F16)
            DIPP_MT_CASE(DIPP_DT_BF16, DIPP_DT_BF16)
#undef DIPP_MT_CASE
        default: break; /* rejected on the host */
        }
    }
}

static inline int dipp_mt_valid_dtype(int dtype) {
    return dtype == DIPP_DT_F32 || dtype == DIPP_DT_F16 || dtype == DIPP_DT_BF16;
}

template <class Op>
static inline dipp_status dipp_mt_launch(const dipp_mt_list &list, const Op &op, cudaStream_t stream) {
    const int64_t total = list.first[list.count];
    if (total <= 0) return DIPP_OK;
    DIPP_CUDA_LAUNCH(dipp_cuda_blocks(total, 1), DIPP_CUDA_THREADS, stream, dipp_mt_kernel<Op>)(list, op);
    DIPP_CUDA_LAUNCH_CHECK();
    return DIPP_OK;
}

/* Packs the tensors (skipping empty ones) into lists and launches op over each. */
template <class Op>
static inline dipp_status dipp_mt_apply(const dipp_tensor_pair *tensors, int64_t count, const Op &op,
                                        cudaStream_t stream) {
    if (count < 0 || (count > 0 && !tensors)) return DIPP_ERR_ARGUMENT;
    for (int64_t k = 0; k < count; ++k) {
        if (tensors[k].n < 0) return DIPP_ERR_ARGUMENT;
        if (!dipp_mt_valid_dtype(tensors[k].dtype) || !dipp_mt_valid_dtype(tensors[k].src_dtype))
            return DIPP_ERR_ARGUMENT;
    }
    dipp_mt_list list{};
    list.count = 0;
    list.first[0] = 0;
    for (int64_t k = 0; k < count; ++k) {
        const dipp_tensor_pair *t = &tensors[k];
        if (t->n == 0) continue;
        const int j = list.count;
        list.data[j] = t->data;
        list.src[j] = t->src;
        list.exp_avg[j] = t->exp_avg;
        list.exp_avg_sq[j] = t->exp_avg_sq;
        list.n[j] = t->n;
        list.dtype[j] = (unsigned char)t->dtype;
        list.src_dtype[j] = (unsigned char)t->src_dtype;
        list.first[j + 1] = list.first[j] + dipp_cuda_chunk_count(t->n);
        list.count = j + 1;
        if (list.count == DIPP_MT_MAX_TENSORS) {
            DIPP_TRY(dipp_mt_launch(list, op, stream));
            list.count = 0;
            list.first[0] = 0;
        }
    }
    if (list.count > 0) DIPP_TRY(dipp_mt_launch(list, op, stream));
    return DIPP_OK;
}

#endif /* DIPP_CUDA_MULTI_TENSOR_CUH */
