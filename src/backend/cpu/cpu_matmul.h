/* cpu_matmul.h - CPU matrix products and row dequantization for every storage type, with
 * dequantization fused in; a plain reference path and a fast path (AVX2/FMA, threads).
 * Not the ops table (backend/cpu/cpu_backend.c wires these in). */
#ifndef MF_BACKEND_CPU_MATMUL_H
#define MF_BACKEND_CPU_MATMUL_H

#include <stdint.h>

#include "backend/backend.h"
#include "core/threadpool.h"

/* y[t][r] = sum_c W[r][c] x[t][c]; x [n_tok][cols], y [n_tok][rows] (must not alias x).
 * pool may be NULL (single thread). reference != 0: plain scalar loops, one thread. */
void cpu_matmul(mf_pool *pool, const mf_wmat *w, const float *x, int64_t n_tok, float *y,
                int reference);
/* out[c] = W[r][c] for one row r. */
void cpu_dequant_row(const mf_wmat *w, int64_t r, float *out);

#endif
