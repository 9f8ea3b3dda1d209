/* bench_matvec.c - speed of cpu_matmul (q4/q8/bf16) at real model shapes in GB/s of weights read,
 * next to this machine's RAM read and memcpy bandwidth. Not a correctness test (tests/test_matmul.c).
 *
 * Build (after `make`, which gives build/libmoeflux.a):
 *   cc -O2 -std=c11 -D_GNU_SOURCE -Iinclude -Isrc bench/bench_matvec.c build/libmoeflux.a \
 *      -lcjson -lm -pthread -o build/bench_matvec
 * Run: build/bench_matvec [--json] [--threads N] [--quick]
 *   --threads N  the "all threads" pool size (default: every online CPU)
 *   --quick      shorter timings, no lm-head shape */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_matmul.h"
#include "core/threadpool.h"
#include "format/quant.h"

#define ROTATE_MIN (256ull << 20)   /* weights cycled through per shape, at least (and 4x L3) */
#define BW_BYTES (1ull << 30)       /* buffer of the bandwidth probes */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t rng = 0x9e3779b97f4a7c15u;

static uint64_t rng_next(void) { /* xorshift64* */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545f4914f6cdd1du;
}

/* ---- memory bandwidth probes ---- */

typedef struct bw_job {
    const uint64_t *src; /* [n] */
    uint64_t *dst;       /* [n], memcpy only */
    int64_t n;
    uint64_t sums[256];  /* per thread, so the reads are not optimised away */
} bw_job;

static void bw_sum(void *ctx, int64_t begin, int64_t end, int thread) {
    bw_job *j = ctx;
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    const uint64_t *p = j->src;
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
        a0 += p[i]; a1 += p[i + 1]; a2 += p[i + 2]; a3 += p[i + 3];
        a4 += p[i + 4]; a5 += p[i + 5]; a6 += p[i + 6]; a7 += p[i + 7];
    }
    for (; i < end; i++) a0 += p[i];
    j->sums[thread & 255] += a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

static void bw_copy(void *ctx, int64_t begin, int64_t end, int thread) {
    (void)thread;
    bw_job *j = ctx;
    memcpy(j->dst + begin, j->src + begin, (size_t)(end - begin) * sizeof *j->dst);
}

/* GB/s of fn over the buffer (bytes_per_pass counted per pass), best of `reps`. */
static double bw_measure(mf_pool *pool, pool_fn fn, bw_job *j, double bytes_per_pass, int reps) {
    double best = 0;
    pool_for(pool, j->n, 1 << 16, fn, j); /* warm up (first touch of the pages) */
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        pool_for(pool, j->n, 1 << 16, fn, j);
        double gbs = bytes_per_pass / (now_s() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    return best;
}

/* ---- matmul timings ---- */

typedef struct shape {
    const char *name;
    int64_t rows, cols, n_tok;
} shape;

static const shape shapes[] = {
    {"expert gate/up", 512, 2048, 1},
    {"expert gate/up", 1024, 4096, 1},
    {"expert down", 2048, 512, 1},
    {"expert down", 4096, 1024, 1},
    {"projection", 4096, 4096, 1},
    {"lm head", 248320, 2048, 1},
    {"expert gate/up", 512, 2048, 32},
    {"projection", 4096, 4096, 32},
};

/* Fills `copies` consecutive [rows, cols] matrices of type t with plausible values. */
static void fill_weights(mf_qtype t, unsigned char *buf, int64_t rows, int64_t cols, int64_t copies) {
    uint64_t bytes = quant_tensor_bytes(t, rows, cols);
    uint64_t n = (uint64_t)rows * (uint64_t)cols;
    for (int64_t k = 0; k < copies; k++) {
        unsigned char *m = buf + (uint64_t)k * bytes;
        if (t == MF_QTYPE_BF16) {
            for (uint64_t i = 0; i < n; i++) {
                uint16_t h = f32_to_bf16((float)((int64_t)(rng_next() >> 40) - (1 << 23)) * 0x1p-27f);
                memcpy(m + 2 * i, &h, 2);
            }
        } else if (t == MF_QTYPE_F32) {
            for (uint64_t i = 0; i < n; i++) {
                float f = (float)((int64_t)(rng_next() >> 40) - (1 << 23)) * 0x1p-27f;
                memcpy(m + 4 * i, &f, 4);
            }
        } else {
            uint64_t wb = n * (uint64_t)quant_bits(t) / 8, ng = n / QUANT_GROUP;
            for (uint64_t i = 0; i + 8 <= wb; i += 8) {
                uint64_t v = rng_next();
                memcpy(m + i, &v, 8);
            }
            for (uint64_t g = 0; g < ng; g++) {
                uint16_t s = f32_to_bf16(0.01f), b = f32_to_bf16(-0.08f);
                memcpy(m + wb + 2 * g, &s, 2);
                memcpy(m + wb + 2 * ng + 2 * g, &b, 2);
            }
        }
    }
}

typedef struct result {
    mf_qtype type;
    const shape *sh;
    double mb;           /* weight bytes of one matrix, MB */
    double gbs[2];       /* weight GB/s, 1 thread and all threads */
    double us[2];        /* microseconds per call */
} result;

/* Seconds per call, cycling through `copies` matrices until min_s has passed. */
static double time_matmul(mf_pool *pool, mf_qtype t, const unsigned char *buf, const shape *sh,
                          int64_t copies, const float *x, float *y, double min_s) {
    uint64_t bytes = quant_tensor_bytes(t, sh->rows, sh->cols);
    int64_t calls = 0, k = 0;
    for (int64_t i = 0; i < copies; i++) { /* warm up: touch every copy once */
        mf_wmat w = {t, sh->rows, sh->cols, buf + (uint64_t)i * bytes};
        cpu_matmul(pool, &w, x, sh->n_tok, y, 0);
    }
    double t0 = now_s(), el;
    do {
        mf_wmat w = {t, sh->rows, sh->cols, buf + (uint64_t)k * bytes};
        cpu_matmul(pool, &w, x, sh->n_tok, y, 0);
        k = (k + 1) % copies;
        calls++;
        el = now_s() - t0;
    } while (el < min_s || calls < copies);
    return el / (double)calls;
}

int main(int argc, char **argv) {
    int json = 0, quick = 0, n_threads = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc) n_threads = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--json] [--threads N] [--quick]\n", argv[0]);
            return 2;
        }
    }
    mf_pool *pool = pool_create(n_threads);
    if (!pool) return 1;
    n_threads = pool_size(pool);
    mf_pool *pools[2] = {NULL, pool};
    const double min_s = quick ? 0.1 : 0.4;
    long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE); /* 0 or -1 where unknown */
    const uint64_t rotate = l3 > 0 && 4 * (uint64_t)l3 > ROTATE_MIN ? 4 * (uint64_t)l3 : ROTATE_MIN;
    long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    double avail = pages > 0 && page > 0 ? (double)pages * (double)page : 4e9;

    /* bandwidth: read (sum) and memcpy (read + write counted) over 1 GiB each */
    bw_job *bj = calloc(1, sizeof *bj);
    uint64_t *src = malloc(BW_BYTES), *dst = malloc(BW_BYTES);
    if (!bj || !src || !dst) return 1;
    for (uint64_t i = 0; i < BW_BYTES / 8; i++) src[i] = i * 0x9e3779b97f4a7c15u;
    memset(dst, 1, BW_BYTES);
    bj->src = src;
    bj->dst = dst;
    bj->n = (int64_t)(BW_BYTES / 8);
    double read_gbs[2], copy_gbs[2];
    for (int p = 0; p < 2; p++) {
        read_gbs[p] = bw_measure(pools[p], bw_sum, bj, (double)BW_BYTES, quick ? 2 : 4);
        copy_gbs[p] = bw_measure(pools[p], bw_copy, bj, 2.0 * (double)BW_BYTES, quick ? 2 : 4);
    }
    free(dst);
    free(src);

    /* weights: one buffer of at least `rotate` bytes, reused by every shape */
    const mf_qtype types[] = {MF_QTYPE_Q4, MF_QTYPE_Q8, MF_QTYPE_BF16};
    const int n_types = 3, n_shapes = (int)(sizeof shapes / sizeof shapes[0]);
    uint64_t buf_bytes = rotate;
    for (int s = 0; s < n_shapes; s++)
        for (int ti = 0; ti < n_types; ti++) {
            uint64_t b = quant_tensor_bytes(types[ti], shapes[s].rows, shapes[s].cols);
            if (b > buf_bytes && (double)b < 0.6 * avail && !(quick && shapes[s].rows > 100000))
                buf_bytes = b;
        }
    unsigned char *buf = malloc(buf_bytes);
    float *x = malloc(32 * 4096 * sizeof *x), *y = malloc(32 * 248320 * sizeof *y);
    if (!buf || !x || !y) return 1;
    for (int i = 0; i < 32 * 4096; i++) x[i] = (float)((int64_t)(rng_next() >> 40) - (1 << 23)) * 0x1p-23f;

    result res[64];
    int n_res = 0;
    for (int s = 0; s < n_shapes; s++) {
        const shape *sh = &shapes[s];
        for (int ti = 0; ti < n_types; ti++) {
            mf_qtype t = types[ti];
            uint64_t bytes = quant_tensor_bytes(t, sh->rows, sh->cols);
            if (bytes > buf_bytes) {
                if (!json)
                    fprintf(stderr, "skip %s %s [%lld x %lld]: %.0f MB does not fit\n", mf_qtype_name(t),
                            sh->name, (long long)sh->rows, (long long)sh->cols, (double)bytes / 1e6);
                continue;
            }
            int64_t copies = (int64_t)((rotate + bytes - 1) / bytes);
            if ((uint64_t)copies * bytes > buf_bytes) copies = (int64_t)(buf_bytes / bytes);
            fill_weights(t, buf, sh->rows, sh->cols, copies);
            result *r = &res[n_res++];
            r->type = t;
            r->sh = sh;
            r->mb = (double)bytes / 1e6;
            for (int p = 0; p < 2; p++) {
                double sec = time_matmul(pools[p], t, buf, sh, copies, x, y, min_s);
                r->us[p] = sec * 1e6;
                r->gbs[p] = (double)bytes / sec / 1e9;
            }
        }
    }

    if (json) {
        printf("{\"threads\": %d, \"rotate_bytes\": %llu, \"read_gbs\": [%.2f, %.2f],"
               " \"memcpy_gbs\": [%.2f, %.2f], \"results\": [",
               n_threads, (unsigned long long)rotate, read_gbs[0], read_gbs[1], copy_gbs[0], copy_gbs[1]);
        for (int i = 0; i < n_res; i++) {
            const result *r = &res[i];
            printf("%s\n  {\"type\": \"%s\", \"name\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"n_tok\": %lld,"
                   " \"mb\": %.3f, \"gbs\": [%.2f, %.2f], \"us\": [%.1f, %.1f]}",
                   i ? "," : "", mf_qtype_name(r->type), r->sh->name, (long long)r->sh->rows,
                   (long long)r->sh->cols, (long long)r->sh->n_tok, r->mb, r->gbs[0], r->gbs[1], r->us[0],
                   r->us[1]);
        }
        printf("\n]}\n");
    } else {
        printf("weights cycled per shape: %.0f MiB (L3 %.0f MiB)\n", (double)rotate / 1048576.0,
               l3 > 0 ? (double)l3 / 1048576.0 : 0.0);
        printf("RAM read (sum):        %6.1f GB/s 1 thread, %6.1f GB/s %d threads\n", read_gbs[0],
               read_gbs[1], n_threads);
        printf("memcpy (read + write): %6.1f GB/s 1 thread, %6.1f GB/s %d threads\n\n", copy_gbs[0],
               copy_gbs[1], n_threads);
        printf("%-5s %-15s %15s %5s %9s | %8s %9s | %8s %9s %8s\n", "type", "shape", "rows x cols", "ntok",
               "MB", "1t GB/s", "1t us", "Nt GB/s", "Nt us", "Nt GF/s");
        for (int i = 0; i < n_res; i++) {
            const result *r = &res[i];
            char dims[32];
            snprintf(dims, sizeof dims, "%lldx%lld", (long long)r->sh->rows, (long long)r->sh->cols);
            double gflops = 2.0 * (double)r->sh->rows * (double)r->sh->cols * (double)r->sh->n_tok /
                            (r->us[1] * 1e3);
            printf("%-5s %-15s %15s %5lld %9.2f | %8.2f %9.1f | %8.2f %9.1f %8.1f\n", mf_qtype_name(r->type),
                   r->sh->name, dims, (long long)r->sh->n_tok, r->mb, r->gbs[0], r->us[0], r->gbs[1],
                   r->us[1], gflops);
        }
        printf("\n(N = %d threads; GB/s = weight bytes (quant_tensor_bytes) / time per call)\n", n_threads);
    }
    free(y);
    free(x);
    free(buf);
    free(bj);
    pool_destroy(pool);
    return 0;
}
