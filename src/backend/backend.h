/* backend.h - the ops table every compute backend implements (CPU now, CUDA next), and the
 * weight-matrix view the ops consume. Not the forward pass: model/forward.c calls these ops.
 * All activations are f32, row-major; pointers are backend memory (host memory for the CPU). */
#ifndef MF_BACKEND_BACKEND_H
#define MF_BACKEND_BACKEND_H

#include <stdint.h>

#include "backend/sample_args.h"

#include "core/err.h"
#include "moeflux.h"

/* A weight matrix [rows, cols] (out x in) in one storage type, laid out as
 * quant_tensor_bytes describes (q4/q8: words | scales | biases for the whole matrix). */
typedef struct mf_wmat {
    mf_qtype type;
    int64_t rows, cols;
    const void *data;
} mf_wmat;

typedef struct mf_backend mf_backend;

/* What attention_prep does for n_tok tokens (all pointers backend memory): head h of token t
 * is read from q_src + (t * n_heads + h) * q_stride (a gated q_proj interleaves [q | gate] per
 * head: q_stride = 2 * head_dim, and its gate part is copied to gate when gate is not NULL);
 * q [n_tok][n_heads][head_dim] = rope(rmsnorm(q head) * q_norm); k, v [n_tok][n_kv][head_dim]:
 * rope(rmsnorm(k head) * k_norm) and v go to row pos[t] of k_cache and v_cache [ctx][n_kv]
 * [head_dim]. Norm weights may be NULL (no scaling); rope as the rope op (rotate_half over the
 * first rot_dim dims). q may equal q_src when q_stride is head_dim. */
/* What deltanet_step does for n_tok tokens of a Gated DeltaNet layer: each row of q, k
 * [n_tok][Hk][dk] as the projections give them is L2-normalised, x * scale / sqrt(sum(x^2) + eps)
 * with eps 1e-6 and scale q_scale for q, 1 for k; the gates come from a, bb [n_tok][Hv] with
 * A_log, dt_bias [Hv]: beta = sigmoid(bb), g = -exp(A_log[h]) * softplus(a + dt_bias[h]) (softplus
 * with threshold 20, as torch); then the delta rule runs as deltanet does on S [Hv][dk][dv] with
 * v [n_tok][Hv][dv] into out [n_tok][Hv][dv]. q, k, g and beta ([n_tok][Hv]) are work space:
 * their contents afterwards are unspecified. */
typedef struct mf_deltanet_step {
    int64_t n_tok;
    int Hk, Hv, dk, dv;
    float q_scale;
    float *q, *k;
    const float *v, *a, *bb, *A_log, *dt_bias;
    float *g, *beta;
    float *S, *out;
} mf_deltanet_step;

typedef struct mf_attn_prep {
    int64_t n_tok;
    int n_heads, n_kv, head_dim, rot_dim;
    float eps;
    double theta;
    const float *q_src;
    int64_t q_stride;
    float *q, *gate;
    const float *k, *v;
    const float *q_norm, *k_norm;
    const int32_t *pos;
    float *k_cache, *v_cache;
} mf_attn_prep;

/* Where the three matrices of an expert blob sit (see docs/format.md): gate [inter][hidden],
 * up [inter][hidden], down [hidden][inter], each stored as its type at its offset in the blob. */
typedef struct mf_expert_layout {
    mf_qtype type[3];
    uint64_t offset[3];
    int64_t inter, hidden;
} mf_expert_layout;

/* The largest work a session will hand the ops, so kernels never allocate while running. */
typedef struct mf_backend_limits {
    int64_t max_ctx;    /* positions an attention op may read */
    int64_t max_tokens; /* tokens in one call */
    int max_head_dim;   /* largest k or v head dim of the linear attention */
    int max_experts;    /* router width */
    int max_top_k;      /* experts per token (moe_experts) */
    int64_t max_inter;  /* largest expert intermediate size (moe_experts) */
    int64_t max_hidden; /* hidden size (moe_experts) */
} mf_backend_limits;

typedef struct mf_backend_ops {
    const char *name;
    int host_memory;   /* nonzero: backend memory is ordinary host memory (the CPU) */
    /* nonzero: compute ops may read host_alloc memory in place, at that pointer (a GPU reads
     * page-locked RAM over the bus) */
    int host_alloc_readable;
    void (*destroy)(mf_backend *b);
    /* Grows the backend's scratch to serve calls within lim (never shrinks). */
    mf_status (*reserve)(mf_backend *b, const mf_backend_limits *lim);

    /* ---- memory ---- */
    void *(*alloc)(mf_backend *b, size_t bytes);      /* zeroed; NULL when out of memory */
    void (*free)(mf_backend *b, void *p);
    /* host -> backend, backend -> host (returns once the bytes are on the host), and within the
     * backend. Ops are ordered: a download sees every op issued before it. */
    void (*upload)(mf_backend *b, void *dst, const void *src, size_t bytes);
    void (*download)(mf_backend *b, void *dst, const void *src, size_t bytes);
    void (*copy)(mf_backend *b, void *dst, const void *src, size_t bytes);
    void (*sync)(mf_backend *b);
    /* Bytes of backend memory still free (0 when not meaningful, as on the CPU). */
    uint64_t (*mem_free)(mf_backend *b);

    /* ---- compute (all pointers are backend memory) ---- */
    /* y[t][r] = sum_c W[r][c] * x[t][c] for t < n_tok; x [n_tok][cols], y [n_tok][rows]. */
    void (*matmul)(mf_backend *b, const mf_wmat *w, const float *x, int64_t n_tok, float *y);
    /* y[j] = x W[j]^T for j < n_w (at most 4), as n_w matmuls of one x: one launch where the
     * backend can (same type and columns). */
    void (*matmul_multi)(mf_backend *b, int n_w, const mf_wmat *w, const float *x, int64_t n_tok,
                         float *const *y);
    /* out[t][:] = row ids[t] of W, dequantized; out [n_tok][cols]. */
    void (*embed)(mf_backend *b, const mf_wmat *w, const int32_t *ids, int64_t n_tok, float *out);
    /* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w (w NULL: no scaling); x, y [n_rows][dim];
     * y may equal x. */
    void (*rmsnorm)(mf_backend *b, const float *x, const float *w, int64_t n_rows, int64_t dim,
                    float eps, float *y);
    /* x += a, then y = rmsnorm(x) * w as rmsnorm does (the residual add and the next norm in
     * one step); x, a, y [n_rows][dim], y distinct from x and a. */
    void (*add_rmsnorm)(mf_backend *b, float *x, const float *a, const float *w, int64_t n_rows,
                        int64_t dim, float eps, float *y);
    /* Rotary embedding in place on x [n_tok][n_heads][head_dim]: for i < rot_dim/2 the pair
     * (i, i + rot_dim/2) rotates by angle pos[t] * theta^(-2i/rot_dim) (rotate_half); the angle
     * is computed in f32 as transformers does. pos [n_tok]. */
    void (*rope)(mf_backend *b, float *x, int64_t n_tok, int n_heads, int head_dim, int rot_dim,
                 const int32_t *pos, double theta);
    /* The per-head steps between the q/k/v projections and attention, in one op (mf_attn_prep). */
    void (*attention_prep)(mf_backend *b, const mf_attn_prep *p);
    /* Causal attention with grouped KV heads: q [n_tok][n_heads][hd]; caches [n_ctx][n_kv][hd];
     * token t attends to cache positions 0 .. pos[t], which are already written; pos [n_tok]
     * (backend memory, so it may change between replays of a captured graph) is ascending and
     * below n_ctx, the bound the op sizes its work for; head h reads kv head h / (n_heads / n_kv).
     * out [n_tok][n_heads][hd]. */
    void (*attention)(mf_backend *b, const float *q, const float *k_cache, const float *v_cache,
                      const int32_t *pos, int64_t n_ctx, int64_t n_tok, int n_heads, int n_kv, int hd,
                      float scale, float *out);
    /* Depthwise causal conv1d (kernel K, no bias) then SiLU: x, out [n_tok][C]; w [C][K];
     * state [K-1][C] holds the previous K-1 inputs, oldest first, and is advanced. */
    void (*conv1d_silu)(mf_backend *b, const float *x, float *state, const float *w,
                        int64_t n_tok, int64_t C, int K, float *out);
    /* Gated delta rule over n_tok steps. q, k [n_tok][Hk][dk] (L2-normalised, q pre-scaled),
     * v [n_tok][Hv][dv], g (log decay) and beta [n_tok][Hv]; state S [Hv][dk][dv] advanced;
     * v-head h reads k-head h / (Hv / Hk). Per step: S *= exp(g); kv = S^T k;
     * S += k (x) (beta (v - kv)); out = S^T q. out [n_tok][Hv][dv]. */
    void (*deltanet)(mf_backend *b, const float *q, const float *k, const float *v,
                     const float *g, const float *beta, float *S, int64_t n_tok, int Hk, int Hv,
                     int dk, int dv, float *out);

    /* L2 norm of q and k, the gates and deltanet in one op (mf_deltanet_step). */
    void (*deltanet_step)(mf_backend *b, const mf_deltanet_step *p);

    /* ---- elementwise and data movement ---- */
    /* y[i] += x[i], i < n */
    void (*add)(mf_backend *b, float *y, const float *x, int64_t n);
    /* dst[r][c] = src[r][c] for r < rows, c < cols, with row strides in floats */
    void (*copy_rows)(mf_backend *b, float *dst, int64_t dst_stride, const float *src,
                      int64_t src_stride, int64_t rows, int64_t cols);
    /* x[i] *= sigmoid(gate[i]) */
    void (*mul_sigmoid)(mf_backend *b, float *x, const float *gate, int64_t n);
    /* g[i] = silu(g[i]) * u[i] */
    void (*swiglu)(mf_backend *b, float *g, const float *u, int64_t n);
    /* o [rows][dim] = rmsnorm(o) * w * silu(z), z [rows][dim], w [dim] */
    void (*gated_norm)(mf_backend *b, float *o, const float *w, const float *z, int64_t rows,
                       int dim, float eps);
    /* Router: per token softmax over E logits [n_tok][E], the top K (ties to the lower id),
     * weights renormalised to sum 1 when norm. ids, w [n_tok][K]. */
    void (*router_topk)(mf_backend *b, const float *logits, int64_t n_tok, int E, int K, int norm,
                        int32_t *ids, float *w);
    /* dst[i] = src[idx[i]] (rows of cols floats), i < n */
    void (*gather_rows)(mf_backend *b, float *dst, const float *src, const int32_t *idx, int64_t n,
                        int64_t cols);
    /* out[r] = index of the largest of x[r][0 .. cols - 1] (the lowest on ties; NaN never wins), r < rows */
    void (*argmax)(mf_backend *b, const float *x, int64_t rows, int64_t cols, int32_t *out);
    /* y[idx[i]] += w[i] * src[i] (rows of cols floats), i < n; idx may repeat only across calls */
    void (*scatter_add)(mf_backend *b, float *y, const float *src, const int32_t *idx, const float *w,
                        int64_t n, int64_t cols);
    /* y[t] += sigmoid(gate[t]) * x[t] for rows t < n_tok of cols floats; gate [n_tok] */
    void (*add_gated)(mf_backend *b, float *y, const float *x, const float *gate, int64_t n_tok,
                      int64_t cols);
    /* Routed experts of a layer in one call: y[t] = sum_j w[t][j] * down_e(silu(gate_e x[t]) *
     * up_e x[t]) with e = ids[t][j], for t < n_tok, j < K. x, y [n_tok][hidden] (y is
     * overwritten); ids, w [n_tok][K] (backend memory); blobs [n_experts] (backend memory) holds
     * a backend pointer to each expert blob, and every chosen expert's entry is set. The sum over
     * j runs in j order. */
    void (*moe_experts)(mf_backend *b, const float *x, const int32_t *ids, const float *w,
                        int64_t n_tok, int K, const void *const *blobs, const mf_expert_layout *lay,
                        float *y);
    /* Page-locked host memory for buffers that feed uploads (experts) or take downloads (the
     * routing choice): NULL when unavailable;
     * the CPU returns ordinary aligned memory. */
    void *(*host_alloc)(mf_backend *b, size_t bytes);
    void (*host_free)(mf_backend *b, void *p);

    /* ---- asynchronous uploads (experts) ---- */
    /* host -> backend on a copy stream of its own, so it overlaps compute: src must stay
     * unchanged until upload_done says the ticket finished (a pageable src is copied at once, as
     * upload does, and its ticket is done on return). The copy starts after every op issued
     * before it (dst may be memory those ops still read); ops issued later see the bytes only
     * after upload_fence. Returns a ticket (0: already done). */
    uint64_t (*upload_async)(mf_backend *b, void *dst, const void *src, size_t bytes);
    /* Nonzero once the copy of ticket has finished (src may then be reused). Never blocks. */
    int (*upload_done)(mf_backend *b, uint64_t ticket);
    /* Ops issued after this see every upload_async issued before it; the host does not wait.
     * sync implies it (and waits for every upload), so does an upload from page-locked memory;
     * download and other uploads do not. */
    void (*upload_fence)(mf_backend *b);

    /* ---- a side branch of ops (NULL where the backend runs ops one by one, as on the CPU) ----
     * Ops issued between branch_begin and branch_end form a side branch that starts after every
     * op issued before branch_begin; ops issued after branch_end may run concurrently with it
     * until branch_join, after which every op sees the side branch's results. Only compute ops
     * may be issued in the side branch, and each begin needs its end and its join. */
    void (*branch_begin)(mf_backend *b);
    void (*branch_end)(mf_backend *b);
    void (*branch_join)(mf_backend *b);

    /* ---- captured op sequences (NULL where the backend has none, as on the CPU) ---- */
    /* Starts recording: the compute ops issued until graph_end are recorded, not run, with the
     * pointers and scalars they were given; memory ops, uploads and downloads must not be issued
     * meanwhile. Returns MF_OK, or a status when recording cannot start. */
    mf_status (*graph_begin)(mf_backend *b);
    /* Ends recording; returns the replayable sequence, NULL when recording failed. */
    void *(*graph_end)(mf_backend *b);
    /* Issues the recorded ops again, in order after every op issued before. */
    void (*graph_launch)(mf_backend *b, void *graph);
    void (*graph_free)(mf_backend *b, void *graph);

    /* ---- sampling on the device (NULL where the host samples, as on the CPU) ----
     * Applies a's penalties to logits [vocab] in place (backend memory), then writes to out
     * (backend memory [1]) the token the host sampler's sampler_finish would pick from them
     * with a's draw, or -1 when the cuts reach more candidates than the device sorts (the
     * caller then finishes on the host from the penalised logits). */
    void (*sample)(mf_backend *b, float *logits, int64_t vocab, const mf_sample_args *a, int32_t *out);
} mf_backend_ops;

struct mf_backend {
    const mf_backend_ops *ops;
};

/* The CPU backend; n_threads <= 0 uses every online CPU; reference != 0 selects the plain
 * scalar kernels (no SIMD, no tiling). */
mf_backend *cpu_backend_create(int n_threads, int reference);

/* The CUDA backend on device `device` (NULL when CUDA is absent from this build or the device
 * cannot be used; err says why). Built only when nvcc was found. */
mf_backend *cuda_backend_create(int device, mf_err *err);
/* Whether this build contains the CUDA backend. */
int cuda_backend_available(void);

#endif
