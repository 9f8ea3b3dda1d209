/* cuda_attention.cu - causal grouped-query attention on the GPU: one block per (split of the
 * context, head, token) with an online softmax per warp over positions whose k and v rows it loads
 * four or eight at a time; when the context is split (decode), the last block of a token-head to
 * finish merges the splits' partial results from the reserved scratch.
 * The positions are read on the device, so a captured decode step replays at any position.
 * Not the KV cache writes (forward.c scatters k and v in). */
#include "backend/cuda/cuda_internal.cuh"

#define ATT_THREADS 128
#define ATT_WARPS (ATT_THREADS / 32)
#define ATT_MAX_J 16       /* head_dim up to 32 * ATT_MAX_J */
#define ATT_MIN_SPAN 32    /* positions per split, at least */
#define ATT_MAX_SPLITS 128
#define ATT_MAX_HD 256     /* head_dim that reserve sizes splits for */
static_assert(ATT_THREADS >= ATT_MAX_SPLITS, "a block merges its token-head's splits, a thread a split");

size_t cuda_attention_scratch_floats(const mf_backend_limits *lim) {
    int64_t splits = (lim->max_ctx + ATT_MIN_SPAN - 1) / ATT_MIN_SPAN;
    if (splits > ATT_MAX_SPLITS) splits = ATT_MAX_SPLITS;
    if (splits < 2) return 0;
    /* enough for a decode step of up to 64 heads at full split, or more rows at fewer splits */
    return (size_t)splits * 64 * (ATT_MAX_HD + 2);
}

/* out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M) for token-head row, over the splits with
 * l_s > 0, by a block of at least n_split threads (the splits' partials were written by other
 * blocks: read from L2). Each split's weight is worked out once, into shared memory, so that an
 * output element's sum is a run of independent loads. */
__device__ __forceinline__ void attn_merge(const float *__restrict__ part_ml, const float *__restrict__ part_acc,
                                           int n_split, int hd, int64_t row, float *__restrict__ out) {
    __shared__ float f[ATT_MAX_SPLITS], red[32];
    const int s = threadIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float *ml = part_ml + row * n_split * 2;
    const float ms = s < n_split ? __ldcg(ml + 2 * s) : -INFINITY, ls = s < n_split ? __ldcg(ml + 2 * s + 1) : 0.0f;
    float M = cb_warp_max(ms);
    if (lane == 0) red[warp] = M;
    __syncthreads();
    M = -INFINITY;
    for (int w = 0; w < nw; w++) M = fmaxf(M, red[w]);
    const float fs = ls > 0.0f ? expf(ms - M) : 0.0f;
    if (s < n_split) f[s] = fs;
    const float L = cb_block_sum(ls * fs, red); /* synchronizes the block: f is complete */
    for (int e = threadIdx.x; e < hd; e += blockDim.x) {
        const float *pa = part_acc + row * n_split * hd + e;
        float a = 0.0f;
#pragma unroll 8
        for (int k = 0; k < n_split; k++) a += __ldcg(pa + (int64_t)k * hd) * f[k];
        out[row * hd + e] = a / L;
    }
}

/* Loads the k and v rows of a warp's round of positions p0, p0 + ATT_WARPS, ... (U of them, those
 * past p_end clamped to p0) into kx, vx: rows below `first` only (below 1), at or above it only
 * (below 0), or all (below -1). */
template <int NJ, int U>
__device__ __forceinline__ void attn_load(const float *__restrict__ kc, const float *__restrict__ vc, int64_t p0,
                                          int64_t p_end, int64_t first, int below, int64_t kv_stride, int64_t kv_off,
                                          int hd, int lane, float (&kx)[U][NJ], float (&vx)[U][NJ]) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int64_t p = p0 + u * ATT_WARPS < p_end ? p0 + u * ATT_WARPS : p0;
        if (below >= 0 && (p < first) != (below == 1)) continue;
        const float *kr = kc + p * kv_stride + kv_off, *vr = vc + p * kv_stride + kv_off;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            const int e = lane + 32 * j;
            kx[u][j] = e < hd ? kr[e] : 0.0f;
            vx[u][j] = e < hd ? vr[e] : 0.0f;
        }
    }
}

/* q, out [n_tok][n_heads][hd]; caches [ctx][n_kv][hd]; pos [n_tok]. Block (split, head, token):
 * positions [split * span, (split + 1) * span) up to the token's own, span = the context of the
 * last token over n_split (a split past the context contributes nothing). Lane l holds dims
 * l + 32 j, j < NJ (NJ * 32 >= hd). A warp takes positions warp, warp + ATT_WARPS, ... and loads
 * the k and v rows of U of them at once, so their loads are in flight together; the online
 * softmax still takes them one by one in that order.
 * n_split == 1: out is written normalized; else part_ml [rows][n_split][2] (max, sum) and
 * part_acc [rows][n_split][hd] (unnormalized), rows = n_tok * n_heads, and the last of a row's
 * blocks to count itself in done[row] merges them into out (and sets done[row] back to 0).
 * Launched dependent: the positions (uploaded before the step's kernels) and the cache rows before
 * pos[0] (written by earlier calls) are read before it waits on the kernel before; q and the rows
 * from pos[0] on (which that kernel writes) after. */
template <int NJ, int U>
__global__ void __launch_bounds__(ATT_THREADS)
attn_kernel(const float *__restrict__ q, const float *__restrict__ kc, const float *__restrict__ vc,
            const int32_t *__restrict__ pos, int64_t n_tok, int n_heads, int n_kv, int hd, float scale, int n_split,
            float *__restrict__ out, float *__restrict__ part_ml, float *__restrict__ part_acc,
            unsigned *__restrict__ done) {
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS];
    __shared__ unsigned last_block;
    __shared__ float sacc[ATT_WARPS][32 * ATT_MAX_J];
    const int split = blockIdx.x, h = blockIdx.y;
    const int64_t t = blockIdx.z, row = t * n_heads + h;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = h / (n_heads / n_kv);
    const int64_t last = pos[t]; /* inclusive */
    const int64_t ctx = (int64_t)pos[n_tok - 1] + 1, first = pos[0];
    int64_t span = (ctx + n_split - 1) / n_split;
    if (span < ATT_MIN_SPAN) span = ATT_MIN_SPAN;
    const int64_t p_begin = (int64_t)split * span;
    int64_t p_end = p_begin + span;
    if (p_end > last + 1) p_end = last + 1;
    const int64_t kv_stride = (int64_t)n_kv * hd, kv_off = (int64_t)kvh * hd;
    float kx[U][NJ], vx[U][NJ];
    /* the warp's first round: the rows written by earlier calls now, the others after the wait */
    if (p_begin + warp < p_end) attn_load<NJ, U>(kc, vc, p_begin + warp, p_end, first, 1, kv_stride, kv_off, hd, lane, kx, vx);
    cb_pdl_enter();
    const float *qr = q + row * hd;
    float qv[NJ], acc[NJ];
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        const int d = lane + 32 * j;
        qv[j] = d < hd ? qr[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int64_t p0 = p_begin + warp; p0 < p_end; p0 += U * ATT_WARPS) {
        attn_load<NJ, U>(kc, vc, p0, p_end, first, p0 == p_begin + warp ? 0 : -1, kv_stride, kv_off, hd, lane, kx, vx);
        float sc[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            float d = 0.0f;
#pragma unroll
            for (int j = 0; j < NJ; j++) d = fmaf(qv[j], kx[u][j], d);
            sc[u] = d;
        }
#pragma unroll
        for (int o = 16; o; o >>= 1)
#pragma unroll
            for (int u = 0; u < U; u++) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (p0 + u * ATT_WARPS >= p_end) break;
            const float sv = sc[u] * scale;
            const float mn = fmaxf(m, sv), corr = expf(m - mn), pw = expf(sv - mn);
            l = l * corr + pw;
            m = mn;
#pragma unroll
            for (int j = 0; j < NJ; j++) acc[j] = acc[j] * corr + pw * vx[u][j];
        }
    }
    /* merge the warps */
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < NJ; j++) sacc[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm[w]);
    float L = 0.0f, f[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; w++) {
        f[w] = sm[w] == -INFINITY ? 0.0f : expf(sm[w] - M);
        L += sl[w] * f[w];
    }
    for (int e = threadIdx.x; e < hd; e += ATT_THREADS) {
        float a = 0.0f;
        for (int w = 0; w < ATT_WARPS; w++) a += sacc[w][e] * f[w];
        if (n_split == 1) out[row * hd + e] = a / L;
        else part_acc[(row * n_split + split) * hd + e] = a;
    }
    if (n_split == 1) return;
    if (threadIdx.x == 0) {
        part_ml[(row * n_split + split) * 2] = M;
        part_ml[(row * n_split + split) * 2 + 1] = L;
    }
    /* the block's partials visible device-wide before it counts itself in */
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_block = atomicAdd(done + row, 1u) == (unsigned)n_split - 1;
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    attn_merge(part_ml, part_acc, n_split, hd, row, out);
    if (threadIdx.x == 0) done[row] = 0;
}

void cuda_op_attention(mf_backend *b, const float *q, const float *k_cache, const float *v_cache, const int32_t *pos,
                       int64_t n_ctx, int64_t n_tok, int n_heads, int n_kv, int hd, float scale, float *out) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n_tok <= 0 || n_heads <= 0) return;
    if (hd <= 0 || hd > 32 * ATT_MAX_J || n_kv <= 0 || n_heads % n_kv || n_tok > 65535 || n_heads > 65535 ||
        n_ctx < n_tok || n_ctx > INT32_MAX) {
        cb_fail(c, "attention: %d heads, %d kv heads, head_dim %d, %lld tokens in a context of %lld not supported",
                n_heads, n_kv, hd, (long long)n_tok, (long long)n_ctx);
        return;
    }
    const int64_t ctx = n_ctx, rows = n_tok * n_heads;
    /* split the context when there are too few token-heads to fill the device */
    int64_t want = ((int64_t)c->n_sm * 4 + rows - 1) / rows;
    int64_t max_by_len = (ctx + ATT_MIN_SPAN - 1) / ATT_MIN_SPAN;
    int64_t n_split = want < max_by_len ? want : max_by_len;
    if (n_split > ATT_MAX_SPLITS) n_split = ATT_MAX_SPLITS;
    int64_t fit = c->scratch_floats / ((size_t)rows * (size_t)(hd + 2));
    if (n_split > fit) n_split = fit;
    if (n_split < 1 || rows > ATT_MERGE_ROWS) n_split = 1;
    float *part_ml = n_split > 1 ? c->scratch : NULL, *part_acc = n_split > 1 ? c->scratch + rows * n_split * 2 : NULL;
    dim3 grid((unsigned)n_split, (unsigned)n_heads, (unsigned)n_tok);
    auto k = hd <= 128 ? attn_kernel<4, 8> : hd <= 256 ? attn_kernel<8, 4> : attn_kernel<ATT_MAX_J, 2>;
    cb_launch_dependent(c, k, grid, dim3(ATT_THREADS), 0, q, k_cache, v_cache, pos, n_tok, n_heads, n_kv, hd, scale,
                        (int)n_split, out, part_ml, part_acc, c->att_done);
    CB_LAUNCHED(c, "attention");
}
