/* test_matmul.c - tests of src/backend/cpu/cpu_matmul.c: fast (AVX2 and scalar) and reference products
 * for f32/bf16/q8/q4 against a double product of quant_decode's weights. Not a speed test. */
#include <criterion/criterion.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A second copy of cpu_matmul.c built without SIMD, so that the scalar fast path is tested
 * on any machine; its two public functions are renamed to stay apart from the library's. */
#define MF_MATMUL_NO_SIMD 1
#define cpu_matmul cpu_matmul_nosimd
#define cpu_dequant_row cpu_dequant_row_nosimd
#include "backend/cpu/cpu_matmul.c"
#undef cpu_matmul
#undef cpu_dequant_row
#undef MF_BACKEND_CPU_MATMUL_H
#include "backend/cpu/cpu_matmul.h"

#include "core/threadpool.h"
#include "format/quant.h"

/* ---- helpers ---- */

static uint64_t rng_state;

static uint64_t rng_next(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static double rng_uniform(void) { /* [0, 1) */
    return (double)(rng_next() >> 11) * 0x1.0p-53;
}

static double rng_normal(void) {
    double u1 = rng_uniform(), u2 = rng_uniform();
    return sqrt(-2.0 * log(1.0 - u1)) * cos(2.0 * M_PI * u2);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    cr_assert(p, "out of memory");
    return p;
}

/* norm(a - b) / norm(b) over n values, where norm(b) is floored at floor_norm: a product
 * that happens to cancel to near zero would otherwise turn rounding into a failure. */
static double rel_err(const float *a, const float *b, int64_t n, double floor_norm) {
    double d = 0, r = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = (double)a[i] - (double)b[i];
        d += e * e;
        r += (double)b[i] * b[i];
    }
    r = sqrt(r);
    if (r < floor_norm) r = floor_norm;
    return r > 0 ? sqrt(d) / r : sqrt(d);
}

#define GUARD 16
#define GUARD_VALUE 12345.0f

/* y: n values, all NaN, then GUARD guard values. */
static float *alloc_output(int64_t n) {
    float *y = xmalloc((size_t)(n + GUARD) * sizeof *y);
    for (int64_t i = 0; i < n; i++) y[i] = NAN;
    for (int i = 0; i < GUARD; i++) y[n + i] = GUARD_VALUE;
    return y;
}

static void check_output(const float *y, int64_t n, const char *what) {
    for (int64_t i = 0; i < n; i++)
        cr_assert(isfinite(y[i]), "%s: y[%lld] = %g not written", what, (long long)i, y[i]);
    for (int i = 0; i < GUARD; i++)
        cr_assert(y[n + i] == GUARD_VALUE, "%s: wrote past the end", what);
}

/* A random [rows, cols] matrix encoded as t: normal values; half the rows get an offset so
 * that groups have a large bias. */
static void *random_matrix(mf_qtype t, int64_t rows, int64_t cols) {
    float *src = xmalloc((size_t)(rows * cols) * sizeof *src);
    for (int64_t r = 0; r < rows; r++) {
        double off = (r % 2) ? 2.0 : 0.0;
        for (int64_t c = 0; c < cols; c++) src[r * cols + c] = (float)(off + rng_normal());
    }
    void *data = xmalloc((size_t)quant_tensor_bytes(t, rows, cols));
    quant_encode(t, src, rows, cols, data);
    free(src);
    return data;
}

/* y[t][r] = sum_c W[r][c] x[t][c] in double, W from quant_decode. Returns the norm that
 * outputs of this size typically have: norm over (t, r) of sum_c |W[r][c] x[t][c]| / sqrt(cols),
 * what a sum of cols terms of these magnitudes and random signs comes to. */
static double expected_product(mf_qtype t, const void *data, int64_t rows, int64_t cols,
                               const float *x, int64_t n_tok, float *y) {
    float *wf = xmalloc((size_t)(rows * cols) * sizeof *wf);
    quant_decode(t, data, rows, cols, wf);
    double typical = 0;
    for (int64_t k = 0; k < n_tok; k++)
        for (int64_t r = 0; r < rows; r++) {
            double acc = 0, mag = 0;
            for (int64_t c = 0; c < cols; c++) {
                double p = (double)wf[r * cols + c] * x[k * cols + c];
                acc += p;
                mag += fabs(p);
            }
            y[k * rows + r] = (float)acc;
            typical += mag * mag;
        }
    free(wf);
    return cols > 0 ? sqrt(typical / (double)cols) : 0.0;
}

typedef void (*matmul_fn)(mf_pool *, const mf_wmat *, const float *, int64_t, float *, int);

/* Every path on one shape: reference vs the double product, each fast path vs the reference
 * (relative error <= 1e-5, see rel_err), every output written and nothing past the end, and
 * the fast paths bit-identical whatever the thread count. x has a mean of 0.5, which makes
 * the fused form s * sum(q x) + b * sum(x) cancel more than zero-mean x would. */
static void check_shape(mf_pool *pool, mf_qtype t, int64_t rows, int64_t cols, int64_t n_tok) {
    void *data = random_matrix(t, rows, cols);
    mf_wmat w = {t, rows, cols, data};
    const int64_t n = rows * n_tok;
    float *x = xmalloc((size_t)(cols * n_tok + 1) * sizeof *x);
    for (int64_t i = 0; i < cols * n_tok; i++) x[i] = (float)(0.5 + rng_normal());

    float *expect = xmalloc((size_t)(n + 1) * sizeof *expect);
    const double typical = expected_product(t, data, rows, cols, x, n_tok, expect);

    char what[128];
    snprintf(what, sizeof what, "%s [%lld x %lld] n_tok %lld", mf_qtype_name(t), (long long)rows,
             (long long)cols, (long long)n_tok);

    float *ref = alloc_output(n);
    cpu_matmul(NULL, &w, x, n_tok, ref, 1);
    check_output(ref, n, what);
    double e = rel_err(ref, expect, n, typical);
    cr_assert(e <= 1e-6, "%s: reference vs double product: rel err %g", what, e);

    struct { const char *name; matmul_fn fn; mf_pool *pool; } paths[] = {
        {"fast", cpu_matmul, NULL},
        {"fast, 2 threads", cpu_matmul, pool},
        {"scalar", cpu_matmul_nosimd, NULL},
        {"scalar, 2 threads", cpu_matmul_nosimd, pool},
    };
    float *first = NULL;
    for (size_t p = 0; p < sizeof paths / sizeof paths[0]; p++) {
        float *y = alloc_output(n);
        paths[p].fn(paths[p].pool, &w, x, n_tok, y, 0);
        check_output(y, n, what);
        e = rel_err(y, ref, n, typical);
        cr_assert(e <= 1e-5, "%s, %s: rel err %g vs reference", what, paths[p].name, e);
        if (p % 2 == 0) {
            free(first);
            first = y;
        } else {
            cr_assert(memcmp(first, y, (size_t)n * sizeof *y) == 0,
                      "%s, %s: differs from one thread", what, paths[p].name);
            free(y);
        }
    }
    free(first);
    free(ref);
    free(expect);
    free(x);
    free(data);
}

static const int64_t shape_rows[] = {1, 3, 65, 257};
static const int64_t shape_cols[] = {64, 128, 448, 2048};
static const int64_t shape_ntok[] = {1, 2, 5, 17};

/* Every rows x cols pair, each with two token counts (so that every count meets every row
 * count and every column count); [257 x 2048] at 5 tokens spans two row blocks (256 KiB each)
 * for every type. Then shapes that cross column blocks (more than 36 groups at 4+ tokens, more
 * than 144 at one token), and one more split over the two threads at 9 tokens. */
static void check_type(mf_qtype t) {
    mf_pool *pool = pool_create(2);
    cr_assert(pool);
    rng_state = 1000 + (uint64_t)t;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
            check_shape(pool, t, shape_rows[i], shape_cols[j], shape_ntok[(i + j) % 4]);
            check_shape(pool, t, shape_rows[i], shape_cols[j], shape_ntok[(i + j + 2) % 4]);
        }
    check_shape(pool, t, 7, 4096, 5);
    check_shape(pool, t, 2, 9280, 1);
    check_shape(pool, t, 3, 9280, 3);
    check_shape(pool, t, 300, 1024, 9);
    if (t == MF_QTYPE_F32 || t == MF_QTYPE_BF16) { /* column tails of the 8- and 16-wide loops */
        check_shape(pool, t, 5, 1, 3);
        check_shape(pool, t, 5, 13, 2);
        check_shape(pool, t, 9, 100, 6);
    }
    pool_destroy(pool);
}

/* ---- tests ---- */

Test(matmul, f32) { check_type(MF_QTYPE_F32); }
Test(matmul, bf16) { check_type(MF_QTYPE_BF16); }
Test(matmul, q8) { check_type(MF_QTYPE_Q8); }
Test(matmul, q4) { check_type(MF_QTYPE_Q4); }

Test(matmul, dequant_row) {
    rng_state = 77;
    for (int t = 0; t < MF_QTYPE_COUNT; t++) {
        const int64_t rows = 5, cols = 448;
        void *data = random_matrix((mf_qtype)t, rows, cols);
        mf_wmat w = {(mf_qtype)t, rows, cols, data};
        float *all = xmalloc((size_t)(rows * cols) * sizeof *all);
        quant_decode((mf_qtype)t, data, rows, cols, all);
        float *row = alloc_output(cols);
        for (int64_t r = 0; r < rows; r++) {
            cpu_dequant_row(&w, r, row);
            check_output(row, cols, mf_qtype_name((mf_qtype)t));
            for (int64_t c = 0; c < cols; c++) {
                float want = all[r * cols + c];
                cr_assert(fabsf(row[c] - want) <= 1e-6f * (1.0f + fabsf(want)),
                          "%s row %lld col %lld: %g, quant_decode %g", mf_qtype_name((mf_qtype)t),
                          (long long)r, (long long)c, row[c], want);
            }
        }
        /* out-of-range rows write nothing */
        for (int64_t c = 0; c < cols; c++) row[c] = NAN;
        cpu_dequant_row(&w, rows, row);
        cpu_dequant_row(&w, -1, row);
        cr_assert(isnan(row[0]) && isnan(row[cols - 1]));
        free(row);
        free(all);
        free(data);
    }
}

Test(matmul, edge_shapes) {
    float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8];
    /* no columns: y is zero */
    mf_wmat w0 = {MF_QTYPE_F32, 4, 0, x};
    for (int i = 0; i < 8; i++) y[i] = NAN;
    cpu_matmul(NULL, &w0, x, 2, y, 0);
    for (int i = 0; i < 8; i++) cr_assert(y[i] == 0.0f);
    for (int i = 0; i < 8; i++) y[i] = NAN;
    cpu_matmul(NULL, &w0, x, 2, y, 1);
    for (int i = 0; i < 8; i++) cr_assert(y[i] == 0.0f);
    /* q4 with cols not a multiple of 64, or no tokens: nothing written */
    mf_wmat wq = {MF_QTYPE_Q4, 1, 8, x};
    for (int i = 0; i < 8; i++) y[i] = NAN;
    cpu_matmul(NULL, &wq, x, 1, y, 0);
    cpu_matmul(NULL, &w0, x, 0, y, 0);
    for (int i = 0; i < 8; i++) cr_assert(isnan(y[i]));
}
