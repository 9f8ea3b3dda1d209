/* test_cuda_ops.c - every op of the CUDA backend against the CPU backend's reference path
 * (cpu_backend_create(1, 1)) on random inputs, at fixture and real model dims: normalized error
 * per op, NaN/Inf checks, guard floats after every device output. Needs a GPU (make test-cuda).
 * Not the speed of the kernels (bench/bench_cuda_matvec.c) and not whole models (test_cuda_model.c). */
#include <criterion/criterion.h>
#include <criterion/logging.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "format/quant.h"
#include "../helpers.h"

/* ---- host arrays (random numbers and guarded buffers: helpers.h) ---- */

static float *hnormal(int64_t n, double mean, double sd) {
    float *x = th_buf_alloc(n);
    th_fill_normal(x, n, mean, sd);
    return x;
}

/* ---- the two backends ---- */

static mf_backend *cpu, *gpu;

static void backends_free(void) {
    if (cpu) cpu->ops->destroy(cpu);
    if (gpu) gpu->ops->destroy(gpu);
    cpu = gpu = NULL;
}

/* Fresh backends, both reserved for these limits. */
static void backends_new(int64_t max_ctx, int64_t max_tokens, int max_head_dim, int max_experts) {
    backends_free();
    mf_err err = {0};
    cpu = cpu_backend_create(1, 1);
    gpu = cuda_backend_create(0, &err);
    cr_assert(cpu, "cannot create the CPU backend");
    cr_assert(gpu, "cannot create the CUDA backend: %s", err.msg);
    mf_backend_limits lim = {max_ctx, max_tokens, max_head_dim, max_experts, 0, 0, 0};
    cr_assert(cpu->ops->reserve(cpu, &lim) == MF_OK, "CPU reserve failed");
    cr_assert(gpu->ops->reserve(gpu, &lim) == MF_OK, "CUDA reserve failed");
}

static void setup(void) { backends_new(64, 64, 128, 512); }
static void teardown(void) { backends_free(); }

TestSuite(cuda, .init = setup, .fini = teardown, .timeout = 300);

static void no_cuda_error(void) {
    const char *e = cuda_backend_last_error(gpu);
    cr_assert(!e, "CUDA backend error: %s", e);
}

/* ---- device buffers: n floats then TH_GUARD guard floats, as th_buf_alloc makes them ---- */

/* n floats in device memory followed by the guard: init[0..n) or, when init is NULL, NaNs. */
static float *dev_floats(const float *init, int64_t n) {
    float *h = init ? th_buf_copy(init, n) : th_buf_alloc(n);
    float *d = gpu->ops->alloc(gpu, sizeof(float) * (size_t)(n + TH_GUARD));
    cr_assert(d, "device allocation of %lld floats failed", (long long)(n + TH_GUARD));
    gpu->ops->upload(gpu, d, h, sizeof(float) * (size_t)(n + TH_GUARD));
    free(h);
    return d;
}

static void *dev_bytes(const void *init, size_t bytes) {
    void *d = gpu->ops->alloc(gpu, bytes);
    cr_assert(d, "device allocation of %zu bytes failed", bytes);
    if (init) gpu->ops->upload(gpu, d, init, bytes); /* else zeroed, as alloc leaves it */
    return d;
}

/* Downloads n floats of d into a new host array; the guard after them must be intact and every
 * value finite. */
static float *dev_fetch(const float *d, int64_t n, const char *what) {
    float *h = malloc(sizeof(float) * (size_t)(n + TH_GUARD));
    cr_assert(h, "out of memory");
    gpu->ops->download(gpu, h, d, sizeof(float) * (size_t)(n + TH_GUARD));
    no_cuda_error();
    th_check_written(h, n, what);
    return h;
}

static void dev_free(void *d) { gpu->ops->free(gpu, d); }

/* norm(got - ref) / norm(ref), asserted <= bound. */
static double check_close(const float *got, const float *ref, int64_t n, double bound, const char *what) {
    double d = 0, r = 0;
    for (int64_t i = 0; i < n; i++) {
        cr_assert(isfinite(ref[i]), "%s: the CPU reference has %g at %lld", what, (double)ref[i], (long long)i);
        double e = (double)got[i] - ref[i];
        d += e * e;
        r += (double)ref[i] * ref[i];
    }
    double rel = r > 0 ? sqrt(d / r) : sqrt(d);
    cr_assert(rel <= bound, "%s: relative error %.3g above %.1g", what, rel, bound);
    return rel;
}

#define TOL_EW 1e-5 /* f32 elementwise and normalizations */
#define TOL_MM 1e-4 /* matmul, attention, deltanet */

/* ---- memory ---- */

Test(cuda, memory) {
    /* alloc is zeroed */
    enum { N = 3000 };
    float *d = gpu->ops->alloc(gpu, sizeof(float) * N);
    cr_assert(d);
    float *h = malloc(sizeof(float) * N);
    gpu->ops->download(gpu, h, d, sizeof(float) * N);
    for (int i = 0; i < N; i++) cr_assert(h[i] == 0.0f, "alloc not zeroed at %d", i);
    /* upload copies: the source may change right after the call */
    float *dd[40];
    for (int k = 0; k < 40; k++) {
        for (int i = 0; i < N; i++) h[i] = (float)(k * N + i);
        dd[k] = gpu->ops->alloc(gpu, sizeof(float) * N);
        gpu->ops->upload(gpu, dd[k], h, sizeof(float) * N);
    }
    for (int k = 0; k < 40; k++) {
        gpu->ops->download(gpu, h, dd[k], sizeof(float) * N);
        for (int i = 0; i < N; i++) cr_assert(h[i] == (float)(k * N + i), "upload %d element %d is %g", k, i, h[i]);
        dev_free(dd[k]);
    }
    /* a large upload crosses several staging buffers; copy within the device */
    int64_t big = (int64_t)11 << 20;
    float *hb = malloc(sizeof(float) * (size_t)big), *hc = malloc(sizeof(float) * (size_t)big);
    for (int64_t i = 0; i < big; i++) hb[i] = (float)(i % 100003) - 5.0f;
    float *db = gpu->ops->alloc(gpu, sizeof(float) * (size_t)big), *dc = gpu->ops->alloc(gpu, sizeof(float) * (size_t)big);
    cr_assert(db && dc);
    gpu->ops->upload(gpu, db, hb, sizeof(float) * (size_t)big);
    memset(hb, 0, sizeof(float) * (size_t)big);
    gpu->ops->copy(gpu, dc, db, sizeof(float) * (size_t)big);
    gpu->ops->download(gpu, hc, dc, sizeof(float) * (size_t)big);
    for (int64_t i = 0; i < big; i++) cr_assert(hc[i] == (float)(i % 100003) - 5.0f, "big copy at %lld", (long long)i);
    gpu->ops->sync(gpu);
    cr_assert(gpu->ops->mem_free(gpu) > 0, "mem_free reports nothing");
    cr_assert(!gpu->ops->host_memory);
    no_cuda_error();
    dev_free(db);
    dev_free(dc);
    dev_free(d);
    free(hb);
    free(hc);
    free(h);
}

Test(cuda, upload_pinned) {
    /* host_alloc memory: page-locked, zeroed; uploads from it (whole or from inside) go direct,
     * and the source may change as soon as upload returns */
    static const size_t sizes[] = {12, 4096, 1 << 20, 7 << 20, 20 << 20};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        size_t n = sizes[si];
        unsigned char *h = gpu->ops->host_alloc(gpu, n + 64), *back = malloc(n);
        cr_assert(h && back, "host_alloc of %zu bytes failed", n + 64);
        size_t z = 0;
        while (z < n + 64 && h[z] == 0) z++;
        cr_assert(z == n + 64, "host_alloc memory not zeroed at %zu", z);
        for (int k = 0; k < 3; k++) {
            unsigned char *src = h + (k == 2 ? 64 : 0); /* k 2: from inside the block */
            for (size_t i = 0; i < n; i++) src[i] = (unsigned char)(i * 7 + k * 13 + si);
            unsigned char *d = gpu->ops->alloc(gpu, n);
            cr_assert(d);
            gpu->ops->upload(gpu, d, src, n);
            memset(src, 0xee, n); /* reused right after the call */
            gpu->ops->download(gpu, back, d, n);
            no_cuda_error();
            for (size_t i = 0; i < n; i++)
                cr_assert(back[i] == (unsigned char)(i * 7 + k * 13 + si), "upload of %zu bytes (case %d) at %zu", n,
                          k, i);
            dev_free(d);
        }
        gpu->ops->host_free(gpu, h);
        free(back);
    }
    gpu->ops->host_free(gpu, NULL);
    no_cuda_error();
}

/* ---- matmul ---- */

static const char *qname(mf_qtype t) { return mf_qtype_name(t); }

/* A random [rows, cols] matrix stored as t (bytes as quant_tensor_bytes lays them out): q4/q8
 * get random words with scales and biases that center the weights; bf16/f32 normal values. */
static void *make_weights(mf_qtype t, int64_t rows, int64_t cols) {
    uint64_t bytes = quant_tensor_bytes(t, rows, cols);
    unsigned char *p = malloc(bytes ? bytes : 1);
    cr_assert(p, "out of memory for %llu weight bytes", (unsigned long long)bytes);
    double sd = 1.0 / sqrt((double)cols);
    int64_t n = rows * cols;
    if (t == MF_QTYPE_F32) {
        float *f = (float *)p;
        for (int64_t i = 0; i < n; i++) f[i] = (float)(sd * th_rng_normal());
    } else if (t == MF_QTYPE_BF16) {
        uint16_t *b = (uint16_t *)p;
        for (int64_t i = 0; i < n; i++) b[i] = f32_to_bf16((float)(sd * th_rng_normal()));
    } else {
        int bits = quant_bits(t);
        uint64_t wbytes = (uint64_t)n * (uint64_t)bits / 8;
        for (uint64_t i = 0; i < wbytes; i += 8) {
            uint64_t r = th_rng_next();
            memcpy(p + i, &r, wbytes - i < 8 ? wbytes - i : 8);
        }
        uint16_t *sc = (uint16_t *)(p + wbytes), *bi = sc + n / QUANT_GROUP;
        double levels = (double)((1 << bits) - 1);
        for (int64_t g = 0; g < n / QUANT_GROUP; g++) {
            float s = (float)(2.0 * sd / levels * (0.5 + th_rng_unif()));
            sc[g] = f32_to_bf16(s);
            bi[g] = f32_to_bf16((float)(-s * levels / 2 * (1.0 + 0.2 * th_rng_normal())));
        }
    }
    return p;
}

/* One matmul case: returns the relative error. misalign: byte offset of the device weights
 * (forces the tiled kernel when not a multiple of 16). */
static double matmul_case(mf_qtype t, int64_t rows, int64_t cols, int64_t n_tok, int misalign) {
    void *hw = make_weights(t, rows, cols);
    uint64_t wbytes = quant_tensor_bytes(t, rows, cols);
    float *x = hnormal(n_tok * cols, 0.0, 1.0);
    float *ref = malloc(sizeof(float) * (size_t)(n_tok * rows));
    mf_wmat w = {t, rows, cols, hw};
    cpu->ops->matmul(cpu, &w, x, n_tok, ref);
    unsigned char *dw = gpu->ops->alloc(gpu, wbytes + 64);
    cr_assert(dw);
    gpu->ops->upload(gpu, dw + misalign, hw, wbytes);
    float *dx = dev_floats(x, n_tok * cols), *dy = dev_floats(NULL, n_tok * rows);
    mf_wmat dwm = {t, rows, cols, dw + misalign};
    gpu->ops->matmul(gpu, &dwm, dx, n_tok, dy);
    char what[128];
    snprintf(what, sizeof what, "matmul %s [%lld x %lld] n_tok %lld%s", qname(t), (long long)rows, (long long)cols,
             (long long)n_tok, misalign ? " misaligned" : "");
    float *y = dev_fetch(dy, n_tok * rows, what);
    double e = check_close(y, ref, n_tok * rows, TOL_MM, what);
    dev_free(dw);
    dev_free(dx);
    dev_free(dy);
    free(hw);
    free(x);
    free(ref);
    free(y);
    return e;
}

static const mf_qtype all_types[] = {MF_QTYPE_Q4, MF_QTYPE_Q8, MF_QTYPE_BF16, MF_QTYPE_F32};

Test(cuda, matmul_fixture_dims) {
    /* fixture shapes (hidden 64, 8 experts, expert inter 64, vocab 512) and odd row counts,
     * every GEMV token count and the tiled kernel (9+) */
    static const struct { int64_t rows, cols; } shapes[] = {{64, 64}, {8, 64}, {512, 64}, {1, 64}, {37, 128}, {192, 64}};
    static const int64_t toks[] = {1, 2, 3, 4, 5, 8, 9, 12, 64, 70};
    double worst = 0;
    for (size_t ti = 0; ti < 4; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
            for (size_t k = 0; k < sizeof toks / sizeof toks[0]; k++) {
                th_rng_seed(1000 + ti * 100 + si * 10 + k);
                double e = matmul_case(all_types[ti], shapes[si].rows, shapes[si].cols, toks[k], 0);
                if (e > worst) worst = e;
            }
    cr_log_info("matmul fixture dims: worst relative error %.3g", worst);
}

Test(cuda, matmul_unaligned) {
    /* bf16/f32 rows that are not whole 16-byte chunks, and misaligned weights: tiled kernel */
    double worst = 0;
    th_rng_seed(2000);
    worst = fmax(worst, matmul_case(MF_QTYPE_BF16, 33, 100, 1, 0));
    worst = fmax(worst, matmul_case(MF_QTYPE_F32, 17, 7, 3, 0));
    worst = fmax(worst, matmul_case(MF_QTYPE_BF16, 40, 72, 2, 4));
    worst = fmax(worst, matmul_case(MF_QTYPE_Q4, 40, 128, 1, 4));
    worst = fmax(worst, matmul_case(MF_QTYPE_Q8, 40, 128, 5, 8));
    cr_log_info("matmul unaligned: worst relative error %.3g", worst);
}

Test(cuda, matmul_real_dims) {
    /* expert gate/up and down of Qwen3.6-35B-A3B and Qwen3.5-397B, a [4096 x 4096] projection,
     * the linear attention's b/a rows (32 x 2048) and the router (256 x 2048) */
    static const struct { int64_t rows, cols; } shapes[] = {
        {512, 2048}, {2048, 512}, {1024, 4096}, {4096, 1024}, {4096, 4096}, {32, 2048}, {256, 2048}};
    static const int64_t toks[] = {1, 3, 8, 33};
    double worst = 0;
    for (size_t ti = 0; ti < 4; ti++)
        for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
            for (size_t k = 0; k < sizeof toks / sizeof toks[0]; k++) {
                /* the CPU reference is slow: the big ones at fewer token counts */
                if (shapes[si].rows * shapes[si].cols > 4 << 20 && toks[k] > 1 && toks[k] != 8) continue;
                th_rng_seed(3000 + ti * 100 + si * 10 + k);
                double e = matmul_case(all_types[ti], shapes[si].rows, shapes[si].cols, toks[k], 0);
                if (e > worst) worst = e;
            }
    cr_log_info("matmul real dims: worst relative error %.3g", worst);
}

Test(cuda, matmul_lm_head_q8) {
    /* the 248320-row lm_head of Qwen3.5/3.6 as q8, one token */
    th_rng_seed(4000);
    double e = matmul_case(MF_QTYPE_Q8, 248320, 2048, 1, 0);
    cr_log_info("matmul q8 lm_head [248320 x 2048]: relative error %.3g", e);
}

/* matmul_multi: the projections that read one x in one launch (the DeltaNet in-projections, the
 * router with the shared expert), each output against the CPU; a set of mixed types (one launch
 * per matrix) too. */
static void matmul_multi_case(const mf_qtype *types, const int64_t *rows, int n_w, int64_t cols, int64_t n_tok) {
    void *hw[4], *dw[4];
    mf_wmat w[4], dwm[4];
    float *ref[4], *dy[4];
    float *x = hnormal(n_tok * cols, 0.0, 1.0), *dx = dev_floats(x, n_tok * cols);
    for (int j = 0; j < n_w; j++) {
        hw[j] = make_weights(types[j], rows[j], cols);
        w[j] = (mf_wmat){types[j], rows[j], cols, hw[j]};
        ref[j] = malloc(sizeof(float) * (size_t)(n_tok * rows[j]));
        cpu->ops->matmul(cpu, &w[j], x, n_tok, ref[j]);
        dw[j] = dev_bytes(hw[j], quant_tensor_bytes(types[j], rows[j], cols));
        dwm[j] = (mf_wmat){types[j], rows[j], cols, dw[j]};
        dy[j] = dev_floats(NULL, n_tok * rows[j]);
    }
    gpu->ops->matmul_multi(gpu, n_w, dwm, dx, n_tok, dy);
    for (int j = 0; j < n_w; j++) {
        char what[128];
        snprintf(what, sizeof what, "matmul_multi %d/%d %s [%lld x %lld] n_tok %lld", j, n_w, qname(types[j]),
                 (long long)rows[j], (long long)cols, (long long)n_tok);
        float *y = dev_fetch(dy[j], n_tok * rows[j], what);
        check_close(y, ref[j], n_tok * rows[j], TOL_MM, what);
        free(y);
        free(hw[j]);
        free(ref[j]);
        dev_free(dw[j]);
        dev_free(dy[j]);
    }
    free(x);
    dev_free(dx);
}

Test(cuda, matmul_multi) {
    const mf_qtype q4[4] = {MF_QTYPE_Q4, MF_QTYPE_Q4, MF_QTYPE_Q4, MF_QTYPE_Q4};
    const mf_qtype q8[4] = {MF_QTYPE_Q8, MF_QTYPE_Q8, MF_QTYPE_Q8, MF_QTYPE_Q8};
    const mf_qtype mixed[4] = {MF_QTYPE_BF16, MF_QTYPE_Q4, MF_QTYPE_Q8, MF_QTYPE_F32};
    const int64_t dn[4] = {8192, 4096, 32, 32}, moe[4] = {256, 512, 512, 1}, odd[3] = {7, 1, 300};
    const int64_t toks[] = {1, 3, 8, 9};
    for (size_t k = 0; k < sizeof toks / sizeof toks[0]; k++) {
        th_rng_seed(3500 + k);
        matmul_multi_case(q4, dn, 4, 2048, toks[k]);
        matmul_multi_case(q8, moe, 4, 2048, toks[k]);
        matmul_multi_case(q4, odd, 3, 64, toks[k]);
        matmul_multi_case(mixed, moe, 4, 2048, toks[k]);
    }
}

/* ---- embed ---- */

Test(cuda, embed) {
    static const struct { int64_t rows, cols; } shapes[] = {{512, 64}, {4096, 2048}};
    for (size_t ti = 0; ti < 4; ti++)
        for (size_t si = 0; si < 2; si++) {
            th_rng_seed(5000 + ti * 10 + si);
            mf_qtype t = all_types[ti];
            int64_t rows = shapes[si].rows, cols = shapes[si].cols, nt = 13;
            void *hw = make_weights(t, rows, cols);
            int32_t ids[13];
            for (int i = 0; i < nt; i++) ids[i] = (int32_t)(th_rng_next() % (uint64_t)rows);
            ids[3] = ids[1]; /* a repeat */
            ids[4] = 0;
            ids[5] = (int32_t)rows - 1;
            float *ref = malloc(sizeof(float) * (size_t)(nt * cols));
            mf_wmat w = {t, rows, cols, hw};
            cpu->ops->embed(cpu, &w, ids, nt, ref);
            void *dw = dev_bytes(hw, quant_tensor_bytes(t, rows, cols));
            int32_t *dids = dev_bytes(ids, sizeof ids);
            float *dout = dev_floats(NULL, nt * cols);
            mf_wmat dwm = {t, rows, cols, dw};
            gpu->ops->embed(gpu, &dwm, dids, nt, dout);
            char what[96];
            snprintf(what, sizeof what, "embed %s [%lld x %lld]", qname(t), (long long)rows, (long long)cols);
            float *out = dev_fetch(dout, nt * cols, what);
            check_close(out, ref, nt * cols, 1e-6, what);
            dev_free(dw);
            dev_free(dids);
            dev_free(dout);
            free(hw);
            free(ref);
            free(out);
        }
}

/* ---- normalizations ---- */

Test(cuda, rmsnorm) {
    static const struct { int64_t rows, dim; } cases[] = {{1, 64}, {7, 64}, {5, 2048}, {3, 4096}, {1024, 256}, {33, 32}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++)
        for (int weighted = 0; weighted < 2; weighted++)
            for (int inplace = 0; inplace < 2; inplace++) {
                th_rng_seed(6000 + ci * 4 + (uint64_t)weighted * 2 + (uint64_t)inplace);
                int64_t rows = cases[ci].rows, dim = cases[ci].dim, n = rows * dim;
                float *x = hnormal(n, 0.3, 2.0), *w = hnormal(dim, 1.0, 0.5), *ref = malloc(sizeof(float) * (size_t)n);
                cpu->ops->rmsnorm(cpu, x, weighted ? w : NULL, rows, dim, 1e-6f, ref);
                float *dx = dev_floats(x, n), *dw = dev_floats(w, dim), *dy = inplace ? dx : dev_floats(NULL, n);
                gpu->ops->rmsnorm(gpu, dx, weighted ? dw : NULL, rows, dim, 1e-6f, dy);
                char what[96];
                snprintf(what, sizeof what, "rmsnorm %lldx%lld w=%d inplace=%d", (long long)rows, (long long)dim,
                         weighted, inplace);
                float *y = dev_fetch(dy, n, what);
                check_close(y, ref, n, TOL_EW, what);
                if (!inplace) {
                    float *xs = dev_fetch(dx, n, "rmsnorm input");
                    cr_assert(!memcmp(xs, x, sizeof(float) * (size_t)n), "rmsnorm changed its input");
                    free(xs);
                    dev_free(dy);
                }
                dev_free(dx);
                dev_free(dw);
                free(x);
                free(w);
                free(ref);
                free(y);
            }
}

Test(cuda, add_rmsnorm) {
    static const struct { int64_t rows, dim; } cases[] = {{1, 2048}, {5, 2048}, {64, 4096}, {3, 64}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        th_rng_seed(6500 + ci);
        int64_t rows = cases[ci].rows, dim = cases[ci].dim, n = rows * dim;
        float *x = hnormal(n, 0.3, 2.0), *a = hnormal(n, 0.0, 1.0), *w = hnormal(dim, 1.0, 0.5);
        float *rx = th_buf_copy(x, n), *ref = malloc(sizeof(float) * (size_t)n);
        cpu->ops->add_rmsnorm(cpu, rx, a, w, rows, dim, 1e-6f, ref);
        float *dx = dev_floats(x, n), *da = dev_floats(a, n), *dw = dev_floats(w, dim), *dy = dev_floats(NULL, n);
        gpu->ops->add_rmsnorm(gpu, dx, da, dw, rows, dim, 1e-6f, dy);
        float *y = dev_fetch(dy, n, "add_rmsnorm"), *gx = dev_fetch(dx, n, "add_rmsnorm sum");
        check_close(gx, rx, n, 0.0, "add_rmsnorm sum");
        check_close(y, ref, n, TOL_EW, "add_rmsnorm");
        void *df[] = {dx, da, dw, dy};
        for (int i = 0; i < 4; i++) dev_free(df[i]);
        void *hf[] = {x, a, w, rx, ref, y, gx};
        for (int i = 0; i < 7; i++) free(hf[i]);
    }
}

Test(cuda, gated_norm) {
    static const struct { int64_t rows; int dim; } cases[] = {{2, 32}, {24, 32}, {16, 128}, {64 * 32, 128}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        th_rng_seed(7000 + ci);
        int64_t rows = cases[ci].rows, n = rows * cases[ci].dim;
        int dim = cases[ci].dim;
        float *x = hnormal(n, 0.1, 1.5), *z = hnormal(n, 0.0, 2.0), *w = hnormal(dim, 1.0, 0.1);
        float *ref = th_buf_copy(x, n);
        cpu->ops->gated_norm(cpu, ref, w, z, rows, dim, 1e-6f);
        float *dx = dev_floats(x, n), *dz = dev_floats(z, n), *dw = dev_floats(w, dim);
        gpu->ops->gated_norm(gpu, dx, dw, dz, rows, dim, 1e-6f);
        char what[96];
        snprintf(what, sizeof what, "gated_norm %lldx%d", (long long)rows, dim);
        float *got = dev_fetch(dx, n, what);
        check_close(got, ref, n, TOL_EW, what);
        dev_free(dx);
        dev_free(dz);
        dev_free(dw);
        free(x);
        free(z);
        free(w);
        free(ref);
        free(got);
    }
}

/* ---- rope ---- */

Test(cuda, rope) {
    static const struct {
        int64_t n_tok;
        int heads, hd, rot;
        double theta;
        int32_t pos0;
    } cases[] = {
        {12, 4, 32, 8, 1e4, 0},      /* fixture: partial rotary 0.25 */
        {12, 2, 32, 32, 1e6, 0},     /* fixture qwen3_moe: full rotary */
        {1, 32, 256, 64, 1e7, 4096}, /* Qwen3.5 decode */
        {64, 2, 256, 64, 1e7, 100},  /* Qwen3.5 prefill, k heads */
        {5, 64, 128, 128, 1e6, 65530},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        th_rng_seed(8000 + ci);
        int64_t nt = cases[ci].n_tok, n = nt * cases[ci].heads * cases[ci].hd;
        int32_t pos[64];
        for (int64_t t = 0; t < nt; t++) pos[t] = cases[ci].pos0 + (int32_t)t;
        float *x = hnormal(n, 0.0, 1.0), *ref = th_buf_copy(x, n);
        cpu->ops->rope(cpu, ref, nt, cases[ci].heads, cases[ci].hd, cases[ci].rot, pos, cases[ci].theta);
        float *dx = dev_floats(x, n);
        int32_t *dpos = dev_bytes(pos, sizeof(int32_t) * (size_t)nt);
        gpu->ops->rope(gpu, dx, nt, cases[ci].heads, cases[ci].hd, cases[ci].rot, dpos, cases[ci].theta);
        char what[96];
        snprintf(what, sizeof what, "rope case %zu (hd %d rot %d)", ci, cases[ci].hd, cases[ci].rot);
        float *y = dev_fetch(dx, n, what);
        check_close(y, ref, n, TOL_EW, what);
        dev_free(dx);
        dev_free(dpos);
        free(x);
        free(ref);
        free(y);
    }
}

/* ---- attention ---- */

/* bound: the context the op is sized for (a recorded decode step's is the session's whole
 * context), at least pos0 + nt. */
static double attention_case(int nh, int nkv, int hd, int64_t pos0, int64_t nt, int64_t bound, int reserved) {
    enum { EXTRA = 3 }; /* cache rows after the last position: NaN, never to be read */
    int64_t n_valid = pos0 + nt, n_ctx = n_valid + EXTRA;
    if (bound < n_valid) bound = n_valid;
    int64_t nq = nt * nh * hd, ncache = n_ctx * nkv * hd, nvalid = n_valid * nkv * hd;
    backends_new(reserved ? bound : 1, nt, 1, 1);
    if (!reserved) { /* the CPU needs its scratch; the GPU runs without any */
        mf_backend_limits lim = {bound, nt, 1, 1, 0, 0, 0};
        cr_assert(cpu->ops->reserve(cpu, &lim) == MF_OK);
    }
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)nt);
    for (int64_t t = 0; t < nt; t++) pos[t] = (int32_t)(pos0 + t);
    int32_t *dpos = dev_bytes(pos, sizeof(int32_t) * (size_t)nt);
    float *q = hnormal(nq, 0.0, 1.0), *kc = hnormal(ncache, 0.0, 1.0), *vc = hnormal(ncache, 0.0, 1.0);
    for (int64_t i = nvalid; i < ncache; i++) kc[i] = vc[i] = NAN;
    float *ref = malloc(sizeof(float) * (size_t)nq);
    float scale = 1.0f / sqrtf((float)hd);
    cpu->ops->attention(cpu, q, kc, vc, pos, bound, nt, nh, nkv, hd, scale, ref);
    float *dq = dev_floats(q, nq), *dk = dev_floats(kc, ncache), *dv = dev_floats(vc, ncache);
    float *dout = dev_floats(NULL, nq);
    gpu->ops->attention(gpu, dq, dk, dv, dpos, bound, nt, nh, nkv, hd, scale, dout);
    char what[160];
    snprintf(what, sizeof what, "attention heads %d/%d hd %d pos0 %lld n_tok %lld bound %lld%s", nh, nkv, hd,
             (long long)pos0, (long long)nt, (long long)bound, reserved ? "" : " (no scratch)");
    float *out = dev_fetch(dout, nq, what);
    double e = check_close(out, ref, nq, TOL_MM, what);
    dev_free(dq);
    dev_free(dk);
    dev_free(dv);
    dev_free(dout);
    dev_free(dpos);
    free(pos);
    free(q);
    free(kc);
    free(vc);
    free(ref);
    free(out);
    return e;
}

Test(cuda, attention) {
    static const struct { int nh, nkv, hd; int64_t pos0, nt, bound; int reserved; } cases[] = {
        {4, 2, 32, 0, 12, 0, 1},       /* fixture prefill */
        {4, 2, 32, 11, 1, 0, 1},       /* fixture decode */
        {32, 2, 256, 0, 1, 0, 1},      /* real dims, context 1 */
        {32, 2, 256, 36, 1, 0, 1},     /* context 37 */
        {32, 2, 256, 4096, 1, 0, 1},   /* context 4097, split */
        {32, 2, 256, 4096, 1, 0, 0},   /* context 4097 without scratch: one split */
        {16, 2, 256, 0, 37, 0, 1},     /* prefill of 37 */
        {16, 2, 256, 4092, 5, 0, 1},   /* a chunk at the end of a 4097 context */
        {32, 4, 128, 4096, 1, 0, 1},   /* Qwen3-MoE dims */
        {64, 4, 128, 1000, 3, 0, 1},
        /* sized for a whole session (recorded decode steps): most splits past the context */
        {16, 2, 256, 0, 1, 32768, 1},
        {16, 2, 256, 70, 1, 32768, 1},
        {16, 2, 256, 9000, 1, 32768, 1},
        {4, 2, 32, 11, 1, 4096, 1},
    };
    double worst = 0;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        th_rng_seed(9000 + ci);
        double e = attention_case(cases[ci].nh, cases[ci].nkv, cases[ci].hd, cases[ci].pos0, cases[ci].nt,
                                  cases[ci].bound, cases[ci].reserved);
        if (e > worst) worst = e;
    }
    cr_log_info("attention: worst relative error %.3g", worst);
}

/* ---- attention_prep: q (from a gated or plain projection) and k normed and rotated, k and v
 * into the caches at scattered positions; against the CPU op ---- */

static void attention_prep_case(int nh, int nkv, int hd, int rot, int64_t nt, int gated, int normed) {
    const int64_t ctx = 300, qs = gated ? 2 * hd : hd, kvw = (int64_t)nkv * hd, nq = nt * nh * hd;
    float *qsrc = hnormal(nt * nh * qs, 0.0, 1.0), *k = hnormal(nt * kvw, 0.0, 1.0), *v = hnormal(nt * kvw, 0.0, 1.0);
    float *qn = hnormal(hd, 1.0, 0.3), *kn = hnormal(hd, 1.0, 0.3), *kc = hnormal(ctx * kvw, 0.0, 1.0);
    float *vc = hnormal(ctx * kvw, 0.0, 1.0);
    int32_t pos[5];
    for (int64_t t = 0; t < nt; t++) pos[t] = (int32_t)((t * 97 + 11) % ctx);
    /* CPU: q in place in a copy of the source when not gated */
    float *rq = gated ? th_buf_alloc(nq) : th_buf_copy(qsrc, nq), *rg = th_buf_alloc(nq);
    float *rkc = th_buf_copy(kc, ctx * kvw), *rvc = th_buf_copy(vc, ctx * kvw);
    mf_attn_prep p = {nt, nh, nkv, hd, rot, 1e-6f, 1e6, gated ? qsrc : rq, qs, rq, gated ? rg : NULL, k, v,
                      normed ? qn : NULL, normed ? kn : NULL, pos, rkc, rvc};
    cpu->ops->attention_prep(cpu, &p);
    float *dqs = dev_floats(qsrc, nt * nh * qs), *dq = gated ? dev_floats(NULL, nq) : dqs, *dg = dev_floats(NULL, nq);
    float *dk = dev_floats(k, nt * kvw), *dv = dev_floats(v, nt * kvw), *dqn = dev_floats(qn, hd), *dkn = dev_floats(kn, hd);
    float *dkc = dev_floats(kc, ctx * kvw), *dvc = dev_floats(vc, ctx * kvw);
    int32_t *dpos = dev_bytes(pos, sizeof(int32_t) * (size_t)nt);
    mf_attn_prep d = {nt, nh, nkv, hd, rot, 1e-6f, 1e6, dqs, qs, dq, gated ? dg : NULL, dk, dv,
                      normed ? dqn : NULL, normed ? dkn : NULL, dpos, dkc, dvc};
    gpu->ops->attention_prep(gpu, &d);
    char what[128];
    snprintf(what, sizeof what, "attention_prep heads %d/%d hd %d rot %d n_tok %lld gated %d normed %d", nh, nkv, hd,
             rot, (long long)nt, gated, normed);
    float *gq = dev_fetch(dq, nq, what), *gkc = dev_fetch(dkc, ctx * kvw, what), *gvc = dev_fetch(dvc, ctx * kvw, what);
    check_close(gq, rq, nq, TOL_EW, what);
    check_close(gkc, rkc, ctx * kvw, TOL_EW, what);
    check_close(gvc, rvc, ctx * kvw, 0.0, what);
    if (gated) {
        float *gg = dev_fetch(dg, nq, what);
        check_close(gg, rg, nq, 0.0, what);
        free(gg);
        dev_free(dq);
    }
    void *df[] = {dqs, dg, dk, dv, dqn, dkn, dkc, dvc, dpos};
    for (int i = 0; i < 9; i++) dev_free(df[i]);
    void *hf[] = {qsrc, k, v, qn, kn, kc, vc, rq, rg, rkc, rvc, gq, gkc, gvc};
    for (int i = 0; i < 14; i++) free(hf[i]);
}

Test(cuda, attention_prep) {
    th_rng_seed(8800);
    attention_prep_case(16, 2, 256, 64, 1, 1, 1); /* Qwen3.5/3.6: gated, partial rotary */
    attention_prep_case(16, 2, 256, 64, 5, 1, 1);
    attention_prep_case(32, 4, 128, 128, 1, 0, 1); /* Qwen3-MoE */
    attention_prep_case(32, 4, 128, 128, 5, 0, 1);
    attention_prep_case(4, 2, 32, 16, 3, 1, 0);    /* fixture dims, no norm weights */
}

/* ---- conv1d_silu ---- */

Test(cuda, conv1d_silu) {
    static const struct { int64_t C, nt; int K; } cases[] = {{256, 12, 4}, {256, 1, 4}, {8192, 1, 4}, {8192, 64, 4},
                                                          {100, 5, 2}, {64, 3, 1}};
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        th_rng_seed(10000 + ci);
        int64_t C = cases[ci].C, nt = cases[ci].nt, n = nt * C;
        int K = cases[ci].K;
        int64_t ns = (int64_t)(K - 1) * C;
        float *x = hnormal(n, 0.0, 1.0), *w = hnormal(C * K, 0.0, 0.5), *st = hnormal(ns, 0.0, 1.0);
        float *sref = th_buf_copy(st, ns), *ref = malloc(sizeof(float) * (size_t)n);
        cpu->ops->conv1d_silu(cpu, x, sref, w, nt, C, K, ref);
        float *dx = dev_floats(x, n), *dw = dev_floats(w, C * K), *ds = dev_floats(st, ns), *dout = dev_floats(NULL, n);
        /* two calls of half the tokens each must equal one call (the state carries) */
        int64_t h = nt / 2;
        if (h > 0) gpu->ops->conv1d_silu(gpu, dx, ds, dw, h, C, K, dout);
        gpu->ops->conv1d_silu(gpu, dx + h * C, ds, dw, nt - h, C, K, dout + h * C);
        char what[96];
        snprintf(what, sizeof what, "conv1d_silu C %lld n_tok %lld K %d", (long long)C, (long long)nt, K);
        float *out = dev_fetch(dout, n, what);
        check_close(out, ref, n, TOL_EW, what);
        if (ns) {
            float *s = dev_fetch(ds, ns, "conv1d_silu state");
            check_close(s, sref, ns, 0.0, "conv1d_silu state");
            free(s);
        }
        dev_free(dx);
        dev_free(dw);
        dev_free(ds);
        dev_free(dout);
        free(x);
        free(w);
        free(st);
        free(sref);
        free(ref);
        free(out);
    }
}

/* ---- deltanet ---- */

static void l2rows(float *x, int64_t rows, int dim, float scale) {
    for (int64_t r = 0; r < rows; r++) {
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)x[r * dim + i] * x[r * dim + i];
        for (int i = 0; i < dim; i++) x[r * dim + i] = (float)(x[r * dim + i] / sqrt(ss + 1e-6) * scale);
    }
}

/* deltanet_step: raw q/k and gate inputs (a past softplus's threshold too), normalised and gated
 * inside the recurrence; against the CPU op (its L2 norm, gates and deltanet). */
Test(cuda, deltanet_step) {
    static const struct { int Hk, Hv, dk, dv; int64_t nt; } cases[] = {
        {2, 4, 32, 32, 1}, {2, 4, 32, 32, 12}, {16, 32, 128, 128, 1}, {16, 32, 128, 128, 5}, {1, 2, 64, 96, 3}};
    backends_new(64, 64, 128, 8);
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        th_rng_seed(11500 + ci);
        int Hk = cases[ci].Hk, Hv = cases[ci].Hv, dk = cases[ci].dk, dv = cases[ci].dv;
        int64_t nt = cases[ci].nt, nqk = nt * Hk * dk, nv = nt * Hv * dv, ng = nt * Hv, nS = (int64_t)Hv * dk * dv;
        float *q = hnormal(nqk, 0.0, 2.0), *k = hnormal(nqk, 0.0, 2.0), *v = hnormal(nv, 0.0, 1.0);
        float *a = hnormal(ng, 0.0, 3.0), *bb = hnormal(ng, 0.0, 2.0), *alog = hnormal(Hv, -1.0, 1.0);
        float *dtb = hnormal(Hv, 0.0, 1.0), *S = hnormal(nS, 0.0, 0.3), *Sref = th_buf_copy(S, nS);
        a[0] = 30.0f; /* past softplus's threshold */
        float *rq = th_buf_copy(q, nqk), *rk = th_buf_copy(k, nqk), *rg = malloc(sizeof(float) * (size_t)ng);
        float *rb = malloc(sizeof(float) * (size_t)ng), *ref = malloc(sizeof(float) * (size_t)nv);
        const float qs = 1.0f / sqrtf((float)dk);
        mf_deltanet_step c = {nt, Hk, Hv, dk, dv, qs, rq, rk, v, a, bb, alog, dtb, rg, rb, Sref, ref};
        cpu->ops->deltanet_step(cpu, &c);
        float *dq = dev_floats(q, nqk), *dk_ = dev_floats(k, nqk), *dv_ = dev_floats(v, nv), *da = dev_floats(a, ng);
        float *dbb = dev_floats(bb, ng), *dal = dev_floats(alog, Hv), *ddt = dev_floats(dtb, Hv);
        float *dg = dev_floats(NULL, ng), *db = dev_floats(NULL, ng), *dS = dev_floats(S, nS), *dout = dev_floats(NULL, nv);
        mf_deltanet_step d = {nt, Hk, Hv, dk, dv, qs, dq, dk_, dv_, da, dbb, dal, ddt, dg, db, dS, dout};
        gpu->ops->deltanet_step(gpu, &d);
        char what[112];
        snprintf(what, sizeof what, "deltanet_step Hk %d Hv %d dk %d dv %d n_tok %lld", Hk, Hv, dk, dv, (long long)nt);
        float *out = dev_fetch(dout, nv, what), *Sg = dev_fetch(dS, nS, what);
        check_close(out, ref, nv, TOL_MM, what);
        check_close(Sg, Sref, nS, TOL_MM, what);
        void *df[] = {dq, dk_, dv_, da, dbb, dal, ddt, dg, db, dS, dout};
        for (int i = 0; i < 11; i++) dev_free(df[i]);
        void *hf[] = {q, k, v, a, bb, alog, dtb, S, Sref, rq, rk, rg, rb, ref, out, Sg};
        for (int i = 0; i < 16; i++) free(hf[i]);
    }
}

Test(cuda, deltanet) {
    static const struct { int Hk, Hv, dk, dv; int64_t nt; } cases[] = {
        {2, 4, 32, 32, 12}, {2, 4, 32, 32, 1}, {16, 32, 128, 128, 1}, {16, 32, 128, 128, 64},
        {16, 64, 128, 128, 3}, {1, 2, 64, 96, 5}};
    backends_new(64, 64, 128, 8);
    double worst = 0;
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        th_rng_seed(11000 + ci);
        int Hk = cases[ci].Hk, Hv = cases[ci].Hv, dk = cases[ci].dk, dv = cases[ci].dv;
        int64_t nt = cases[ci].nt, nqk = nt * Hk * dk, nv = nt * Hv * dv, ng = nt * Hv, nS = (int64_t)Hv * dk * dv;
        float *q = hnormal(nqk, 0.0, 1.0), *k = hnormal(nqk, 0.0, 1.0), *v = hnormal(nv, 0.0, 1.0);
        l2rows(q, nt * Hk, dk, 1.0f / sqrtf((float)dk));
        l2rows(k, nt * Hk, dk, 1.0f);
        float *g = malloc(sizeof(float) * (size_t)ng), *beta = malloc(sizeof(float) * (size_t)ng);
        for (int64_t i = 0; i < ng; i++) {
            g[i] = (float)(-0.5 * th_rng_unif() - 0.01);
            beta[i] = (float)th_rng_unif();
        }
        float *S = hnormal(nS, 0.0, 0.3), *Sref = th_buf_copy(S, nS), *ref = malloc(sizeof(float) * (size_t)nv);
        cpu->ops->deltanet(cpu, q, k, v, g, beta, Sref, nt, Hk, Hv, dk, dv, ref);
        float *dq = dev_floats(q, nqk), *dk_ = dev_floats(k, nqk), *dv_ = dev_floats(v, nv), *dg = dev_floats(g, ng);
        float *db = dev_floats(beta, ng), *dS = dev_floats(S, nS), *dout = dev_floats(NULL, nv);
        /* two calls of half the tokens each, back to back, must equal one call (the state carries;
         * the second call reads the state the first just wrote) */
        const int64_t h = nt / 2;
        if (h > 0) gpu->ops->deltanet(gpu, dq, dk_, dv_, dg, db, dS, h, Hk, Hv, dk, dv, dout);
        gpu->ops->deltanet(gpu, dq + h * Hk * dk, dk_ + h * Hk * dk, dv_ + h * Hv * dv, dg + h * Hv, db + h * Hv, dS,
                           nt - h, Hk, Hv, dk, dv, dout + h * Hv * dv);
        char what[96];
        snprintf(what, sizeof what, "deltanet Hk %d Hv %d dk %d dv %d n_tok %lld", Hk, Hv, dk, dv, (long long)nt);
        float *out = dev_fetch(dout, nv, what);
        worst = fmax(worst, check_close(out, ref, nv, TOL_MM, what));
        float *Sg = dev_fetch(dS, nS, "deltanet state");
        worst = fmax(worst, check_close(Sg, Sref, nS, TOL_MM, "deltanet state"));
        void *frees[] = {dq, dk_, dv_, dg, db, dS, dout};
        for (int i = 0; i < 7; i++) dev_free(frees[i]);
        void *hf[] = {q, k, v, g, beta, S, Sref, ref, out, Sg};
        for (int i = 0; i < 10; i++) free(hf[i]);
    }
    cr_log_info("deltanet: worst relative error %.3g", worst);
}

/* ---- router ---- */

Test(cuda, router_topk) {
    static const struct { int E, K, norm; int64_t nt; int ties; } cases[] = {
        {8, 2, 1, 12, 0}, {8, 2, 0, 1, 0}, {256, 8, 1, 64, 0}, {512, 10, 1, 1, 0}, {512, 10, 0, 33, 0},
        {128, 8, 1, 20, 1}, {512, 10, 1, 7, 1}, {1024, 8, 1, 5, 0}, {1024, 8, 0, 3, 1}};
    backends_new(64, 64, 1, 512);
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        th_rng_seed(12000 + ci);
        int E = cases[ci].E, K = cases[ci].K;
        int64_t nt = cases[ci].nt, n = nt * E;
        float *lg = hnormal(n, 0.0, 2.0);
        if (cases[ci].ties) /* few distinct values: ties go to the lower id */
            for (int64_t i = 0; i < n; i++) lg[i] = (float)(th_rng_next() % 5);
        int32_t *rid = malloc(sizeof(int32_t) * (size_t)(nt * K)), *gid = malloc(sizeof(int32_t) * (size_t)(nt * K));
        float *rw = malloc(sizeof(float) * (size_t)(nt * K));
        cpu->ops->router_topk(cpu, lg, nt, E, K, cases[ci].norm, rid, rw);
        float *dlg = dev_floats(lg, n), *dw = dev_floats(NULL, nt * K);
        int32_t *dids = (int32_t *)dev_floats(NULL, nt * K);
        gpu->ops->router_topk(gpu, dlg, nt, E, K, cases[ci].norm, dids, dw);
        char what[96];
        snprintf(what, sizeof what, "router E %d K %d norm %d n_tok %lld ties %d", E, K, cases[ci].norm, (long long)nt,
                 cases[ci].ties);
        float *w = dev_fetch(dw, nt * K, what);
        gpu->ops->download(gpu, gid, dids, sizeof(int32_t) * (size_t)(nt * K));
        for (int64_t i = 0; i < nt * K; i++)
            cr_assert_eq(gid[i], rid[i], "%s: token %lld choice %lld is %d, CPU %d", what, (long long)(i / K),
                         (long long)(i % K), gid[i], rid[i]);
        check_close(w, rw, nt * K, TOL_EW, what);
        dev_free(dlg);
        dev_free(dw);
        dev_free(dids);
        free(lg);
        free(rid);
        free(gid);
        free(rw);
        free(w);
    }
}

/* ---- elementwise ---- */

Test(cuda, elementwise) {
    static const int64_t sizes[] = {1, 64, 1000, 4096 * 3, 1 << 20};
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        th_rng_seed(13000 + si);
        int64_t n = sizes[si];
        float *a = hnormal(n, 0.0, 3.0), *b = hnormal(n, 0.0, 3.0);
        char what[64];
        for (int op = 0; op < 3; op++) {
            float *ref = th_buf_copy(a, n);
            float *da = dev_floats(a, n), *db = dev_floats(b, n);
            if (op == 0) cpu->ops->add(cpu, ref, b, n), gpu->ops->add(gpu, da, db, n);
            if (op == 1) cpu->ops->mul_sigmoid(cpu, ref, b, n), gpu->ops->mul_sigmoid(gpu, da, db, n);
            if (op == 2) cpu->ops->swiglu(cpu, ref, b, n), gpu->ops->swiglu(gpu, da, db, n);
            snprintf(what, sizeof what, "%s n %lld", op == 0 ? "add" : op == 1 ? "mul_sigmoid" : "swiglu", (long long)n);
            float *got = dev_fetch(da, n, what);
            check_close(got, ref, n, TOL_EW, what);
            dev_free(da);
            dev_free(db);
            free(ref);
            free(got);
        }
        free(a);
        free(b);
    }
    /* add_gated [n_tok][cols] */
    static const int64_t gated_tok[] = {12, 1, 64};
    for (size_t ci = 0; ci < 3; ci++) {
        th_rng_seed(13100 + ci);
        int64_t nt = gated_tok[ci], cols = 64 * (int64_t)(ci + 1) * 16;
        float *y = hnormal(nt * cols, 0.0, 1.0), *x = hnormal(nt * cols, 0.0, 1.0), *gate = hnormal(nt, 0.0, 2.0);
        float *ry = th_buf_copy(y, nt * cols);
        cpu->ops->add_gated(cpu, ry, x, gate, nt, cols);
        float *dy = dev_floats(y, nt * cols), *dx = dev_floats(x, nt * cols), *dgate = dev_floats(gate, nt);
        gpu->ops->add_gated(gpu, dy, dx, dgate, nt, cols);
        float *gy = dev_fetch(dy, nt * cols, "add_gated");
        check_close(gy, ry, nt * cols, TOL_EW, "add_gated");
        void *df[] = {dy, dx, dgate};
        for (int i = 0; i < 3; i++) dev_free(df[i]);
        void *hf[] = {y, x, gate, ry, gy};
        for (int i = 0; i < 5; i++) free(hf[i]);
    }
}

/* ---- row movement ---- */

Test(cuda, rows) {
    th_rng_seed(14000);
    /* copy_rows: the q / gate split of a gated q_proj output [n][heads][2 hd] */
    int64_t nt = 7, heads = 32, hd = 256, rows = nt * heads, n = rows * 2 * hd;
    float *src = hnormal(n, 0.0, 1.0), *ref = malloc(sizeof(float) * (size_t)(rows * hd));
    cpu->ops->copy_rows(cpu, ref, hd, src + hd, 2 * hd, rows, hd);
    float *ds = dev_floats(src, n), *dd = dev_floats(NULL, rows * hd);
    gpu->ops->copy_rows(gpu, dd, hd, ds + hd, 2 * hd, rows, hd);
    float *got = dev_fetch(dd, rows * hd, "copy_rows");
    check_close(got, ref, rows * hd, 0.0, "copy_rows");
    free(got);
    free(ref);
    dev_free(dd);
    /* gather_rows and scatter_add with the unique indices of one expert's tokens */
    int64_t H = 2048, T = 64, cnt = 23;
    float *h = hnormal(T * H, 0.0, 1.0), *y = hnormal(T * H, 0.0, 1.0), *eo = hnormal(cnt * H, 0.0, 1.0);
    int32_t idx[23];
    float tw[23];
    for (int i = 0; i < cnt; i++) {
        idx[i] = (int32_t)((i * 37 + 5) % T); /* unique: 37 is coprime with 64 */
        tw[i] = (float)th_rng_unif();
    }
    float *rg = malloc(sizeof(float) * (size_t)(cnt * H)), *ry = th_buf_copy(y, T * H);
    cpu->ops->gather_rows(cpu, rg, h, idx, cnt, H);
    cpu->ops->scatter_add(cpu, ry, eo, idx, tw, cnt, H);
    float *dh = dev_floats(h, T * H), *dy = dev_floats(y, T * H), *deo = dev_floats(eo, cnt * H);
    float *dg = dev_floats(NULL, cnt * H), *dtw = dev_floats(tw, cnt);
    int32_t *didx = dev_bytes(idx, sizeof idx);
    gpu->ops->gather_rows(gpu, dg, dh, didx, cnt, H);
    gpu->ops->scatter_add(gpu, dy, deo, didx, dtw, cnt, H);
    float *gg = dev_fetch(dg, cnt * H, "gather_rows"), *gy = dev_fetch(dy, T * H, "scatter_add");
    check_close(gg, rg, cnt * H, 0.0, "gather_rows");
    check_close(gy, ry, T * H, TOL_EW, "scatter_add");
    void *df[] = {ds, dh, dy, deo, dg, dtw, didx};
    for (int i = 0; i < 7; i++) dev_free(df[i]);
    void *hf[] = {src, h, y, eo, rg, ry, gg, gy};
    for (int i = 0; i < 8; i++) free(hf[i]);
}

/* argmax (the greedy choice) over vocabulary-sized rows: a random row, ties, NaNs, all equal */
Test(cuda, argmax) {
    th_rng_seed(14500);
    int64_t V = 248320, R = 4;
    float *x = hnormal(R * V, 0.0, 3.0);
    x[V + 70000] = x[V + 200000] = x[V + 70001] = 100.0f;
    x[2 * V + 5] = NAN;
    x[2 * V + 248319] = 50.0f;
    for (int64_t i = 0; i < V; i++) x[3 * V + i] = 1.0f;
    int32_t want[4], have[4];
    cpu->ops->argmax(cpu, x, R, V, want);
    float *dx = dev_floats(x, R * V);
    int32_t *dout = dev_bytes(NULL, sizeof have);
    gpu->ops->argmax(gpu, dx, R, V, dout);
    gpu->ops->download(gpu, have, dout, sizeof have);
    cr_assert(!cuda_backend_last_error(gpu), "%s", cuda_backend_last_error(gpu));
    cr_assert(want[1] == 70000 && want[2] == 248319 && want[3] == 0, "cpu argmax %d %d %d", want[1], want[2], want[3]);
    for (int r = 0; r < R; r++) cr_assert_eq(have[r], want[r], "argmax row %d: gpu %d, cpu %d", r, have[r], want[r]);
    /* one row at a time (the greedy choice: spread over blocks), twice each, live and recorded */
    for (int rep = 0; rep < 2; rep++)
        for (int r = 0; r < R; r++) {
            int32_t one = -1;
            gpu->ops->argmax(gpu, dx + r * V, 1, V, dout);
            gpu->ops->download(gpu, &one, dout, sizeof one);
            cr_assert_eq(one, want[r], "argmax of row %d alone: gpu %d, cpu %d", r, one, want[r]);
        }
    cr_assert_eq(gpu->ops->graph_begin(gpu), MF_OK);
    gpu->ops->argmax(gpu, dx + V, 1, V, dout);
    void *g = gpu->ops->graph_end(gpu);
    cr_assert(g, "recording failed: %s", cuda_backend_last_error(gpu));
    for (int rep = 0; rep < 3; rep++) {
        int32_t one = -1;
        gpu->ops->graph_launch(gpu, g);
        gpu->ops->download(gpu, &one, dout, sizeof one);
        cr_assert_eq(one, want[1], "replayed argmax: gpu %d, cpu %d", one, want[1]);
    }
    gpu->ops->graph_free(gpu, g);
    dev_free(dx);
    dev_free(dout);
    free(x);
}

/* A recorded op sequence replays with what its device inputs hold at replay time: a rope and
 * an attention whose positions change between replays, against the CPU at each position. */
Test(cuda, graph_replay) {
    cr_assert(gpu->ops->graph_begin && gpu->ops->graph_launch);
    int nh = 8, nkv = 2, hd = 128, rot = 64;
    int64_t ctx = 512, nq = nh * hd, ncache = ctx * nkv * hd;
    backends_new(ctx, 1, 1, 1);
    th_rng_seed(14600);
    float *q = hnormal(nq, 0.0, 1.0), *kc = hnormal(ncache, 0.0, 1.0), *vc = hnormal(ncache, 0.0, 1.0);
    float *dq = dev_floats(q, nq), *dqr = dev_floats(NULL, nq), *dk = dev_floats(kc, ncache),
          *dv = dev_floats(vc, ncache), *dout = dev_floats(NULL, nq);
    int32_t *dpos = dev_bytes(NULL, sizeof(int32_t));
    cr_assert_eq(gpu->ops->graph_begin(gpu), MF_OK);
    gpu->ops->copy(gpu, dqr, dq, sizeof(float) * (size_t)nq);
    gpu->ops->rope(gpu, dqr, 1, nh, hd, rot, dpos, 1e6);
    gpu->ops->attention(gpu, dqr, dk, dv, dpos, ctx, 1, nh, nkv, hd, 0.1f, dout);
    void *g = gpu->ops->graph_end(gpu);
    cr_assert(g, "recording failed: %s", cuda_backend_last_error(gpu));
    float *qr = malloc(sizeof(float) * (size_t)nq), *ref = malloc(sizeof(float) * (size_t)nq);
    const int32_t at[] = {0, 1, 63, 64, 65, 300, 511, 7};
    for (size_t i = 0; i < sizeof at / sizeof at[0]; i++) {
        gpu->ops->upload(gpu, dpos, &at[i], sizeof(int32_t));
        gpu->ops->graph_launch(gpu, g);
        memcpy(qr, q, sizeof(float) * (size_t)nq);
        cpu->ops->rope(cpu, qr, 1, nh, hd, rot, &at[i], 1e6);
        cpu->ops->attention(cpu, qr, kc, vc, &at[i], ctx, 1, nh, nkv, hd, 0.1f, ref);
        char what[64];
        snprintf(what, sizeof what, "replay at position %d", at[i]);
        float *got = dev_fetch(dout, nq, what);
        check_close(got, ref, nq, TOL_MM, what);
        free(got);
    }
    gpu->ops->graph_free(gpu, g);
    void *df[] = {dq, dqr, dk, dv, dout, dpos};
    for (int i = 0; i < 6; i++) dev_free(df[i]);
    void *hf[] = {q, kc, vc, qr, ref};
    for (int i = 0; i < 5; i++) free(hf[i]);
}

/* A side branch (the shared expert beside the routed ones): its results are seen after the
 * join, live and replayed from a recorded graph. */
Test(cuda, branch) {
    cr_assert(gpu->ops->branch_begin && gpu->ops->branch_end && gpu->ops->branch_join);
    th_rng_seed(14700);
    int64_t n = 1 << 20;
    float *a = hnormal(n, 0.0, 1.0), *b = hnormal(n, 0.0, 1.0), *ref = th_buf_copy(a, n);
    for (int64_t i = 0; i < n; i++) ref[i] = 2 * a[i] + b[i]; /* a + a on the side, + b on the main branch */
    for (int graph = 0; graph < 2; graph++) {
        float *da = dev_floats(a, n), *db = dev_floats(b, n), *side = dev_floats(a, n), *out = dev_floats(a, n);
        void *g = NULL;
        if (graph) cr_assert_eq(gpu->ops->graph_begin(gpu), MF_OK);
        gpu->ops->branch_begin(gpu);
        for (int k = 0; k < 8; k++) gpu->ops->copy_rows(gpu, side, 1, da, 1, n, 1); /* long enough to overlap */
        gpu->ops->add(gpu, side, da, n);
        gpu->ops->branch_end(gpu);
        gpu->ops->add(gpu, out, db, n);
        gpu->ops->branch_join(gpu);
        gpu->ops->copy_rows(gpu, out, 1, side, 1, n, 1);
        gpu->ops->add(gpu, out, db, n);
        if (graph) {
            g = gpu->ops->graph_end(gpu);
            cr_assert(g, "recording failed: %s", cuda_backend_last_error(gpu));
            gpu->ops->graph_launch(gpu, g);
        }
        float *got = dev_fetch(out, n, graph ? "branch in a graph" : "branch");
        check_close(got, ref, n, 0.0, graph ? "branch in a graph" : "branch");
        if (g) gpu->ops->graph_free(gpu, g);
        free(got);
        void *df[] = {da, db, side, out};
        for (int i = 0; i < 4; i++) dev_free(df[i]);
    }
    free(a);
    free(b);
    free(ref);
}

/* ---- errors: sticky, no exit ---- */

Test(cuda, sticky_error) {
    cr_assert(cuda_backend_available());
    float *dq = dev_floats(NULL, 1024);
    cr_assert(!cuda_backend_last_error(gpu));
    /* a head_dim the kernel does not take: refused with a message, then every op is a no-op */
    int32_t *dpos = dev_bytes(NULL, sizeof(int32_t));
    gpu->ops->attention(gpu, dq, dq, dq, dpos, 1, 1, 1, 1, 1000, 1.0f, dq);
    const char *e = cuda_backend_last_error(gpu);
    cr_assert(e && strstr(e, "attention"), "no sticky error: %s", e ? e : "(none)");
    float h[4] = {1, 2, 3, 4};
    gpu->ops->upload(gpu, dq, h, sizeof h);
    gpu->ops->download(gpu, h, dq, sizeof h);
    uint32_t u;
    memcpy(&u, &h[0], 4);
    cr_assert(u == 0xffffffffu, "a download after an error must fill its destination with 0xff bytes");
    cr_assert(gpu->ops->alloc(gpu, 64) == NULL, "alloc after an error must fail");
    cr_assert(cuda_backend_last_error(cpu) == NULL);
    mf_err err = {0};
    cr_assert(cuda_backend_create(99, &err) == NULL && err.status == MF_ERR_ARG, "device 99: %s", err.msg);
}

/* ---- moe_experts: a layer's routed experts ---- */

/* E expert blobs in host memory as th_expert_layout lays them out, random weights. */
typedef struct moe_host {
    mf_expert_layout lay;
    unsigned char *mem;
    uint64_t stride;
    int E;
} moe_host;

static void moe_host_make(moe_host *mh, const mf_qtype types[3], int E, int64_t H, int64_t I) {
    const int64_t rows[3] = {I, I, H}, cols[3] = {H, H, I};
    mh->E = E;
    mh->stride = th_expert_layout(&mh->lay, types, H, I);
    mh->mem = aligned_alloc(4096, mh->stride * (uint64_t)E);
    cr_assert(mh->mem, "out of memory for %d experts", E);
    memset(mh->mem, 0x7f, mh->stride * (uint64_t)E); /* padding: NaN-ish bytes, never read */
    for (int e = 0; e < E; e++)
        for (int p = 0; p < 3; p++) {
            void *part = make_weights(types[p], rows[p], cols[p]);
            memcpy(mh->mem + mh->stride * (uint64_t)e + mh->lay.offset[p], part,
                   quant_tensor_bytes(types[p], rows[p], cols[p]));
            free(part);
        }
}

/* The CUDA op against the CPU op (ref) for each token count; the blobs go up from host_alloc
 * memory (pinned, scribbled over right after each upload) or from malloc memory. */
static double moe_case(mf_backend *ref, const mf_qtype types[3], int E, int K, int64_t H, int64_t I,
                       const int64_t *ntoks, int n_nt, int pinned) {
    moe_host mh;
    moe_host_make(&mh, types, E, H, I);
    int64_t max_nt = 0;
    for (int i = 0; i < n_nt; i++) max_nt = ntoks[i] > max_nt ? ntoks[i] : max_nt;
    mf_backend_limits lim = {1, max_nt, 1, E, K, I, H};
    cr_assert(ref->ops->reserve(ref, &lim) == MF_OK && gpu->ops->reserve(gpu, &lim) == MF_OK, "reserve failed");
    unsigned char *stage = pinned ? gpu->ops->host_alloc(gpu, mh.stride) : NULL;
    cr_assert(!pinned || stage, "host_alloc failed");
    const void **table = malloc(sizeof(void *) * (size_t)E), **dtab_h = malloc(sizeof(void *) * (size_t)E);
    cr_assert(table && dtab_h);
    for (int e = 0; e < E; e++) {
        const unsigned char *blob = mh.mem + mh.stride * (uint64_t)e;
        table[e] = blob;
        void *d = gpu->ops->alloc(gpu, mh.stride);
        cr_assert(d, "device allocation of expert %d failed", e);
        if (pinned) {
            memcpy(stage, blob, mh.stride);
            gpu->ops->upload(gpu, d, stage, mh.stride);
            memset(stage, 0xff, mh.stride); /* the next expert's bytes would land here */
        } else {
            gpu->ops->upload(gpu, d, blob, mh.stride);
        }
        dtab_h[e] = d;
    }
    if (stage) gpu->ops->host_free(gpu, stage);
    void *dtab = dev_bytes(dtab_h, sizeof(void *) * (size_t)E);
    double worst = 0;
    for (int ni = 0; ni < n_nt; ni++) {
        int64_t nt = ntoks[ni];
        float *x = hnormal(nt * H, 0.0, 1.0), *w = malloc(sizeof(float) * (size_t)(nt * K));
        int32_t *ids = malloc(sizeof(int32_t) * (size_t)(nt * K));
        float *yref = malloc(sizeof(float) * (size_t)(nt * H));
        cr_assert(w && ids && yref);
        th_moe_routes(E, K, nt, ids, w);
        ref->ops->moe_experts(ref, x, ids, w, nt, K, table, &mh.lay, yref);
        float *dx = dev_floats(x, nt * H), *dw = dev_floats(w, nt * K), *dy = dev_floats(NULL, nt * H);
        int32_t *dids = dev_bytes(ids, sizeof(int32_t) * (size_t)(nt * K));
        gpu->ops->moe_experts(gpu, dx, dids, dw, nt, K, (const void *const *)dtab, &mh.lay, dy);
        char what[160];
        snprintf(what, sizeof what, "moe_experts %s/%s/%s H %lld I %lld E %d K %d n_tok %lld from %s",
                 qname(types[0]), qname(types[1]), qname(types[2]), (long long)H, (long long)I, E, K, (long long)nt,
                 pinned ? "host_alloc" : "malloc");
        float *y = dev_fetch(dy, nt * H, what);
        for (int64_t t = 0; t < nt; t++) {
            char wt[200];
            snprintf(wt, sizeof wt, "%s token %lld", what, (long long)t);
            worst = fmax(worst, check_close(y + t * H, yref + t * H, H, TOL_MM, wt));
        }
        dev_free(dx);
        dev_free(dw);
        dev_free(dy);
        dev_free(dids);
        free(x);
        free(w);
        free(ids);
        free(yref);
        free(y);
    }
    for (int e = 0; e < E; e++) dev_free((void *)dtab_h[e]);
    dev_free(dtab);
    free(table);
    free(dtab_h);
    free(mh.mem);
    return worst;
}

Test(cuda, moe_experts_fixture_dims) {
    /* the fixtures' experts (hidden 64, inter 64, 8 experts, top 2), every storage type, down
     * stored apart from gate/up, a wider hidden and an odd token count */
    static const mf_qtype typesets[][3] = {
        {MF_QTYPE_Q4, MF_QTYPE_Q4, MF_QTYPE_Q4},       {MF_QTYPE_Q8, MF_QTYPE_Q8, MF_QTYPE_Q8},
        {MF_QTYPE_BF16, MF_QTYPE_BF16, MF_QTYPE_BF16}, {MF_QTYPE_F32, MF_QTYPE_F32, MF_QTYPE_F32},
        {MF_QTYPE_Q4, MF_QTYPE_Q4, MF_QTYPE_BF16},     {MF_QTYPE_Q8, MF_QTYPE_Q8, MF_QTYPE_F32},
    };
    static const int64_t ntoks[] = {1, 3, 12, 64};
    double worst = 0;
    for (size_t ti = 0; ti < sizeof typesets / sizeof typesets[0]; ti++) {
        th_rng_seed(15000 + ti);
        worst = fmax(worst, moe_case(cpu, typesets[ti], 8, 2, 64, 64, ntoks, 4, (int)(ti & 1)));
        worst = fmax(worst, moe_case(cpu, typesets[ti], 16, 4, 192, 128, ntoks, 3, (int)(~ti & 1)));
    }
    cr_log_info("moe_experts fixture dims: worst relative error %.3g", worst);
}

Test(cuda, moe_experts_real_dims) {
    /* Qwen3.6-35B-A3B (hidden 2048, inter 512, top 8) and Qwen3.5-397B (4096, 1024, top 10),
     * q4 experts (and q8 at the 35B shape); decode and a 64-token chunk; the CPU fast path as
     * the reference (threads: the reference path is slow at these sizes) */
    mf_backend *fast = cpu_backend_create(0, 0);
    cr_assert(fast);
    static const int64_t ntoks[] = {1, 64};
    static const mf_qtype q4[3] = {MF_QTYPE_Q4, MF_QTYPE_Q4, MF_QTYPE_Q4}, q8[3] = {MF_QTYPE_Q8, MF_QTYPE_Q8, MF_QTYPE_Q8};
    double worst = 0;
    th_rng_seed(16000);
    worst = fmax(worst, moe_case(fast, q4, 64, 8, 2048, 512, ntoks, 2, 1));
    th_rng_seed(16001);
    worst = fmax(worst, moe_case(fast, q8, 32, 8, 2048, 512, ntoks, 2, 0));
    th_rng_seed(16002);
    worst = fmax(worst, moe_case(fast, q4, 24, 10, 4096, 1024, ntoks, 2, 0));
    th_rng_seed(16003);
    worst = fmax(worst, moe_case(fast, q4, 12, 10, 4096, 1024, ntoks, 1, 1));
    fast->ops->destroy(fast);
    cr_log_info("moe_experts real dims: worst relative error %.3g", worst);
}

Test(cuda, moe_experts_refused) {
    /* more pairs than reserve was told: refused with a message, nothing written */
    mf_backend_limits lim = {1, 2, 1, 8, 2, 64, 64};
    cr_assert(gpu->ops->reserve(gpu, &lim) == MF_OK);
    mf_expert_layout lay = {{MF_QTYPE_Q4, MF_QTYPE_Q4, MF_QTYPE_Q4}, {0, 4096, 8192}, 64, 64};
    float *d = dev_floats(NULL, 4 * 64);
    gpu->ops->moe_experts(gpu, d, (const int32_t *)d, d, 3, 2, (const void *const *)d, &lay, d);
    const char *e = cuda_backend_last_error(gpu);
    cr_assert(e && strstr(e, "moe_experts"), "no sticky error: %s", e ? e : "(none)");
}

/* ---- asynchronous uploads ---- */

/* Spins until ticket t is done (it must be, within seconds). */
static void wait_done(uint64_t t) {
    for (long i = 0; !gpu->ops->upload_done(gpu, t); i++) cr_assert(i < 200000000L, "ticket %llu never done",
                                                                      (unsigned long long)t);
}

Test(cuda, upload_async) {
    enum { N = 4 << 20 }; /* floats: 16 MB a copy, long enough for races to show */
    float *ha = gpu->ops->host_alloc(gpu, sizeof(float) * N), *hb = gpu->ops->host_alloc(gpu, sizeof(float) * N);
    float *back = malloc(sizeof(float) * N), *pageable = malloc(sizeof(float) * 1000);
    cr_assert(ha && hb && back && pageable);
    float *d = gpu->ops->alloc(gpu, sizeof(float) * N), *dy = gpu->ops->alloc(gpu, sizeof(float) * N);
    float *dz = gpu->ops->alloc(gpu, sizeof(float) * N);
    cr_assert(d && dy && dz);
    for (int i = 0; i < N; i++) ha[i] = (float)(i % 1000), hb[i] = (float)(i % 777) + 0.5f;

    /* overwrite order: the later upload to the same destination wins */
    uint64_t t1 = gpu->ops->upload_async(gpu, d, ha, sizeof(float) * N);
    uint64_t t2 = gpu->ops->upload_async(gpu, d, hb, sizeof(float) * N);
    cr_assert(t1 && t2 && t2 != t1, "tickets %llu %llu", (unsigned long long)t1, (unsigned long long)t2);
    /* fence: a kernel issued after it sees the bytes (dy = 0 + d), the host never waited */
    gpu->ops->upload_fence(gpu);
    gpu->ops->add(gpu, dy, d, N);
    gpu->ops->download(gpu, back, dy, sizeof(float) * N);
    no_cuda_error();
    for (int i = 0; i < N; i++) cr_assert(back[i] == (float)(i % 777) + 0.5f, "after the fence, element %d is %g", i, back[i]);
    wait_done(t2);
    cr_assert(gpu->ops->upload_done(gpu, t1), "an earlier ticket is not done after a later one");

    /* a destination the compute stream still reads: the upload starts after that read */
    gpu->ops->copy(gpu, dz, d, sizeof(float) * N);       /* dz = hb's values */
    gpu->ops->add(gpu, dz, d, N);                         /* dz = 2 x hb's values */
    uint64_t t3 = gpu->ops->upload_async(gpu, d, ha, sizeof(float) * N);
    gpu->ops->upload_fence(gpu);
    gpu->ops->add(gpu, dz, d, N);                         /* + ha's values */
    gpu->ops->download(gpu, back, dz, sizeof(float) * N);
    no_cuda_error();
    for (int i = 0; i < N; i++)
        cr_assert(back[i] == 2.0f * ((float)(i % 777) + 0.5f) + (float)(i % 1000), "reuse: element %d is %g", i,
                  back[i]);
    wait_done(t3);
    /* once done, the source may change: the device keeps what was copied */
    memset(ha, 0, sizeof(float) * N);
    gpu->ops->download(gpu, back, d, sizeof(float) * N);
    for (int i = 0; i < N; i++) cr_assert(back[i] == (float)(i % 1000), "after done, element %d is %g", i, back[i]);

    /* many small uploads wrap the ticket ring; each lands where it was sent */
    uint64_t last = 0;
    for (int k = 0; k < 700; k++) {
        hb[k * 1000] = (float)(k + 1);
        uint64_t t = gpu->ops->upload_async(gpu, d + k * 1000, hb + k * 1000, sizeof(float) * 1000);
        cr_assert(t > last, "tickets must grow: %llu after %llu", (unsigned long long)t, (unsigned long long)last);
        last = t;
    }
    gpu->ops->sync(gpu); /* waits for every upload */
    cr_assert(gpu->ops->upload_done(gpu, last) && gpu->ops->upload_done(gpu, last - 300));
    gpu->ops->download(gpu, back, d, sizeof(float) * N);
    for (int k = 0; k < 700; k++)
        cr_assert(back[k * 1000] == (float)(k + 1) && back[k * 1000 + 999] == hb[k * 1000 + 999], "small upload %d", k);

    /* a pageable source is copied at once: done on return, source free to change */
    for (int i = 0; i < 1000; i++) pageable[i] = (float)(-i);
    uint64_t tp = gpu->ops->upload_async(gpu, d, pageable, sizeof(float) * 1000);
    cr_assert(gpu->ops->upload_done(gpu, tp), "a pageable upload is not done on return");
    memset(pageable, 0, sizeof(float) * 1000);
    gpu->ops->upload_fence(gpu);
    gpu->ops->download(gpu, back, d, sizeof(float) * 1000);
    for (int i = 0; i < 1000; i++) cr_assert(back[i] == (float)(-i), "pageable upload element %d is %g", i, back[i]);
    cr_assert(gpu->ops->upload_async(gpu, d, ha, 0) == 0, "an empty upload needs no ticket");
    no_cuda_error();
    dev_free(d);
    dev_free(dy);
    dev_free(dz);
    gpu->ops->host_free(gpu, ha);
    gpu->ops->host_free(gpu, hb);
    free(back);
    free(pageable);
}
