/* cuda_attn_prep.cu - the per-head steps between the q/k/v projections and attention in one
 * launch: q (split from a gated projection) and k RMS-normed and rotated, k and v written into
 * the caches at the tokens' positions (read on the device). Not the attention (cuda_attention.cu). */
#include "backend/cuda/cuda_internal.cuh"

#define AP_THREADS 128
#define AP_MAX_HD 512
#define AP_PER (AP_MAX_HD / 2 / AP_THREADS) /* rotated pairs a thread takes */

/* Block (slot, token): slot < n_heads is a q head, then n_kv k heads, then n_kv v heads. The head
 * is staged in shared memory, so q may be rewritten in place. Norm as the rmsnorm op; angles as
 * the rope op (inv_freq = theta^(-2i/rot) in double rounded to float, f32 angle). Launched
 * dependent: the positions (uploaded before the step's kernels) and the angles are ready before
 * it waits on the projections. */
__global__ void __launch_bounds__(AP_THREADS) attn_prep_kernel(const mf_attn_prep p) {
    __shared__ float v[AP_MAX_HD], red[32];
    const int slot = blockIdx.x, hd = p.head_dim;
    const int64_t t = blockIdx.y;
    const int32_t pt = p.pos[t];
    const int half = p.rot_dim / 2;
    float cs[AP_PER], sn[AP_PER]; /* pair i = threadIdx.x + k * blockDim.x */
    if (slot < p.n_heads + p.n_kv)
#pragma unroll
        for (int k = 0; k < AP_PER; k++) {
            const int i = threadIdx.x + k * blockDim.x;
            cs[k] = 1.0f, sn[k] = 0.0f;
            if (i < half) {
                const float ang = (float)pt * (float)pow(p.theta, -2.0 * i / p.rot_dim);
                cs[k] = cosf(ang), sn[k] = sinf(ang);
            }
        }
    cb_pdl_enter();
    const float *src, *nw;
    float *dst;
    if (slot < p.n_heads) {
        src = p.q_src + (t * p.n_heads + slot) * p.q_stride;
        dst = p.q + (t * p.n_heads + slot) * hd;
        nw = p.q_norm;
        if (p.gate)
            for (int i = threadIdx.x; i < hd; i += blockDim.x) p.gate[(t * p.n_heads + slot) * hd + i] = src[hd + i];
    } else {
        const int h = (slot - p.n_heads) % p.n_kv, is_v = slot - p.n_heads >= p.n_kv;
        src = (is_v ? p.v : p.k) + (t * p.n_kv + h) * hd;
        dst = (is_v ? p.v_cache : p.k_cache) + ((int64_t)pt * p.n_kv + h) * hd;
        if (is_v) {
            for (int i = threadIdx.x; i < hd; i += blockDim.x) dst[i] = src[i];
            return;
        }
        nw = p.k_norm;
    }
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        const float x = src[i];
        v[i] = x;
        ss = fmaf(x, x, ss);
    }
    ss = cb_block_sum(ss, red); /* synchronizes: v is complete */
    const float inv = (float)(1.0 / sqrt((double)ss / (double)hd + (double)p.eps));
#pragma unroll
    for (int k = 0; k < AP_PER; k++) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < half) {
            const float a = v[i] * inv * (nw ? nw[i] : 1.0f), b = v[i + half] * inv * (nw ? nw[i + half] : 1.0f);
            dst[i] = a * cs[k] - b * sn[k];
            dst[i + half] = b * cs[k] + a * sn[k];
        }
    }
    for (int i = p.rot_dim + threadIdx.x; i < hd; i += blockDim.x) dst[i] = v[i] * inv * (nw ? nw[i] : 1.0f);
}

void cuda_op_attention_prep(mf_backend *b, const mf_attn_prep *p) {
    cuda_backend *c = cb_of(b);
    if (c->failed || p->n_tok <= 0 || p->n_heads <= 0) return;
    if (p->head_dim <= 0 || p->head_dim > AP_MAX_HD || p->rot_dim < 0 || p->rot_dim > p->head_dim || p->rot_dim % 2 ||
        p->n_kv <= 0 || p->n_tok > 65535 || p->n_heads + 2 * p->n_kv > 65535) {
        cb_fail(c, "attention_prep: %d heads, %d kv heads, head_dim %d, rot_dim %d, %lld tokens not supported",
                p->n_heads, p->n_kv, p->head_dim, p->rot_dim, (long long)p->n_tok);
        return;
    }
    dim3 grid((unsigned)(p->n_heads + 2 * p->n_kv), (unsigned)p->n_tok);
    cb_launch_dependent(c, attn_prep_kernel, grid, dim3(AP_THREADS), 0, *p);
    CB_LAUNCHED(c, "attention_prep");
}
