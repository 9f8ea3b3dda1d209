/* cuda_rope.cu - rotary position embedding in place on the GPU (rotate_half pairing, partial
 * rotary dims), angles in f32 as transformers and the CPU op compute them. Not attention. */
#include "backend/cuda/cuda_internal.cuh"

/* x [n_tok][n_heads][head_dim]; pos [n_tok]. One block per (token, head group); thread i of the
 * first rot_dim/2 dims rotates the pair (i, i + rot_dim/2). inv_freq = theta^(-2i/rot_dim) in
 * double, rounded to float; angle = (float)pos * inv_freq in f32. */
__global__ void rope_kernel(float *x, int n_heads, int head_dim, int rot_dim, const int32_t *__restrict__ pos,
                            double theta) {
    cb_pdl_trigger();
    const int64_t t = blockIdx.y;
    const int half = rot_dim / 2;
    const int i = threadIdx.x % half, h0 = threadIdx.x / half, hstep = blockDim.x / half;
    if (h0 >= hstep) return;
    const float inv_freq = (float)pow(theta, -2.0 * i / rot_dim);
    const float ang = (float)pos[t] * inv_freq;
    const float cs = cosf(ang), sn = sinf(ang);
    for (int h = blockIdx.x * hstep + h0; h < n_heads; h += gridDim.x * hstep) {
        float *v = x + (t * n_heads + h) * head_dim;
        const float a = v[i], b = v[i + half];
        v[i] = a * cs - b * sn;
        v[i + half] = b * cs + a * sn;
    }
}

void cuda_op_rope(mf_backend *b, float *x, int64_t n_tok, int n_heads, int head_dim, int rot_dim,
                  const int32_t *pos, double theta) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n_tok <= 0 || n_heads <= 0 || rot_dim < 2) return;
    if (rot_dim > head_dim || rot_dim > 2048 || n_tok > 65535) {
        cb_fail(c, "rope: rot_dim %d of head_dim %d, %lld tokens", rot_dim, head_dim, (long long)n_tok);
        return;
    }
    const int half = rot_dim / 2;
    int per_block = 256 / half; /* heads per block */
    if (per_block < 1) per_block = 1;
    if (per_block > n_heads) per_block = n_heads;
    dim3 grid((unsigned)((n_heads + per_block - 1) / per_block), (unsigned)n_tok);
    rope_kernel<<<grid, per_block * half, 0, c->stream>>>(x, n_heads, head_dim, rot_dim, pos, theta);
    CB_LAUNCHED(c, "rope");
}
