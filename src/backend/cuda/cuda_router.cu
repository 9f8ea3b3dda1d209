/* cuda_router.cu - the MoE router on the GPU: per token a softmax over the expert logits, the
 * top K (ties to the lower id), weights renormalised on request; one warp per token, the
 * probabilities in registers up to 512 experts, in shared memory beyond.
 * Not the expert dispatch (forward.c groups tokens by expert on the host). */
#include "backend/cuda/cuda_internal.cuh"

#define RT_WARPS 4

#define RT_MAX_K 64 /* choices a lane keeps in registers: choice j in slot j / 32 of lane j % 32 */

/* The choices made so far, as the lanes keep them, and their weights' running sum. */
struct rt_choices {
    int id[RT_MAX_K / 32];
    float w[RT_MAX_K / 32];
    float sum;
};

/* Writes token t's K choices, each once, the weights renormalised when norm. */
__device__ __forceinline__ void rt_store(const rt_choices &ch, int lane, int64_t t, int K, int norm,
                                         int32_t *__restrict__ ids, float *__restrict__ w) {
#pragma unroll
    for (int s = 0; s < RT_MAX_K / 32; s++) {
        const int j = s * 32 + lane;
        if (j < K) {
            ids[t * K + j] = ch.id[s];
            w[t * K + j] = norm ? ch.w[s] / ch.sum : ch.w[s];
        }
    }
}

/* logits [n_tok][E]; ids, w [n_tok][K]. Probabilities as the CPU op: p = (float)(expf(l - max) /
 * sum), the sum in double; each round's winner is marked -1 (taken). Shared: [RT_WARPS][E] probabilities. */
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
    /* unrolled so that a lane's loads are in flight together, not one after another */
#pragma unroll 8
    for (int e = lane; e < E; e += 32) {
        const float v = lg[e];
        p[e] = v;
        mx = fmaxf(mx, v);
    }
    mx = cb_warp_max(mx);
    double sum = 0.0;
#pragma unroll 8
    for (int e = lane; e < E; e += 32) {
        const float v = expf(p[e] - mx);
        p[e] = v;
        sum += v;
    }
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll 8
    for (int e = lane; e < E; e += 32) p[e] = (float)(p[e] / sum);
    __syncwarp();
    rt_choices ch = {{-1, -1}, {0.0f, 0.0f}, 0.0f};
    for (int j = 0; j < K; j++) {
        float bv = -1.0f;
        int be = -1;
#pragma unroll 8
        for (int e = lane; e < E; e += 32)
            if (p[e] >= 0.0f && p[e] > bv) bv = p[e], be = e;
        for (int o = 16; o; o >>= 1) { /* the warp's best, ties to the lower id */
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (oe >= 0 && (be < 0 || ov > bv || (ov == bv && oe < be))) bv = ov, be = oe;
        }
        const float wv = be >= 0 ? bv : 0.0f; /* every lane learns choice j; lane j % 32 keeps it */
        ch.sum += wv;
        if (lane == (j & 31)) ch.id[j >> 5] = be, ch.w[j >> 5] = wv;
        if (lane == 0 && be >= 0) p[be] = -1.0f;
        __syncwarp();
    }
    rt_store(ch, lane, t, K, norm, ids, w);
}

/* A probability's rank key: 0 for none (taken, or not a number), else its bits + 1 (bits of
 * floats >= 0 order as the floats). */
__device__ __forceinline__ unsigned rt_key(float p) { return p >= 0.0f ? __float_as_uint(p) + 1u : 0u; }

/* The same for E <= 32 * PER experts with the probabilities in registers (PER per lane, expert
 * i * 32 + lane in slot i): no shared memory. Each lane keeps its best candidate; a round takes
 * the warp's best key and, among lanes holding it, the lowest id, in two warp reductions, and
 * only the winning lane looks for its next candidate. Launched dependent: the logits are the
 * output of the kernel before. */
template <int PER>
__global__ void __launch_bounds__(RT_WARPS * 32)
router_reg_kernel(const float *__restrict__ logits, int64_t n_tok, int E, int K, int norm, int32_t *__restrict__ ids,
                  float *__restrict__ w) {
    cb_pdl_enter();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int64_t t = (int64_t)blockIdx.x * RT_WARPS + warp;
    if (t >= n_tok) return; /* whole warps leave together */
    const float *lg = logits + t * E;
    float p[PER];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        const int e = i * 32 + lane;
        p[i] = e < E ? lg[e] : -INFINITY;
        mx = fmaxf(mx, p[i]);
    }
    mx = cb_warp_max(mx);
    double sum = 0.0;
#pragma unroll
    for (int i = 0; i < PER; i++)
        if (i * 32 + lane < E) {
            p[i] = expf(p[i] - mx);
            sum += p[i];
        }
    for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    unsigned bk = 0; /* the lane's best key and its slot */
    int bi = 0;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        p[i] = i * 32 + lane < E ? (float)(p[i] / sum) : -1.0f; /* -1: not a choice */
        const unsigned k = rt_key(p[i]);
        if (k > bk) bk = k, bi = i;
    }
    rt_choices ch = {{-1, -1}, {0.0f, 0.0f}, 0.0f};
    for (int j = 0; j < K; j++) {
        const unsigned best = __reduce_max_sync(0xffffffffu, bk);
        const unsigned won = __reduce_min_sync(0xffffffffu, best && bk == best ? (unsigned)(bi * 32 + lane) : ~0u);
        const int e = best ? (int)won : -1;
        const float wv = best ? __uint_as_float(best - 1u) : 0.0f;
        ch.sum += wv;
        if (lane == (j & 31)) ch.id[j >> 5] = e, ch.w[j >> 5] = wv;
        if (best && lane == (int)(won & 31)) { /* the winner takes it and finds its next best */
            const int taken = bi;
            bk = 0;
#pragma unroll
            for (int i = 0; i < PER; i++) {
                if (i == taken) p[i] = -1.0f;
                const unsigned k = rt_key(p[i]);
                if (k > bk) bk = k, bi = i;
            }
        }
    }
    rt_store(ch, lane, t, K, norm, ids, w);
}

void cuda_op_router_topk(mf_backend *b, const float *logits, int64_t n_tok, int E, int K, int norm, int32_t *ids,
                         float *w) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n_tok <= 0 || K <= 0) return;
    if (E <= 0 || K > E || E > 3072 || K > RT_MAX_K) { /* 48 KB of shared memory for RT_WARPS tokens */
        cb_fail(c, "router_topk: top %d of %d experts not supported", K, E);
        return;
    }
    const unsigned grid = (unsigned)((n_tok + RT_WARPS - 1) / RT_WARPS);
    if (E <= 512) {
        auto k = E <= 128 ? router_reg_kernel<4> : E <= 256 ? router_reg_kernel<8> : router_reg_kernel<16>;
        cb_launch_dependent(c, k, dim3(grid), dim3(RT_WARPS * 32), 0, logits, n_tok, E, K, norm, ids, w);
        CB_LAUNCHED(c, "router_topk");
        return;
    }
    router_kernel<<<grid, RT_WARPS * 32, (size_t)RT_WARPS * E * sizeof(float), c->stream>>>(logits, n_tok, E, K, norm,
                                                                                           ids, w);
    CB_LAUNCHED(c, "router_topk");
}
