/* cuda_sample.cu - the sampler's draw on the GPU (penalties, temperature, top-k, top-p, min-p),
 * the same choice as the host sampler (text/sampler.c) makes for the same uniform draw, so a
 * decode step hands the host one token id in every sampling mode. Not the draw's random stream
 * (the host's) and not greedy decoding without penalties (cuda_argmax.cu).
 *
 * The passes, all on the compute stream: penalties on the listed tokens; the best logit
 * (argmax); per chunk of the vocabulary a histogram of the candidates (logits within 40
 * temperatures of the best) in buckets of logit below the best, with their weights; the last
 * chunk to finish decides from the histogram how many of the best candidates the cuts can reach,
 * and a gather pass collects just those; one block sorts them (logit descending, id ascending,
 * as the host) and applies top-k, top-p, min-p and the draw. Without a cut by rank the draw
 * walks the candidates in vocabulary order, as the host does. When the cuts reach more
 * candidates than the block sorts, the op answers -1 and the host finishes. */
#include "backend/cuda/cuda_internal.cuh"

#define SAMPLE_BUCKETS 4096
#define SAMPLE_THREADS 256
#define SAMPLE_CHUNKS 128        /* chunks of the vocabulary the passes spread over, at most */
#define SAMPLE_SORT_MAX 8192     /* candidates the final block sorts, at most */
#define SAMPLE_FINAL_THREADS 1024

enum { SAMPLE_WALK = 0, SAMPLE_SORTED = 1, SAMPLE_HOST = 2, SAMPLE_TOP = 3 };

/* Device state of one draw; zeroed before each. */
struct samp_state {
    unsigned cnt[SAMPLE_BUCKETS];
    float mass[SAMPLE_BUCKETS];
    double chunk_mass[SAMPLE_CHUNKS];
    unsigned done;        /* chunks of the histogram pass finished */
    unsigned gathered;    /* candidates the gather pass collected */
    int32_t top;          /* the best logit's index */
    int mode;             /* SAMPLE_* */
    int last_bucket;      /* the gather pass takes buckets 0 .. last_bucket */
    int n, cut;           /* candidates; those the softmax runs over (top-k) */
    double total;         /* weight of every candidate */
};

struct cb_sampler {
    samp_state *st;       /* device */
    uint64_t *keys;       /* device [SAMPLE_SORT_MAX] gathered candidates */
    int32_t *pen;         /* device [2][pen_cap]: ids, then counts */
    int pen_cap;
    int sort_max;         /* candidates the final block holds (shared memory) */
};

typedef struct samp_params {
    float temp, inv_t, top_p, min_p;
    int top_k, chunks, sort_max;
    double u;
    int64_t V, span;
} samp_params;

/* The candidate floor and the bucket scale, as the host computes them (no contraction). */
struct samp_frame {
    float best, floor_, scale;
    int ok;        /* best is finite */
    int buckets;   /* the range spreads over buckets (else every candidate falls in bucket 0) */
};

__device__ __forceinline__ samp_frame samp_frame_of(const float *logits, const samp_state *st, const samp_params &p) {
    samp_frame f;
    f.best = logits[st->top];
    f.ok = isfinite(f.best);
    f.floor_ = __fsub_rn(f.best, __fmul_rn(40.0f, p.temp));
    const float range = __fsub_rn(f.best, f.floor_);
    f.buckets = range > 0 && isfinite(range);
    f.scale = f.buckets ? (float)(SAMPLE_BUCKETS - 1) / range : 0.0f;
    return f;
}

__device__ __forceinline__ int samp_bucket(const samp_frame &f, float l) {
    if (!f.buckets) return 0;
    int b = (int)__fmul_rn(__fsub_rn(f.best, l), f.scale);
    return b < 0 ? 0 : (b >= SAMPLE_BUCKETS ? SAMPLE_BUCKETS - 1 : b);
}

__device__ __forceinline__ float samp_weight(const samp_frame &f, float l, float inv_t) {
    return expf(__fmul_rn(__fsub_rn(l, f.best), inv_t));
}

/* Sort key: ascending keys are logits descending, then ids ascending (-0 counts as 0). */
__device__ __forceinline__ uint64_t samp_key(float l, int64_t i) {
    unsigned b = l == 0.0f ? 0u : __float_as_uint(l);
    unsigned o = (b & 0x80000000u) ? ~b : (b | 0x80000000u); /* ascending with l */
    return ((uint64_t)(~o) << 32) | (uint64_t)(uint32_t)i;
}
__device__ __forceinline__ float samp_key_logit(uint64_t k) {
    unsigned o = ~(unsigned)(k >> 32);
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
__device__ __forceinline__ int32_t samp_key_id(uint64_t k) { return (int32_t)(uint32_t)k; }

/* Exclusive prefix sum over the block (blockDim.x a multiple of 32); *total gets the sum.
 * sh: __shared__ T [32]. */
template <typename T>
__device__ __forceinline__ T samp_scan(T v, T *sh, T *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    T inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        T y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
    }
    __syncthreads();
    if (lane == 31) sh[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        T w = lane < nw ? sh[lane] : (T)0;
        for (int o = 1; o < 32; o <<= 1) {
            T y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        if (lane < nw) sh[lane] = w; /* inclusive over warps */
    }
    __syncthreads();
    *total = sh[nw - 1];
    return inc - v + (warp ? sh[warp - 1] : (T)0);
}

__global__ void samp_penalty_kernel(float *logits, const int32_t *id, const int32_t *count, int n, float rep,
                                    float presence, float frequency) {
    cb_pdl_trigger();
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n) return;
    float l = logits[id[k]];
    if (rep != 1.0f) l = l > 0 ? __fdiv_rn(l, rep) : __fmul_rn(l, rep);
    l = __fsub_rn(l, __fadd_rn(presence, __fmul_rn(frequency, (float)count[k])));
    logits[id[k]] = l;
}

/* Histogram of one chunk's candidates; the last chunk done picks the mode and the buckets the
 * cuts can reach. */
__global__ void __launch_bounds__(SAMPLE_THREADS)
samp_hist_kernel(const float *__restrict__ logits, samp_params p, samp_state *st) {
    cb_pdl_trigger();
    __shared__ unsigned cnt[SAMPLE_BUCKETS];
    __shared__ float mass[SAMPLE_BUCKETS];
    __shared__ double dsh[32];
    __shared__ unsigned ush[32];
    __shared__ float fsh[32];
    __shared__ int found_k, found_p, L_sh;
    __shared__ bool last;
    for (int b = threadIdx.x; b < SAMPLE_BUCKETS; b += blockDim.x) cnt[b] = 0, mass[b] = 0.0f;
    __syncthreads();
    const samp_frame f = samp_frame_of(logits, st, p);
    const int64_t begin = (int64_t)blockIdx.x * p.span, end = begin + p.span < p.V ? begin + p.span : p.V;
    double sum = 0;
    if (f.ok)
        for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
            const float l = logits[i];
            if (l >= f.floor_) {
                const float w = samp_weight(f, l, p.inv_t);
                const int b = samp_bucket(f, l);
                atomicAdd(&cnt[b], 1u);
                atomicAdd(&mass[b], w);
                sum += (double)w;
            }
        }
    double tot;
    samp_scan(sum, dsh, &tot);
    for (int b = threadIdx.x; b < SAMPLE_BUCKETS; b += blockDim.x)
        if (cnt[b]) {
            atomicAdd(&st->cnt[b], cnt[b]);
            atomicAdd(&st->mass[b], mass[b]);
        }
    if (threadIdx.x == 0) {
        st->chunk_mass[blockIdx.x] = tot;
        __threadfence();
        last = atomicAdd(&st->done, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    /* the last chunk: every bucket in order, SAMPLE_BUCKETS / blockDim.x consecutive per thread */
    const int per = SAMPLE_BUCKETS / blockDim.x, b0 = threadIdx.x * per;
    unsigned my_n = 0;
    float my_m = 0;
    for (int b = b0; b < b0 + per; b++) {
        my_n += __ldcg(&st->cnt[b]);
        my_m += __ldcg(&st->mass[b]);
    }
    unsigned n_all;
    float m_all;
    const unsigned n_before = samp_scan(my_n, ush, &n_all);
    const float m_before = samp_scan(my_m, fsh, &m_all);
    const int n = (int)n_all;
    const int cut = p.top_k > 0 && p.top_k < n ? p.top_k : n;
    int mode;
    if (!f.ok) mode = SAMPLE_TOP;
    else if (cut == n && p.top_p >= 1.0f && p.min_p <= 0.0f) mode = SAMPLE_WALK;
    else mode = SAMPLE_SORTED;
    if (threadIdx.x == 0) found_k = found_p = SAMPLE_BUCKETS - 1;
    __syncthreads();
    /* top-k: the bucket where the count reaches cut; top-p: where the weight reaches top_p of
     * the whole (with a margin for the float sums), one bucket more */
    const float m_goal = (p.top_p + 1e-4f < 1.0f ? p.top_p + 1e-4f : 1.0f) * m_all;
    unsigned cn = n_before;
    float cm = m_before;
    for (int b = b0; b < b0 + per; b++) {
        cn += __ldcg(&st->cnt[b]);
        cm += __ldcg(&st->mass[b]);
        if (cn >= (unsigned)cut) atomicMin(&found_k, b);
        if (p.top_p < 1.0f && cm >= m_goal) atomicMin(&found_p, b + 1 < SAMPLE_BUCKETS ? b + 1 : b);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int L = SAMPLE_BUCKETS - 1;
        if (!f.buckets) L = 0;
        else if (cut < n) L = found_k;
        else {
            if (p.top_p < 1.0f) L = found_p;
            if (p.min_p > 0.0f) {
                /* tokens at or above min_p of the best lie within -T ln(min_p) of its logit */
                const float reach = -p.temp * logf(p.min_p) * f.scale;
                if (reach < (float)(SAMPLE_BUCKETS - 3)) {
                    const int Lm = (int)reach + 2;
                    if (Lm < L) L = Lm;
                }
            }
        }
        L_sh = L;
        st->n = n;
        st->cut = cut;
        st->last_bucket = L;
        double total = 0;
        for (int c = 0; c < (int)gridDim.x; c++) total += __ldcg(&st->chunk_mass[c]);
        st->total = total;
    }
    __syncthreads();
    /* more to gather than the final block sorts: the host finishes */
    const int L = L_sh;
    if (L >= b0 && L < b0 + per) {
        unsigned c2 = n_before;
        for (int b = b0; b <= L; b++) c2 += __ldcg(&st->cnt[b]);
        if (mode == SAMPLE_SORTED && c2 > (unsigned)p.sort_max) mode = SAMPLE_HOST;
        st->mode = mode;
    }
}

/* Collects the candidates in buckets 0 .. last_bucket as sort keys. */
__global__ void __launch_bounds__(SAMPLE_THREADS)
samp_gather_kernel(const float *__restrict__ logits, samp_params p, samp_state *st, uint64_t *keys, int cap) {
    cb_pdl_trigger();
    if (st->mode != SAMPLE_SORTED) return;
    const samp_frame f = samp_frame_of(logits, st, p);
    const int L = st->last_bucket;
    const int64_t begin = (int64_t)blockIdx.x * p.span, end = begin + p.span < p.V ? begin + p.span : p.V;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float l = logits[i];
        if (l >= f.floor_ && samp_bucket(f, l) <= L) {
            const unsigned k = atomicAdd(&st->gathered, 1u);
            if (k < (unsigned)cap) keys[k] = samp_key(l, i);
        }
    }
}

/* The first index i in [0, n) whose running sum of w (in index order, from base) passes r
 * (strictly, `above`) or reaches it; n when none. The block's threads each take `per`
 * consecutive entries. sh: __shared__ double [32]; pick: __shared__ int. */
__device__ int samp_first_crossing(const float *w, int n, double base, double r, int above, double *sh, int *pick) {
    const int per = (n + blockDim.x - 1) / blockDim.x, i0 = threadIdx.x * per;
    const int i1 = i0 + per < n ? i0 + per : n;
    double mine = 0;
    for (int i = i0; i < i1; i++) mine += (double)w[i];
    double tot;
    double c = base + samp_scan(mine, sh, &tot);
    if (threadIdx.x == 0) *pick = n;
    __syncthreads();
    for (int i = i0; i < i1; i++) {
        c += (double)w[i];
        if (above ? r < c : c >= r) {
            atomicMin(pick, i);
            break;
        }
    }
    __syncthreads();
    const int at = *pick;
    __syncthreads(); /* before anyone reuses pick */
    return at;
}

/* One block: the draw. Shared memory: keys [sort_max], weights [sort_max]. */
__global__ void __launch_bounds__(SAMPLE_FINAL_THREADS)
samp_final_kernel(const float *__restrict__ logits, samp_params p, samp_state *st, const uint64_t *keys, int sort_max,
                  int32_t *out) {
    cb_pdl_trigger();
    extern __shared__ uint64_t smem[];
    uint64_t *key = smem;
    float *w = (float *)(smem + sort_max);
    __shared__ double dsh[32];
    __shared__ int pick, chunk;
    __shared__ double base_sh;
    const samp_frame f = samp_frame_of(logits, st, p);
    const int mode = st->mode;
    if (mode == SAMPLE_TOP || mode == SAMPLE_HOST) {
        if (threadIdx.x == 0) out[0] = mode == SAMPLE_TOP ? st->top : -1;
        return;
    }
    if (mode == SAMPLE_WALK) {
        /* every candidate in vocabulary order: find the chunk, then walk it in tiles */
        const double r = p.u * st->total;
        if (threadIdx.x == 0) {
            double c = 0;
            int j = 0;
            for (; j < p.chunks - 1; j++) {
                if (r < c + st->chunk_mass[j]) break;
                c += st->chunk_mass[j];
            }
            chunk = j;
            base_sh = c;
        }
        __syncthreads();
        double base = base_sh;
        const int tile = sort_max;
        for (int64_t t0 = (int64_t)chunk * p.span; t0 < p.V; t0 += tile) {
            const int len = p.V - t0 < tile ? (int)(p.V - t0) : tile;
            for (int i = threadIdx.x; i < len; i += blockDim.x) {
                const float l = logits[t0 + i];
                w[i] = l >= f.floor_ ? samp_weight(f, l, p.inv_t) : 0.0f;
            }
            __syncthreads();
            const int at = samp_first_crossing(w, len, base, r, 1, dsh, &pick);
            if (at < len) {
                if (threadIdx.x == 0) out[0] = (int32_t)(t0 + at);
                return;
            }
            double tot = 0;
            for (int i = threadIdx.x; i < len; i += blockDim.x) tot += (double)w[i];
            samp_scan(tot, dsh, &tot);
            base += tot;
            __syncthreads();
        }
        /* past the end (rounding): the last candidate, as the host */
        int lastc = -1;
        for (int64_t i = threadIdx.x; i < p.V; i += blockDim.x)
            if (logits[i] >= f.floor_) lastc = (int)i;
        if (threadIdx.x == 0) pick = -1;
        __syncthreads();
        atomicMax(&pick, lastc);
        __syncthreads();
        if (threadIdx.x == 0) out[0] = pick >= 0 ? pick : st->top;
        return;
    }
    /* SAMPLE_SORTED: the gathered candidates, sorted */
    const int G = (int)st->gathered;
    if (G > sort_max) {
        if (threadIdx.x == 0) out[0] = -1;
        return;
    }
    int P = 1;
    while (P < G) P <<= 1;
    for (int i = threadIdx.x; i < P; i += blockDim.x) key[i] = i < G ? keys[i] : ~0ull;
    __syncthreads();
    for (int k = 2; k <= P; k <<= 1)
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < P; i += blockDim.x) {
                const int o = i ^ j;
                if (o > i) {
                    const uint64_t a = key[i], b = key[o];
                    if (((i & k) == 0) == (a > b)) key[i] = b, key[o] = a;
                }
            }
            __syncthreads();
        }
    const int n = st->n, cut = st->cut;
    const int m = cut < n && cut < G ? cut : G; /* the top-k (all gathered), or every gathered one */
    for (int i = threadIdx.x; i < m; i += blockDim.x) w[i] = samp_weight(f, samp_key_logit(key[i]), p.inv_t);
    __syncthreads();
    double sum;
    if (cut < n) {
        double mine = 0;
        for (int i = threadIdx.x; i < m; i += blockDim.x) mine += (double)w[i];
        samp_scan(mine, dsh, &sum);
    } else {
        sum = st->total;
    }
    int keep = m;
    if (p.top_p >= 1.0f && p.min_p <= 0.0f) {
        /* top-k alone: the draw over the weights in rank order */
        const int at = samp_first_crossing(w, m, 0.0, p.u * sum, 1, dsh, &pick);
        if (threadIdx.x == 0) out[0] = samp_key_id(key[at < m ? at : m - 1]);
        return;
    }
    for (int i = threadIdx.x; i < m; i += blockDim.x) w[i] = (float)((double)w[i] / sum);
    __syncthreads();
    if (p.top_p < 1.0f) {
        const int at = samp_first_crossing(w, m, 0.0, (double)p.top_p, 0, dsh, &pick);
        if (at < m) keep = at + 1;
    }
    if (p.min_p > 0.0f) {
        const float thr = __fmul_rn(p.min_p, w[0]);
        if (threadIdx.x == 0) pick = keep;
        __syncthreads();
        for (int i = 1 + threadIdx.x; i < keep; i += blockDim.x)
            if (w[i] < thr) atomicMin(&pick, i);
        __syncthreads();
        keep = pick;
        __syncthreads();
    }
    double total = 0;
    {
        double mine = 0;
        for (int i = threadIdx.x; i < keep; i += blockDim.x) mine += (double)w[i];
        samp_scan(mine, dsh, &total);
    }
    const int at = samp_first_crossing(w, keep, 0.0, p.u * total, 1, dsh, &pick);
    if (threadIdx.x == 0) out[0] = samp_key_id(key[at < keep ? at : keep - 1]);
}

static cb_sampler *samp_get(cuda_backend *c) {
    if (c->samp) return c->samp;
    cb_sampler *s = (cb_sampler *)calloc(1, sizeof *s);
    if (!s) {
        cb_fail(c, "sample: out of host memory");
        return NULL;
    }
    int sort_max = SAMPLE_SORT_MAX;
    while (sort_max > 256 && (size_t)sort_max * 12 + 2048 > (size_t)c->smem_optin) sort_max >>= 1;
    s->sort_max = sort_max;
    c->samp = s;
    if (cb_check(c, cudaMalloc((void **)&s->st, sizeof(samp_state)), "sample: state") ||
        cb_check(c, cudaMalloc((void **)&s->keys, sizeof(uint64_t) * SAMPLE_SORT_MAX), "sample: keys") ||
        cb_check(c, cudaFuncSetAttribute(samp_final_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         sort_max * 12), "sample: shared memory"))
        return NULL;
    return s;
}

void cuda_sample_free(cuda_backend *c) {
    if (!c->samp) return;
    cudaFree(c->samp->st);
    cudaFree(c->samp->keys);
    cudaFree(c->samp->pen);
    free(c->samp);
    c->samp = NULL;
}

void cuda_op_sample(mf_backend *b, float *logits, int64_t vocab, const mf_sample_args *a, int32_t *out) {
    cuda_backend *c = cb_of(b);
    if (c->failed) return;
    if (vocab < 1 || vocab > INT32_MAX) {
        cb_fail(c, "sample: vocabulary of %lld not supported", (long long)vocab);
        return;
    }
    cb_sampler *s = samp_get(c);
    if (!s) return;
    if (a->n_pen > 0) {
        if (a->n_pen > s->pen_cap) {
            cudaFree(s->pen);
            s->pen = NULL;
            s->pen_cap = 0;
            if (cb_check(c, cudaMalloc((void **)&s->pen, sizeof(int32_t) * 2 * (size_t)a->n_pen), "sample: penalties"))
                return;
            s->pen_cap = a->n_pen;
        }
        b->ops->upload(b, s->pen, a->pen_id, sizeof(int32_t) * (size_t)a->n_pen);
        b->ops->upload(b, s->pen + s->pen_cap, a->pen_count, sizeof(int32_t) * (size_t)a->n_pen);
        samp_penalty_kernel<<<cb_blocks(a->n_pen, 256, 1 << 20), 256, 0, c->stream>>>(
            logits, s->pen, s->pen + s->pen_cap, a->n_pen, a->repetition, a->presence, a->frequency);
        if (CB_LAUNCHED(c, "sample: penalties")) return;
    }
    if (a->temperature <= 0) {
        cuda_op_argmax(b, logits, 1, vocab, out);
        return;
    }
    if (cb_check(c, cudaMemsetAsync(s->st, 0, sizeof(samp_state), c->stream), "sample: reset")) return;
    cuda_op_argmax(b, logits, 1, vocab, &s->st->top);
    samp_params p;
    p.temp = a->temperature;
    p.inv_t = a->inv_temperature;
    p.top_p = a->top_p;
    p.min_p = a->min_p;
    p.top_k = a->top_k;
    p.u = a->u;
    p.sort_max = s->sort_max;
    p.V = vocab;
    int64_t chunks = (vocab + 2047) / 2048;
    if (chunks > SAMPLE_CHUNKS) chunks = SAMPLE_CHUNKS;
    p.span = (vocab + chunks - 1) / chunks;
    p.chunks = (int)((vocab + p.span - 1) / p.span);
    samp_hist_kernel<<<p.chunks, SAMPLE_THREADS, 0, c->stream>>>(logits, p, s->st);
    samp_gather_kernel<<<p.chunks, SAMPLE_THREADS, 0, c->stream>>>(logits, p, s->st, s->keys, s->sort_max);
    samp_final_kernel<<<1, SAMPLE_FINAL_THREADS, (size_t)s->sort_max * 12, c->stream>>>(logits, p, s->st, s->keys,
                                                                                          s->sort_max, out);
    CB_LAUNCHED(c, "sample");
}
