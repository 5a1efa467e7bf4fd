/*
 * Turning Python arguments (NumPy arrays, __dlpack__ producers) into checked,
 * zero-copy views, and releasing them. Every check raises a Python exception
 * that names the argument; callers just return NULL when a function fails.
 */
#ifndef DIPP_TENSOR_ARG_H
#define DIPP_TENSOR_ARG_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "dlpack_abi.h"

/* View element types beyond the kernel dtypes (which are 0..2 as in dipp_math.h). */
enum { VIEW_F32 = 0, VIEW_F16 = 1, VIEW_BF16 = 2, VIEW_F64 = 3, VIEW_I64 = 4, VIEW_NTYPES = 5 };

#define DTYPES_FLOAT ((1u << VIEW_F32) | (1u << VIEW_F16) | (1u << VIEW_BF16))
#define DTYPES_F32 (1u << VIEW_F32)
#define DTYPES_I64 (1u << VIEW_I64)
#define DTYPES_F64 (1u << VIEW_F64)

#define VIEW_MAX_DIMS 16

typedef enum { ROLE_INPUT = 0, ROLE_OUTPUT = 1, ROLE_INOUT = 2 } view_role;

typedef struct {
    const char *name; /* points at label */
    char label[64];
    view_role role;
    void *data;
    int dtype;
    int ndim;
    int64_t shape[VIEW_MAX_DIMS];
    int64_t numel;
    int64_t itemsize;
    int device_type; /* kDLCPU or kDLCUDA */
    int device_id;
    PyObject *owner;                     /* array or capsule kept alive */
    DLManagedTensor *legacy;             /* to delete when done, or NULL */
    DLManagedTensorVersioned *versioned; /* to delete when done, or NULL */
} tensor_view;

/* All views of one call: released together; device and overlap checks span them.
 * Views are allocated one by one so pointers handed out stay valid. */
typedef struct {
    tensor_view **views;
    Py_ssize_t count, capacity;
} call_views;

void call_init(call_views *call);
void call_release(call_views *call);

/* Acquires obj as a view; NULL with an exception set on failure. */
tensor_view *call_tensor(call_views *call, PyObject *obj, const char *name, view_role role, unsigned dtypes);
/* Same, but Py_None gives NULL without an error (check PyErr_Occurred). */
tensor_view *call_optional(call_views *call, PyObject *obj, const char *name, view_role role, unsigned dtypes);

/* One device for all views; no output overlapping any other view. 0 ok, -1 error. */
int call_check_devices_and_overlap(call_views *call);

int check_same_shape(const tensor_view *a, const tensor_view *b);
int check_same_dtype(const tensor_view *a, const tensor_view *b);
/* v must have shape (batch,); `of` names the tensor that batch came from (NULL: none). */
int check_per_sample(const tensor_view *v, int64_t batch, const char *of);
int check_batched(const tensor_view *v); /* ndim >= 1 */

/*
 * Scalar arguments. Every entry point takes them as plain objects ("O") and converts
 * them here rather than with PyArg_Parse's d/s/p/n/K codes, whose errors do not name
 * the argument ("must be real number, not str", "embedded null character"). A NULL
 * object (argument not given) leaves *out unchanged, i.e. keeps the caller's default.
 * Wrong types raise TypeError, bad values ValueError; all return 0 or -1.
 */
int arg_double(PyObject *obj, const char *name, double *out); /* a real number, not bool */
int arg_bool(PyObject *obj, const char *name, int *out);      /* bool, numpy.bool_, or the ints 0 and 1 */
int arg_i64(PyObject *obj, const char *name, int64_t lo, int64_t hi, int64_t *out); /* an int in [lo, hi] */
int arg_u64(PyObject *obj, const char *name, uint64_t *out);  /* an int in [0, 2**64) */
/* Index of the str obj among the NULL-terminated choices (obj NULL: `fallback`); -1 on error. */
int arg_choice(PyObject *obj, const char *name, const char *const *choices, int fallback);

/* Checks of values the kernels take as float32: finite, and inside float32's range so the
 * conversion neither overflows to Inf nor, where 0 is invalid, underflows to 0. */
int arg_f32_finite(const char *name, double value);
int arg_f32_positive(const char *name, double value);
int arg_in_range(const char *name, double value, double lo, double hi, int lo_open, int hi_open);
/* On CPU: every element of a float32 per-sample vector finite and > 0. */
int check_sigma_values(const tensor_view *sigma);

/*
 * The multi-tensor kernels' fast path over parallel lists (tuples of equal length): every item a
 * NumPy array or, with an exporter, a torch CPU tensor that is_neg(x) says is not negated, read
 * through the exchange API or from its export_fn(x) DLPack capsule. One allocation for all items; no labels. All or
 * nothing: any item it cannot take, or that fails a check (dtype, contiguity, empty, device, shape
 * against the first list's item), gives 0 with no exception set, and the caller then takes the
 * checked path, which names the item. -1 only for errors that must propagate (no memory, an
 * exporter's KeyboardInterrupt). fast_lists_release also after a failed parse.
 */
typedef struct {
    void *data;
    const int64_t *shape; /* NumPy's dims or the capsule's shape, alive as long as the item */
    int64_t numel;
    int ndim, dtype;
    DLManagedTensor *managed; /* deleted by fast_lists_release, or NULL */
} list_item;

/* fast=(exchange_api, export_fn, is_neg, types) of the Python layer: torch.Tensor's
 * __dlpack_c_exchange_api__ capsule (or None), torch's to_dlpack, Tensor.is_neg, and the exact
 * tensor types that share that capsule. Borrowed from the call's arguments. */
typedef struct {
    int (*dltensor_from)(void *py_object, DLTensor *out); /* NULL: export_fn only */
    PyObject *export_fn, *is_neg, *types;
} list_exporter;

/* The fast= argument: 1 with ex set, 0 when not given (NULL or None), -1 on a TypeError. */
int list_exporter_arg(PyObject *obj, list_exporter *ex);

typedef struct {
    list_item *items; /* list k's item i at items[k * n + i] */
    Py_ssize_t n;
    int nlists;
} fast_lists;

int fast_lists_parse(fast_lists *f, PyObject *const *seqs, const view_role *roles, const unsigned *dtypes,
                     int nlists, const list_exporter *ex);
/* 1 when no output item overlaps any other item, 0 when one does, -1 on no memory. */
int fast_lists_disjoint(const fast_lists *f, const view_role *roles);
void fast_lists_release(fast_lists *f);

/*
 * The single-tensor kernels' fast path (fast= of their entries): each tensor argument a NumPy array or
 * an exact torch tensor type of ex->types that is not lazily negated, read through the exchange API
 * (no capsule, nothing to release). Like the lists, all or nothing: 1 taken, 0 (no exception set) for
 * anything the checked path must see, -1 only for errors that propagate.
 */
int fast_item(PyObject *obj, list_item *it, view_role role, unsigned dtypes, const list_exporter *ex);
/* 1 when no output among items[0..count) (data NULL: absent) overlaps another item, else 0. */
int fast_items_disjoint(const list_item *items, const view_role *roles, int count);

/* How a fast tensor argument relates to the first (the lead): any shape, a batch (the lead itself, at
 * least one dimension), the lead's shape and dtype, or one value per sample of the lead. */
enum { FAST_ANY = 0, FAST_BATCH = 1, FAST_LIKE = 2, FAST_SAMPLE = 3 };
typedef struct {
    unsigned char role, shape, optional, sigma; /* view_role; FAST_*; None allowed; values finite, > 0 */
    unsigned dtypes;
} fast_spec;

/* objs[k] checked as spec[k] into items[k] (data NULL for an absent optional), then the devices (CPU)
 * and overlaps: 1 taken, 0 hand the call back, -1 error. */
int fast_tensors(PyObject *const *objs, const fast_spec *spec, int count, const list_exporter *ex,
                 list_item *items);
/* What an entry called with fast= answers when the fast path does not take the call: NotImplemented,
 * the pending Exception (the checked path raises it again, in its order) cleared; NULL for the others. */
PyObject *fast_not_taken(void);

const char *view_dtype_name(int dtype);
/* Like PyErr_Format, but with C printf formats (floats included). */
void raise_error(PyObject *exception, const char *format, ...);

#endif /* DIPP_TENSOR_ARG_H */
