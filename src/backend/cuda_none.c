/* cuda_none.c - the CUDA entry points of a build without nvcc: no device, a clear message.
 * Not compiled when the CUDA backend is (MF_WITH_CUDA). */
#ifndef MF_WITH_CUDA
#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"

mf_backend *cuda_backend_create(int device, mf_err *err) {
    (void)device;
    err_set(err, MF_ERR_UNSUPPORTED, "this moeflux was built without CUDA (nvcc was not found at build time)");
    return NULL;
}

int cuda_backend_available(void) { return 0; }

const char *cuda_backend_last_error(mf_backend *b) {
    (void)b;
    return NULL;
}
#endif
