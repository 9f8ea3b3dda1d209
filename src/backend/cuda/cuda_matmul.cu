/* cuda_matmul.cu - y = x W^T on the GPU for f32/bf16/q8/q4 weights: a fused-dequant GEMV for up
 * to 8 tokens (each weight byte read once, 16-byte loads, x staged in shared memory) and a
 * shared-memory tiled kernel for more tokens or rows the GEMV cannot vectorize.
 * Not embedding lookups (cuda_embed.cu). */
#include "backend/cuda/cuda_gemv.cuh"

/* ---- GEMV: n_tok <= 8 (cuda_gemv.cuh describes the layout) ----
 * Each block stages x of its tokens, then its warps stride over row tiles. */

#define GEMV_SMEM_MAX (96 * 1024) /* x of the tokens of one launch, and the chunk sums */
#define GEMV_TINY ((uint64_t)4 << 20) /* weight bytes below which one token uses 1 row and 4 chunks in flight a lane */
#ifndef GEMV_BIG
#define GEMV_BIG ((uint64_t)64 << 20) /* weight bytes from which one token uses 4 rows per lane */
#endif

/* Matrices of one type and one column count that read the same x, run by one launch: matrix j
 * takes the warps [warp_end[j - 1], warp_end[j]) and writes y[j] [n_tok][rows_j]. */
#define GEMV_SET_MAX 4
struct gemv_set {
    cq_mat m[GEMV_SET_MAX];
    float *y[GEMV_SET_MAX];
    int64_t warp_end[GEMV_SET_MAX];
    int n;
};

/* Block of THREADS: x [n_tok][cols] staged as described above, then warps stride over the row
 * tiles of the set's matrices in order. A warp issues its first weight loads before the staging,
 * so that they overlap it. */
template <int QT, int NT, int R, int U, int THREADS>
__global__ void __launch_bounds__(THREADS)
gemv_kernel(const __grid_constant__ gemv_set set, int64_t nchunks, int lpr_log2, const float *__restrict__ x,
            int n_tok) {
    constexpr int EPC = cq_traits<QT>::EPC, F = EPC / 4, WARPS = THREADS / 32;
    extern __shared__ float4 xs4[];             /* [n_tok][nchunks][F] swizzled */
    const int64_t nf4 = nchunks * F;
    float *xsum = (float *)(xs4 + n_tok * nf4); /* [n_tok][nchunks], affine types only */
    const int lane = threadIdx.x & 31, lpr = 1 << lpr_log2, li = lane & (lpr - 1);
    const int64_t tiles_per_warp = 32 >> lpr_log2, n_warps = (int64_t)gridDim.x * WARPS;
    const int64_t total = set.warp_end[set.n - 1];
    int64_t wt = (int64_t)blockIdx.x * WARPS + (threadIdx.x >> 5), r0 = 0, rr[R];
    int j = 0; /* the matrix of warp tile wt; wt only grows, so j only advances */
    uint4 wv[U][R];
    float A[U][R], B[U][R];
    /* places the warp on tile wt (the same for the whole warp) and issues its first loads */
    auto place = [&]() -> bool {
        if (wt >= total) return false;
        while (wt >= set.warp_end[j]) j++;
        const int64_t lw = wt - (j ? set.warp_end[j - 1] : 0);
        const int64_t rows = set.m[j].rows;
        r0 = (lw * tiles_per_warp + (lane >> lpr_log2)) * R;
#pragma unroll
        for (int i = 0; i < R; i++) rr[i] = r0 + i < rows ? r0 + i : rows - 1; /* clamped for loads */
        gemv_load<QT, R, U>(set.m[j], rr, li, lpr, nchunks, wv, A, B);
        return true;
    };
    bool live = place();
    /* launched dependent: the weight loads above overlap the kernel before, x is its output */
    cb_pdl_enter();
    gemv_stage<QT>(xs4, xsum, x, n_tok, set.m[0].cols, nchunks, THREADS);
    while (live) {
        const cq_mat &m = set.m[j];
        float acc[R][NT];
#pragma unroll
        for (int i = 0; i < R; i++)
#pragma unroll
            for (int t = 0; t < NT; t++) acc[i][t] = 0.0f;
        for (int64_t ch0 = li; ch0 < nchunks;) {
            gemv_math<QT, NT, R, U>(xs4, xsum, nchunks, n_tok, ch0, lpr, wv, A, B, acc);
            ch0 += U * lpr;
            if (ch0 < nchunks) gemv_load<QT, R, U>(m, rr, ch0, lpr, nchunks, wv, A, B);
        }
        /* the next tile's first loads go out before this one's sums meet and are stored */
        const int64_t rows = m.rows, r0_done = r0;
        float *const y = set.y[j];
        wt += n_warps;
        live = place();
        /* the LPR lanes of a tile are aligned: xor offsets below LPR stay inside it */
        for (int o = lpr >> 1; o; o >>= 1)
#pragma unroll
            for (int i = 0; i < R; i++)
#pragma unroll
                for (int t = 0; t < NT; t++) acc[i][t] += __shfl_xor_sync(0xffffffffu, acc[i][t], o);
        if (li == 0)
#pragma unroll
            for (int i = 0; i < R; i++)
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (r0_done + i < rows && t < n_tok) y[t * rows + r0_done + i] = acc[i][t];
    }
}

/* Launches one configuration: a grid no larger than what the device holds at once (the warps
 * then stride over the row tiles). set's warp_end is filled here. */
template <int QT, int NT, int R, int U, int THREADS>
static void gemv_launch_cfg(cuda_backend *c, gemv_set &set, const float *x, int n_tok) {
    static int resident = 0;       /* blocks per multiprocessor at resident_smem (per process) */
    static size_t resident_smem = 0;
    const int64_t cols = set.m[0].cols;
    const size_t smem = gemv_smem<QT>(cols, n_tok);
    if (!resident || smem != resident_smem) {
        if (!resident)
            cb_check(c, cudaFuncSetAttribute(gemv_kernel<QT, NT, R, U, THREADS>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, GEMV_SMEM_MAX),
                     "matmul setup");
        int nb = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, gemv_kernel<QT, NT, R, U, THREADS>, THREADS, smem) !=
                cudaSuccess || nb < 1) {
            cudaGetLastError();
            nb = 1;
        }
        resident = nb;
        resident_smem = smem;
    }
    const int64_t nchunks = cols / cq_traits<QT>::EPC;
    int lpr_log2 = 0;
    while (lpr_log2 < 5 && ((int64_t)2 << lpr_log2) <= nchunks) lpr_log2++;
    const int64_t tiles_per_warp = 32 >> lpr_log2;
    int64_t warps = 0;
    for (int j = 0; j < set.n; j++) {
        const int64_t tiles = (set.m[j].rows + R - 1) / R;
        warps += (tiles + tiles_per_warp - 1) / tiles_per_warp; /* a warp's tiles stay in one matrix */
        set.warp_end[j] = warps;
    }
    int64_t blocks = (warps + THREADS / 32 - 1) / (THREADS / 32);
    if (blocks > (int64_t)c->n_sm * resident) blocks = (int64_t)c->n_sm * resident;
    cb_launch_dependent(c, gemv_kernel<QT, NT, R, U, THREADS>, dim3((unsigned)blocks), dim3(THREADS), smem, set,
                        nchunks, lpr_log2, x, n_tok);
}

/* Whether the set's row tiles of R rows (at most one warp each) fit in two 256-thread blocks a
 * multiprocessor, so that every warp is placed at once and none strides to a second tile. */
static bool gemv_one_wave(const cuda_backend *c, const gemv_set &set, int R) {
    int64_t warps = 0;
    for (int j = 0; j < set.n; j++) warps += (set.m[j].rows + R - 1) / R;
    return warps <= (int64_t)c->n_sm * 16;
}

/* Rows per lane R and chunks in flight U, by sandbox timings on an H200 (kernel times in CUDA
 * graphs, q4/q8/bf16 at expert, projection and lm-head shapes): R = 4 reads x least and wins on
 * the 248320-row lm head (q4 2.8 TB/s, q8 3.9, bf16 4.4 against a 4.25 TB/s copy); below 64 MB
 * of weights R = 2 gives twice the warps and wins or ties everywhere; below 4 MB (a router, a
 * shared expert) R = 1 with 4 chunks in flight shortens each warp's chain of loads (30B-A3B
 * shape decode +1.5% on an H100, router 128 x 2048 bf16). Between the two, a set whose tiles all fit
 * in one wave takes 4 chunks in flight, so that a lane issues all of a 4096-column q4 row's loads
 * (or half a q8 one's) before waiting on the kernel before it (H100, in graphs: 4096 x 4096 q4
 * 8.2 -> 7.1 us, q8 9.7 -> 8.3 us; decode unchanged); sets spanning several waves (a DeltaNet
 * in-projection) keep 2, as more registers a warp there means fewer warps in flight. */
template <int QT, int NT>
static void gemv_launch(cuda_backend *c, gemv_set &set, const float *x, int n_tok) {
    uint64_t bytes = 0;
    for (int j = 0; j < set.n; j++)
        bytes += (uint64_t)set.m[j].rows * (uint64_t)set.m[j].cols * (uint64_t)quant_bits((mf_qtype)QT) / 8;
    if constexpr (NT == 1) {
        if (bytes >= GEMV_BIG) gemv_launch_cfg<QT, 1, 4, 2, 256>(c, set, x, n_tok);
        else if (bytes < GEMV_TINY) gemv_launch_cfg<QT, 1, 1, 4, 256>(c, set, x, n_tok);
        else if (gemv_one_wave(c, set, 2)) gemv_launch_cfg<QT, 1, 2, 4, 256>(c, set, x, n_tok);
        else gemv_launch_cfg<QT, 1, 2, 2, 256>(c, set, x, n_tok);
    } else {
        gemv_launch_cfg<QT, NT, 2, 2, 256>(c, set, x, n_tok);
    }
}

/* Tokens go in groups whose x fits the shared memory; returns 0 when not even one token does.
 * Every matrix of the set has the type QT and the same columns. */
template <int QT>
static int gemv_run(cuda_backend *c, const cq_mat *ms, int n_m, const float *x, int64_t n_tok, float *const *ys) {
    const int64_t cols = ms[0].cols;
    int64_t g = GEMV_SMEM_MAX / (int64_t)gemv_smem<QT>(cols, 1);
    if (g < 1) return 0;
    if (g > 8) g = 8;
    for (int64_t t0 = 0; t0 < n_tok; t0 += g) {
        const int nt = (int)(n_tok - t0 < g ? n_tok - t0 : g);
        const float *xt = x + t0 * cols;
        gemv_set set;
        set.n = n_m;
        for (int j = 0; j < n_m; j++) {
            set.m[j] = ms[j];
            set.y[j] = ys[j] + t0 * ms[j].rows;
        }
        if (nt == 1) gemv_launch<QT, 1>(c, set, xt, nt);
        else if (nt == 2) gemv_launch<QT, 2>(c, set, xt, nt);
        else if (nt <= 4) gemv_launch<QT, 4>(c, set, xt, nt);
        else gemv_launch<QT, 8>(c, set, xt, nt);
    }
    return 1;
}

/* ---- tiled: any n_tok, any alignment ----
 * A block owns TB_M rows x TB_N tokens. Per step of TB_K columns it dequantizes the weight tile
 * into shared memory once and reuses it for all TB_N tokens; each thread accumulates a 4 x 4
 * (rows x tokens) piece. Loader: thread (lr, lk) fills 16 columns of row / token lr. */

#define TB_M 64
#define TB_N 64
#define TB_K 64

/* W[r][k0 .. k0 + 16) into out (zeros past the row); q4/q8: k0 is a multiple of 16, so the 16
 * values share one group. */
template <int QT>
__device__ __forceinline__ void tile_row16(const cq_mat &m, int64_t r, int64_t k0, float *out) {
    if (QT == MF_QTYPE_Q4 || QT == MF_QTYPE_Q8) {
        constexpr int bits = QT == MF_QTYPE_Q4 ? 4 : 8, per = 32 / bits;
        const int64_t e = r * m.cols + k0;
        const uint32_t *wp = (const uint32_t *)m.data + e / per;
        const int64_t g = e / QUANT_GROUP;
        const float s = cb_bf16(m.scales[g]), b = cb_bf16(m.biases[g]);
#pragma unroll
        for (int wi = 0; wi < 16 / per; wi++) {
            const uint32_t word = wp[wi];
#pragma unroll
            for (int j = 0; j < per; j++) out[wi * per + j] = s * (float)((word >> (j * bits)) & ((1u << bits) - 1u)) + b;
        }
    } else {
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const int64_t k = k0 + j;
            out[j] = k < m.cols ? (QT == MF_QTYPE_F32 ? ((const float *)m.data)[r * m.cols + k]
                                                      : cb_bf16(((const unsigned short *)m.data)[r * m.cols + k]))
                                : 0.0f;
        }
    }
}

template <int QT>
__global__ void __launch_bounds__(256)
tiled_kernel(cq_mat m, const float *__restrict__ x, int64_t n_tok, int x_vec, float *__restrict__ y) {
    cb_pdl_trigger();
    __shared__ __align__(16) float ws[TB_K][TB_M + 4]; /* [k][row] */
    __shared__ __align__(16) float xs[TB_K][TB_N + 4]; /* [k][token] */
    const int tid = threadIdx.x, tr = tid >> 4, tc = tid & 15;
    const int64_t row0 = (int64_t)blockIdx.x * TB_M, tok0 = (int64_t)blockIdx.y * TB_N;
    const int lr = tid >> 2, lk = (tid & 3) * 16;
    const int64_t r = row0 + lr, t = tok0 + lr;
    float acc[4][4] = {};
    for (int64_t k0 = 0; k0 < m.cols; k0 += TB_K) {
        float v[16];
        if (r < m.rows) tile_row16<QT>(m, r, k0 + lk, v);
#pragma unroll
        for (int j = 0; j < 16; j++) ws[lk + j][lr] = r < m.rows ? v[j] : 0.0f;
        if (t < n_tok && x_vec && k0 + lk + 16 <= m.cols) {
            const float4 *xp = (const float4 *)(x + t * m.cols + k0 + lk);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float4 q = __ldg(xp + j);
                xs[lk + 4 * j][lr] = q.x, xs[lk + 4 * j + 1][lr] = q.y, xs[lk + 4 * j + 2][lr] = q.z,
                                   xs[lk + 4 * j + 3][lr] = q.w;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 16; j++) {
                const int64_t k = k0 + lk + j;
                xs[lk + j][lr] = t < n_tok && k < m.cols ? x[t * m.cols + k] : 0.0f;
            }
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < TB_K; k++) {
            const float4 a = *(const float4 *)&ws[k][tr * 4];
            const float4 b = *(const float4 *)&xs[k][tc * 4];
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int64_t tt = tok0 + tc * 4 + j;
        if (tt >= n_tok) continue;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int64_t rr = row0 + tr * 4 + i;
            if (rr < m.rows) y[tt * m.rows + rr] = acc[i][j];
        }
    }
}

template <int QT>
static void tiled_launch(cuda_backend *c, const cq_mat &m, const float *x, int64_t n_tok, float *y) {
    const int x_vec = ((uintptr_t)x & 15) == 0 && m.cols % 4 == 0;
    dim3 grid((unsigned)((m.rows + TB_M - 1) / TB_M), (unsigned)((n_tok + TB_N - 1) / TB_N));
    tiled_kernel<QT><<<grid, 256, 0, c->stream>>>(m, x, n_tok, x_vec, y);
}

__global__ void zero_kernel(float *y, int64_t n) {
    cb_pdl_trigger();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        y[i] = 0.0f;
}

template <int QT>
static void matmul_typed(cuda_backend *c, const cq_mat &m, bool vec, const float *x, int64_t n_tok, float *y) {
    if (n_tok <= 8 && vec && gemv_run<QT>(c, &m, 1, x, n_tok, &y)) return;
    tiled_launch<QT>(c, m, x, n_tok, y);
}

/* Whether the GEMV can read w: whole 16-byte chunks of rows and float4s of x. */
static bool gemv_fits(const mf_wmat *w, const float *x) {
    const int bytes = w->type == MF_QTYPE_F32 ? 4 : w->type == MF_QTYPE_BF16 ? 2 : 0;
    return ((uintptr_t)w->data & 15) == 0 && ((uintptr_t)x & 15) == 0 && (bytes == 0 || (w->cols * bytes) % 16 == 0);
}

/* Runs the set of matrices sharing w[0]'s type and columns in one GEMV launch; 0 when it cannot. */
static int matmul_set(cuda_backend *c, const mf_wmat *const *w, int n, const float *x, int64_t n_tok,
                      float *const *y) {
    cq_mat ms[GEMV_SET_MAX];
    for (int j = 0; j < n; j++) ms[j] = cq_mat_of(w[j]);
    switch (w[0]->type) {
    case MF_QTYPE_Q4: return gemv_run<MF_QTYPE_Q4>(c, ms, n, x, n_tok, y);
    case MF_QTYPE_Q8: return gemv_run<MF_QTYPE_Q8>(c, ms, n, x, n_tok, y);
    case MF_QTYPE_BF16: return gemv_run<MF_QTYPE_BF16>(c, ms, n, x, n_tok, y);
    default: return gemv_run<MF_QTYPE_F32>(c, ms, n, x, n_tok, y);
    }
}

void cuda_op_matmul_multi(mf_backend *b, int n_w, const mf_wmat *w, const float *x, int64_t n_tok, float *const *y) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n_tok <= 0 || n_w <= 0) return;
    if (n_w > GEMV_SET_MAX) {
        cb_fail(c, "matmul_multi: %d matrices (at most %d)", n_w, GEMV_SET_MAX);
        return;
    }
    /* the matrices the GEMV takes go in one launch per type and column count, the rest alone */
    int gemv[GEMV_SET_MAX], done[GEMV_SET_MAX] = {0};
    for (int j = 0; j < n_w; j++) {
        const mf_wmat *wj = &w[j];
        gemv[j] = n_tok <= 8 && wj->type < MF_QTYPE_COUNT && wj->cols > 0 && wj->rows > 0 &&
                  quant_type_fits(wj->type, wj->cols) && gemv_fits(wj, x) &&
                  !(wj->type >= MF_QTYPE_Q8 && ((uintptr_t)wj->data & 3));
    }
    for (int j = 0; j < n_w; j++) {
        if (!gemv[j] || done[j]) continue;
        const mf_wmat *set[GEMV_SET_MAX];
        float *ys[GEMV_SET_MAX];
        int n = 0, members[GEMV_SET_MAX];
        for (int k = j; k < n_w; k++)
            if (gemv[k] && !done[k] && w[k].type == w[j].type && w[k].cols == w[j].cols) {
                set[n] = &w[k];
                ys[n] = y[k];
                members[n++] = k;
            }
        if (!matmul_set(c, set, n, x, n_tok, ys)) break; /* x too wide for the GEMV: one by one below */
        for (int i = 0; i < n; i++) done[members[i]] = 1;
        CB_LAUNCHED(c, "matmul_multi");
    }
    for (int j = 0; j < n_w; j++)
        if (!done[j]) cuda_op_matmul(b, &w[j], x, n_tok, y[j]);
}

void cuda_op_matmul(mf_backend *b, const mf_wmat *w, const float *x, int64_t n_tok, float *y) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n_tok <= 0 || w->rows <= 0) return;
    if (w->type >= MF_QTYPE_COUNT || !quant_type_fits(w->type, w->cols) || w->cols < 0) {
        cb_fail(c, "matmul: %s weights of %lld columns are not supported", mf_qtype_name(w->type),
                (long long)w->cols);
        return;
    }
    if (n_tok > 65535LL * TB_N || (w->type >= MF_QTYPE_Q8 && ((uintptr_t)w->data & 3))) {
        cb_fail(c, "matmul: %lld tokens, weights at %p", (long long)n_tok, w->data);
        return;
    }
    if (w->cols == 0) {
        zero_kernel<<<cb_grid(c, n_tok * w->rows, 256), 256, 0, c->stream>>>(y, n_tok * w->rows);
        CB_LAUNCHED(c, "matmul");
        return;
    }
    const cq_mat m = cq_mat_of(w);
    const bool vec = gemv_fits(w, x);
    switch (w->type) {
    case MF_QTYPE_Q4: matmul_typed<MF_QTYPE_Q4>(c, m, vec, x, n_tok, y); break;
    case MF_QTYPE_Q8: matmul_typed<MF_QTYPE_Q8>(c, m, vec, x, n_tok, y); break;
    case MF_QTYPE_BF16: matmul_typed<MF_QTYPE_BF16>(c, m, vec, x, n_tok, y); break;
    default: matmul_typed<MF_QTYPE_F32>(c, m, vec, x, n_tok, y); break;
    }
    CB_LAUNCHED(c, "matmul");
}
