/* cuda_norm.cu - row normalizations on the GPU: RMSNorm (optionally weighted, optionally after a
 * residual add), L2 norm with a
 * scale, and the gated RMSNorm of Gated DeltaNet; one block per row. Not RoPE (cuda_rope.cu). */
#include "backend/cuda/cuda_internal.cuh"

static int norm_threads(int64_t dim) {
    int t = 32;
    while (t < 256 && t < dim) t <<= 1;
    return t;
}

/* x, y [rows][dim] (y may be x); w [dim] or NULL; z [rows][dim] or NULL (then no gate); a
 * [rows][dim] or NULL: added into x first (x += a, written back).
 * mode 0: y = x / sqrt(mean(x^2) + eps) * w [* silu(z)]; mode 1: y = x * scale / sqrt(sum(x^2) + eps). */
__global__ void norm_kernel(float *x, const float *__restrict__ a, const float *__restrict__ w,
                            const float *__restrict__ z, int64_t dim, float eps, float scale, int mode, float *y) {
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
    float inv;
    if (mode == 0) inv = (float)(1.0 / sqrt((double)ss / (double)dim + (double)eps));
    else inv = (float)(1.0 / sqrt((double)ss + (double)eps)) * scale;
    const float *zr = z ? z + (int64_t)blockIdx.x * dim : NULL;
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i] * inv;
        if (w) v *= w[i];
        if (zr) v *= cb_silu(zr[i]);
        yr[i] = v;
    }
}

static void norm_launch(mf_backend *b, const char *what, float *x, const float *a, const float *w, const float *z,
                        int64_t rows, int64_t dim, float eps, float scale, int mode, float *y) {
    cuda_backend *c = cb_of(b);
    if (c->failed || rows <= 0 || dim <= 0) return;
    if (rows > 0x7fffffffLL) {
        cb_fail(c, "%s: %lld rows", what, (long long)rows);
        return;
    }
    norm_kernel<<<(unsigned)rows, norm_threads(dim), 0, c->stream>>>(x, a, w, z, dim, eps, scale, mode, y);
    CB_LAUNCHED(c, what);
}

void cuda_op_rmsnorm(mf_backend *b, const float *x, const float *w, int64_t n_rows, int64_t dim, float eps,
                     float *y) {
    /* x is only read when nothing is added */
    norm_launch(b, "rmsnorm", (float *)x, NULL, w, NULL, n_rows, dim, eps, 1.0f, 0, y);
}

void cuda_op_add_rmsnorm(mf_backend *b, float *x, const float *a, const float *w, int64_t n_rows, int64_t dim,
                         float eps, float *y) {
    norm_launch(b, "add_rmsnorm", x, a, w, NULL, n_rows, dim, eps, 1.0f, 0, y);
}

void cuda_op_l2norm(mf_backend *b, float *x, int64_t rows, int dim, float eps, float scale) {
    norm_launch(b, "l2norm", x, NULL, NULL, NULL, rows, dim, eps, scale, 1, x);
}

void cuda_op_gated_norm(mf_backend *b, float *o, const float *w, const float *z, int64_t rows, int dim, float eps) {
    norm_launch(b, "gated_norm", o, NULL, w, z, rows, dim, eps, 1.0f, 0, o);
}
