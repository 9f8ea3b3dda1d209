/* cuda_elementwise.cu - the elementwise ops on the GPU: add, x *= sigmoid(gate), SwiGLU and the
 * gated residual add; grid-stride loops. Not row movement (cuda_rows.cu), not the Gated DeltaNet
 * gates (computed inside deltanet_step, cuda_deltanet.cu). */
#include "backend/cuda/cuda_internal.cuh"

#define EW_THREADS 256
#define EW_LOOP(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

/* y, x [n] */
__global__ void add_kernel(float *y, const float *x, int64_t n) {
    cb_pdl_enter(); /* launched dependent: the ops before wrote what it reads */
    EW_LOOP(i, n) y[i] += x[i];
}
/* x, gate [n] */
__global__ void mul_sigmoid_kernel(float *x, const float *gate, int64_t n) {
    cb_pdl_enter(); /* launched dependent: the ops before wrote what it reads */
    EW_LOOP(i, n) x[i] *= cb_sigmoid(gate[i]);
}
/* g, u [n] */
__global__ void swiglu_kernel(float *g, const float *u, int64_t n) {
    cb_pdl_enter(); /* launched dependent: the ops before wrote what it reads */
    EW_LOOP(i, n) g[i] = cb_silu(g[i]) * u[i];
}
/* y, x [n_tok][cols]; gate [n_tok] */
__global__ void add_gated_kernel(float *y, const float *x, const float *gate, int64_t n, int64_t cols) {
    cb_pdl_enter(); /* launched dependent: the ops before wrote what it reads */
    EW_LOOP(i, n) y[i] += cb_sigmoid(gate[i / cols]) * x[i];
}

#define EW_RUN(c, what, n, kernel, ...)                                               \
    do {                                                                              \
        if ((c)->failed || (n) <= 0) return;                                          \
        cb_launch_dependent((c), kernel, dim3(cb_grid((c), (n), EW_THREADS)), dim3(EW_THREADS), 0, __VA_ARGS__); \
        CB_LAUNCHED((c), what);                                                       \
    } while (0)

void cuda_op_add(mf_backend *b, float *y, const float *x, int64_t n) {
    EW_RUN(cb_of(b), "add", n, add_kernel, y, x, n);
}

void cuda_op_mul_sigmoid(mf_backend *b, float *x, const float *gate, int64_t n) {
    EW_RUN(cb_of(b), "mul_sigmoid", n, mul_sigmoid_kernel, x, gate, n);
}

void cuda_op_swiglu(mf_backend *b, float *g, const float *u, int64_t n) {
    EW_RUN(cb_of(b), "swiglu", n, swiglu_kernel, g, u, n);
}

void cuda_op_add_gated(mf_backend *b, float *y, const float *x, const float *gate, int64_t n_tok, int64_t cols) {
    if (cols <= 0) return;
    EW_RUN(cb_of(b), "add_gated", n_tok * cols, add_gated_kernel, y, x, gate, n_tok * cols, cols);
}
