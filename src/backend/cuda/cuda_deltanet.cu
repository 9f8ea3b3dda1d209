/* cuda_deltanet.cu - the gated delta rule, recurrent form, on the GPU: the state S of a v-head
 * lives in registers for all n_tok steps, read and written once per call. Columns of S are
 * independent, so a block owns one v-head's slice of columns. deltanet_step also normalises q
 * and k and computes the gates inside the same kernel. Not the chunked prefill form. */
#include "backend/cuda/cuda_internal.cuh"

#define DN_MAX_ROWS 32   /* rows of S per thread */
#define DN_THREADS 128
#define DN_PREFETCH 4    /* q/k values per thread staged for the next step: dk <= 256 */

/* Block (column slice, v-head h): thread (column c, part p) of R parts holds rows p, p + R, ...
 * of column c of S [Hv][dk][dv]; the R parts of a column are adjacent lanes, so sums over rows
 * meet by shuffles. Per step: S *= exp(g); kv = S^T k; u = beta (v - kv); S += k (x) u;
 * out = S^T q. q, k [n_tok][Hk][dk]; v, out [n_tok][Hv][dv]; g, beta [n_tok][Hv]. q and k of
 * the step go through shared memory, double buffered. */
/* Raw inputs of deltanet_step: q, k not yet normalised, the gates from a, bb. NULL a: the
 * deltanet op (q, k normalised and g, beta given). */
struct dn_raw {
    const float *a, *bb, *A_log, *dt_bias;
    float q_scale;
};

__global__ void __launch_bounds__(DN_THREADS)
deltanet_kernel(const float *__restrict__ q, const float *__restrict__ k, const float *__restrict__ v,
                const float *__restrict__ g, const float *__restrict__ beta, float *__restrict__ S, int64_t n_tok,
                int Hk, int Hv, int dk, int dv, int R, int cols_per_block, dn_raw raw, int early,
                float *__restrict__ out) {
    if (!early) cb_pdl_wait();
    extern __shared__ float qk[]; /* [2][2][dk]: buffer, (q | k), row */
    const int h = blockIdx.y, kh = h / (Hv / Hk);
    const int p = threadIdx.x % R, c = blockIdx.x * cols_per_block + threadIdx.x / R;
    const bool col_ok = threadIdx.x / R < cols_per_block && c < dv;
    const int nr = (dk + R - 1) / R;
    float *Sh = S + (int64_t)h * dk * dv;
    float s[DN_MAX_ROWS];
#pragma unroll
    for (int i = 0; i < DN_MAX_ROWS; i++) {
        const int r = i * R + p;
        s[i] = col_ok && i < nr && r < dk ? Sh[(int64_t)r * dv + c] : 0.0f;
    }
    const float neg_A = raw.a ? -expf(raw.A_log[h]) : 0.0f, dtb = raw.a ? raw.dt_bias[h] : 0.0f;
    /* launched dependent: the weights were readable above, and the state where early (the op
     * before did not write it); q, k, v and the gates (the outputs of the ops before) only from here */
    cb_pdl_enter();
    /* stage step 0 */
    for (int i = threadIdx.x; i < 2 * dk; i += blockDim.x)
        qk[i] = i < dk ? q[(int64_t)kh * dk + i] : k[(int64_t)kh * dk + i - dk];
    __syncthreads();
    for (int64_t t = 0; t < n_tok; t++) {
        float *qs = qk + (t & 1) * 2 * dk, *ks = qs + dk;
        /* the step's own loads first, so that they are in flight across the barriers below */
        const float vc = col_ok ? v[(t * Hv + h) * dv + c] : 0.0f;
        const float ga = raw.a ? raw.a[t * Hv + h] : g[t * Hv + h];
        const float gb = raw.a ? raw.bb[t * Hv + h] : beta[t * Hv + h];
        /* fetch the next step's q and k while this one computes */
        float nq[DN_PREFETCH];
#pragma unroll
        for (int j = 0; j < DN_PREFETCH; j++) {
            const int li = threadIdx.x + j * DN_THREADS;
            nq[j] = 0.0f;
            if (t + 1 < n_tok && li < 2 * dk)
                nq[j] = li < dk ? q[((t + 1) * Hk + kh) * dk + li] : k[((t + 1) * Hk + kh) * dk + li - dk];
        }
        float decay, bt;
        if (raw.a) {
            /* the step's q and k L2-normalised (every warp sums the staged rows itself, then the
             * rows are scaled in place) and the gates, as mf_deltanet_step states them */
            const int lane = threadIdx.x & 31;
            float sq = 0.0f, sk = 0.0f;
            for (int i = lane; i < dk; i += 32) {
                sq = fmaf(qs[i], qs[i], sq);
                sk = fmaf(ks[i], ks[i], sk);
            }
            sq = cb_warp_sum(sq);
            sk = cb_warp_sum(sk);
            const float qn = (float)(1.0 / sqrt((double)sq + 1e-6)) * raw.q_scale;
            const float kn = (float)(1.0 / sqrt((double)sk + 1e-6));
            __syncthreads(); /* every warp has read the raw rows */
            for (int i = threadIdx.x; i < dk; i += blockDim.x) {
                qs[i] *= qn;
                ks[i] *= kn;
            }
            __syncthreads();
            const float sp = ga + dtb;
            bt = cb_sigmoid(gb);
            decay = expf(neg_A * (sp > 20.0f ? sp : log1pf(expf(sp))));
        } else {
            decay = expf(ga);
            bt = gb;
        }
        float kv = 0.0f;
#pragma unroll
        for (int i = 0; i < DN_MAX_ROWS; i++) {
            const int r = i * R + p;
            if (i < nr && r < dk) {
                s[i] *= decay;
                kv = fmaf(s[i], ks[r], kv);
            }
        }
        for (int o = 1; o < R; o <<= 1) kv += __shfl_xor_sync(0xffffffffu, kv, o);
        const float u = (vc - kv) * bt;
        float o_ = 0.0f;
#pragma unroll
        for (int i = 0; i < DN_MAX_ROWS; i++) {
            const int r = i * R + p;
            if (i < nr && r < dk) {
                s[i] = fmaf(ks[r], u, s[i]);
                o_ = fmaf(s[i], qs[r], o_);
            }
        }
        for (int o = 1; o < R; o <<= 1) o_ += __shfl_xor_sync(0xffffffffu, o_, o);
        if (col_ok && p == 0) out[(t * Hv + h) * dv + c] = o_;
#pragma unroll
        for (int j = 0; j < DN_PREFETCH; j++) {
            const int li = threadIdx.x + j * DN_THREADS;
            if (t + 1 < n_tok && li < 2 * dk) qk[((t + 1) & 1) * 2 * dk + li] = nq[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < DN_MAX_ROWS; i++) {
        const int r = i * R + p;
        if (col_ok && i < nr && r < dk) Sh[(int64_t)r * dv + c] = s[i];
    }
}

static void deltanet_launch(mf_backend *b, const float *q, const float *k, const float *v, const float *g,
                            const float *beta, float *S, int64_t n_tok, int Hk, int Hv, int dk, int dv, dn_raw raw,
                            float *out) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n_tok <= 0 || Hv <= 0) return;
    int R = 1; /* the fewest parts a column (measured: more, smaller blocks are slower, also at one token) */
    while (R < 32 && (dk + R - 1) / R > DN_MAX_ROWS) R <<= 1;
    if (dk <= 0 || dv <= 0 || Hk <= 0 || Hv % Hk || (dk + R - 1) / R > DN_MAX_ROWS || 2 * dk > DN_THREADS * DN_PREFETCH ||
        Hv > 65535) {
        cb_fail(c, "deltanet: Hk %d Hv %d dk %d dv %d not supported", Hk, Hv, dk, dv);
        return;
    }
    const int cols_per_block = DN_THREADS / R;
    dim3 grid((unsigned)((dv + cols_per_block - 1) / cols_per_block), (unsigned)Hv);
    cb_launch_dependent(c, deltanet_kernel, grid, dim3(DN_THREADS), 4 * dk * sizeof(float), q, k, v, g, beta, S, n_tok,
                        Hk, Hv, dk, dv, R, cols_per_block, raw, (int)(c->state_written != S), out);
    CB_LAUNCHED(c, "deltanet");
    c->state_written = S;
}

void cuda_op_deltanet(mf_backend *b, const float *q, const float *k, const float *v, const float *g,
                      const float *beta, float *S, int64_t n_tok, int Hk, int Hv, int dk, int dv, float *out) {
    const dn_raw none = {NULL, NULL, NULL, NULL, 1.0f};
    deltanet_launch(b, q, k, v, g, beta, S, n_tok, Hk, Hv, dk, dv, none, out);
}

/* The norms and gates are folded into the recurrence (one launch); q, k, g, beta are untouched. */
void cuda_op_deltanet_step(mf_backend *b, const mf_deltanet_step *p) {
    const dn_raw raw = {p->a, p->bb, p->A_log, p->dt_bias, p->q_scale};
    deltanet_launch(b, p->q, p->k, p->v, NULL, NULL, p->S, p->n_tok, p->Hk, p->Hv, p->dk, p->dv, raw, p->out);
}
