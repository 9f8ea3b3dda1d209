/* cuda_moe.cu - a layer's routed experts on the GPU in two launches for any n_tok and K: gate and
 * up of every (token, choice) pair into the reserved act scratch, then down of every pair summed
 * per token in choice order. Not the expert residency (experts/) nor the router (cuda_router.cu). */
#include "backend/cuda/cuda_gemv.cuh"

#define MOE_MAX_K 64        /* experts per token the down kernel keeps in shared memory */
#define MOE_MAX_THREADS 256

/* The shapes both kernels read. Pair p = t * K + j chose expert ids[p]. */
struct moe_geo {
    uint64_t off[3];        /* gate, up, down offsets in a blob */
    int64_t inter, hidden;
    int K;
    int64_t nchunks;        /* 16-byte chunks per row of the kernel's matrix */
    int lpr_log2;           /* lanes per row tile: 1 << lpr_log2 */
    int64_t n_tiles;        /* row tiles of R rows per pair (gate/up) or per token (down) */
    int64_t blocks_per_item;/* blocks per pair (gate/up) or per token (down) */
};

/* The [rows][cols] matrix stored as QT at data (q4/q8: words | scales | biases). */
template <int QT>
__device__ __forceinline__ cq_mat moe_mat(const unsigned char *data, int64_t rows, int64_t cols) {
    cq_mat m;
    m.data = data;
    m.rows = rows;
    m.cols = cols;
    m.scales = m.biases = NULL;
    if (cq_traits<QT>::AFFINE) {
        const int64_t n = rows * cols;
        m.scales = (const unsigned short *)(data + n * (QT == MF_QTYPE_Q4 ? 4 : 8) / 8);
        m.biases = m.scales + n / QUANT_GROUP;
    }
    return m;
}

/* The first row of the lane's tile, its R rows clamped into the matrix for loads; false when the
 * warp has no tile (the same for the whole warp). wt: the warp's index among the item's warps. */
template <int R>
__device__ __forceinline__ bool moe_tile(int64_t wt, int lane, int lpr_log2, int64_t n_tiles, int64_t rows,
                                         int64_t &r0, int64_t (&rr)[R]) {
    const int64_t tpw = 32 >> lpr_log2;
    r0 = (wt * tpw + (lane >> lpr_log2)) * R;
#pragma unroll
    for (int i = 0; i < R; i++) rr[i] = r0 + i < rows ? r0 + i : rows - 1;
    return wt * tpw < n_tiles;
}

/* Gate and up of pair p = blockIdx.x / blocks_per_item: act[p][r] = silu(gate_r x) * up_r x for
 * the rows r of the block's tiles; x [n_tok][hidden], act [n_pairs][inter]. The warps issue their
 * first weight loads, then the block stages x[t] (cuda_gemv.cuh). */
template <int QT, int R, int U>
__device__ __forceinline__ void moe_gate_up(const float *__restrict__ x, const int32_t *__restrict__ ids,
                                            const void *const *__restrict__ blobs, const moe_geo &g,
                                            float *__restrict__ act) {
    /* launched dependent: the choice (ids) is the output of the kernel before */
    cb_pdl_enter();
    extern __shared__ float4 xs4[];                      /* [nchunks][F] swizzled */
    float *xsum = (float *)(xs4 + g.nchunks * (cq_traits<QT>::EPC / 4)); /* [nchunks], affine types */
    const int64_t p = blockIdx.x / g.blocks_per_item, bi = blockIdx.x % g.blocks_per_item, t = p / g.K;
    const int lane = threadIdx.x & 31, lpr = 1 << g.lpr_log2, li = lane & (lpr - 1);
    const unsigned char *blob = (const unsigned char *)blobs[ids[p]];
    const cq_mat mg = moe_mat<QT>(blob + g.off[0], g.inter, g.hidden), mu = moe_mat<QT>(blob + g.off[1], g.inter, g.hidden);
    int64_t r0, rr[R];
    const bool live = moe_tile<R>(bi * (blockDim.x >> 5) + (threadIdx.x >> 5), lane, g.lpr_log2, g.n_tiles, g.inter, r0, rr);
    uint4 wg[U][R], wu[U][R];
    float Ag[U][R], Bg[U][R], Au[U][R], Bu[U][R];
    if (live) {
        gemv_load<QT, R, U>(mg, rr, li, lpr, g.nchunks, wg, Ag, Bg);
        gemv_load<QT, R, U>(mu, rr, li, lpr, g.nchunks, wu, Au, Bu);
    }
    gemv_stage<QT>(xs4, xsum, x + t * g.hidden, 1, g.hidden, g.nchunks, blockDim.x);
    if (!live) return;
    float ag[R][1], au[R][1];
#pragma unroll
    for (int i = 0; i < R; i++) ag[i][0] = au[i][0] = 0.0f;
    for (int64_t ch0 = li; ch0 < g.nchunks;) {
        gemv_math<QT, 1, R, U>(xs4, xsum, g.nchunks, 1, ch0, lpr, wg, Ag, Bg, ag);
        gemv_math<QT, 1, R, U>(xs4, xsum, g.nchunks, 1, ch0, lpr, wu, Au, Bu, au);
        ch0 += U * lpr;
        if (ch0 < g.nchunks) {
            gemv_load<QT, R, U>(mg, rr, ch0, lpr, g.nchunks, wg, Ag, Bg);
            gemv_load<QT, R, U>(mu, rr, ch0, lpr, g.nchunks, wu, Au, Bu);
        }
    }
    float sg[R], su[R];
#pragma unroll
    for (int i = 0; i < R; i++) sg[i] = ag[i][0], su[i] = au[i][0];
    gemv_lanes_sum<R>(sg, lpr);
    gemv_lanes_sum<R>(su, lpr);
    if (li == 0)
#pragma unroll
        for (int i = 0; i < R; i++)
            if (r0 + i < g.inter) act[p * g.inter + r0 + i] = cb_silu(sg[i]) * su[i];
}

/* The kernel as the compiler sizes it, and one held to the registers of three blocks a
 * multiprocessor (a few spill) for grids the first cannot place in one wave. */
template <int QT, int R, int U>
__global__ void __launch_bounds__(MOE_MAX_THREADS)
moe_gate_up_kernel(const float *__restrict__ x, const int32_t *__restrict__ ids, const void *const *__restrict__ blobs,
                   moe_geo g, float *__restrict__ act) {
    moe_gate_up<QT, R, U>(x, ids, blobs, g, act);
}
template <int QT, int R, int U>
__global__ void __launch_bounds__(MOE_MAX_THREADS, 3)
moe_gate_up_kernel3(const float *__restrict__ x, const int32_t *__restrict__ ids, const void *const *__restrict__ blobs,
                    moe_geo g, float *__restrict__ act) {
    moe_gate_up<QT, R, U>(x, ids, blobs, g, act);
}

/* Loads step s of a lane's walk over (choice j, chunk k): chunk li + k * lpr of rows rr of
 * choice j's down matrix (a lane past the row's end loads its first chunk instead). */
template <int QT, int R>
__device__ __forceinline__ void moe_down_load(const unsigned char *const *base, const moe_geo &g, int S, int s,
                                              int li, int lpr, const int64_t (&rr)[R], uint4 (&wv)[R],
                                              float (&A)[R], float (&B)[R]) {
    const int j = s / S, k = s - j * S;
    int64_t ch = li + (int64_t)k * lpr;
    if (ch >= g.nchunks) ch = li;
    gemv_load1<QT, R>(moe_mat<QT>(base[j], g.hidden, g.inter), rr, ch, g.nchunks, wv, A, B);
}

/* Down of token t = blockIdx.x / blocks_per_item: y[t][r] = sum over j in order of w[t][j] *
 * (down_j row r . act[t][j]) for the rows r of the block's tiles; y [n_tok][hidden]. The block
 * stages the K act vectors of the token; each lane walks (j, k) with U steps' loads in flight
 * across choices, and its tile sums each choice's partials before weighting it. */
template <int QT, int R, int U>
__global__ void __launch_bounds__(MOE_MAX_THREADS)
moe_down_kernel(const float *__restrict__ act, const int32_t *__restrict__ ids, const float *__restrict__ w,
                const void *const *__restrict__ blobs, moe_geo g, float *__restrict__ y) {
    __shared__ const unsigned char *base[MOE_MAX_K]; /* choice j's down matrix */
    __shared__ float wj[MOE_MAX_K];
    extern __shared__ float4 xs4[];                  /* [K][nchunks][F] swizzled */
    constexpr int F = cq_traits<QT>::EPC / 4;
    const int64_t nf4 = g.nchunks * F;
    float *xsum = (float *)(xs4 + g.K * nf4);        /* [K][nchunks], affine types */
    const int64_t t = blockIdx.x / g.blocks_per_item, bi = blockIdx.x % g.blocks_per_item;
    const int lane = threadIdx.x & 31, lpr = 1 << g.lpr_log2, li = lane & (lpr - 1);
    for (int j = threadIdx.x; j < g.K; j += blockDim.x) {
        base[j] = (const unsigned char *)blobs[ids[t * g.K + j]] + g.off[2];
        wj[j] = w[t * g.K + j];
    }
    __syncthreads();
    int64_t r0, rr[R];
    const bool live = moe_tile<R>(bi * (blockDim.x >> 5) + (threadIdx.x >> 5), lane, g.lpr_log2, g.n_tiles, g.hidden, r0, rr);
    const int S = (int)((g.nchunks + lpr - 1) >> g.lpr_log2), total = g.K * S;
    uint4 wv[U][R];
    float A[U][R], B[U][R];
    if (live)
#pragma unroll
        for (int u = 0; u < U; u++)
            if (u < total) moe_down_load<QT, R>(base, g, S, u, li, lpr, rr, wv[u], A[u], B[u]);
    /* launched dependent after gate/up, which started only once the choice was complete: the
     * choice and the weights were readable above, act (gate/up's output) only from here */
    cb_pdl_enter();
    gemv_stage<QT>(xs4, xsum, act + t * g.K * g.inter, g.K, g.inter, g.nchunks, blockDim.x);
    if (!live) return;
    float acc[R], ya[R];
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = ya[i] = 0.0f;
    for (int s0 = 0; s0 < total; s0 += U) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int s = s0 + u;
            if (s >= total) break;
            const int j = s / S, k = s - j * S;
            const int64_t ch = li + (int64_t)k * lpr;
            if (ch < g.nchunks) gemv_dot1<QT, R>(xs4 + j * nf4, xsum + j * g.nchunks, ch, wv[u], A[u], B[u], acc);
            if (s + U < total) moe_down_load<QT, R>(base, g, S, s + U, li, lpr, rr, wv[u], A[u], B[u]);
            if (k == S - 1) { /* choice j is complete: weight it, in j order */
                gemv_lanes_sum<R>(acc, lpr);
#pragma unroll
                for (int i = 0; i < R; i++) {
                    ya[i] = fmaf(wj[j], acc[i], ya[i]);
                    acc[i] = 0.0f;
                }
            }
        }
    }
    if (li == 0)
#pragma unroll
        for (int i = 0; i < R; i++)
            if (r0 + i < g.hidden) y[t * g.hidden + r0 + i] = ya[i];
}

/* Down of a few tokens with the choices spread over warps: block (row group, token t) has one warp
 * per choice j (K warps), each warp the rows row0 .. row0 + rb - 1 of choice j's down matrix in
 * MOE_DS_PASSES passes of its tiles, act[t][j]'s chunks in registers (S per lane); the weighted
 * row sums meet in shared memory and are added in j order. Short per-warp work and many warps,
 * where moe_down_kernel walks every choice in one warp. */
#define MOE_DS_PASSES 2
#define MOE_DS_MAX_K 16
template <int QT, int R, int S>
__global__ void __launch_bounds__(MOE_DS_MAX_K * 32)
moe_down_split_kernel(const float *__restrict__ act, const int32_t *__restrict__ ids, const float *__restrict__ w,
                      const void *const *__restrict__ blobs, moe_geo g, int rb, float *__restrict__ y) {
    extern __shared__ float part[]; /* [K][rb] */
    constexpr int EPC = cq_traits<QT>::EPC, F = EPC / 4, P = MOE_DS_PASSES;
    const int64_t t = blockIdx.y, row0 = (int64_t)blockIdx.x * rb;
    const int lane = threadIdx.x & 31, j = threadIdx.x >> 5, lpr = 1 << g.lpr_log2, li = lane & (lpr - 1);
    const int tile = lane >> g.lpr_log2, tpw = 32 >> g.lpr_log2;
    const float wj = w[t * g.K + j];
    const cq_mat m = moe_mat<QT>((const unsigned char *)blobs[ids[t * g.K + j]] + g.off[2], g.hidden, g.inter);
    int64_t rr[P][R];
    uint4 wv[P][S][R];
    float A[P][S][R], B[P][S][R];
#pragma unroll
    for (int p = 0; p < P; p++) {
#pragma unroll
        for (int i = 0; i < R; i++) {
            const int64_t r = row0 + (p * tpw + tile) * R + i;
            rr[p][i] = r < g.hidden ? r : g.hidden - 1;
        }
#pragma unroll
        for (int k = 0; k < S; k++) {
            const int64_t ch = li + (int64_t)k * lpr;
            gemv_load1<QT, R>(m, rr[p], ch < g.nchunks ? ch : li, g.nchunks, wv[p][k], A[p][k], B[p][k]);
        }
    }
    /* launched dependent after gate/up: act (its output) is readable only from here */
    cb_pdl_enter();
    float xv[S][EPC], X[S];
#pragma unroll
    for (int k = 0; k < S; k++) {
        const int64_t ch = li + (int64_t)k * lpr;
        const float4 *xc = (const float4 *)(act + (t * g.K + j) * g.inter) + (ch < g.nchunks ? ch : li) * F;
        X[k] = 0.0f;
#pragma unroll
        for (int f = 0; f < F; f++) {
            const float4 v = xc[f];
            xv[k][4 * f] = v.x, xv[k][4 * f + 1] = v.y, xv[k][4 * f + 2] = v.z, xv[k][4 * f + 3] = v.w;
            X[k] += (v.x + v.y) + (v.z + v.w);
        }
    }
#pragma unroll
    for (int p = 0; p < P; p++) {
        float acc[R];
#pragma unroll
        for (int i = 0; i < R; i++) acc[i] = 0.0f;
#pragma unroll
        for (int k = 0; k < S; k++)
            if (li + (int64_t)k * lpr < g.nchunks)
#pragma unroll
                for (int i = 0; i < R; i++) acc[i] = gemv_chunk_dot<QT>(xv[k], X[k], wv[p][k][i], A[p][k][i], B[p][k][i], acc[i]);
        gemv_lanes_sum<R>(acc, lpr);
        if (li == 0)
#pragma unroll
            for (int i = 0; i < R; i++) {
                const int lr = (p * tpw + tile) * R + i;
                if (lr < rb) part[j * rb + lr] = wj * acc[i];
            }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < rb; r += blockDim.x)
        if (row0 + r < g.hidden) {
            float sum = 0.0f;
            for (int jj = 0; jj < g.K; jj++) sum += part[jj * rb + r];
            y[t * g.hidden + row0 + r] = sum;
        }
}

size_t cuda_moe_act_floats(const mf_backend_limits *lim) {
    if (lim->max_top_k <= 0 || lim->max_inter <= 0 || lim->max_tokens <= 0) return 0;
    return (size_t)lim->max_tokens * (size_t)lim->max_top_k * (size_t)lim->max_inter;
}

/* Lanes per row tile for rows of nchunks chunks: the largest power of two up to 32 that fits. */
static int moe_lpr_log2(int64_t nchunks) {
    int l = 0;
    while (l < 5 && ((int64_t)2 << l) <= nchunks) l++;
    return l;
}

/* Warps per block: 8, halved (down to 2) while the grid would leave a quarter of the
 * multiprocessors without a block. Sets g.blocks_per_item; returns the block size in threads. */
static int moe_block(const cuda_backend *c, moe_geo &g, int64_t items) {
    const int64_t warps = (g.n_tiles + (32 >> g.lpr_log2) - 1) / (32 >> g.lpr_log2);
    int wpb = 8;
    while (wpb > 2 && items * ((warps + wpb - 1) / wpb) < (int64_t)c->n_sm * 3 / 4) wpb /= 2;
    g.blocks_per_item = (warps + wpb - 1) / wpb;
    return wpb * 32;
}

/* Whether smem bytes of dynamic shared memory fit beside the kernel's static ones; opts the
 * kernel in to all it may have past 48 KB (once per kernel). */
template <typename Kernel>
static int moe_smem_ok(cuda_backend *c, Kernel k, size_t smem, size_t static_smem, int &done) {
    const size_t cap = (size_t)c->smem_optin - static_smem;
    if (smem > cap) return 0;
    if (smem + static_smem > 48 * 1024 && !done) {
        if (cb_check(c, cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)cap),
                     "moe_experts setup"))
            return 0;
        done = 1;
    }
    return 1;
}

#ifndef MOE_GU_R
#define MOE_GU_R 2
#endif
/* gate/up: one chunk of each of a lane's rows in flight (the next loaded while this one is
 * summed) measured faster than two on an H100, in decode of the 8-layer cuts with every expert
 * resident (35B 1,457 -> 1,499 tok/s, 30B 1,640 -> 1,662), and the same for the 397B shape and
 * experts read from host memory (bench_cuda_matvec --only experts) */
#ifndef MOE_GU_U
#define MOE_GU_U 1
#endif
#ifndef MOE_DN_R
#define MOE_DN_R 2
#endif
#ifndef MOE_DN_U
#define MOE_DN_U 4
#endif

template <int QT>
static void moe_gate_up_launch(cuda_backend *c, const float *x, const int32_t *ids, const void *const *blobs, moe_geo g,
                        int64_t pairs) {
    static int smem_set = 0, smem_set3 = 0;
    g.nchunks = g.hidden / cq_traits<QT>::EPC;
    g.lpr_log2 = moe_lpr_log2(g.nchunks);
    g.n_tiles = (g.inter + MOE_GU_R - 1) / MOE_GU_R;
    const int threads = moe_block(c, g, pairs);
    const size_t smem = gemv_smem<QT>(g.hidden, 1);
    const int64_t blocks = pairs * g.blocks_per_item;
    auto k = moe_gate_up_kernel<QT, MOE_GU_R, MOE_GU_U>;
    auto k3 = moe_gate_up_kernel3<QT, MOE_GU_R, MOE_GU_U>;
    if (!moe_smem_ok(c, k, smem, 0, smem_set) || !moe_smem_ok(c, k3, smem, 0, smem_set3)) {
        cb_fail(c, "moe_experts: hidden %lld needs %zu bytes of shared memory", (long long)g.hidden, smem);
        return;
    }
    /* a grid one wave of the first kernel cannot hold takes the second when it fits more blocks
     * (H100, decode of the 8-layer cuts: 30B, 384 blocks, 1,712 -> 1,747 tok/s; the 35B's 256
     * blocks fit one wave of the first, which is 2.8% faster there) */
    static int q_threads = -1, nb = 0, nb3 = 0; /* the last query, kept for the same block and shared memory */
    static size_t q_smem = 0;
    if (threads != q_threads || smem != q_smem) {
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, k, threads, smem) != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb3, k3, threads, smem) != cudaSuccess) {
            cudaGetLastError();
            nb = nb3 = 0;
        }
        q_threads = threads;
        q_smem = smem;
    }
    if (blocks > (int64_t)nb * c->n_sm && nb3 > nb) k = k3;
    cb_launch_dependent(c, k, dim3((unsigned)blocks), dim3(threads), smem, x, ids, blobs, g, c->moe_act);
}

template <int QT>
static void moe_down(cuda_backend *c, const int32_t *ids, const float *w, const void *const *blobs, moe_geo g,
                     int64_t n_tok, float *y) {
    static int smem_set = 0;
    g.nchunks = g.inter / cq_traits<QT>::EPC;
    g.lpr_log2 = moe_lpr_log2(g.nchunks);
    const int64_t lpr = (int64_t)1 << g.lpr_log2, S = (g.nchunks + lpr - 1) / lpr;
    if (g.K <= MOE_DS_MAX_K && S <= 2 && n_tok <= 65535) {
        const int R = 2, rb = MOE_DS_PASSES * (int)(32 / lpr) * R;
        const dim3 grid((unsigned)((g.hidden + rb - 1) / rb), (unsigned)n_tok);
        const size_t smem = sizeof(float) * (size_t)g.K * (size_t)rb;
        if (S == 1)
            cb_launch_dependent(c, moe_down_split_kernel<QT, 2, 1>, grid, dim3(32 * g.K), smem, (const float *)c->moe_act,
                                ids, w, blobs, g, rb, y);
        else
            cb_launch_dependent(c, moe_down_split_kernel<QT, 2, 2>, grid, dim3(32 * g.K), smem, (const float *)c->moe_act,
                                ids, w, blobs, g, rb, y);
        return;
    }
    g.n_tiles = (g.hidden + MOE_DN_R - 1) / MOE_DN_R;
    const int threads = moe_block(c, g, n_tok);
    const size_t smem = gemv_smem<QT>(g.inter, g.K);
    auto k = moe_down_kernel<QT, MOE_DN_R, MOE_DN_U>;
    if (!moe_smem_ok(c, k, smem, MOE_MAX_K * (sizeof(void *) + sizeof(float)), smem_set)) {
        cb_fail(c, "moe_experts: %d experts of inter %lld need %zu bytes of shared memory", g.K, (long long)g.inter,
                smem);
        return;
    }
    cb_launch_dependent(c, k, dim3((unsigned)(n_tok * g.blocks_per_item)), dim3(threads), smem,
                        (const float *)c->moe_act, ids, w, blobs, g, y);
}

/* Whether a [*, cols] matrix of type t can be read by the GEMV: whole 16-byte chunks per row. */
static bool moe_vec_ok(mf_qtype t, int64_t cols) {
    return t < MF_QTYPE_COUNT && quant_type_fits(t, cols) && cols * quant_bits(t) % 128 == 0;
}

void cuda_op_moe_experts(mf_backend *b, const float *x, const int32_t *ids, const float *w, int64_t n_tok, int K,
                         const void *const *blobs, const mf_expert_layout *lay, float *y) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n_tok <= 0 || lay->hidden <= 0) return;
    const int64_t H = lay->hidden, I = lay->inter;
    if (K <= 0 || I <= 0) { /* no experts, or empty ones: y = 0 */
        cb_check(c, cudaMemsetAsync(y, 0, sizeof(float) * (size_t)(n_tok * H), c->stream), "moe_experts");
        return;
    }
    const mf_qtype tg = lay->type[0], td = lay->type[2];
    if (K > MOE_MAX_K || tg != lay->type[1] || !moe_vec_ok(tg, H) || !moe_vec_ok(td, I) ||
        ((lay->offset[0] | lay->offset[1] | lay->offset[2]) & 15) || ((uintptr_t)x & 15)) {
        cb_fail(c, "moe_experts: K %d, gate/up %s [%lld x %lld], down %s, offsets %llu/%llu/%llu, x at %p are not "
                "supported", K, mf_qtype_name(tg), (long long)I, (long long)H, mf_qtype_name(td),
                (unsigned long long)lay->offset[0], (unsigned long long)lay->offset[1],
                (unsigned long long)lay->offset[2], (const void *)x);
        return;
    }
    if ((size_t)(n_tok * K) * (size_t)I > c->moe_act_floats) {
        cb_fail(c, "moe_experts: %lld tokens x %d experts x inter %lld exceed what reserve was told (%zu floats)",
                (long long)n_tok, K, (long long)I, c->moe_act_floats);
        return;
    }
    moe_geo g = {};
    for (int i = 0; i < 3; i++) g.off[i] = lay->offset[i];
    g.inter = I, g.hidden = H, g.K = K;
    switch (tg) {
    case MF_QTYPE_Q4: moe_gate_up_launch<MF_QTYPE_Q4>(c, x, ids, blobs, g, n_tok * K); break;
    case MF_QTYPE_Q8: moe_gate_up_launch<MF_QTYPE_Q8>(c, x, ids, blobs, g, n_tok * K); break;
    case MF_QTYPE_BF16: moe_gate_up_launch<MF_QTYPE_BF16>(c, x, ids, blobs, g, n_tok * K); break;
    default: moe_gate_up_launch<MF_QTYPE_F32>(c, x, ids, blobs, g, n_tok * K); break;
    }
    if (CB_LAUNCHED(c, "moe_experts gate/up")) return;
    switch (td) {
    case MF_QTYPE_Q4: moe_down<MF_QTYPE_Q4>(c, ids, w, blobs, g, n_tok, y); break;
    case MF_QTYPE_Q8: moe_down<MF_QTYPE_Q8>(c, ids, w, blobs, g, n_tok, y); break;
    case MF_QTYPE_BF16: moe_down<MF_QTYPE_BF16>(c, ids, w, blobs, g, n_tok, y); break;
    default: moe_down<MF_QTYPE_F32>(c, ids, w, blobs, g, n_tok, y); break;
    }
    CB_LAUNCHED(c, "moe_experts down");
}
