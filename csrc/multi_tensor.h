/*
 * One parallel loop over many tensors (apex multi_tensor_apply style): every
 * tensor is cut into DIPP_RED_CHUNK-element tasks and the tasks of all
 * tensors are spread over the threads together.
 */
#ifndef DIPP_MULTI_TENSOR_H
#define DIPP_MULTI_TENSOR_H

#include <stdlib.h>

#include "cpu_common.h"

/* first_task[k] = tasks before tensor k; first_task[count] = all tasks. NULL on failure. */
static inline int64_t *dipp_task_prefix(const dipp_tensor_pair *tensors, int64_t count) {
    int64_t *first = malloc((size_t)(count + 1) * sizeof(int64_t));
    if (!first) return NULL;
    first[0] = 0;
    for (int64_t k = 0; k < count; ++k) first[k + 1] = first[k] + dipp_chunk_count(tensors[k].n);
    return first;
}

/* Tensor owning a task: the last k with first[k] <= task. */
static inline int64_t dipp_task_owner(const int64_t *first, int64_t count, int64_t task) {
    int64_t lo = 0, hi = count - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        if (first[mid] <= task) lo = mid; else hi = mid - 1;
    }
    return lo;
}

#endif /* DIPP_MULTI_TENSOR_H */
