/* cpu_matmul.c - y = x W^T on the CPU for f32/bf16/q8/q4 weights: a plain reference, and a fast path
 * (fused group dequant, AVX2/FMA picked at run time, token tiles, threads). Not the ops table. */
#include "backend/cpu/cpu_matmul.h"

#include <math.h>
#include <string.h>

#include "format/quant.h"

/* The AVX2/FMA kernels are compiled with target attributes, so a build without -mavx2 still
 * has them and picks them at run time; MF_MATMUL_NO_SIMD leaves them out (tests use it to
 * exercise the scalar fast path on any machine). */
#if !defined(MF_MATMUL_NO_SIMD) && (defined(__x86_64__) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#define MM_X86 1
#include <immintrin.h>
#define MM_AVX2_FN static __attribute__((target("avx2,fma")))
#define MM_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
#endif

#define MM_TILE 4                     /* tokens that share one pass over a weight row */
#define MM_XP_FLOATS 9216             /* prepared x per thread: tile tokens x one column block */
#define MM_BLOCK_BYTES (256 * 1024)   /* weights revisited per token tile, sized to stay in L2 */
#define MM_CHUNK_MACS (INT64_C(1) << 20) /* multiply-adds per thread chunk, at least (a pool_for
                                         * costs ~10 us, 1M q4 multiply-adds ~40 us) */
#define MM_MAX_GROUPS (MM_XP_FLOATS / QUANT_GROUP) /* groups in a column block, at most */
#define MM_PREFETCH 2048              /* q4/q8: bytes ahead of the weights being read */

/* ---- reading the packed bytes (any alignment) ---- */

static uint32_t mm_u32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static float mm_f32(const unsigned char *p) {
    float v;
    memcpy(&v, p, sizeof v);
    return v;
}

static float mm_bf16(const unsigned char *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static int mm_is_affine(mf_qtype t) {
    return t == MF_QTYPE_Q4 || t == MF_QTYPE_Q8;
}

/* The three arrays of a q4/q8 matrix. */
typedef struct mm_affine {
    int bits;                    /* 4 or 8 */
    int64_t ng;                  /* groups per row: cols / 64 */
    const unsigned char *words;  /* u32 [rows][cols * bits / 32] */
    const unsigned char *scales; /* bf16 [rows][ng] */
    const unsigned char *biases; /* bf16 [rows][ng] */
} mm_affine;

static mm_affine mm_affine_of(const mf_wmat *w) {
    mm_affine a;
    uint64_t n = (uint64_t)w->rows * (uint64_t)w->cols;
    a.bits = quant_bits(w->type);
    a.ng = w->cols / QUANT_GROUP;
    a.words = w->data;
    a.scales = a.words + n * (uint64_t)a.bits / 8;
    a.biases = a.scales + 2 * (n / QUANT_GROUP);
    return a;
}

/* ---- the reference: one weight at a time, double accumulation ---- */

/* W[r][c], dequantized as quant_decode does (q4/q8: scale * q + bias in f32). */
static float mm_weight_at(const mf_wmat *w, int64_t r, int64_t c) {
    const unsigned char *d = w->data;
    uint64_t i = (uint64_t)r * (uint64_t)w->cols + (uint64_t)c; /* flat index */
    switch (w->type) {
    case MF_QTYPE_F32:
        return mm_f32(d + 4 * i);
    case MF_QTYPE_BF16:
        return mm_bf16(d + 2 * i);
    case MF_QTYPE_Q8:
    case MF_QTYPE_Q4: {
        /* rows are contiguous and cols is a multiple of 64: element i of the tensor is field
         * i % per_word of word i / per_word, in group i / 64 */
        mm_affine a = mm_affine_of(w);
        unsigned per_word = 32u / (unsigned)a.bits;
        uint32_t word = mm_u32(a.words + 4 * (i / per_word));
        uint32_t q = (word >> ((i % per_word) * (unsigned)a.bits)) & ((1u << a.bits) - 1u);
        uint64_t g = i / QUANT_GROUP;
        return mm_bf16(a.scales + 2 * g) * (float)q + mm_bf16(a.biases + 2 * g);
    }
    case MF_QTYPE_COUNT:
        break;
    }
    return NAN;
}

static void mm_reference(const mf_wmat *w, const float *x, int64_t n_tok, float *y) {
    for (int64_t t = 0; t < n_tok; t++) {
        const float *xt = x + t * w->cols;
        for (int64_t r = 0; r < w->rows; r++) {
            double acc = 0.0;
            for (int64_t c = 0; c < w->cols; c++)
                acc += (double)mm_weight_at(w, r, c) * (double)xt[c];
            y[t * w->rows + r] = (float)acc;
        }
    }
}

void cpu_dequant_row(const mf_wmat *w, int64_t r, float *out) {
    if (!w || !out || r < 0 || r >= w->rows || !quant_type_fits(w->type, w->cols)) return;
    const unsigned char *d = w->data;
    const uint64_t cols = (uint64_t)w->cols;
    switch (w->type) {
    case MF_QTYPE_F32:
        memcpy(out, d + 4 * (uint64_t)r * cols, cols * sizeof(float));
        break;
    case MF_QTYPE_BF16:
        for (uint64_t c = 0; c < cols; c++) out[c] = mm_bf16(d + 2 * ((uint64_t)r * cols + c));
        break;
    case MF_QTYPE_Q8:
    case MF_QTYPE_Q4: {
        mm_affine a = mm_affine_of(w);
        const unsigned per_word = 32u / (unsigned)a.bits;
        const uint32_t mask = (1u << a.bits) - 1u;
        const unsigned char *words = a.words + (uint64_t)r * cols * (uint64_t)a.bits / 8;
        for (int64_t g = 0; g < a.ng; g++) {
            uint64_t gi = (uint64_t)(r * a.ng + g);
            float s = mm_bf16(a.scales + 2 * gi), b = mm_bf16(a.biases + 2 * gi);
            for (unsigned j = 0; j < QUANT_GROUP; j++) {
                uint64_t c = (uint64_t)g * QUANT_GROUP + j;
                uint32_t q = (mm_u32(words + 4 * (c / per_word)) >> ((c % per_word) * (unsigned)a.bits)) & mask;
                out[c] = s * (float)q + b;
            }
        }
        break;
    }
    case MF_QTYPE_COUNT:
        break;
    }
}

/* ---- the fast path ----
 * q4/q8, per group of 64: sum_j (s q_j + b) x_j = s * sum_j q_j x_j + b * sum_j x_j.
 * A group's packed words, loaded as 8-lane vectors of u32, give 8 fields per lane position
 * (q4: field i of word k is element 8k + i; q8: 2 vectors, field i of word k of half h is
 * element 32h + 4k + i). Field i is isolated with a mask (no shift): it then reads
 * q * 2^(bits i), exactly, and x is prepared once per token in the same order scaled by
 * 2^-(bits i), so q x comes out exact. The top field (i = 32/bits - 1) is shifted down
 * instead, since masked in place it would read as a negative int32.
 * Accuracy: all sums are f32. The fused form cancels when x has a large mean over a group
 * (b sum(x) against s sum(q x)); against the double reference, norm-relative errors measured
 * 1e-7..5e-7 for zero-mean x and up to 4e-6 for x of mean 3 sd (plain f32 dots: 1e-7..8e-7).
 * Centring q (q - 8) would remove that but costs a third more arithmetic per weight.
 * Loop order per thread (mm_rows_*): row blocks (all rows when n_tok <= MM_TILE, else as many
 * as fit MM_BLOCK_BYTES), then token tiles of MM_TILE, then column blocks (q4/q8: as many
 * groups as fit the tile's prepared x in MM_XP_FLOATS), then rows; so each weight byte comes
 * from memory once per call. Scratch is on the stack (~38 KB per thread): no allocation.
 * A row's arithmetic does not depend on how rows are split, so results are the same for any
 * number of threads. */

/* Prepares one token's x for groups [0, ng) of a column block: xp [ng][64] (element e of
 * a group goes to slot v * 8 + k where field v of lane k holds it, scaled as above),
 * xs [ng] the plain sums of each group. */
static void mm_prep_x(int bits, const float *x, int64_t ng, float *xp, float *xs) {
    const int per_word = 32 / bits;
    float f[8];
    for (int v = 0; v < 8; v++) {
        int i = v % per_word;
        f[v] = i == per_word - 1 ? 1.0f : ldexpf(1.0f, -bits * i);
    }
    for (int64_t g = 0; g < ng; g++) {
        const float *xg = x + g * QUANT_GROUP;
        float *pg = xp + g * QUANT_GROUP;
        float sum = 0.0f;
        for (int v = 0; v < 8; v++) {
            int h = v / per_word, i = v % per_word;
            for (int k = 0; k < 8; k++) {
                float e = xg[(h * 8 + k) * per_word + i];
                pg[v * 8 + k] = e * f[v];
                sum += e;
            }
        }
        xs[g] = sum;
    }
}

/* One row, groups [0, ng) of a column block, nt tokens: out[t] = that part of y[t][row].
 * wq: the block's first word; sc, bi: its first scale and bias; xp [nt][ng][64], xs [nt][ng]. */
static void mm_affine_scalar(int bits, int nt, const unsigned char *wq, const unsigned char *sc,
                             const unsigned char *bi, int64_t ng, const float *xp, const float *xs,
                             float *out) {
    const int per_word = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    float acc[MM_TILE] = {0};
    float qf[QUANT_GROUP]; /* the group's fields in prepared order, as xp */
    for (int64_t g = 0; g < ng; g++) {
        const unsigned char *wg = wq + g * 8 * bits;
        for (int v = 0; v < 8; v++) {
            int h = v / per_word, i = v % per_word;
            for (int k = 0; k < 8; k++) {
                uint32_t word = mm_u32(wg + 4 * (8 * h + k));
                uint32_t q = i == per_word - 1 ? word >> (32 - bits) : word & (mask << (bits * i));
                qf[v * 8 + k] = (float)q;
            }
        }
        float s = mm_bf16(sc + 2 * g), b = mm_bf16(bi + 2 * g);
        for (int t = 0; t < nt; t++) {
            const float *xg = xp + (t * ng + g) * QUANT_GROUP;
            float dot = 0.0f;
            for (int j = 0; j < QUANT_GROUP; j++) dot += qf[j] * xg[j];
            acc[t] += s * dot + b * xs[t * ng + g];
        }
    }
    for (int t = 0; t < nt; t++) out[t] = acc[t];
}

/* One f32/bf16 row, nt tokens: out[t] = sum_c W[c] x[t][c]; x [nt][cols]. */
static void mm_dense_scalar(int is_bf16, int nt, const unsigned char *wr, int64_t cols,
                            const float *x, float *out) {
    float acc[MM_TILE] = {0};
    for (int64_t c = 0; c < cols; c++) {
        float wv = is_bf16 ? mm_bf16(wr + 2 * c) : mm_f32(wr + 4 * c);
        for (int t = 0; t < nt; t++) acc[t] += wv * x[t * cols + c];
    }
    for (int t = 0; t < nt; t++) out[t] = acc[t];
}

#ifdef MM_X86
MM_AVX2_INLINE float mm_hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Field i of each lane of wv as floats, q * 2^(bits i) (top field: q). */
MM_AVX2_INLINE __m256 mm_field_avx2(__m256i wv, int bits, int i) {
    if (i == 32 / bits - 1) return _mm256_cvtepi32_ps(_mm256_srli_epi32(wv, 32 - bits));
    const int mask = (int)(((1u << bits) - 1u) << (bits * i));
    return _mm256_cvtepi32_ps(_mm256_and_si256(wv, _mm256_set1_epi32(mask)));
}

/* 8 bf16 values at p as floats. */
MM_AVX2_INLINE __m256 mm_bf16x8_avx2(const unsigned char *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)(const void *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* mm_affine_scalar with 8 lanes; bits and nt are constants once inlined. The scales are
 * converted up front (the group loop then broadcasts each from memory), and the bias terms
 * sum_g b_g xs[t][g] are done there too, 8 groups at a time. Two partial sums per token when
 * nt is small, so that the FMA chains of one group overlap. Weights are prefetched ahead in
 * software: the hardware prefetcher alone left q4 at 7-9 GB/s and q8 erratic (9-17 GB/s),
 * against 12-14 GB/s and 14-15 GB/s with it, one thread of a 2-core EPYC. */
MM_AVX2_INLINE void mm_affine_avx2_t(int bits, int nt, const unsigned char *wq,
                                     const unsigned char *sc, const unsigned char *bi, int64_t ng,
                                     const float *xp, const float *xs, float *out) {
    const int per_word = 32 / bits;
    const int ch = nt <= 2 ? 2 : 1;
    const int64_t xstride = ng * QUANT_GROUP;
    __m256 acc[MM_TILE], tmp[MM_TILE][2];
    float sf[MM_MAX_GROUPS]; /* the block's scales, f32 */
    float tail[MM_TILE] = {0};
    for (int t = 0; t < nt; t++) acc[t] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
        _mm256_storeu_ps(sf + g, mm_bf16x8_avx2(sc + 2 * g));
        __m256 b = mm_bf16x8_avx2(bi + 2 * g);
        for (int t = 0; t < nt; t++)
            acc[t] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xs + t * ng + g), acc[t]);
    }
    for (; g < ng; g++) {
        sf[g] = mm_bf16(sc + 2 * g);
        float b = mm_bf16(bi + 2 * g);
        for (int t = 0; t < nt; t++) tail[t] += b * xs[t * ng + g];
    }
#pragma GCC unroll 2
    for (g = 0; g < ng; g++) {
        const unsigned char *wg = wq + g * 8 * bits;
        const float *xg = xp + g * QUANT_GROUP;
        _mm_prefetch((const char *)(wg + MM_PREFETCH), _MM_HINT_T0);
        __m256i w0 = _mm256_loadu_si256((const __m256i *)wg);
        __m256i w1 = bits == 8 ? _mm256_loadu_si256((const __m256i *)(wg + 32)) : w0;
#pragma GCC unroll 8
        for (int v = 0; v < 8; v++) {
            __m256 q = mm_field_avx2(v / per_word ? w1 : w0, bits, v % per_word);
#pragma GCC unroll 4
            for (int t = 0; t < nt; t++) {
                __m256 xv = _mm256_load_ps(xg + t * xstride + 8 * v);
                if (v < ch)
                    tmp[t][v] = _mm256_mul_ps(q, xv);
                else
                    tmp[t][v % ch] = _mm256_fmadd_ps(q, xv, tmp[t][v % ch]);
            }
        }
        __m256 s = _mm256_broadcast_ss(sf + g);
#pragma GCC unroll 4
        for (int t = 0; t < nt; t++) {
            __m256 d = ch == 2 ? _mm256_add_ps(tmp[t][0], tmp[t][1]) : tmp[t][0];
            acc[t] = _mm256_fmadd_ps(s, d, acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = mm_hsum_avx2(acc[t]) + tail[t];
}

MM_AVX2_FN void mm_affine_avx2(int bits, int nt, const unsigned char *wq, const unsigned char *sc,
                               const unsigned char *bi, int64_t ng, const float *xp,
                               const float *xs, float *out) {
#define MM_CASE(B, T) \
    case T: mm_affine_avx2_t(B, T, wq, sc, bi, ng, xp, xs, out); break
    if (bits == 4) {
        switch (nt) { MM_CASE(4, 1); MM_CASE(4, 2); MM_CASE(4, 3); default: MM_CASE(4, 4); }
    } else {
        switch (nt) { MM_CASE(8, 1); MM_CASE(8, 2); MM_CASE(8, 3); default: MM_CASE(8, 4); }
    }
#undef MM_CASE
}

/* 8 weights at c as floats. */
MM_AVX2_INLINE __m256 mm_load8_avx2(int is_bf16, const unsigned char *wr, int64_t c) {
    if (!is_bf16) return _mm256_loadu_ps((const float *)(const void *)(wr + 4 * c));
    return mm_bf16x8_avx2(wr + 2 * c);
}

MM_AVX2_INLINE void mm_dense_avx2_t(int is_bf16, int nt, const unsigned char *wr, int64_t cols,
                                    const float *x, float *out) {
    __m256 acc[MM_TILE][2];
    for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            __m256 wv = mm_load8_avx2(is_bf16, wr, c + 8 * h);
#pragma GCC unroll 4
            for (int t = 0; t < nt; t++)
                acc[t][h] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * cols + c + 8 * h), acc[t][h]);
        }
    }
    for (; c + 8 <= cols; c += 8) {
        __m256 wv = mm_load8_avx2(is_bf16, wr, c);
        for (int t = 0; t < nt; t++)
            acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * cols + c), acc[t][0]);
    }
    float tail[MM_TILE] = {0};
    for (; c < cols; c++) {
        float wv = is_bf16 ? mm_bf16(wr + 2 * c) : mm_f32(wr + 4 * c);
        for (int t = 0; t < nt; t++) tail[t] += wv * x[t * cols + c];
    }
    for (int t = 0; t < nt; t++)
        out[t] = mm_hsum_avx2(_mm256_add_ps(acc[t][0], acc[t][1])) + tail[t];
}

MM_AVX2_FN void mm_dense_avx2(int is_bf16, int nt, const unsigned char *wr, int64_t cols,
                              const float *x, float *out) {
#define MM_CASE(B, T) \
    case T: mm_dense_avx2_t(B, T, wr, cols, x, out); break
    if (is_bf16) {
        switch (nt) { MM_CASE(1, 1); MM_CASE(1, 2); MM_CASE(1, 3); default: MM_CASE(1, 4); }
    } else {
        switch (nt) { MM_CASE(0, 1); MM_CASE(0, 2); MM_CASE(0, 3); default: MM_CASE(0, 4); }
    }
#undef MM_CASE
}
#endif /* MM_X86 */

static int mm_have_avx2(void) {
#if defined(MM_X86) && defined(__AVX2__) && defined(__FMA__)
    return 1;
#elif defined(MM_X86)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

typedef struct mm_job {
    const mf_wmat *w;
    const float *x; /* [n_tok][cols] */
    float *y;       /* [n_tok][rows] */
    int64_t n_tok;
    int simd;       /* use the AVX2 kernels */
} mm_job;

static int64_t mm_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* Rows per block: a block is swept once per token tile, so with several tiles it must stay
 * in cache; with one tile there is no reuse and the whole range is one block. */
static int64_t mm_row_block(const mf_wmat *w, int64_t n_tok, int64_t n_rows) {
    if (n_tok <= MM_TILE) return n_rows;
    uint64_t row_bytes = quant_tensor_bytes(w->type, 1, w->cols);
    int64_t rb = (int64_t)(MM_BLOCK_BYTES / (row_bytes ? row_bytes : 1));
    return rb < 1 ? 1 : rb;
}

/* Adds a column block's part of y[t0 .. t0 + nt)[r]; the first block stores. */
static void mm_store(float *y, int64_t rows, int64_t t0, int nt, int64_t r, const float *out,
                     int first) {
    for (int t = 0; t < nt; t++) {
        float *yy = y + (t0 + t) * rows + r;
        *yy = first ? out[t] : *yy + out[t];
    }
}

static void mm_rows_affine(const mm_job *job, int64_t r0, int64_t r1) {
    const mf_wmat *w = job->w;
    const mm_affine a = mm_affine_of(w);
    const int64_t rows = w->rows, cols = w->cols, n_tok = job->n_tok;
    const int64_t gbytes = QUANT_GROUP * a.bits / 8;
    /* column blocks of cbg groups, so that a tile's prepared x fits xp */
    const int64_t tile = mm_min(n_tok, MM_TILE);
    const int64_t max_g = MM_XP_FLOATS / (QUANT_GROUP * tile);
    const int64_t n_cb = (a.ng + max_g - 1) / max_g;
    const int64_t cbg = (a.ng + n_cb - 1) / n_cb;
    const int64_t rb = mm_row_block(w, n_tok, r1 - r0);
    _Alignas(32) float xp[MM_XP_FLOATS];      /* [nt][ngb][64] prepared x */
    float xs[MM_MAX_GROUPS];                  /* [nt][ngb] group sums of x */
    float out[MM_TILE];
    for (int64_t b0 = r0; b0 < r1; b0 += rb) {
        const int64_t b1 = mm_min(b0 + rb, r1);
        for (int64_t t0 = 0; t0 < n_tok; t0 += MM_TILE) {
            const int nt = (int)mm_min(MM_TILE, n_tok - t0);
            for (int64_t g0 = 0; g0 < a.ng; g0 += cbg) {
                const int64_t ngb = mm_min(cbg, a.ng - g0);
                for (int t = 0; t < nt; t++)
                    mm_prep_x(a.bits, job->x + (t0 + t) * cols + g0 * QUANT_GROUP, ngb,
                              xp + t * ngb * QUANT_GROUP, xs + t * ngb);
                for (int64_t r = b0; r < b1; r++) {
                    const uint64_t gi = (uint64_t)(r * a.ng + g0); /* first group, tensor-wide */
                    const unsigned char *wq = a.words + gi * (uint64_t)gbytes;
                    const unsigned char *sc = a.scales + 2 * gi, *bi = a.biases + 2 * gi;
#ifdef MM_X86
                    if (job->simd)
                        mm_affine_avx2(a.bits, nt, wq, sc, bi, ngb, xp, xs, out);
                    else
#endif
                        mm_affine_scalar(a.bits, nt, wq, sc, bi, ngb, xp, xs, out);
                    mm_store(job->y, rows, t0, nt, r, out, g0 == 0);
                }
            }
        }
    }
}

static void mm_rows_dense(const mm_job *job, int64_t r0, int64_t r1) {
    const mf_wmat *w = job->w;
    const int64_t rows = w->rows, cols = w->cols, n_tok = job->n_tok;
    const int is_bf16 = w->type == MF_QTYPE_BF16;
    const uint64_t row_bytes = (uint64_t)cols * (is_bf16 ? 2 : 4);
    const int64_t rb = mm_row_block(w, n_tok, r1 - r0);
    float out[MM_TILE];
    for (int64_t b0 = r0; b0 < r1; b0 += rb) {
        const int64_t b1 = mm_min(b0 + rb, r1);
        for (int64_t t0 = 0; t0 < n_tok; t0 += MM_TILE) {
            const int nt = (int)mm_min(MM_TILE, n_tok - t0);
            const float *xt = job->x + t0 * cols;
            for (int64_t r = b0; r < b1; r++) {
                const unsigned char *wr = (const unsigned char *)w->data + (uint64_t)r * row_bytes;
#ifdef MM_X86
                if (job->simd)
                    mm_dense_avx2(is_bf16, nt, wr, cols, xt, out);
                else
#endif
                    mm_dense_scalar(is_bf16, nt, wr, cols, xt, out);
                mm_store(job->y, rows, t0, nt, r, out, 1);
            }
        }
    }
}

static void mm_worker(void *ctx, int64_t begin, int64_t end, int thread) {
    (void)thread;
    const mm_job *job = ctx;
    if (mm_is_affine(job->w->type))
        mm_rows_affine(job, begin, end);
    else
        mm_rows_dense(job, begin, end);
}

/* Shapes that quant_tensor_bytes rejects leave y untouched. */
void cpu_matmul(mf_pool *pool, const mf_wmat *w, const float *x, int64_t n_tok, float *y,
                int reference) {
    if (!w || !x || !y || n_tok <= 0 || w->rows <= 0 || !quant_type_fits(w->type, w->cols)) return;
    if (w->cols == 0) {
        for (int64_t i = 0; i < n_tok * w->rows; i++) y[i] = 0.0f;
        return;
    }
    if (reference) {
        mm_reference(w, x, n_tok, y);
        return;
    }
    mm_job job = {w, x, y, n_tok, mm_have_avx2()};
    int64_t grain = MM_CHUNK_MACS / (w->cols * n_tok);
    pool_for(pool, w->rows, grain < 1 ? 1 : grain, mm_worker, &job);
}
