/* synth.c - `moeflux synth`: a .moeflux file of a built-in shape filled with seeded random
 * weights scaled so activations stay sane, generated in parallel blocks and written at about
 * disk speed. Not a converter (format/convert.c): nothing is read, and no value means anything. */
#include "format/synth.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "core/threadpool.h"
#include "format/quant.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define SYNTH_HOST_LE 0
#else
#define SYNTH_HOST_LE 1 /* the file is little-endian: fast paths store host words as they are */
#endif

#define SYNTH_CHUNK (4u << 20) /* bytes generated and written per job (a multiple of MFPACK_ALIGN) */

/* ---- shapes ---- */

typedef struct synth_shape {
    const char *name, *model_type;
    mf_arch arch;
    int layers, hidden, vocab, max_pos;
    int heads, kv_heads, head_dim;
    double rope_theta;
    int lin_k_heads, lin_v_heads, lin_k_dim, lin_v_dim;   /* hybrids only */
    int experts, top_k, moe_inter, shared_inter, dense_inter;
} synth_shape;

/* Real shapes from the released configs (docs: REFERENCE.md section 2); tiny ones equal the
 * configs of tests/fixtures/{qwen3_5_moe_text, qwen3_next, qwen3_moe_experts}, except that
 * every synthetic model keeps a separate lm_head (tie_word_embeddings false). */
static const synth_shape shapes[] = {
    /* name, model_type, arch, layers, hidden, vocab, max_pos, heads, kv, head_dim, theta,
     * lin k heads, lin v heads, lin k dim, lin v dim, experts, top-k, moe inter, shared, dense */
    {"qwen3.5-397b-a17b", "qwen3_5_moe", MF_ARCH_QWEN3_5_MOE, 60, 4096, 248320, 262144, 32, 2, 256,
     1e7, 16, 64, 128, 128, 512, 10, 1024, 1024, 0},
    {"qwen3.6-35b-a3b", "qwen3_5_moe", MF_ARCH_QWEN3_5_MOE, 40, 2048, 248320, 262144, 16, 2, 256,
     1e7, 16, 32, 128, 128, 256, 8, 512, 512, 0},
    {"qwen3-next-80b-a3b", "qwen3_next", MF_ARCH_QWEN3_NEXT, 48, 2048, 151936, 262144, 16, 2, 256,
     1e7, 16, 32, 128, 128, 512, 10, 512, 512, 5120},
    {"qwen3-30b-a3b", "qwen3_moe", MF_ARCH_QWEN3_MOE, 48, 2048, 151936, 40960, 32, 4, 128, 1e6, 0,
     0, 0, 0, 128, 8, 768, 0, 6144},
    {"qwen3-235b-a22b", "qwen3_moe", MF_ARCH_QWEN3_MOE, 94, 4096, 151936, 40960, 64, 4, 128, 1e6, 0,
     0, 0, 0, 128, 8, 1536, 0, 12288},
    /* the demo: small, with Qwen3's vocabulary so it can carry the real tokenizer */
    {"demo-qwen3.5", "qwen3_5_moe_text", MF_ARCH_QWEN3_5_MOE, 4, 256, 151936, 8192, 4, 2, 64, 1e7, 2, 4,
     64, 64, 32, 4, 128, 128, 0},
    {"tiny-qwen3.5", "qwen3_5_moe_text", MF_ARCH_QWEN3_5_MOE, 4, 64, 512, 4096, 4, 2, 32, 1e4, 2, 4,
     32, 32, 8, 2, 64, 64, 0},
    {"tiny-qwen3-next", "qwen3_next", MF_ARCH_QWEN3_NEXT, 4, 64, 512, 4096, 4, 2, 32, 1e4, 2, 4, 32,
     32, 8, 2, 64, 64, 128},
    {"tiny-qwen3-moe", "qwen3_moe", MF_ARCH_QWEN3_MOE, 4, 64, 512, 4096, 4, 2, 32, 1e4, 0, 0, 0, 0,
     8, 2, 64, 0, 128},
};
#define N_SHAPES ((int)(sizeof shapes / sizeof shapes[0]))

int synth_shape_count(void) { return N_SHAPES; }

const char *synth_shape_name(int i) { return i >= 0 && i < N_SHAPES ? shapes[i].name : NULL; }

const char *mf_synth_shape_name(int i) { return synth_shape_name(i); }

mf_status synth_hparams(const char *name, int n_layers, mf_hparams *hp, mf_err *err) {
    const synth_shape *s = NULL;
    for (int i = 0; i < N_SHAPES && name; i++)
        if (!strcmp(name, shapes[i].name)) s = &shapes[i];
    if (!s) {
        char known[512] = "";
        size_t k = 0;
        for (int i = 0; i < N_SHAPES && k < sizeof known; i++)
            k += (size_t)snprintf(known + k, sizeof known - k, "%s%s", i ? ", " : "", shapes[i].name);
        return err_set(err, MF_ERR_ARG, "unknown shape '%s' (known: %s)", name ? name : "(none)", known);
    }
    if (n_layers < 0 || n_layers > s->layers)
        return err_set(err, MF_ERR_ARG, "shape %s has %d layers; %d layers is out of range [1, %d]",
                       s->name, s->layers, n_layers, s->layers);
    memset(hp, 0, sizeof *hp);
    int hybrid = s->arch != MF_ARCH_QWEN3_MOE;
    hp->arch = s->arch;
    snprintf(hp->model_type, sizeof hp->model_type, "%s", s->model_type);
    hp->n_layers = n_layers ? n_layers : s->layers;
    hp->hidden = s->hidden;
    hp->vocab = s->vocab;
    hp->max_position = s->max_pos;
    hp->rms_eps = 1e-6;
    hp->tie_word_embeddings = 0;
    hp->n_heads = s->heads;
    hp->n_kv_heads = s->kv_heads;
    hp->head_dim = s->head_dim;
    hp->rope_theta = s->rope_theta;
    hp->partial_rotary = hybrid ? 0.25 : 1.0;
    hp->attn_output_gate = hybrid;
    hp->lin_k_heads = s->lin_k_heads;
    hp->lin_v_heads = s->lin_v_heads;
    hp->lin_k_dim = s->lin_k_dim;
    hp->lin_v_dim = s->lin_v_dim;
    hp->lin_conv_kernel = hybrid ? 4 : 0;
    hp->n_experts = s->experts;
    hp->top_k = s->top_k;
    hp->norm_topk_prob = 1;
    hp->moe_inter = s->moe_inter;
    hp->shared_inter = s->shared_inter;
    hp->dense_inter = s->dense_inter;
    for (int i = 0; i < hp->n_layers; i++) {
        /* hybrids: full attention every 4th layer (full_attention_interval 4) */
        hp->layer_kind[i] = !hybrid || (i + 1) % 4 == 0 ? MF_LAYER_FULL_ATTENTION : MF_LAYER_LINEAR_ATTENTION;
        hp->layer_moe[i] = 1;
    }
    /* the table is checked the way a reader checks a manifest */
    char *js = hparams_to_json(hp);
    cJSON *o = js ? cJSON_Parse(js) : NULL;
    free(js);
    if (!o) return err_set(err, MF_ERR_NOMEM, "out of memory");
    mf_hparams back;
    mf_status st = hparams_from_manifest(&back, o, err);
    cJSON_Delete(o);
    return st;
}

/* ---- the layout: the tensors convert.c's build_plan produces, in its order ---- */

typedef enum role {
    R_MATRIX,      /* std 1/sqrt(cols) */
    R_EMBED,       /* std 1 */
    R_ROUTER,      /* std 1/sqrt(cols), rows scaled by the layer's skew multipliers */
    R_GATE,        /* shared_expert_gate: std 1/sqrt(cols) */
    R_NORM,        /* 1 + U(-0.1, 0.1): every norm is stored as its multiplier */
    R_CONV,        /* U(-0.5, 0.5) / sqrt(kernel) */
    R_DT_BIAS,     /* U(-0.2, 0.2) */
    R_A_LOG        /* log(U(1, 16)) */
} role;

typedef struct tinfo {
    role role;
    int layer;
} tinfo;

typedef struct builder {
    const mf_hparams *hp;
    mf_qtype experts, dense;
    mfpack_layout *L;
    tinfo *info;       /* [L->n_tensors] */
    int cap;
    mf_err *err;
} builder;

static mf_status add(builder *b, role r, int layer, int64_t rows, int64_t cols, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

/* Adds tensor `fmt...` of shape [rows, cols] ([cols] when rows == 0) with the storage type
 * convert.c picks for a bf16 source of that role. */
static mf_status add(builder *b, role r, int layer, int64_t rows, int64_t cols, const char *fmt, ...) {
    char name[MFPACK_NAME_MAX + 8];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    mf_qtype t;
    switch (r) {
    case R_MATRIX:
    case R_EMBED: t = quant_type_fits(b->dense, cols) ? b->dense : MF_QTYPE_BF16; break;
    case R_ROUTER:
    case R_GATE: t = MF_QTYPE_BF16; break;
    default: t = MF_QTYPE_F32; break;
    }
    int64_t shape[2] = {rows, cols};
    mf_status st = rows ? mfpack_layout_add_tensor(b->L, name, t, 2, shape, b->err)
                        : mfpack_layout_add_tensor(b->L, name, t, 1, &cols, b->err);
    if (st) return st;
    if (b->L->n_tensors > b->cap) {
        int cap = b->cap ? 2 * b->cap : 256;
        tinfo *n = realloc(b->info, (size_t)cap * sizeof *n);
        if (!n) return err_set(b->err, MF_ERR_NOMEM, "out of memory");
        b->info = n;
        b->cap = cap;
    }
    b->info[b->L->n_tensors - 1] = (tinfo){r, layer};
    return MF_OK;
}

#define TRY(x)                                                                                     \
    do {                                                                                           \
        mf_status st_ = (x);                                                                       \
        if (st_) return st_;                                                                       \
    } while (0)

static mf_status add_mlp(builder *b, int l, const char *base, int64_t inter) {
    int64_t H = b->hp->hidden;
    TRY(add(b, R_MATRIX, l, inter, H, "layers.%d.%s.gate_proj", l, base));
    TRY(add(b, R_MATRIX, l, inter, H, "layers.%d.%s.up_proj", l, base));
    return add(b, R_MATRIX, l, H, inter, "layers.%d.%s.down_proj", l, base);
}

static mf_status build_layer(builder *b, int l) {
    const mf_hparams *hp = b->hp;
    int64_t H = hp->hidden, hd = hp->head_dim;
    TRY(add(b, R_NORM, l, 0, H, "layers.%d.input_layernorm", l));
    TRY(add(b, R_NORM, l, 0, H, "layers.%d.post_attention_layernorm", l));
    if (hp->layer_kind[l] == MF_LAYER_FULL_ATTENTION) {
        int64_t qrows = hp->n_heads * hd * (hp->attn_output_gate ? 2 : 1), kv = hp->n_kv_heads * hd;
        TRY(add(b, R_MATRIX, l, qrows, H, "layers.%d.self_attn.q_proj", l));
        TRY(add(b, R_MATRIX, l, kv, H, "layers.%d.self_attn.k_proj", l));
        TRY(add(b, R_MATRIX, l, kv, H, "layers.%d.self_attn.v_proj", l));
        TRY(add(b, R_MATRIX, l, H, hp->n_heads * hd, "layers.%d.self_attn.o_proj", l));
        TRY(add(b, R_NORM, l, 0, hd, "layers.%d.self_attn.q_norm", l));
        TRY(add(b, R_NORM, l, 0, hd, "layers.%d.self_attn.k_norm", l));
    } else {
        int64_t kd = (int64_t)hp->lin_k_heads * hp->lin_k_dim, vd = (int64_t)hp->lin_v_heads * hp->lin_v_dim;
        int64_t C = 2 * kd + vd, Hv = hp->lin_v_heads;
        TRY(add(b, R_MATRIX, l, C, H, "layers.%d.linear_attn.in_proj_qkv", l));
        TRY(add(b, R_MATRIX, l, vd, H, "layers.%d.linear_attn.in_proj_z", l));
        TRY(add(b, R_MATRIX, l, Hv, H, "layers.%d.linear_attn.in_proj_b", l));
        TRY(add(b, R_MATRIX, l, Hv, H, "layers.%d.linear_attn.in_proj_a", l));
        TRY(add(b, R_CONV, l, C, hp->lin_conv_kernel, "layers.%d.linear_attn.conv1d", l));
        TRY(add(b, R_DT_BIAS, l, 0, Hv, "layers.%d.linear_attn.dt_bias", l));
        TRY(add(b, R_A_LOG, l, 0, Hv, "layers.%d.linear_attn.A_log", l));
        TRY(add(b, R_NORM, l, 0, hp->lin_v_dim, "layers.%d.linear_attn.norm", l));
        TRY(add(b, R_MATRIX, l, H, vd, "layers.%d.linear_attn.out_proj", l));
    }
    if (!hp->layer_moe[l]) return add_mlp(b, l, "mlp", hp->dense_inter);
    TRY(add(b, R_ROUTER, l, hp->n_experts, H, "layers.%d.mlp.gate", l));
    if (hp->shared_inter > 0) {
        TRY(add_mlp(b, l, "mlp.shared_expert", hp->shared_inter));
        TRY(add(b, R_GATE, l, 1, H, "layers.%d.mlp.shared_expert_gate", l));
    }
    mf_qtype types[3];
    for (int p = 0; p < 3; p++) {
        int64_t cols = p == 2 ? hp->moe_inter : H;
        types[p] = quant_type_fits(b->experts, cols) ? b->experts : MF_QTYPE_BF16;
    }
    return mfpack_layout_add_experts(b->L, l, hp->n_experts, types, hp->moe_inter, H, b->err);
}

static mf_status build(builder *b) {
    const mf_hparams *hp = b->hp;
    TRY(add(b, R_EMBED, -1, hp->vocab, hp->hidden, "embed_tokens"));
    for (int l = 0; l < hp->n_layers; l++) TRY(build_layer(b, l));
    TRY(add(b, R_NORM, -1, 0, hp->hidden, "norm"));
    if (!hp->tie_word_embeddings) TRY(add(b, R_MATRIX, -1, hp->vocab, hp->hidden, "lm_head"));
    return MF_OK;
}

static mf_status check_types(mf_qtype experts, mf_qtype dense, mf_err *err) {
    if ((unsigned)experts >= MF_QTYPE_COUNT || (unsigned)dense >= MF_QTYPE_COUNT)
        return err_set(err, MF_ERR_ARG, "synth: unknown storage type");
    return MF_OK;
}

mf_status synth_layout(const mf_hparams *hp, mf_qtype experts, mf_qtype dense, mfpack_layout *L,
                       mf_err *err) {
    mfpack_layout_init(L, hp);
    TRY(check_types(experts, dense, err));
    builder b = {hp, experts, dense, L, NULL, 0, err};
    mf_status st = build(&b);
    free(b.info);
    if (st) return st;
    mfpack_layout_finish(L);
    return MF_OK;
}

/* ---- random numbers: counter-based, so any block of any tensor can be made on any thread ---- */

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Value i of stream `key`: splitmix64 with its state set to key + (i + 1) * golden gamma. */
static inline uint64_t rnd(uint64_t key, uint64_t i) {
    return mix64(key + (i + 1) * 0x9e3779b97f4a7c15ull);
}

/* The stream of a named tensor: depends on the seed and the name only, so a model cut with
 * --layers holds the same values as the first layers of the full one. */
static uint64_t name_key(uint64_t seed, const char *name) {
    uint64_t h = 1469598103934665603ull;
    for (const char *p = name; *p; p++) {
        h ^= (unsigned char)*p;
        h *= 1099511628211ull;
    }
    return mix64(seed ^ mix64(h));
}

/* Router skew. A router is a bias-free linear map and its inputs here (RMS-normed activations of
 * random weights) share no common direction, so a per-expert logit offset cannot be put into
 * the weights; what steers top-k choice is the norm of each row: for an input of RMS 1,
 * expert e's logit has a spread proportional to |w_e|, and wider logits win top-k more often.
 * Layer l ranks its experts by a seeded permutation r (rank 0 = most popular) and scales
 * row e by
 *     m_e = (1 + r_e)^(-S/4) / sqrt(mean_f (1 + r_f)^(-S/2))
 * (the mean over all experts keeps the RMS of m at 1, so the logit scale stays put).
 * S = 0: m = 1, uniform routing. With independent N(0, m_e^2) logits, the share of tokens
 * routed to rank r falls roughly as r^-a with a ~0.6 / 0.9 / 1.1 at S = 1 (128 experts top-8 /
 * 256 top-8 / 512 top-10) and ~0.9 / 1.4 / 1.9 at S = 1.5. */
void synth_router_scales(uint64_t seed, int layer, int n_experts, double skew, float *out) {
    if (n_experts <= 0) return;
    int *rank = malloc((size_t)n_experts * sizeof *rank);
    char name[64];
    snprintf(name, sizeof name, "layers.%d.mlp.gate.rank", layer);
    uint64_t key = name_key(seed, name);
    double sum = 0;
    for (int e = 0; e < n_experts; e++) {
        if (rank) rank[e] = e;
        sum += pow(1.0 + e, -skew / 2);
    }
    if (rank)
        for (int i = n_experts - 1; i > 0; i--) { /* Fisher-Yates */
            int j = (int)(rnd(key, (uint64_t)i) % (uint64_t)(i + 1));
            int t = rank[i];
            rank[i] = rank[j];
            rank[j] = t;
        }
    double norm = sqrt(sum / n_experts);
    for (int e = 0; e < n_experts; e++)
        out[e] = (float)(pow(1.0 + (rank ? rank[e] : e), -skew / 4) / norm);
    free(rank);
}

/* ---- values ---- */

/* How tensor (or expert part) values are made; see gen_fill. */
typedef struct gen {
    uint64_t key;
    mf_qtype type;
    int64_t rows, cols;
    float center, half;     /* float storage: center + half * (2u - 1), u ~ U(0, 1) */
    int a_log;              /* float storage: log(1 + 15 u) = log(U(1, 16)) instead */
    const float *row_scale; /* [rows] multipliers (skewed routers) or NULL */
    uint16_t qscale, qbias; /* q storage: bf16 scale and bias of every group */
} gen;

/* A matrix of values with mean 0 and standard deviation std.
 * Float storage: U(-a, a) with a = sqrt(3) std. q4/q8 storage: the codes are uniform random
 * bits, so q ~ U{0 .. n-1} with n = 2^bits; scale = 2a/(n-1), bias = -a give n evenly spaced
 * values on [-a, a], whose variance a^2 (n+1) / (3 (n-1)) is std^2 for
 * a = std sqrt(3 (n-1) / (n+1)). No float buffer is needed for q tensors. */
static void gen_matrix(gen *g, double std) {
    if (g->type == MF_QTYPE_Q4 || g->type == MF_QTYPE_Q8) {
        double n = (double)(1u << quant_bits(g->type));
        double a = std * sqrt(3.0 * (n - 1) / (n + 1));
        g->qscale = f32_to_bf16((float)(2 * a / (n - 1)));
        g->qbias = f32_to_bf16((float)(-(n - 1) / 2 * bf16_to_f32(g->qscale)));
    } else {
        g->center = 0;
        g->half = (float)(sqrt(3.0) * std);
    }
}

static inline void put_le64(unsigned char *p, uint64_t v) {
    if (SYNTH_HOST_LE) {
        memcpy(p, &v, 8);
        return;
    }
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* f32 -> bf16, round to nearest even (f32_to_bf16 without its NaN case: no value here is NaN) */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Element e of a float tensor (the fast path of gen_fill computes the same for plain tensors). */
static float gen_value(const gen *g, uint64_t e) {
    float u = ((float)(rnd(g->key, e) >> 40) + 0.5f) * (1.0f / 16777216.0f);
    float v = g->a_log ? logf(1.0f + 15.0f * u) : g->center + g->half * (2.0f * u - 1.0f);
    if (g->row_scale) v *= g->row_scale[e / (uint64_t)g->cols];
    return v;
}

/* Writes bytes [b0, b0 + n) of g's storage (the layout of quant_tensor_bytes) to dst. */
static void gen_fill(const gen *g, uint64_t b0, uint64_t n, unsigned char *dst) {
    uint64_t end = b0 + n, k = b0;
    if (g->type == MF_QTYPE_Q4 || g->type == MF_QTYPE_Q8) {
        uint64_t W = (uint64_t)g->rows * (uint64_t)g->cols * (uint64_t)quant_bits(g->type) / 8;
        uint64_t G = (uint64_t)g->rows * (uint64_t)(g->cols / QUANT_GROUP) * 2;
        /* words: byte k is byte k % 8 of random value k / 8 */
        uint64_t wend = end < W ? end : W;
        for (; k < wend && (k & 7); k++) dst[k - b0] = (unsigned char)(rnd(g->key, k >> 3) >> (8 * (k & 7)));
        for (; k + 8 <= wend; k += 8) put_le64(dst + (k - b0), rnd(g->key, k >> 3));
        for (; k < wend; k++) dst[k - b0] = (unsigned char)(rnd(g->key, k >> 3) >> (8 * (k & 7)));
        for (; k < end; k++) { /* scales, then biases (G is even, so bytes pair up) */
            uint64_t j = k - W;
            uint16_t v = j < G ? g->qscale : g->qbias;
            dst[k - b0] = (unsigned char)(v >> (8 * (j & 1)));
        }
        return;
    }
    uint64_t es = g->type == MF_QTYPE_F32 ? 4 : 2;
    if (SYNTH_HOST_LE && !(b0 % es) && !(n % es) && !g->row_scale && !g->a_log) { /* the common case */
        uint64_t e0 = b0 / es, ne = n / es;
        for (uint64_t i = 0; i < ne; i++) {
            float u = ((float)(rnd(g->key, e0 + i) >> 40) + 0.5f) * (1.0f / 16777216.0f);
            float v = g->center + g->half * (2.0f * u - 1.0f);
            if (es == 4) {
                memcpy(dst + 4 * i, &v, 4);
            } else {
                uint16_t h = bf16_round(v);
                memcpy(dst + 2 * i, &h, 2);
            }
        }
        return;
    }
    for (uint64_t e = b0 / es; e * es < end; e++) {
        unsigned char b[4];
        float v = gen_value(g, e);
        if (es == 4) {
            uint32_t u;
            memcpy(&u, &v, 4);
            for (int i = 0; i < 4; i++) b[i] = (unsigned char)(u >> (8 * i));
        } else {
            uint16_t h = bf16_round(v);
            b[0] = (unsigned char)h;
            b[1] = (unsigned char)(h >> 8);
        }
        for (uint64_t i = 0; i < es; i++)
            if (e * es + i >= b0 && e * es + i < end) dst[e * es + i - b0] = b[i];
    }
}

/* ---- the run ---- */

typedef struct job {
    int tensor;          /* dense tensor index, or -1 for (part of) an expert blob */
    int elayer, expert;  /* expert blob: index into L.expert_layers, expert number */
    uint64_t off, len;   /* byte range inside the tensor or the blob */
} job;

struct mf_synthesizer {
    mf_err err;
};

typedef struct synth {
    const mf_synth_options *opt;
    mf_err *err;
    mf_hparams hp;
    mfpack_layout L;
    tinfo *info;         /* [L.n_tensors] */
    gen *gens;           /* [L.n_tensors] */
    float *rscale;       /* [n_layers][n_experts] router row multipliers */
    job *jobs;
    int64_t n_jobs;
    uint64_t total;      /* bytes the jobs write */
    /* while writing */
    int fd;              /* the output, buffered */
    int dfd;             /* the same file opened O_DIRECT, or -1 */
    const char *path;
    unsigned char **bufs; /* [threads][SYNTH_CHUNK], 4096-aligned */
    atomic_llong next;
    atomic_int failed;
    atomic_int direct;   /* writes go through dfd (cleared when the filesystem refuses one) */
    pthread_mutex_t mu;  /* guards err, done and progress calls */
    uint64_t done;
} synth;

void mf_synth_options_init(mf_synth_options *opt) {
    memset(opt, 0, sizeof *opt);
    opt->experts_type = MF_QTYPE_Q4;
    opt->dense_type = MF_QTYPE_Q8;
}

mf_synthesizer *mf_synthesizer_new(void) { return calloc(1, sizeof(mf_synthesizer)); }
const char *mf_synthesizer_error(const mf_synthesizer *s) { return s ? s->err.msg : "out of memory"; }
void mf_synthesizer_free(mf_synthesizer *s) { free(s); }

static void make_gens(synth *s) {
    const mfpack_layout *L = &s->L;
    for (int i = 0; i < L->n_tensors; i++) {
        const mfpack_tensor *t = &L->tensors[i];
        gen *g = &s->gens[i];
        memset(g, 0, sizeof *g);
        g->key = name_key(s->opt->seed, t->name);
        g->type = t->type;
        g->cols = t->shape[t->ndim - 1];
        g->rows = 1;
        for (int d = 0; d < t->ndim - 1; d++) g->rows *= t->shape[d];
        double inv = 1.0 / sqrt((double)g->cols);
        switch (s->info[i].role) {
        case R_MATRIX: gen_matrix(g, inv); break;
        case R_EMBED: gen_matrix(g, 1.0); break;
        case R_ROUTER:
            gen_matrix(g, inv);
            g->row_scale = s->rscale + (size_t)s->info[i].layer * (size_t)s->hp.n_experts;
            break;
        case R_GATE: gen_matrix(g, inv); break;
        case R_NORM: g->center = 1.0f; g->half = 0.1f; break;
        case R_CONV: g->half = (float)(0.5 * inv); break;
        case R_DT_BIAS: g->half = 0.2f; break;
        case R_A_LOG: g->a_log = 1; break;
        }
    }
}

static void expert_gen(const synth *s, const mfpack_expert_layer *E, int expert, int p, gen *g) {
    static const char *parts[] = {"gate_proj", "up_proj", "down_proj"};
    char name[96];
    snprintf(name, sizeof name, "layers.%d.mlp.experts.%d.%s", E->layer, expert, parts[p]);
    memset(g, 0, sizeof *g);
    g->key = name_key(s->opt->seed, name);
    g->type = E->parts[p].type;
    g->rows = E->parts[p].rows;
    g->cols = E->parts[p].cols;
    gen_matrix(g, 1.0 / sqrt((double)g->cols));
}

static void fill_job(const synth *s, const job *j, unsigned char *buf) {
    if (j->tensor >= 0) {
        gen_fill(&s->gens[j->tensor], j->off, j->len, buf);
        return;
    }
    const mfpack_expert_layer *E = &s->L.expert_layers[j->elayer];
    memset(buf, 0, j->len); /* padding between and after the parts */
    for (int p = 0; p < MFPACK_EXPERT_PARTS; p++) {
        const mfpack_part *P = &E->parts[p];
        uint64_t lo = j->off > P->offset ? j->off : P->offset;
        uint64_t hi = j->off + j->len < P->offset + P->bytes ? j->off + j->len : P->offset + P->bytes;
        if (lo >= hi) continue;
        gen g;
        expert_gen(s, E, j->expert, p, &g);
        gen_fill(&g, lo - P->offset, hi - lo, buf + (lo - j->off));
    }
}

static uint64_t job_offset(const synth *s, const job *j) {
    if (j->tensor >= 0) return s->L.tensors[j->tensor].offset + j->off;
    const mfpack_expert_layer *E = &s->L.expert_layers[j->elayer];
    return E->offset + E->stride * (uint64_t)j->expert + j->off;
}

/* Splits every tensor and expert blob, in file order, into jobs of at most SYNTH_CHUNK bytes. */
static mf_status make_jobs(synth *s) {
    const mfpack_layout *L = &s->L;
    int64_t n = 0;
    for (int pass = 0; pass < 2; pass++) {
        n = 0;
        uint64_t total = 0;
        for (int i = 0; i < L->n_tensors; i++)
            for (uint64_t off = 0; off < L->tensors[i].bytes; off += SYNTH_CHUNK, n++) {
                uint64_t len = L->tensors[i].bytes - off < SYNTH_CHUNK ? L->tensors[i].bytes - off : SYNTH_CHUNK;
                if (pass) s->jobs[n] = (job){i, -1, -1, off, len};
                total += len;
            }
        for (int li = 0; li < L->n_expert_layers; li++) {
            const mfpack_expert_layer *E = &L->expert_layers[li];
            for (int e = 0; e < E->count; e++)
                for (uint64_t off = 0; off < E->stride; off += SYNTH_CHUNK, n++) {
                    uint64_t len = E->stride - off < SYNTH_CHUNK ? E->stride - off : SYNTH_CHUNK;
                    if (pass) s->jobs[n] = (job){-1, li, e, off, len};
                    total += len;
                }
        }
        if (!pass) {
            s->jobs = malloc((size_t)(n ? n : 1) * sizeof *s->jobs);
            if (!s->jobs) return err_set(s->err, MF_ERR_NOMEM, "out of memory planning %lld blocks", (long long)n);
        }
        s->total = total;
    }
    s->n_jobs = n;
    return MF_OK;
}

static int write_all(int fd, const unsigned char *p, uint64_t n, uint64_t off) {
    while (n) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return w < 0 ? errno : ENOSPC;
        p += w;
        n -= (uint64_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

/* One per thread: takes jobs in file order until none are left (or one failed). */
static void worker(void *ctx, int64_t begin, int64_t end, int thread) {
    (void)begin;
    (void)end;
    synth *s = ctx;
    unsigned char *buf = s->bufs[thread];
    while (!atomic_load(&s->failed)) {
        int64_t i = atomic_fetch_add(&s->next, 1);
        if (i >= s->n_jobs) return;
        const job *j = &s->jobs[i];
        fill_job(s, j, buf);
        int e = EINVAL;
        if (atomic_load(&s->direct)) {
            /* O_DIRECT wants whole 4096-byte blocks: every job starts on one, and the bytes up to
             * the next boundary are padding before the next tensor or the end of the file */
            uint64_t padded = (j->len + MFPACK_ALIGN - 1) / MFPACK_ALIGN * MFPACK_ALIGN;
            memset(buf + j->len, 0, padded - j->len);
            e = write_all(s->dfd, buf, padded, job_offset(s, j));
            if (e == EINVAL) atomic_store(&s->direct, 0);
        }
        if (e == EINVAL) e = write_all(s->fd, buf, j->len, job_offset(s, j));
        pthread_mutex_lock(&s->mu);
        if (e) {
            if (!atomic_exchange(&s->failed, 1))
                err_set(s->err, MF_ERR_IO, "%s: write failed: %s", s->path, strerror(e));
        } else {
            s->done += j->len;
            if (s->opt->progress) s->opt->progress(s->opt->progress_user, s->done, s->total);
        }
        pthread_mutex_unlock(&s->mu);
    }
}

/* Fills the file open as fd (at tmp_path; path names it in messages). */
static mf_status write_payload(synth *s, int fd, const char *tmp_path, const char *path) {
    mf_pool *pool = pool_create(s->opt->n_threads);
    if (!pool) return err_set(s->err, MF_ERR_NOMEM, "out of memory creating threads");
    int nt = pool_size(pool);
    mf_status st = MF_OK;
    s->bufs = calloc((size_t)nt, sizeof *s->bufs);
    for (int t = 0; s->bufs && t < nt; t++)
        if (posix_memalign((void **)&s->bufs[t], MFPACK_ALIGN, SYNTH_CHUNK)) {
            s->bufs[t] = NULL;
            break;
        }
    for (int t = 0; t < nt && !st; t++)
        if (!s->bufs || !s->bufs[t]) st = err_set(s->err, MF_ERR_NOMEM, "out of memory for %d write buffers", nt);
    if (!st) {
        s->fd = fd;
        s->path = path;
        /* O_DIRECT keeps the kernel from copying every byte into the page cache (half the CPU
         * time of a buffered run) and leaves the cache cold for benchmarks that read the file */
        s->dfd = open(tmp_path, O_WRONLY | O_DIRECT);
        atomic_init(&s->direct, s->dfd >= 0);
        atomic_init(&s->next, 0);
        atomic_init(&s->failed, 0);
        pthread_mutex_init(&s->mu, NULL);
        pool_for(pool, nt, 1, worker, s);
        pthread_mutex_destroy(&s->mu);
        if (atomic_load(&s->failed)) st = s->err->status;
        if (s->dfd >= 0) close(s->dfd);
    }
    for (int t = 0; s->bufs && t < nt; t++) free(s->bufs[t]);
    free(s->bufs);
    s->bufs = NULL;
    pool_destroy(pool);
    return st;
}

static char *source_json(const synth *s) {
    const mf_synth_options *o = s->opt;
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "synth", o->shape);
    if (o->seed < (1ull << 53)) {
        cJSON_AddNumberToObject(j, "seed", (double)o->seed);
    } else { /* a double would round it */
        char buf[32];
        snprintf(buf, sizeof buf, "%llu", (unsigned long long)o->seed);
        cJSON_AddStringToObject(j, "seed", buf);
    }
    cJSON_AddNumberToObject(j, "skew", o->skew);
    cJSON_AddNumberToObject(j, "n_layers", s->hp.n_layers);
    cJSON_AddStringToObject(j, "experts", mf_qtype_name(o->experts_type));
    cJSON_AddStringToObject(j, "dense", mf_qtype_name(o->dense_type));
    cJSON_AddStringToObject(j, "generator", "moeflux " MF_VERSION_STRING);
    char *txt = cJSON_PrintUnformatted(j);
    cJSON_Delete(j);
    return txt;
}

/* Refuses when the output's filesystem has less room than the file needs. */
static mf_status check_space(synth *s, const char *out, uint64_t need) {
    char *d = strdup(out);
    if (!d) return err_set(s->err, MF_ERR_NOMEM, "out of memory");
    struct statvfs v;
    mf_status st = MF_OK;
    if (statvfs(dirname(d), &v) == 0) {
        uint64_t avail = (uint64_t)v.f_bavail * (uint64_t)v.f_frsize;
        if (need > avail)
            st = err_set(s->err, MF_ERR_IO,
                         "%s: the file needs %.2f GB but its filesystem has only %.2f GB free", out,
                         need / 1e9, avail / 1e9);
    }
    free(d);
    return st;
}

static void synth_free(synth *s) {
    mfpack_layout_free(&s->L);
    free(s->info);
    free(s->gens);
    free(s->rscale);
    free(s->jobs);
}

static mf_status synth_plan(synth *s) {
    const mf_synth_options *o = s->opt;
    TRY(synth_hparams(o->shape, o->n_layers, &s->hp, s->err));
    mfpack_layout_init(&s->L, &s->hp);
    builder b = {&s->hp, o->experts_type, o->dense_type, &s->L, NULL, 0, s->err};
    mf_status st = build(&b);
    s->info = b.info;
    if (st) return st;
    if (!(s->L.extra_json = source_json(s))) return err_set(s->err, MF_ERR_NOMEM, "out of memory");
    if (o->tokenizer_dir) {
        TRY(mfpack_add_dir_files(&s->L, o->tokenizer_dir, s->err));
        if (!mfpack_find_blob(&s->L, "tokenizer.json"))
            return err_set(s->err, MF_ERR_ARG, "%s: no tokenizer.json there", o->tokenizer_dir);
    }
    mfpack_layout_finish(&s->L);
    size_t nr = (size_t)s->hp.n_layers * (size_t)s->hp.n_experts;
    s->gens = calloc((size_t)(s->L.n_tensors ? s->L.n_tensors : 1), sizeof *s->gens);
    s->rscale = malloc((nr ? nr : 1) * sizeof *s->rscale);
    if (!s->gens || !s->rscale) return err_set(s->err, MF_ERR_NOMEM, "out of memory");
    for (int l = 0; l < s->hp.n_layers; l++)
        synth_router_scales(o->seed, l, s->hp.n_experts, o->skew, s->rscale + (size_t)l * s->hp.n_experts);
    make_gens(s);
    return make_jobs(s);
}

mf_status mf_synth(mf_synthesizer *sy, const mf_synth_options *opt) {
    if (!sy) return MF_ERR_NOMEM;
    mf_err *err = &sy->err;
    err_clear(err);
    if (!opt || !opt->shape || !opt->out_path)
        return err_set(err, MF_ERR_ARG, "synth: a shape name and an output path are required");
    TRY(check_types(opt->experts_type, opt->dense_type, err));
    if (!(opt->skew >= 0) || !isfinite(opt->skew))
        return err_set(err, MF_ERR_ARG, "synth: skew must be a finite number >= 0 (got %g)", opt->skew);
    if (opt->n_layers < 0)
        return err_set(err, MF_ERR_ARG, "synth: layer count %d is negative", opt->n_layers);
    synth s = {0};
    s.opt = opt;
    s.err = err;
    mf_status st = synth_plan(&s);
    if (!st) st = check_space(&s, opt->out_path, s.L.file_bytes);
    if (st) {
        synth_free(&s);
        return st;
    }
    /* write to a temporary name in the output's directory, rename when complete */
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", opt->out_path);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        st = err_set(err, MF_ERR_IO, "%s: cannot create output: %s", opt->out_path, strerror(errno));
        synth_free(&s);
        return st;
    }
    fchmod(fd, 0644);
    st = mfpack_write_header(&s.L, fd, opt->out_path, err);
    if (!st) st = write_payload(&s, fd, tmp, opt->out_path);
    if (!st && opt->tokenizer_dir) st = mfpack_write_dir_files(&s.L, opt->tokenizer_dir, fd, opt->out_path, err);
    if (!st && fsync(fd) != 0)
        st = err_set(err, MF_ERR_IO, "%s: fsync failed: %s", opt->out_path, strerror(errno));
    if (close(fd) != 0 && !st)
        st = err_set(err, MF_ERR_IO, "%s: close failed: %s", opt->out_path, strerror(errno));
    if (!st && rename(tmp, opt->out_path) != 0)
        st = err_set(err, MF_ERR_IO, "%s: cannot rename the finished file into place: %s",
                     opt->out_path, strerror(errno));
    if (st) unlink(tmp);
    synth_free(&s);
    return st;
}
