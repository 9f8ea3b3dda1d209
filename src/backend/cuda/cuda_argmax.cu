/* cuda_argmax.cu - the index of each row's largest value on the GPU (greedy decoding), so a
 * decode step hands the host one token id instead of the logits. Not sampling with temperature
 * (the host sampler, over downloaded logits). */
#include "backend/cuda/cuda_internal.cuh"

#define ARGMAX_THREADS 256

/* Whether (v, i) beats (bv, bi): larger, or equal with a lower index; NaN never beats a number. */
__device__ __forceinline__ int argmax_better(float v, int64_t i, float bv, int64_t bi) {
    if (v != v) return 0;
    if (bv != bv) return 1;
    return v > bv || (v == bv && i < bi);
}

/* One block per row of x [rows][cols]: each thread scans a strided share, then the block reduces.
 * Unrolled by 4 so that a thread has four loads in flight, not one. */
__device__ __forceinline__ void argmax_block(const float *__restrict__ xr, int64_t begin, int64_t end, float &bv,
                                             int64_t &bi) {
    bv = __int_as_float(0x7fc00000); /* NaN: loses to any number */
    bi = begin;
    int64_t i = begin + threadIdx.x;
    for (; i + 3 * (int64_t)blockDim.x < end; i += 4 * (int64_t)blockDim.x) {
        float v[4];
#pragma unroll
        for (int k = 0; k < 4; k++) v[k] = xr[i + k * (int64_t)blockDim.x];
#pragma unroll
        for (int k = 0; k < 4; k++)
            if (argmax_better(v[k], i + k * (int64_t)blockDim.x, bv, bi)) bv = v[k], bi = i + k * (int64_t)blockDim.x;
    }
    for (; i < end; i += blockDim.x)
        if (argmax_better(xr[i], i, bv, bi)) bv = xr[i], bi = i;
}

/* The block's best of every thread's (bv, bi); thread 0 gets it. */
__device__ __forceinline__ void argmax_reduce(float &bv, int64_t &bi) {
    __shared__ float sv[ARGMAX_THREADS / 32];
    __shared__ int64_t si[ARGMAX_THREADS / 32];
    for (int o = 16; o; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (argmax_better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sv[warp] = bv, si[warp] = bi;
    __syncthreads();
    if (threadIdx.x == 0)
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (argmax_better(sv[w], si[w], bv, bi)) bv = sv[w], bi = si[w];
}

__global__ void __launch_bounds__(ARGMAX_THREADS)
argmax_kernel(const float *__restrict__ x, int64_t cols, int32_t *__restrict__ out) {
    cb_pdl_enter(); /* launched dependent: the ops before wrote what it reads */
    float bv;
    int64_t bi;
    argmax_block(x + (int64_t)blockIdx.x * cols, 0, cols, bv, bi);
    argmax_reduce(bv, bi);
    if (threadIdx.x == 0) out[blockIdx.x] = (int32_t)bi;
}

/* One row split over the grid: block b scans its span and leaves its best in part; the last
 * block to finish (counted in done, which it resets) reduces the parts in block order. */
__global__ void __launch_bounds__(ARGMAX_THREADS)
argmax_split_kernel(const float *__restrict__ x, int64_t cols, int64_t span, float *part_v, int64_t *part_i,
                    unsigned *done, int32_t *__restrict__ out) {
    cb_pdl_enter(); /* launched dependent: the ops before wrote what it reads */
    __shared__ bool last;
    const int64_t begin = (int64_t)blockIdx.x * span, end = begin + span < cols ? begin + span : cols;
    float bv;
    int64_t bi;
    argmax_block(x, begin, end, bv, bi);
    argmax_reduce(bv, bi);
    if (threadIdx.x == 0) {
        part_v[blockIdx.x] = bv;
        part_i[blockIdx.x] = bi;
        __threadfence();
        last = atomicAdd(done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    bv = __int_as_float(0x7fc00000);
    bi = 0;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += blockDim.x) {
        const float v = ((volatile float *)part_v)[b];
        const int64_t i = ((volatile int64_t *)part_i)[b];
        if (argmax_better(v, i, bv, bi)) bv = v, bi = i;
    }
    argmax_reduce(bv, bi);
    if (threadIdx.x == 0) {
        out[0] = (int32_t)bi;
        *done = 0; /* ready for the next call */
    }
}

void cuda_op_argmax(mf_backend *b, const float *x, int64_t rows, int64_t cols, int32_t *out) {
    cuda_backend *c = cb_of(b);
    if (c->failed || rows <= 0 || cols <= 0) return;
    if (rows > INT32_MAX || cols > INT32_MAX) {
        cb_fail(c, "argmax: %lld rows of %lld not supported", (long long)rows, (long long)cols);
        return;
    }
    if (rows == 1 && cols >= 16 * ARGMAX_THREADS) {
        /* one row (the greedy choice over a vocabulary): spread over up to ARGMAX_PARTS blocks */
        int64_t parts = cols / (8 * ARGMAX_THREADS);
        if (parts > ARGMAX_PARTS) parts = ARGMAX_PARTS;
        const int64_t span = (cols + parts - 1) / parts;
        parts = (cols + span - 1) / span;
        cb_launch_dependent(c, argmax_split_kernel, dim3((unsigned)parts), dim3(ARGMAX_THREADS), 0, x, cols, span,
                            c->arg_v, c->arg_i, c->arg_done, out);
    } else {
        cb_launch_dependent(c, argmax_kernel, dim3((unsigned)rows), dim3(ARGMAX_THREADS), 0, x, cols, out);
    }
    CB_LAUNCHED(c, "argmax");
}
