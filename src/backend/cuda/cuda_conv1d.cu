/* cuda_conv1d.cu - depthwise causal conv1d (no bias) then SiLU on the GPU, advancing the window
 * state: one thread per channel walks the tokens in order. Not the Gated DeltaNet recurrence. */
#include "backend/cuda/cuda_internal.cuh"

#define CONV_MAX_K 8

/* x, out [n_tok][C]; w [C][K]; state [K-1][C], oldest first. */
__global__ void conv1d_silu_kernel(const float *__restrict__ x, float *__restrict__ state, const float *__restrict__ w,
                                   int64_t n_tok, int64_t C, int K, int early, float *__restrict__ out) {
    if (!early) cb_pdl_wait();
    for (int64_t ch = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; ch < C; ch += (int64_t)gridDim.x * blockDim.x) {
        float win[CONV_MAX_K], wc[CONV_MAX_K];
#pragma unroll
        for (int k = 0; k < CONV_MAX_K; k++) {
            win[k] = k < K - 1 ? state[k * C + ch] : 0.0f;
            wc[k] = k < K ? w[ch * K + k] : 0.0f;
        }
        /* launched dependent: the weights were readable above, and the window where early (the
         * op before did not write it); x (the output of the op before) only from here */
        cb_pdl_enter();
        for (int64_t t = 0; t < n_tok; t++) {
            const float xt = x[t * C + ch];
            float acc = 0.0f;
#pragma unroll
            for (int k = 0; k < CONV_MAX_K - 1; k++)
                if (k < K - 1) acc += wc[k] * win[k];
            /* wc[K - 1] with a constant index: pick it by the unrolled loop */
#pragma unroll
            for (int k = 0; k < CONV_MAX_K; k++)
                if (k == K - 1) acc += wc[k] * xt;
            out[t * C + ch] = cb_silu(acc);
#pragma unroll
            for (int k = 0; k < CONV_MAX_K - 1; k++) {
                if (k < K - 2) win[k] = win[k + 1];
                else if (k == K - 2) win[k] = xt;
            }
        }
#pragma unroll
        for (int k = 0; k < CONV_MAX_K - 1; k++)
            if (k < K - 1) state[k * C + ch] = win[k];
    }
}

void cuda_op_conv1d_silu(mf_backend *b, const float *x, float *state, const float *w, int64_t n_tok, int64_t C, int K,
                         float *out) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n_tok <= 0 || C <= 0) return;
    if (K < 1 || K > CONV_MAX_K) {
        cb_fail(c, "conv1d_silu: kernel %d (at most %d)", K, CONV_MAX_K);
        return;
    }
    cb_launch_dependent(c, conv1d_silu_kernel, dim3(cb_grid(c, C, 128)), dim3(128), 0, x, state, w, n_tok, C, K,
                        (int)(c->state_written != state), out);
    CB_LAUNCHED(c, "conv1d_silu");
    c->state_written = state;
}
