/* cuda_backend.h - the CUDA backend's calls beyond the ops table (backend.h creates it): its
 * sticky error. Not the kernels (the .cu files beside it); builds without nvcc answer from cuda_none.c. */
#ifndef MF_BACKEND_CUDA_BACKEND_H
#define MF_BACKEND_CUDA_BACKEND_H

#include "backend/backend.h"

/* The first CUDA error or unsupported shape this backend met, or NULL while there is none.
 * After an error every op is a no-op and downloads fill their destination with 0xff bytes
 * (NaN floats, -1 ids), so a forward pass that runs on sees garbage, never stale values. */
const char *cuda_backend_last_error(mf_backend *b);

#endif
