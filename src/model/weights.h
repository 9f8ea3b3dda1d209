/* weights.h - the dense weights of a model, read once from a .moeflux file into one resident
 * allocation and viewed per layer. Not the routed experts (experts/store.c streams those). */
#ifndef MF_MODEL_WEIGHTS_H
#define MF_MODEL_WEIGHTS_H

#include "backend/backend.h"
#include "format/mfpack.h"
#include "model/hparams.h"

typedef struct layer_weights {
    const float *input_norm, *post_norm;      /* [hidden], multipliers */
    /* full attention */
    mf_wmat q_proj, k_proj, v_proj, o_proj;
    const float *q_norm, *k_norm;             /* [head_dim] */
    /* Gated DeltaNet */
    mf_wmat in_qkv, in_z, in_b, in_a, out_proj;
    const float *conv;                        /* [channels][kernel] */
    const float *dt_bias, *A_log;             /* [v heads] */
    const float *lin_norm;                    /* [v head dim] */
    /* MoE (router, shared expert) or dense MLP (mlp_*) */
    mf_wmat router;                           /* [experts, hidden] */
    mf_wmat sh_gate, sh_up, sh_down, sh_gate_w; /* shared expert; sh_gate_w: [1, hidden] */
    int has_shared;
    mf_wmat mlp_gate, mlp_up, mlp_down;
} layer_weights;

typedef struct model_weights {
    mf_backend *be;             /* owner of mem */
    void *mem;                  /* backend memory: every dense tensor, as laid out in the file's dense region */
    uint64_t mem_bytes;
    mf_wmat embed, lm_head;     /* lm_head aliases embed when tied */
    const float *final_norm;    /* [hidden] */
    layer_weights *layers;      /* [n_layers] */
} model_weights;

/* Reads the dense region of f and checks every tensor the hyperparameters call for exists with
 * the right shape (errors name the tensor). */
mf_status weights_load(model_weights *w, const mfpack_file *f, mf_backend *be, mf_err *err);
void weights_free(model_weights *w);

#endif
