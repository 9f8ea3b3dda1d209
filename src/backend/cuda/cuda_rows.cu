/* cuda_rows.cu - row movement on the GPU: strided row copies, gathers by index and the weighted
 * scatter-add of expert outputs (indices unique within a call: no atomics). Not elementwise math,
 * not KV cache writes (attention_prep, cuda_attn_prep.cu). */
#include "backend/cuda/cuda_internal.cuh"

#define ROWS_THREADS 256

/* Block (column block, row group): rows blockIdx.y, + gridDim.y, ...; columns in the block.
 * idx == NULL: source row r is r. dst[r][:] = src[idx[r]][:], strides in floats. */
__global__ void rows_copy_kernel(float *__restrict__ dst, int64_t dst_stride, const float *__restrict__ src,
                                 int64_t src_stride, const int32_t *__restrict__ idx, int64_t rows, int64_t cols) {
    cb_pdl_trigger();
    const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const int64_t sr = idx ? idx[r] : r;
        dst[r * dst_stride + col] = src[sr * src_stride + col];
    }
}

/* y [*][cols] rows idx[i] += w[i] * src[i]; src [n][cols] */
__global__ void scatter_add_kernel(float *__restrict__ y, const float *__restrict__ src, const int32_t *__restrict__ idx,
                                   const float *__restrict__ w, int64_t n, int64_t cols) {
    cb_pdl_trigger();
    const int64_t col = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= cols) return;
    for (int64_t i = blockIdx.y; i < n; i += gridDim.y) y[(int64_t)idx[i] * cols + col] += w[i] * src[i * cols + col];
}

static dim3 rows_grid(int64_t rows, int64_t cols) {
    int64_t gy = rows < 4096 ? rows : 4096;
    return dim3((unsigned)((cols + ROWS_THREADS - 1) / ROWS_THREADS), (unsigned)gy);
}

void cuda_op_copy_rows(mf_backend *b, float *dst, int64_t dst_stride, const float *src, int64_t src_stride, int64_t rows,
                       int64_t cols) {
    cuda_backend *c = cb_of(b);
    if (c->failed || rows <= 0 || cols <= 0) return;
    rows_copy_kernel<<<rows_grid(rows, cols), ROWS_THREADS, 0, c->stream>>>(dst, dst_stride, src, src_stride, NULL, rows,
                                                                            cols);
    CB_LAUNCHED(c, "copy_rows");
}

void cuda_op_gather_rows(mf_backend *b, float *dst, const float *src, const int32_t *idx, int64_t n, int64_t cols) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n <= 0 || cols <= 0) return;
    rows_copy_kernel<<<rows_grid(n, cols), ROWS_THREADS, 0, c->stream>>>(dst, cols, src, cols, idx, n, cols);
    CB_LAUNCHED(c, "gather_rows");
}

void cuda_op_scatter_add(mf_backend *b, float *y, const float *src, const int32_t *idx, const float *w, int64_t n,
                         int64_t cols) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n <= 0 || cols <= 0) return;
    scatter_add_kernel<<<rows_grid(n, cols), ROWS_THREADS, 0, c->stream>>>(y, src, idx, w, n, cols);
    CB_LAUNCHED(c, "scatter_add");
}
