/* sampler.c - penalties, temperature, top-k, top-p and min-p over one logits vector, then a
 * draw from a seeded xoshiro256** stream. Not a beam search. */
#include "text/sampler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct cand {
    float logit;
    int32_t id;
} cand;

struct sampler {
    mf_sampler_params p;
    int vocab;
    uint64_t rng[4];
    cand *c;           /* [vocab] candidates, sorted by logit */
    float *prob;       /* [vocab] */
    int32_t *count;    /* [vocab] occurrences within the penalty window (0 between calls) */
    int32_t *pen_id;   /* [vocab] distinct tokens of the window, in order of first occurrence */
    int32_t *pen_count;/* [vocab] their counts */
};

void mf_sampler_params_init(mf_sampler_params *p) {
    memset(p, 0, sizeof *p);
    p->top_p = 1.0f;
    p->repetition_penalty = 1.0f;
}

mf_status mf_sampler_params_check(const mf_sampler_params *p, char *err, size_t errlen) {
    const char *bad = NULL;
    if (!(p->temperature >= 0 && p->temperature <= 100)) bad = "temperature must be in [0, 100]";
    else if (p->top_k < 0) bad = "top-k must be >= 0";
    else if (!(p->top_p > 0 && p->top_p <= 1)) bad = "top-p must be in (0, 1]";
    else if (!(p->min_p >= 0 && p->min_p < 1)) bad = "min-p must be in [0, 1)";
    else if (!(p->repetition_penalty > 0 && p->repetition_penalty <= 100)) bad = "repetition penalty must be in (0, 100]";
    else if (!(fabsf(p->presence_penalty) <= 100)) bad = "presence penalty must be in [-100, 100]";
    else if (!(fabsf(p->frequency_penalty) <= 100)) bad = "frequency penalty must be in [-100, 100]";
    else if (p->penalty_last_n < 0) bad = "penalty window must be >= 0";
    if (bad) {
        if (err && errlen) snprintf(err, errlen, "%s", bad);
        return MF_ERR_ARG;
    }
    return MF_OK;
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_u64(uint64_t s[4]) {
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

static double next_unit(uint64_t s[4]) { return (double)(next_u64(s) >> 11) * 0x1.0p-53; }

sampler *sampler_new(const mf_sampler_params *p, int vocab) {
    sampler *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->p = *p;
    s->vocab = vocab;
    s->c = malloc(sizeof(cand) * (size_t)vocab);
    s->prob = malloc(sizeof(float) * (size_t)vocab);
    s->count = calloc((size_t)vocab, sizeof(int32_t));
    s->pen_id = malloc(sizeof(int32_t) * (size_t)vocab);
    s->pen_count = malloc(sizeof(int32_t) * (size_t)vocab);
    if (!s->c || !s->prob || !s->count || !s->pen_id || !s->pen_count) {
        sampler_free(s);
        return NULL;
    }
    uint64_t z = p->seed;
    for (int i = 0; i < 4; i++) { /* splitmix64 seeding */
        z += 0x9e3779b97f4a7c15ull;
        uint64_t x = z;
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
        s->rng[i] = x ^ (x >> 31);
    }
    return s;
}

void sampler_free(sampler *s) {
    if (!s) return;
    free(s->c);
    free(s->prob);
    free(s->count);
    free(s->pen_id);
    free(s->pen_count);
    free(s);
}

static int by_logit_desc(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->logit != y->logit) return x->logit < y->logit ? 1 : -1;
    return x->id - y->id;
}

#define SORT_BUCKETS 4096

/* Sorts at least the m best of the n candidates (by_logit_desc) to the front and returns how
 * many it sorted: the candidates fall into buckets of logit below best (one pass), the top
 * buckets that hold m of them move to the front (a second pass) and only those are sorted. */
static int sort_best(cand *c, int n, int m, float best, float floor_) {
    const float range = best - floor_;
    if (m >= n || !(range > 0) || !isfinite(range)) { /* (infinite logits: no buckets) */
        qsort(c, (size_t)n, sizeof(cand), by_logit_desc);
        return n;
    }
    static _Thread_local int hist[SORT_BUCKETS];
    memset(hist, 0, sizeof hist);
    const float scale = (float)(SORT_BUCKETS - 1) / range; /* every candidate lies in [floor_, best] */
#define BUCKET(l) ((int)((best - (l)) * scale))
    for (int i = 0; i < n; i++) hist[BUCKET(c[i].logit)]++;
    int have = 0, last = 0;
    while (have + hist[last] < m) have += hist[last++];
    int k = 0;
    for (int i = 0; i < n; i++)
        if (BUCKET(c[i].logit) <= last) {
            cand t = c[k];
            c[k++] = c[i];
            c[i] = t;
        }
#undef BUCKET
    qsort(c, (size_t)k, sizeof(cand), by_logit_desc);
    return k;
}

/* The first largest value's index; NaNs never win (all NaN: 0). */
static int32_t argmax(const float *v, int n) {
    int32_t b = 0;
    while (b < n && v[b] != v[b]) b++;
    if (b == n) return 0;
    for (int i = b + 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

int sampler_vocab(const sampler *s) { return s->vocab; }

void sampler_prepare(sampler *s, const int32_t *history, int n_history, mf_sample_args *a) {
    const mf_sampler_params *p = &s->p;
    int V = s->vocab;
    memset(a, 0, sizeof *a);
    a->temperature = p->temperature;
    a->inv_temperature = p->temperature > 0 ? 1.0f / p->temperature : 0;
    a->top_k = p->top_k;
    a->top_p = p->top_p;
    a->min_p = p->min_p;
    a->repetition = p->repetition_penalty;
    a->presence = p->presence_penalty;
    a->frequency = p->frequency_penalty;
    a->pen_id = s->pen_id;
    a->pen_count = s->pen_count;
    /* the window's distinct tokens and their counts */
    if (p->repetition_penalty != 1.0f || p->presence_penalty != 0 || p->frequency_penalty != 0) {
        int from = (p->penalty_last_n > 0 && n_history > p->penalty_last_n) ? n_history - p->penalty_last_n : 0;
        for (int i = from; i < n_history; i++) {
            int32_t t = history[i];
            if (t >= 0 && t < V && s->count[t]++ == 0) s->pen_id[a->n_pen++] = t;
        }
        for (int k = 0; k < a->n_pen; k++) {
            s->pen_count[k] = s->count[s->pen_id[k]];
            s->count[s->pen_id[k]] = 0;
        }
    }
    if (p->temperature > 0) a->u = next_unit(s->rng);
}

int32_t sampler_sample(sampler *s, float *logits, const int32_t *history, int n_history) {
    mf_sample_args a;
    sampler_prepare(s, history, n_history, &a);
    return sampler_finish(s, logits, &a, 0);
}

int32_t sampler_finish(sampler *s, float *logits, const mf_sample_args *a, int penalised) {
    const mf_sampler_params *p = &s->p;
    int V = s->vocab;
    if (!penalised)
        for (int k = 0; k < a->n_pen; k++) {
            float l = logits[a->pen_id[k]];
            if (a->repetition != 1.0f) l = l > 0 ? l / a->repetition : l * a->repetition;
            l -= a->presence + a->frequency * (float)a->pen_count[k];
            logits[a->pen_id[k]] = l;
        }
    if (p->temperature <= 0) return argmax(logits, V);
    /* candidates: tokens within 40 temperatures of the best logit (the rest weigh under e^-40
     * of it); only the best ones are ever sorted (top-k, then as far as top-p and min-p reach) */
    const int32_t top = argmax(logits, V);
    const float best = logits[top], floor_ = best - 40.0f * p->temperature;
    if (!isfinite(best)) return top; /* +inf takes all the mass; -inf or NaN everywhere: nothing to weigh */
    const float inv_t = a->inv_temperature;
    int n = 0;
    for (int i = 0; i < V; i++)
        if (logits[i] >= floor_) s->c[n++] = (cand){logits[i], i};
    int cut = p->top_k > 0 && p->top_k < n ? p->top_k : n; /* the softmax runs over these */
    int sorted = 0;                                        /* c[0 .. sorted) is in rank order */
    if (cut < n) sorted = sort_best(s->c, n, cut, best, floor_);
    double sum = 0;
    for (int i = 0; i < cut; i++) sum += expf((s->c[i].logit - best) * inv_t);
    if (p->top_p >= 1.0f && p->min_p <= 0) {
        /* no cut by rank: one draw over the candidates in any fixed order */
        double r = a->u * sum, c = 0;
        for (int i = 0; i < cut; i++) {
            c += expf((s->c[i].logit - best) * inv_t);
            if (r < c) return s->c[i].id;
        }
        return s->c[cut - 1].id;
    }
    /* sort a prefix long enough for top-p and min-p to end inside it */
    int m = cut < 256 ? cut : 256;
    for (;;) {
        if (sorted < m) sorted = sort_best(s->c, cut, m, best, floor_);
        if (sorted > cut) sorted = cut;
        m = sorted; /* every sorted one is in rank order: use them all */
        for (int i = 0; i < m; i++) s->prob[i] = (float)(expf((s->c[i].logit - best) * inv_t) / sum);
        if (m == cut) break;
        double c = 0;
        int reached = p->top_p >= 1.0f;
        for (int i = 0; i < m && !reached; i++) reached = (c += s->prob[i]) >= p->top_p;
        if (reached && (p->min_p <= 0 || s->prob[m - 1] < p->min_p * s->prob[0])) break;
        m = cut - m < 3 * m ? cut : 4 * m;
    }
    n = m;
    if (p->top_p < 1.0f) {
        double c = 0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            c += s->prob[i];
            if (c >= p->top_p) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
    }
    if (p->min_p > 0) {
        float thr = p->min_p * s->prob[0];
        int keep = 1;
        while (keep < n && s->prob[keep] >= thr) keep++;
        n = keep;
    }
    double total = 0;
    for (int i = 0; i < n; i++) total += s->prob[i];
    double r = a->u * total, c = 0;
    for (int i = 0; i < n; i++) {
        c += s->prob[i];
        if (r < c) return s->c[i].id;
    }
    return s->c[n - 1].id;
}
