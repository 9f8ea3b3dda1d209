/* bench_cuda_matvec.c - speed of the CUDA backend's matmul (src/backend/cuda/cuda_matmul.cu) for
 * q4, q8 and bf16 weights at real expert and projection shapes, in GB/s of weight bytes, against
 * the device-to-device copy bandwidth measured in the same run; of a layer's routed experts
 * (moe_experts, cuda_moe.cu) against the per-expert ops they replace; and of expert uploads
 * from pageable and from host_alloc (page-locked) memory. Not a correctness test
 * (tests/cuda/test_cuda_ops.c). Build: make bench (built when nvcc is found); run on a GPU machine:
 *   build/bench_cuda_matvec [--quick] [--only TEXT]
 * --only TEXT keeps the rows whose name contains TEXT (for example "projection", "experts",
 * "397B"), after the copy bandwidth they are measured against.
 * Each shape cycles through copies of its weights totalling at least 256 MiB, so that the
 * timings are of device memory, not of the 50 MB L2. Launches go back to back on the backend's
 * stream, as the engine issues them: for small matrices the launch rate, not memory, is the limit. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "format/quant.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Device-to-device copy of `bytes`, GB/s counting bytes read plus bytes written. */
static double copy_gbps(mf_backend *be, size_t bytes, int reps) {
    void *a = be->ops->alloc(be, bytes), *b = be->ops->alloc(be, bytes);
    if (!a || !b) return 0;
    be->ops->copy(be, b, a, bytes);
    be->ops->sync(be);
    double t0 = now_s();
    for (int i = 0; i < reps; i++) be->ops->copy(be, i & 1 ? a : b, i & 1 ? b : a, bytes);
    be->ops->sync(be);
    double dt = now_s() - t0;
    be->ops->free(be, a);
    be->ops->free(be, b);
    return 2.0 * (double)bytes * reps / dt / 1e9;
}

/* One layer's routed experts at a real shape: E q4 blobs (>= 256 MiB in all, so that the
 * experts come from device memory), calls cycling through E / K disjoint routes. Prints us per
 * call and GB/s of the chosen experts' bytes for the fused op and for the per-expert ops
 * (gather, gate, up, SwiGLU, down, scatter-add) that the engine ran before it. */
static int bench_moe(mf_backend *be, const char *what, int E, int K, int64_t H, int64_t I, int64_t nt, int in_host,
                     int quick) {
    const mf_qtype t = MF_QTYPE_Q4;
    const uint64_t part = quant_tensor_bytes(t, I, H), stride = (3 * part + 4095) / 4096 * 4096;
    mf_expert_layout lay = {{t, t, t}, {0, part, 2 * part}, I, H};
    mf_backend_limits lim = {1, nt, 1, E, K, I, H};
    if (be->ops->reserve(be, &lim) != MF_OK) return 1;
    unsigned char *host = malloc(stride);
    void **dblob = calloc((size_t)E, sizeof *dblob);
    const int NS = E / K; /* routes */
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(NS * nt * K));
    float *w = malloc(sizeof(float) * (size_t)(NS * nt * K));
    if (!host || !dblob || !ids || !w) return 1;
    memset(host, 0x3c, stride);
    for (int e = 0; e < E; e++) {
        /* in_host 1: every blob in page-locked host memory, read by the kernels over the bus;
         * 2: every second one */
        if (in_host == 1 || (in_host == 2 && e % 2)) {
            if (!(dblob[e] = be->ops->host_alloc(be, stride))) return 1;
            memcpy(dblob[e], host, stride);
            continue;
        }
        if (!(dblob[e] = be->ops->alloc(be, stride))) return 1;
        be->ops->upload(be, dblob[e], host, stride);
    }
    for (int r = 0; r < NS; r++) /* route r: token i takes experts (r K + j + i) mod E */
        for (int64_t i = 0; i < nt; i++)
            for (int j = 0; j < K; j++) {
                ids[(r * nt + i) * K + j] = (int32_t)((r * K + j + i) % E);
                w[(r * nt + i) * K + j] = 1.0f / (float)K;
            }
    void *dtab = be->ops->alloc(be, sizeof(void *) * (size_t)E);
    int32_t *dids = be->ops->alloc(be, sizeof(int32_t) * (size_t)(NS * nt * K));
    float *dw = be->ops->alloc(be, sizeof(float) * (size_t)(NS * nt * K));
    float *x = be->ops->alloc(be, sizeof(float) * (size_t)(nt * H)), *y = be->ops->alloc(be, sizeof(float) * (size_t)(nt * H));
    float *g = be->ops->alloc(be, sizeof(float) * (size_t)(nt * I)), *u = be->ops->alloc(be, sizeof(float) * (size_t)(nt * I));
    float *xo = be->ops->alloc(be, sizeof(float) * (size_t)(nt * H)), *ey = be->ops->alloc(be, sizeof(float) * (size_t)(nt * H));
    int32_t *tok = be->ops->alloc(be, sizeof(int32_t) * (size_t)nt);
    if (!dtab || !dids || !dw || !x || !y || !g || !u || !xo || !ey || !tok) return 1;
    be->ops->upload(be, dtab, dblob, sizeof(void *) * (size_t)E);
    be->ops->upload(be, dids, ids, sizeof(int32_t) * (size_t)(NS * nt * K));
    be->ops->upload(be, dw, w, sizeof(float) * (size_t)(NS * nt * K));
    int32_t *htok = malloc(sizeof(int32_t) * (size_t)nt);
    for (int64_t i = 0; i < nt; i++) htok[i] = (int32_t)i;
    be->ops->upload(be, tok, htok, sizeof(int32_t) * (size_t)nt);
    double per[3] = {0, 0, 0};
    { /* the fused op in a recorded graph, as a decode step replays it */
        void *gr = NULL;
        if (be->ops->graph_begin(be) == MF_OK) {
            for (int r = 0; r < NS; r++)
                be->ops->moe_experts(be, x, dids + r * nt * K, dw + r * nt * K, nt, K, (const void *const *)dtab, &lay, y);
            gr = be->ops->graph_end(be);
        }
        int calls = 0;
        double t0 = now_s(), dt = 0, budget = quick ? 0.05 : 0.3;
        while (gr && dt < budget) {
            be->ops->graph_launch(be, gr);
            calls += NS;
            be->ops->sync(be);
            dt = now_s() - t0;
        }
        per[2] = calls ? dt / calls : 0;
        if (gr) be->ops->graph_free(be, gr);
    }
    for (int way = 0; way < (nt == 1 ? 2 : 1); way++) {
        int calls = 0;
        double t0 = 0, dt = 0, budget = quick ? 0.05 : 0.3;
        for (int warm = 1; warm >= 0; warm--) {
            if (!warm) t0 = now_s();
            do {
                for (int r = 0; r < NS; r++) {
                    const int32_t *rid = dids + r * nt * K;
                    if (way == 0) {
                        be->ops->moe_experts(be, x, rid, dw + r * nt * K, nt, K, (const void *const *)dtab, &lay, y);
                        continue;
                    }
                    for (int j = 0; j < K; j++) { /* one token, 6 ops per expert, as forward.c ran them */
                        const char *b = dblob[ids[r * nt * K + j]];
                        mf_wmat wg = {t, I, H, b}, wu = {t, I, H, b + part}, wd = {t, H, I, b + 2 * part};
                        be->ops->gather_rows(be, xo, x, tok, nt, H);
                        be->ops->matmul(be, &wg, xo, nt, g);
                        be->ops->matmul(be, &wu, xo, nt, u);
                        be->ops->swiglu(be, g, u, nt * I);
                        be->ops->matmul(be, &wd, g, nt, ey);
                        be->ops->scatter_add(be, y, ey, tok, dw, nt, H);
                    }
                }
                if (!warm) calls += NS;
                be->ops->sync(be);
                dt = now_s() - t0;
            } while (!warm && dt < budget);
        }
        per[way] = dt / calls;
    }
    const char *e = cuda_backend_last_error(be);
    if (e) {
        fprintf(stderr, "CUDA error: %s\n", e);
        return 1;
    }
    /* bytes of the distinct experts a call chooses (token i's route is shifted by i) */
    double bytes = (double)(K + nt - 1 < E ? K + nt - 1 : E) * 3 * (double)part;
    printf("%-24s K %2d [%lld x %lld] q4 n_tok %lld %7.2f MB: fused %7.2f us %6.0f GB/s", what, K, (long long)I,
           (long long)H, (long long)nt, bytes / 1e6, per[0] * 1e6, bytes / per[0] / 1e9);
    if (per[2] > 0) printf("; in a graph %7.2f us %6.0f GB/s", per[2] * 1e6, bytes / per[2] / 1e9);
    if (nt == 1) printf("; per-expert ops %7.2f us %6.0f GB/s", per[1] * 1e6, bytes / per[1] / 1e9);
    printf("\n");
    fflush(stdout);
    for (int i = 0; i < E; i++) {
        if (in_host == 1 || (in_host == 2 && i % 2)) be->ops->host_free(be, dblob[i]);
        else be->ops->free(be, dblob[i]);
    }
    void *fr[] = {dtab, dids, dw, x, y, g, u, xo, ey, tok};
    for (int i = 0; i < 10; i++) be->ops->free(be, fr[i]);
    free(host);
    free(dblob);
    free(ids);
    free(w);
    free(htok);
    return 0;
}

/* Upload of one expert-sized blob from malloc memory and from host_alloc memory, GB/s. */
static int bench_upload(mf_backend *be, size_t bytes, int quick) {
    void *d = be->ops->alloc(be, bytes), *pageable = malloc(bytes), *pinned = be->ops->host_alloc(be, bytes);
    if (!d || !pageable || !pinned) {
        fprintf(stderr, "upload bench: allocation failed (host_alloc %p)\n", pinned);
        return 1;
    }
    memset(pageable, 1, bytes);
    memset(pinned, 1, bytes);
    double gbps[2];
    for (int k = 0; k < 2; k++) {
        void *src = k ? pinned : pageable;
        be->ops->upload(be, d, src, bytes);
        be->ops->sync(be);
        int n = quick ? 10 : 50;
        double t0 = now_s();
        for (int i = 0; i < n; i++) be->ops->upload(be, d, src, bytes);
        be->ops->sync(be);
        gbps[k] = (double)bytes * n / (now_s() - t0) / 1e9;
    }
    printf("upload of a %.1f MB blob: %.1f GB/s from pageable memory, %.1f GB/s from host_alloc memory\n\n",
           bytes / 1e6, gbps[0], gbps[1]);
    be->ops->free(be, d);
    be->ops->host_free(be, pinned);
    free(pageable);
    return 0;
}

/* Whether the row `name` is wanted under --only (NULL: every row). */
static int wanted(const char *only, const char *name) { return !only || strstr(name, only); }

typedef struct shape {
    const char *what;
    int64_t rows, cols, n_tok;
} shape;

int main(int argc, char **argv) {
    int quick = 0;
    const char *only = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) {
            quick = 1;
        } else if (!strcmp(argv[i], "--only") && i + 1 < argc) {
            only = argv[++i];
        } else {
            fprintf(stderr, "usage: bench_cuda_matvec [--quick] [--only TEXT]\n");
            return 2;
        }
    }
    mf_err err = {0};
    mf_backend *be = cuda_backend_create(0, &err);
    if (!be) {
        fprintf(stderr, "bench_cuda_matvec: %s\n", err.msg);
        return 1;
    }
    double copy = copy_gbps(be, (size_t)1 << 30, quick ? 10 : 40);
    printf("device-to-device copy (read + write): %.0f GB/s\n", copy);
    if (!only) { /* the floor of any op: one-element adds back to back */
        float *a = be->ops->alloc(be, 64);
        be->ops->add(be, a, a, 1);
        be->ops->sync(be);
        double t0 = now_s();
        for (int i = 0; i < 2000; i++) be->ops->add(be, a, a, 1);
        be->ops->sync(be);
        printf("smallest op (add of 1 float) back to back: %.2f us per call\n\n", (now_s() - t0) / 2000 * 1e6);
        be->ops->free(be, a);
    }
    if (!only && bench_upload(be, (size_t)7 << 20, quick)) return 1;
    /* the chosen experts of one layer, fused (2 launches) against one op chain per expert */
    static const struct { const char *what; int E, K; int64_t H, I, nt; int in_host; } moes[] = {
        {"experts Qwen3.6-35B-A3B", 256, 8, 2048, 512, 1, 0},
        {"experts Qwen3.6-35B-A3B", 256, 8, 2048, 512, 8, 0},
        {"experts Qwen3.5-397B", 64, 10, 4096, 1024, 1, 0},
        {"experts in host memory 35B", 256, 8, 2048, 512, 1, 1},
        {"experts half in host memory 35B", 256, 8, 2048, 512, 1, 2},
        {"experts in host memory 397B", 64, 10, 4096, 1024, 1, 1},
    };
    for (size_t i = 0; i < sizeof moes / sizeof moes[0]; i++)
        if (wanted(only, moes[i].what) &&
            bench_moe(be, moes[i].what, moes[i].E, moes[i].K, moes[i].H, moes[i].I, moes[i].nt,
                                moes[i].in_host, quick))
            return 1;
    printf("\n");
    static const shape shapes[] = {
        {"expert gate/up 35B", 512, 2048, 1},   {"expert down 35B", 2048, 512, 1},
        {"expert gate/up 397B", 1024, 4096, 1}, {"expert down 397B", 4096, 1024, 1},
        {"projection", 4096, 4096, 1},          {"lm head", 248320, 2048, 1},
        {"projection", 4096, 4096, 2},          {"projection", 4096, 4096, 8},
        {"projection prefill", 4096, 4096, 64}, {"expert gate/up 35B", 512, 2048, 8},
        {"DeltaNet in 35B", 12352, 2048, 1},    {"DeltaNet out 35B", 2048, 4096, 1},
    };
    static const mf_qtype types[] = {MF_QTYPE_Q4, MF_QTYPE_Q8, MF_QTYPE_BF16};
    printf("%-22s %-14s %5s %5s %9s %10s %9s %7s %10s %9s %7s\n", "", "", "", "", "", "launched:", "", "",
           "in graph:", "", "");
    printf("%-22s %-14s %5s %5s %9s %10s %9s %7s %10s %9s %7s\n", "shape", "[rows x cols]", "type", "n_tok", "MB",
           "us/call", "GB/s", "%copy", "us/call", "GB/s", "%copy");
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
            const shape *s = &shapes[si];
            mf_qtype t = types[ti];
            if ((quick && s->rows > 100000) || !wanted(only, s->what)) continue;
            uint64_t wb = quant_tensor_bytes(t, s->rows, s->cols);
            int copies = (int)(((uint64_t)256 << 20) / wb);
            if (copies < 1) copies = 1;
            if (copies > 512) copies = 512;
            unsigned char *host = malloc(wb);
            if (!host) return 1;
            memset(host, 0x3c, wb); /* bf16 0x3c3c: small finite weights, scales, biases */
            void **dw = calloc((size_t)copies, sizeof *dw);
            int n = 0;
            for (; n < copies; n++) {
                if (!(dw[n] = be->ops->alloc(be, wb))) break;
                be->ops->upload(be, dw[n], host, wb);
            }
            free(host);
            float *x = be->ops->alloc(be, sizeof(float) * (size_t)(s->n_tok * s->cols));
            float *y = be->ops->alloc(be, sizeof(float) * (size_t)(s->n_tok * s->rows));
            if (n < 1 || !x || !y) {
                fprintf(stderr, "out of device memory at %s\n", s->what);
                return 1;
            }
            mf_wmat w = {t, s->rows, s->cols, NULL};
            for (int i = 0; i < n; i++) { /* warm up */
                w.data = dw[i];
                be->ops->matmul(be, &w, x, s->n_tok, y);
            }
            be->ops->sync(be);
            double per[2];
            for (int graph = 0; graph < 2; graph++) {
                /* back to back launches, then one recorded pass over the copies replayed */
                void *g = NULL;
                if (graph && be->ops->graph_begin(be) == MF_OK) {
                    for (int i = 0; i < n; i++) {
                        w.data = dw[i];
                        be->ops->matmul(be, &w, x, s->n_tok, y);
                    }
                    g = be->ops->graph_end(be);
                }
                int calls = 0;
                double t0 = now_s(), dt = 0, budget = quick ? 0.05 : 0.3;
                while (dt < budget) {
                    if (g) {
                        be->ops->graph_launch(be, g);
                    } else {
                        for (int i = 0; i < n; i++) {
                            w.data = dw[i];
                            be->ops->matmul(be, &w, x, s->n_tok, y);
                        }
                    }
                    calls += n;
                    be->ops->sync(be);
                    dt = now_s() - t0;
                }
                per[graph] = dt / calls;
                if (g) be->ops->graph_free(be, g);
            }
            const char *e = cuda_backend_last_error(be);
            if (e) {
                fprintf(stderr, "CUDA error: %s\n", e);
                return 1;
            }
            double gbps = (double)wb / per[0] / 1e9, ggbps = (double)wb / per[1] / 1e9;
            char dims[32];
            snprintf(dims, sizeof dims, "[%lld x %lld]", (long long)s->rows, (long long)s->cols);
            printf("%-22s %-14s %5s %5lld %9.2f %10.2f %9.0f %6.0f%% %10.2f %9.0f %6.0f%%\n", s->what, dims,
                   mf_qtype_name(t), (long long)s->n_tok, wb / 1e6, per[0] * 1e6, gbps, 100.0 * gbps / copy,
                   per[1] * 1e6, ggbps, 100.0 * ggbps / copy);
            fflush(stdout);
            for (int i = 0; i < n; i++) be->ops->free(be, dw[i]);
            free(dw);
            be->ops->free(be, x);
            be->ops->free(be, y);
        }
    be->ops->destroy(be);
    return 0;
}
