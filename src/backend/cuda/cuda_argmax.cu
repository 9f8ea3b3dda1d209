/* cuda_argmax.cu - the index of each row's largest value on the GPU (greedy decoding), so a
 * decode step hands the host one token id instead of the logits. Not sampling with temperature
 * (the host sampler, over downloaded logits). */
#include "backend/cuda/cuda_internal.cuh"

#define ARGMAX_THREADS 1024

/* Whether (v, i) beats (bv, bi): larger, or equal with a lower index; NaN never beats a number. */
__device__ __forceinline__ int argmax_better(float v, int64_t i, float bv, int64_t bi) {
    if (v != v) return 0;
    if (bv != bv) return 1;
    return v > bv || (v == bv && i < bi);
}

/* One block per row of x [rows][cols]: each thread scans a strided share, then the block reduces. */
__global__ void __launch_bounds__(ARGMAX_THREADS)
argmax_kernel(const float *__restrict__ x, int64_t cols, int32_t *__restrict__ out) {
    cb_pdl_trigger();
    __shared__ float sv[ARGMAX_THREADS / 32];
    __shared__ int64_t si[ARGMAX_THREADS / 32];
    const float *xr = x + (int64_t)blockIdx.x * cols;
    float bv = __int_as_float(0x7fc00000); /* NaN: loses to any number */
    int64_t bi = 0;
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) {
        const float v = xr[i];
        if (argmax_better(v, i, bv, bi)) bv = v, bi = i;
    }
    for (int o = 16; o; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (argmax_better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (argmax_better(sv[w], si[w], bv, bi)) bv = sv[w], bi = si[w];
        out[blockIdx.x] = (int32_t)bi;
    }
}

void cuda_op_argmax(mf_backend *b, const float *x, int64_t rows, int64_t cols, int32_t *out) {
    cuda_backend *c = cb_of(b);
    if (c->failed || rows <= 0 || cols <= 0) return;
    if (rows > INT32_MAX || cols > INT32_MAX) {
        cb_fail(c, "argmax: %lld rows of %lld not supported", (long long)rows, (long long)cols);
        return;
    }
    argmax_kernel<<<(unsigned)rows, ARGMAX_THREADS, 0, c->stream>>>(x, cols, out);
    CB_LAUNCHED(c, "argmax");
}
