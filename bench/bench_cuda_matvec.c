/* bench_cuda_matvec.c - speed of the CUDA backend's matmul (src/backend/cuda/cuda_matmul.cu) for
 * q4, q8 and bf16 weights at real expert and projection shapes, in GB/s of weight bytes, against
 * the device-to-device copy bandwidth measured in the same run. Not a correctness test
 * (tests/cuda/test_cuda_ops.c). Build: make bench (built when nvcc is found); run on a GPU machine:
 *   build/bench_cuda_matvec [--quick]
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

typedef struct shape {
    const char *what;
    int64_t rows, cols, n_tok;
} shape;

int main(int argc, char **argv) {
    int quick = argc > 1 && !strcmp(argv[1], "--quick");
    mf_err err = {0};
    mf_backend *be = cuda_backend_create(0, &err);
    if (!be) {
        fprintf(stderr, "bench_cuda_matvec: %s\n", err.msg);
        return 1;
    }
    double copy = copy_gbps(be, (size_t)1 << 30, quick ? 10 : 40);
    printf("device-to-device copy (read + write): %.0f GB/s\n", copy);
    { /* the floor of any op: one-element adds back to back */
        float *a = be->ops->alloc(be, 64);
        be->ops->add(be, a, a, 1);
        be->ops->sync(be);
        double t0 = now_s();
        for (int i = 0; i < 2000; i++) be->ops->add(be, a, a, 1);
        be->ops->sync(be);
        printf("smallest op (add of 1 float) back to back: %.2f us per call\n\n", (now_s() - t0) / 2000 * 1e6);
        be->ops->free(be, a);
    }
    static const shape shapes[] = {
        {"expert gate/up 35B", 512, 2048, 1},   {"expert down 35B", 2048, 512, 1},
        {"expert gate/up 397B", 1024, 4096, 1}, {"expert down 397B", 4096, 1024, 1},
        {"projection", 4096, 4096, 1},          {"lm head", 248320, 2048, 1},
        {"projection", 4096, 4096, 2},          {"projection", 4096, 4096, 8},
        {"projection prefill", 4096, 4096, 64}, {"expert gate/up 35B", 512, 2048, 8},
    };
    static const mf_qtype types[] = {MF_QTYPE_Q4, MF_QTYPE_Q8, MF_QTYPE_BF16};
    printf("%-22s %-14s %5s %5s %9s %10s %9s %7s\n", "shape", "[rows x cols]", "type", "n_tok", "MB", "us/call",
           "GB/s", "%copy");
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
            const shape *s = &shapes[si];
            mf_qtype t = types[ti];
            if (quick && s->rows > 100000) continue;
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
            int calls = 0;
            double t0 = now_s(), dt = 0, budget = quick ? 0.05 : 0.3;
            while (dt < budget) {
                for (int i = 0; i < n; i++) {
                    w.data = dw[i];
                    be->ops->matmul(be, &w, x, s->n_tok, y);
                }
                calls += n;
                be->ops->sync(be);
                dt = now_s() - t0;
            }
            const char *e = cuda_backend_last_error(be);
            if (e) {
                fprintf(stderr, "CUDA error: %s\n", e);
                return 1;
            }
            double per = dt / calls, gbps = (double)wb / per / 1e9;
            char dims[32];
            snprintf(dims, sizeof dims, "[%lld x %lld]", (long long)s->rows, (long long)s->cols);
            printf("%-22s %-14s %5s %5lld %9.2f %10.2f %9.0f %6.0f%%\n", s->what, dims, mf_qtype_name(t),
                   (long long)s->n_tok, wb / 1e6, per * 1e6, gbps, 100.0 * gbps / copy);
            fflush(stdout);
            for (int i = 0; i < n; i++) be->ops->free(be, dw[i]);
            free(dw);
            be->ops->free(be, x);
            be->ops->free(be, y);
        }
    be->ops->destroy(be);
    return 0;
}
