/* hparams.h - hyperparameters of the supported MoE families, read from a checkpoint's
 * config.json or from a .moeflux manifest. Not weights, and not the forward pass. */
#ifndef MF_MODEL_HPARAMS_H
#define MF_MODEL_HPARAMS_H

#include <stdint.h>

#include "core/err.h"

#define MF_MAX_LAYERS 512

typedef enum mf_arch {
    MF_ARCH_QWEN3_5_MOE = 0, /* qwen3_5_moe, qwen3_5_moe_text: Gated DeltaNet + gated attention */
    MF_ARCH_QWEN3_NEXT,      /* qwen3_next: same blocks, fused in_proj_qkvz / in_proj_ba in HF files */
    MF_ARCH_QWEN3_MOE,       /* qwen3_moe: attention everywhere, no shared expert */
    MF_ARCH_COUNT
} mf_arch;

typedef enum mf_layer_kind {
    MF_LAYER_FULL_ATTENTION = 0,
    MF_LAYER_LINEAR_ATTENTION = 1
} mf_layer_kind;

typedef struct mf_hparams {
    mf_arch arch;
    char model_type[48];          /* as config.json spells it */
    int n_layers;
    int hidden;
    int vocab;
    int max_position;
    double rms_eps;
    int tie_word_embeddings;
    /* attention */
    int n_heads, n_kv_heads, head_dim;
    double rope_theta;
    double partial_rotary;        /* fraction of head_dim that is rotated */
    int attn_output_gate;         /* q_proj yields [q | gate] per head */
    /* Gated DeltaNet */
    int lin_k_heads, lin_v_heads, lin_k_dim, lin_v_dim, lin_conv_kernel;
    /* MoE */
    int n_experts, top_k, norm_topk_prob;
    int moe_inter;                /* one routed expert's intermediate size */
    int shared_inter;             /* shared expert's intermediate size; 0 = none */
    int dense_inter;              /* dense MLP intermediate size for non-MoE layers */
    uint8_t layer_kind[MF_MAX_LAYERS];  /* mf_layer_kind per layer */
    uint8_t layer_moe[MF_MAX_LAYERS];   /* 1: sparse MoE block, 0: dense MLP */
} mf_hparams;

const char *mf_arch_name(mf_arch a);
/* Whether the family's RMSNorms (input, post-attention, final, q/k) compute x * (1 + w). */
int hparams_norm_plus_one(const mf_hparams *hp);

/* Reads SRC/config.json (text part of a vision-language config taken from text_config).
 * Unknown model_type, missing or out-of-range fields are refused with a message naming
 * the file and field. */
mf_status hparams_from_config_file(mf_hparams *hp, const char *path, mf_err *err);
/* Same, from a JSON text; `what` names its source in messages. */
mf_status hparams_from_config_json(mf_hparams *hp, const char *json, const char *what, mf_err *err);

/* Manifest form (moeflux's own names): malloc'd JSON object text, and back. */
char *hparams_to_json(const mf_hparams *hp);
struct cJSON;
mf_status hparams_from_manifest(mf_hparams *hp, const struct cJSON *obj, mf_err *err);

#endif
