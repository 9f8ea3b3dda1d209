/* cuda_gemv.cuh - the fused-dequant GEMV's pieces, shared by the matmul and the routed-experts
 * kernels: x staged in shared memory (swizzled, with chunk sums), 16-byte weight chunk loads with
 * their group's scale and bias folded, and the per-chunk dot products. Not a kernel. */
#ifndef MF_BACKEND_CUDA_GEMV_CUH
#define MF_BACKEND_CUDA_GEMV_CUH

#include "backend/cuda/cuda_quant.cuh"

/* A row is a run of 16-byte chunks. A warp works on row tiles of R rows; LPR lanes (a power of
 * two, up to 32) share a tile, lane i reading chunks i, i + LPR, ... of each of its R rows, so
 * each x value read serves R rows and a warp's weight loads are contiguous. A block first copies
 * x into shared memory, chunk by chunk with the float4s of a chunk XOR-swizzled so that lanes
 * reading consecutive chunks hit distinct banks, plus each chunk's sum. Per chunk of a row:
 * w = A f + B (cq_vals), so the chunk adds A sum(f x) + B sum(x). The LPR lanes' partial sums
 * meet by shuffles. */

/* Where float4 j of chunk c sits among the chunk's F float4s: eight lanes reading float4 j of
 * eight consecutive chunks (one shared-memory phase) land in eight distinct 16-byte bank groups. */
template <int F>
__device__ __forceinline__ int gemv_swz(int64_t c, int j) {
    return j ^ (int)((c / (8 / F)) & (F - 1));
}

/* Shared memory for n vectors of cols floats and their chunk sums. */
template <int QT>
static inline size_t gemv_smem(int64_t cols, int64_t n) {
    const int64_t nchunks = cols / cq_traits<QT>::EPC;
    return (size_t)n * (size_t)(cols + (cq_traits<QT>::AFFINE ? nchunks : 0)) * sizeof(float);
}

/* The whole block copies x [n][cols] into xs4 [n][nchunks][F] (swizzled) and, for q4/q8, the
 * chunk sums into xsum [n][nchunks]; ends with the block synchronized. threads: blockDim.x. */
template <int QT>
__device__ __forceinline__ void gemv_stage(float4 *xs4, float *xsum, const float *x, int n, int64_t cols,
                                           int64_t nchunks, int threads) {
    constexpr int F = cq_traits<QT>::EPC / 4;
    const int64_t nf4 = nchunks * F;
    for (int t = 0; t < n; t++) {
        const float4 *xt = (const float4 *)(x + t * cols);
        for (int64_t i = threadIdx.x; i < nf4; i += threads) {
            const int64_t c = i / F;
            xs4[t * nf4 + c * F + gemv_swz<F>(c, (int)(i % F))] = __ldg(xt + i);
        }
    }
    __syncthreads();
    if (cq_traits<QT>::AFFINE) {
        for (int64_t i = threadIdx.x; i < n * nchunks; i += threads) {
            const float4 *xc = xs4 + i * F; /* chunk i % nchunks of vector i / nchunks */
            float s = 0.0f;
#pragma unroll
            for (int j = 0; j < F; j++) {
                const float4 v = xc[j];
                s += (v.x + v.y) + (v.z + v.w);
            }
            xsum[i] = s;
        }
        __syncthreads();
    }
}

/* Issues the loads of chunk ch of rows rr, with the chunk's affine constants (q4/q8). */
template <int QT, int R>
__device__ __forceinline__ void gemv_load1(const cq_mat &m, const int64_t *rr, int64_t ch, int64_t nchunks,
                                           uint4 (&wv)[R], float (&A)[R], float (&B)[R]) {
    constexpr int EPC = cq_traits<QT>::EPC;
    const int64_t ng = m.cols / QUANT_GROUP;
#pragma unroll
    for (int i = 0; i < R; i++) wv[i] = cq_load_stream(m.data + (rr[i] * nchunks + ch) * 16);
    if (cq_traits<QT>::AFFINE) {
        const int64_t g = ch * EPC / QUANT_GROUP;
#pragma unroll
        for (int i = 0; i < R; i++)
            cq_fold<QT>(cb_bf16(__ldg(m.scales + rr[i] * ng + g)), cb_bf16(__ldg(m.biases + rr[i] * ng + g)), A[i],
                        B[i]);
    }
}

/* Issues the loads of chunks ch0, ch0 + lpr, ... (U of them, clamped into the row) of rows rr. */
template <int QT, int R, int U>
__device__ __forceinline__ void gemv_load(const cq_mat &m, const int64_t *rr, int64_t ch0, int lpr, int64_t nchunks,
                                          uint4 (&wv)[U][R], float (&A)[U][R], float (&B)[U][R]) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int64_t ch = ch0 + u * lpr < nchunks ? ch0 + u * lpr : ch0;
        gemv_load1<QT, R>(m, rr, ch, nchunks, wv[u], A[u], B[u]);
    }
}

/* acc + a chunk (loaded in wv, A, B) times x's matching EPC values xv (X: their sum). */
template <int QT>
__device__ __forceinline__ float gemv_chunk_dot(const float *xv, float X, const uint4 &wv, float A, float B, float acc) {
    constexpr int EPC = cq_traits<QT>::EPC;
    float f[EPC], d0 = 0.0f, d1 = 0.0f;
    cq_vals<QT>(wv, f);
#pragma unroll
    for (int j = 0; j < EPC; j += 2) {
        d0 = fmaf(f[j], xv[j], d0);
        d1 = fmaf(f[j + 1], xv[j + 1], d1);
    }
    return cq_traits<QT>::AFFINE ? fmaf(A, d0 + d1, fmaf(B, X, acc)) : acc + (d0 + d1);
}

/* acc[i] += row i's chunk ch (loaded in wv, A, B) times x's chunk ch, x one staged vector. */
template <int QT, int R>
__device__ __forceinline__ void gemv_dot1(const float4 *xs4, const float *xsum, int64_t ch, const uint4 (&wv)[R],
                                          const float (&A)[R], const float (&B)[R], float (&acc)[R]) {
    constexpr int EPC = cq_traits<QT>::EPC, F = EPC / 4;
    constexpr bool AFF = cq_traits<QT>::AFFINE;
    float xv[EPC];
#pragma unroll
    for (int j = 0; j < F; j++) {
        const float4 v = xs4[ch * F + gemv_swz<F>(ch, j)];
        xv[4 * j] = v.x, xv[4 * j + 1] = v.y, xv[4 * j + 2] = v.z, xv[4 * j + 3] = v.w;
    }
    const float X = AFF ? xsum[ch] : 0.0f;
#pragma unroll
    for (int i = 0; i < R; i++) acc[i] = gemv_chunk_dot<QT>(xv, X, wv[i], A[i], B[i], acc[i]);
}

/* Adds the loaded chunks' contributions to acc [R][NT] (x: n_tok staged vectors). */
template <int QT, int NT, int R, int U>
__device__ __forceinline__ void gemv_math(const float4 *xs4, const float *xsum, int64_t nchunks, int n_tok,
                                          int64_t ch0, int lpr, const uint4 (&wv)[U][R], const float (&A)[U][R],
                                          const float (&B)[U][R], float (&acc)[R][NT]) {
    constexpr int EPC = cq_traits<QT>::EPC, F = EPC / 4;
    constexpr bool AFF = cq_traits<QT>::AFFINE;
    const int64_t nf4 = nchunks * F;
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int64_t ch = ch0 + u * lpr;
        if (ch >= nchunks) break;
        if (NT == 1) {
            float a1[R];
#pragma unroll
            for (int i = 0; i < R; i++) a1[i] = acc[i][0];
            gemv_dot1<QT, R>(xs4, xsum, ch, wv[u], A[u], B[u], a1);
#pragma unroll
            for (int i = 0; i < R; i++) acc[i][0] = a1[i];
        } else {
            float f[R][EPC];
#pragma unroll
            for (int i = 0; i < R; i++) cq_vals<QT>(wv[u][i], f[i]);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                if (t < n_tok) {
                    float xv[EPC];
#pragma unroll
                    for (int j = 0; j < F; j++) {
                        const float4 v = xs4[t * nf4 + ch * F + gemv_swz<F>(ch, j)];
                        xv[4 * j] = v.x, xv[4 * j + 1] = v.y, xv[4 * j + 2] = v.z, xv[4 * j + 3] = v.w;
                    }
                    const float X = AFF ? xsum[t * nchunks + ch] : 0.0f;
#pragma unroll
                    for (int i = 0; i < R; i++) {
                        float d = 0.0f;
#pragma unroll
                        for (int j = 0; j < EPC; j++) d = fmaf(f[i][j], xv[j], d);
                        acc[i][t] = AFF ? fmaf(A[u][i], d, fmaf(B[u][i], X, acc[i][t])) : acc[i][t] + d;
                    }
                }
            }
        }
    }
}

/* The LPR lanes of a tile (aligned groups of lanes) sum their partials; every lane gets them. */
template <int R>
__device__ __forceinline__ void gemv_lanes_sum(float (&acc)[R], int lpr) {
    for (int o = lpr >> 1; o; o >>= 1)
#pragma unroll
        for (int i = 0; i < R; i++) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
}

#endif
