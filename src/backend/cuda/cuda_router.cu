/* cuda_router.cu - the MoE router on the GPU: per token a softmax over the expert logits, the
 * top K (ties to the lower id), weights renormalised on request; one warp per token.
 * Not the expert dispatch (forward.c groups tokens by expert on the host). */
#include "backend/cuda/cuda_internal.cuh"

#define RT_WARPS 4

/* logits [n_tok][E]; ids, w [n_tok][K]. Probabilities as the CPU op: p = (float)(expf(l - max) /
 * sum), the sum in double; a taken expert is marked -1. Shared: [RT_WARPS][E] probabilities. */
__global__ void __launch_bounds__(RT_WARPS * 32)
router_kernel(const float *__restrict__ logits, int64_t n_tok, int E, int K, int norm, int32_t *__restrict__ ids,
              float *__restrict__ w) {
    cb_pdl_trigger();
    extern __shared__ float prob[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t t = (int64_t)blockIdx.x * RT_WARPS + warp;
    if (t >= n_tok) return; /* whole warps leave together */
    float *p = prob + warp * E;
    const float *lg = logits + t * E;
    float mx = -INFINITY;
    for (int e = lane; e < E; e += 32) mx = fmaxf(mx, lg[e]);
    mx = cb_warp_max(mx);
    double sum = 0.0;
    for (int e = lane; e < E; e += 32) {
        p[e] = expf(lg[e] - mx);
        sum += p[e];
    }
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    for (int e = lane; e < E; e += 32) p[e] = (float)(p[e] / sum);
    __syncwarp();
    int32_t *id = ids + t * K;
    float *wt = w + t * K;
    for (int j = 0; j < K; j++) {
        float bv = -1.0f;
        int be = -1;
        for (int e = lane; e < E; e += 32)
            if (p[e] >= 0.0f && p[e] > bv) bv = p[e], be = e;
        for (int o = 16; o; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (oe >= 0 && (be < 0 || ov > bv || (ov == bv && oe < be))) bv = ov, be = oe;
        }
        if (lane == 0) {
            id[j] = be;
            wt[j] = be >= 0 ? p[be] : 0.0f;
            if (be >= 0) p[be] = -1.0f;
        }
        __syncwarp();
    }
    if (norm && lane == 0) {
        float ws = 0.0f;
        for (int j = 0; j < K; j++) ws += wt[j];
        for (int j = 0; j < K; j++) wt[j] /= ws;
    }
}

void cuda_op_router_topk(mf_backend *b, const float *logits, int64_t n_tok, int E, int K, int norm, int32_t *ids,
                         float *w) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n_tok <= 0 || K <= 0) return;
    if (E <= 0 || K > E || E > 3072) { /* 48 KB of shared memory for RT_WARPS tokens */
        cb_fail(c, "router_topk: top %d of %d experts not supported", K, E);
        return;
    }
    const unsigned grid = (unsigned)((n_tok + RT_WARPS - 1) / RT_WARPS);
    router_kernel<<<grid, RT_WARPS * 32, (size_t)RT_WARPS * E * sizeof(float), c->stream>>>(logits, n_tok, E, K, norm,
                                                                                           ids, w);
    CB_LAUNCHED(c, "router_topk");
}
