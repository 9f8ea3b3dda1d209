/* model_internal.h - what the model handle and sessions share inside the library.
 * Not public: the CLI sees only include/moeflux.h. */
#ifndef MF_MODEL_INTERNAL_H
#define MF_MODEL_INTERNAL_H

#include "backend/backend.h"
#include "core/err.h"
#include "experts/dev_cache.h"
#include "experts/store.h"
#include "format/mfpack.h"
#include "model/weights.h"

struct mf_model {
    mf_err err;
    mfpack_file file;
    int open, loaded;
    char *info;
    uint64_t manifest_hash;    /* identifies the model in saved sessions */
    mf_engine_options opt;
    model_weights w;
    mf_backend *be;
    expert_store *store;
    dev_cache *dcache;         /* experts in backend memory; NULL when the backend uses host memory */
    struct slot_pool *slots;   /* page-locked arenas the store's slots come from (GPU backends) */
};

/* The expert tiers as the forward pass sees them: backend pointers to blobs. */
mf_status experts_prefetch(mf_model *m, int layer, const int32_t *ids, int n, mf_err *err);
mf_status experts_get(mf_model *m, int layer, int32_t id, const void **blob, mf_err *err);
void experts_release(mf_model *m, int layer, int32_t id);
/* How many experts the tiers can hold pinned at once (the smallest tier's slot count). */
int experts_capacity(const mf_model *m);
/* Starts fetching experts a coming layer will probably use; returns at once. */
void experts_prefetch_async(mf_model *m, int layer, const int32_t *ids, int n, int to_device);

/* Linear-attention state at one position, kept so truncation can restore it. */
typedef struct lin_snapshot {
    int pos;                   /* -1: empty */
    float *data;               /* every linear layer's conv state then recurrent state */
} lin_snapshot;

#define SESSION_SNAPSHOTS 4

struct mf_session {
    mf_err err;
    mf_model *m;
    int max_ctx, chunk;
    int pos;
    int profile;
    mf_profile prof;
    double prof_t;             /* clock at the last phase boundary */
    int32_t *tokens;           /* host [max_ctx] tokens at positions 0 .. pos-1 */
    /* backend memory */
    float **k_cache, **v_cache;/* per full-attention layer: [max_ctx][n_kv][head_dim]; NULL elsewhere */
    float **conv_state;        /* per linear layer: [kernel-1][channels] */
    float **rec_state;         /* per linear layer: [v heads][k dim][v dim] */
    int32_t *d_positions;      /* [2][chunk]: the step's positions, then its tokens (one upload) */
    int32_t *d_tokens;         /* [chunk] (view: d_positions + chunk) */
    float *x;                  /* [chunk][hidden] residual stream */
    float *h;                  /* [chunk][hidden] normed input of a block */
    float *y;                  /* [chunk][hidden] block output */
    float *zeros;              /* [chunk][hidden] zeros */
    float *big1, *big2, *big3, *big4, *big5, *big6; /* [chunk][max projection width] */
    float *small1, *small2, *small3, *small4; /* [chunk][max(v heads, experts)] */
    void *d_route;             /* [3][chunk][top_k] words: d_topk_ids, d_topk_w, d_pred_ids, so that one
                                  download brings a layer's choice and the next layer's prediction */
    int32_t *d_topk_ids;       /* [chunk][top_k] (view into d_route) */
    float *d_topk_w;           /* [chunk][top_k] (view) */
    int32_t *d_expert_tok;     /* [chunk * top_k] token indices grouped by expert */
    float *d_expert_tw;        /* [chunk * top_k] their routing weights */
    float *d_logits;           /* [chunk][vocab] */
    /* host memory */
    uint64_t lin_floats;       /* floats of all linear-layer state (one snapshot) */
    lin_snapshot snaps[SESSION_SNAPSHOTS];
    int snap_next;
    float *lin_host;           /* [lin_floats] staging for snapshots, save and load */
    int32_t *positions;        /* [2][chunk]: host copy of d_positions */
    void *route;               /* host copy of d_route (page-locked where the backend has it, so that
                                * its download is a direct copy, not one staged behind uploads) */
    int route_pinned;          /* route came from host_alloc */
    int32_t *topk_ids;         /* [chunk][top_k] (view into route) */
    float *topk_w;             /* [chunk][top_k] (view) */
    int32_t *pred_raw;         /* [chunk][top_k] (view): the next layer's router's choice */
    int32_t *expert_count;     /* [n_experts] tokens routed to each expert */
    int32_t *expert_tok;       /* [chunk * top_k] */
    float *expert_tw;          /* [chunk * top_k] */
    int32_t *expert_start;     /* [n_experts + 1] */
    int32_t *used_ids;         /* [n_experts] */
    int32_t *pred_ids;         /* [n_experts] predicted experts of layer pred_layer */
    uint8_t *pred_mark;        /* [n_experts] */
    int n_pred, pred_layer;    /* pred_layer -1: no prediction pending */
    int predict;               /* next-layer prediction on */
    const void **blob_host;    /* [n_experts] blob pointers of the current layer (host copy) */
    const void **d_blob_table; /* backend memory [n_experts] */
    int32_t *d_pred_ids;       /* backend memory [chunk][top_k] the next layer's predicted choice (view) */
    float *d_pred_w;           /* backend memory [chunk][top_k] */
    int32_t *d_next;           /* backend memory [1] the greedy choice after the last token; the
                                  word after d_route_log */
    int32_t *d_route_log;      /* backend memory [n_layers][FUSED_MAX_TOKENS][top_k]: each layer's
                                  choice in a step whose experts run as one op */
    int32_t *route_log;        /* host copy of d_route_log */
    int log_n;                 /* tokens of the step whose choices d_route_log holds for the
                                  device cache (host-read mode), 0: none pending */
    int log_fetched;           /* route_log holds them already (downloaded with d_next) */
    int keep_logits;           /* forward_chunk leaves the last token's logits in d_logits */
    float *logits_host;        /* host [vocab] for sampling on the host, allocated on first use */
    int64_t attn_ctx;          /* context bound the attention ops of this step are sized for */
    int use_graph;             /* decode steps may be recorded once and replayed */
    void *graph;               /* the recorded decode step (layers, head, greedy choice), or NULL */
    void **pieces;             /* [n_layers] per streamed layer: its ops up to the router's choice
                                  and the next layer's prediction, recorded for one token, or NULL */
    int pieces_off;            /* recording a piece failed once: issue those ops directly */
};

/* Up to this many tokens the routed experts run as one fused op (moe_experts); a larger
 * prefill chunk groups tokens per expert so each expert is read once for the chunk. */
#define FUSED_MAX_TOKENS 8

/* Profiling: closes the current phase (waiting for the backend first) and charges it to *acc. */
void prof_mark(mf_session *s, double *acc);

/* Runs n <= chunk tokens at positions pos .. pos + n - 1 through every layer; writes logits
 * [n][vocab] when all_logits, else only the last token's [vocab] (logits may be NULL), and the
 * greedy choice after the last token into *next (next may be NULL). With keep_logits set the
 * last token's logits are left in d_logits (row 0) either way. */
mf_status forward_chunk(mf_session *s, const int32_t *tokens, int n, float *logits, int all_logits, int32_t *next);

#endif
