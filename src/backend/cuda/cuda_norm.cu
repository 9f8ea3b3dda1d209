/* cuda_norm.cu - row normalizations on the GPU: RMSNorm (optionally weighted, optionally after a
 * residual add) and the gated RMSNorm of Gated DeltaNet; one block per row. Not RoPE
 * (cuda_rope.cu), not the L2 norm of q and k (inside deltanet_step, cuda_deltanet.cu). */
#include "backend/cuda/cuda_internal.cuh"

static int norm_threads(int64_t dim) {
    int t = 32;
    while (t < 256 && t < dim) t <<= 1;
    return t;
}

/* x, y [rows][dim] (y may be x); w [dim] or NULL; z [rows][dim] or NULL (then no gate); a
 * [rows][dim] or NULL: added into x first (x += a, written back).
 * y = x / sqrt(mean(x^2) + eps) * w [* silu(z)]. */
__global__ void norm_kernel(float *x, const float *__restrict__ a, const float *__restrict__ w,
                            const float *__restrict__ z, int64_t dim, float eps, float *y) {
    cb_pdl_enter(); /* launched dependent: the ops before wrote what it reads */
    __shared__ float sh[32];
    float *xr = x + (int64_t)blockIdx.x * dim;
    float *yr = y + (int64_t)blockIdx.x * dim;
    const float *ar = a ? a + (int64_t)blockIdx.x * dim : NULL;
    float ss = 0.0f;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i];
        if (ar) xr[i] = v = v + ar[i]; /* each thread rereads only what it wrote */
        ss = fmaf(v, v, ss);
    }
    ss = cb_block_sum(ss, sh);
    const float inv = (float)(1.0 / sqrt((double)ss / (double)dim + (double)eps));
    const float *zr = z ? z + (int64_t)blockIdx.x * dim : NULL;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i] * inv;
        if (w) v *= w[i];
        if (zr) v *= cb_silu(zr[i]);
        yr[i] = v;
    }
}

/* The same with float4 rows held in registers between the two passes (NV float4 per thread), so
 * that a row is read once and every load of a thread is in flight together: dim4 = dim / 4,
 * every pointer 16-byte aligned. */
template <int NV>
__global__ void norm4_kernel(float *x, const float *__restrict__ a, const float *__restrict__ w,
                             const float *__restrict__ z, int64_t dim4, float eps, float *y) {
    cb_pdl_enter(); /* launched dependent: the ops before wrote what it reads */
    __shared__ float sh[32];
    const int64_t row = blockIdx.x;
    float4 *xr = (float4 *)x + row * dim4;
    const float4 *ar = a ? (const float4 *)a + row * dim4 : NULL;
    float4 v[NV];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; k++) {
        const int64_t i = threadIdx.x + (int64_t)k * blockDim.x;
        if (i < dim4) {
            v[k] = xr[i];
            if (ar) {
                const float4 d = ar[i];
                v[k].x += d.x, v[k].y += d.y, v[k].z += d.z, v[k].w += d.w;
                xr[i] = v[k];
            }
            ss = fmaf(v[k].x, v[k].x, fmaf(v[k].y, v[k].y, fmaf(v[k].z, v[k].z, fmaf(v[k].w, v[k].w, ss))));
        }
    }
    ss = cb_block_sum(ss, sh);
    const float inv = (float)(1.0 / sqrt((double)ss / (double)(4 * dim4) + (double)eps));
    float4 *yr = (float4 *)y + row * dim4;
    const float4 *zr = z ? (const float4 *)z + row * dim4 : NULL;
#pragma unroll
    for (int k = 0; k < NV; k++) {
        const int64_t i = threadIdx.x + (int64_t)k * blockDim.x;
        if (i < dim4) {
            float4 r = v[k];
            r.x *= inv, r.y *= inv, r.z *= inv, r.w *= inv;
            if (w) {
                const float4 g = ((const float4 *)w)[i];
                r.x *= g.x, r.y *= g.y, r.z *= g.z, r.w *= g.w;
            }
            if (zr) {
                const float4 g = zr[i];
                r.x *= cb_silu(g.x), r.y *= cb_silu(g.y), r.z *= cb_silu(g.z), r.w *= cb_silu(g.w);
            }
            yr[i] = r;
        }
    }
}

static void norm_launch(mf_backend *b, const char *what, float *x, const float *a, const float *w, const float *z,
                        int64_t rows, int64_t dim, float eps, float *y) {
    cuda_backend *c = cb_of(b);
    if (c->failed || rows <= 0 || dim <= 0) return;
    if (rows > 0x7fffffffLL) {
        cb_fail(c, "%s: %lld rows", what, (long long)rows);
        return;
    }
    const uintptr_t ptrs = (uintptr_t)x | (uintptr_t)a | (uintptr_t)w | (uintptr_t)z | (uintptr_t)y;
    const int64_t dim4 = dim / 4;
    if (dim % 4 == 0 && (ptrs & 15) == 0 && dim4 <= 4 * 1024) {
        /* a thread per float4 up to 1024 threads, then up to 4 float4 a thread */
        int threads = (int)((dim4 + 31) / 32 * 32);
        if (threads > 1024) threads = 1024;
        const int64_t nv = (dim4 + threads - 1) / threads;
        auto k = nv == 1 ? norm4_kernel<1> : nv == 2 ? norm4_kernel<2> : norm4_kernel<4>;
        cb_launch_dependent(c, k, dim3((unsigned)rows), dim3(threads), 0, x, a, w, z, dim4, eps, y);
    } else {
        cb_launch_dependent(c, norm_kernel, dim3((unsigned)rows), dim3(norm_threads(dim)), 0, x, a, w, z, dim, eps, y);
    }
    CB_LAUNCHED(c, what);
}

void cuda_op_rmsnorm(mf_backend *b, const float *x, const float *w, int64_t n_rows, int64_t dim, float eps,
                     float *y) {
    /* x is only read when nothing is added */
    norm_launch(b, "rmsnorm", (float *)x, NULL, w, NULL, n_rows, dim, eps, y);
}

void cuda_op_add_rmsnorm(mf_backend *b, float *x, const float *a, const float *w, int64_t n_rows, int64_t dim,
                         float eps, float *y) {
    norm_launch(b, "add_rmsnorm", x, a, w, NULL, n_rows, dim, eps, y);
}

void cuda_op_gated_norm(mf_backend *b, float *o, const float *w, const float *z, int64_t rows, int dim, float eps) {
    norm_launch(b, "gated_norm", o, NULL, w, z, rows, dim, eps, o);
}
