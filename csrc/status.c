/* Messages of the status codes; the binding turns them into exceptions. */
#include "dipp.h"

const char *dipp_status_message(dipp_status status) {
    switch (status) {
    case DIPP_OK: return "ok";
    case DIPP_ERR_NOMEM: return "out of memory while allocating kernel scratch space";
    case DIPP_ERR_ARGUMENT: return "invalid argument reached the kernel (please report: the binding should catch it)";
    case DIPP_ERR_CUDA: return "a CUDA runtime call failed";
    }
    return "unknown status";
}
