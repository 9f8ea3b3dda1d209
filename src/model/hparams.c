/* hparams.c - config.json and manifest parsing for the supported MoE families.
 * Not a general Hugging Face config reader: only the fields these families use. */
#include "model/hparams.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *mf_arch_name(mf_arch a) {
    switch (a) {
    case MF_ARCH_QWEN3_5_MOE: return "qwen3_5_moe";
    case MF_ARCH_QWEN3_NEXT: return "qwen3_next";
    case MF_ARCH_QWEN3_MOE: return "qwen3_moe";
    case MF_ARCH_COUNT: break;
    }
    return "unknown";
}

int hparams_norm_plus_one(const mf_hparams *hp) {
    return hp->arch == MF_ARCH_QWEN3_5_MOE || hp->arch == MF_ARCH_QWEN3_NEXT;
}

/* Field lookup: the text config first, then the root (vision-language configs keep some
 * fields, such as tie_word_embeddings, at the top). */
typedef struct cfg {
    const cJSON *text, *root;
    const char *what;
    mf_err *err;
} cfg;

static const cJSON *cfg_item(const cfg *c, const char *name) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(c->text, name);
    if ((!it || cJSON_IsNull(it)) && c->root != c->text)
        it = cJSON_GetObjectItemCaseSensitive(c->root, name);
    return (it && !cJSON_IsNull(it)) ? it : NULL;
}

/* Reads a number field; *out keeps def when absent and !required. */
static mf_status cfg_num(const cfg *c, const char *name, int required, double def, double *out) {
    const cJSON *it = cfg_item(c, name);
    if (!it) {
        if (required)
            return err_set(c->err, MF_ERR_FORMAT, "%s: missing field '%s'", c->what, name);
        *out = def;
        return MF_OK;
    }
    if (!cJSON_IsNumber(it))
        return err_set(c->err, MF_ERR_FORMAT, "%s: field '%s' is not a number", c->what, name);
    *out = it->valuedouble;
    return MF_OK;
}

static mf_status cfg_int(const cfg *c, const char *name, int required, int def, int lo, int hi,
                         int *out) {
    double v = def;
    mf_status st = cfg_num(c, name, required, def, &v);
    if (st) return st;
    if (v != floor(v) || v < lo || v > hi)
        return err_set(c->err, MF_ERR_FORMAT, "%s: field '%s' = %g is not an integer in [%d, %d]",
                       c->what, name, v, lo, hi);
    *out = (int)v;
    return MF_OK;
}

static mf_status cfg_bool(const cfg *c, const char *name, int def, int *out) {
    const cJSON *it = cfg_item(c, name);
    if (!it) {
        *out = def;
        return MF_OK;
    }
    if (!cJSON_IsBool(it))
        return err_set(c->err, MF_ERR_FORMAT, "%s: field '%s' is not true or false", c->what, name);
    *out = cJSON_IsTrue(it);
    return MF_OK;
}

/* rope_theta and partial_rotary_factor sit at the top of the text config in older files and
 * inside rope_parameters (or rope_scaling) in newer ones. */
static mf_status cfg_rope(const cfg *c, const char *name, double def, double *out) {
    const cJSON *it = cfg_item(c, name);
    const char *where[] = {"rope_parameters", "rope_scaling"};
    for (int i = 0; !it && i < 2; i++) {
        const cJSON *o = cfg_item(c, where[i]);
        if (o && cJSON_IsObject(o)) it = cJSON_GetObjectItemCaseSensitive(o, name);
        if (it && cJSON_IsNull(it)) it = NULL;
    }
    if (!it) {
        *out = def;
        return MF_OK;
    }
    if (!cJSON_IsNumber(it) || !(it->valuedouble > 0))
        return err_set(c->err, MF_ERR_FORMAT, "%s: field '%s' must be a positive number", c->what,
                       name);
    *out = it->valuedouble;
    return MF_OK;
}

#define TRY(x)                                                                                     \
    do {                                                                                           \
        mf_status st_ = (x);                                                                       \
        if (st_) return st_;                                                                       \
    } while (0)

static mf_status parse_layer_types(const cfg *c, mf_hparams *hp) {
    const cJSON *lt = cfg_item(c, "layer_types");
    if (hp->arch == MF_ARCH_QWEN3_MOE) {
        for (int i = 0; i < hp->n_layers; i++) hp->layer_kind[i] = MF_LAYER_FULL_ATTENTION;
        return MF_OK;
    }
    if (lt) {
        if (!cJSON_IsArray(lt) || cJSON_GetArraySize(lt) != hp->n_layers)
            return err_set(c->err, MF_ERR_FORMAT,
                           "%s: field 'layer_types' must be an array of num_hidden_layers (%d) strings",
                           c->what, hp->n_layers);
        int i = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, lt) {
            const char *s = cJSON_GetStringValue(e);
            if (s && !strcmp(s, "full_attention")) hp->layer_kind[i] = MF_LAYER_FULL_ATTENTION;
            else if (s && !strcmp(s, "linear_attention")) hp->layer_kind[i] = MF_LAYER_LINEAR_ATTENTION;
            else if (!s)
                return err_set(c->err, MF_ERR_FORMAT, "%s: layer_types[%d] is not a string",
                               c->what, i);
            else
                return err_set(c->err, MF_ERR_UNSUPPORTED,
                               "%s: layer_types[%d] = '%s' is not full_attention or linear_attention",
                               c->what, i, s);
            i++;
        }
        return MF_OK;
    }
    int interval;
    TRY(cfg_int(c, "full_attention_interval", 0, 4, 1, MF_MAX_LAYERS, &interval));
    for (int i = 0; i < hp->n_layers; i++)
        hp->layer_kind[i] = ((i + 1) % interval == 0) ? MF_LAYER_FULL_ATTENTION : MF_LAYER_LINEAR_ATTENTION;
    return MF_OK;
}

static mf_status parse_moe_layers(const cfg *c, mf_hparams *hp) {
    for (int i = 0; i < hp->n_layers; i++) hp->layer_moe[i] = 1;
    if (hp->arch == MF_ARCH_QWEN3_5_MOE) return MF_OK;
    int step;
    TRY(cfg_int(c, "decoder_sparse_step", 0, 1, 1, MF_MAX_LAYERS, &step));
    for (int i = 0; i < hp->n_layers; i++) hp->layer_moe[i] = ((i + 1) % step == 0);
    const cJSON *only = cfg_item(c, "mlp_only_layers");
    if (only) {
        if (!cJSON_IsArray(only))
            return err_set(c->err, MF_ERR_FORMAT, "%s: field 'mlp_only_layers' is not an array", c->what);
        const cJSON *e;
        cJSON_ArrayForEach(e, only) {
            if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= hp->n_layers ||
                e->valuedouble != floor(e->valuedouble))
                return err_set(c->err, MF_ERR_FORMAT,
                               "%s: mlp_only_layers holds an entry that is not a layer index", c->what);
            hp->layer_moe[(int)e->valuedouble] = 0;
        }
    }
    return MF_OK;
}

static mf_status check_hparams(const mf_hparams *hp, const char *what, mf_err *err) {
    if (hp->n_heads % hp->n_kv_heads)
        return err_set(err, MF_ERR_FORMAT,
                       "%s: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)",
                       what, hp->n_heads, hp->n_kv_heads);
    double rot = hp->head_dim * hp->partial_rotary;
    if (rot != floor(rot) || (int)rot % 2 || rot < 2 || rot > hp->head_dim)
        return err_set(err, MF_ERR_FORMAT,
                       "%s: head_dim (%d) x partial_rotary_factor (%g) must be an even number of dims",
                       what, hp->head_dim, hp->partial_rotary);
    if (hp->top_k > hp->n_experts)
        return err_set(err, MF_ERR_FORMAT, "%s: num_experts_per_tok (%d) exceeds num_experts (%d)",
                       what, hp->top_k, hp->n_experts);
    int any_linear = 0, any_dense = 0;
    for (int i = 0; i < hp->n_layers; i++) {
        any_linear |= hp->layer_kind[i] == MF_LAYER_LINEAR_ATTENTION;
        any_dense |= !hp->layer_moe[i];
    }
    if (any_linear && hp->lin_v_heads % hp->lin_k_heads)
        return err_set(err, MF_ERR_FORMAT,
                       "%s: linear_num_value_heads (%d) is not a multiple of linear_num_key_heads (%d)",
                       what, hp->lin_v_heads, hp->lin_k_heads);
    if (any_dense && hp->dense_inter <= 0)
        return err_set(err, MF_ERR_FORMAT, "%s: dense MLP layers need intermediate_size", what);
    return MF_OK;
}

mf_status hparams_from_config_json(mf_hparams *hp, const char *json, const char *what, mf_err *err) {
    memset(hp, 0, sizeof *hp);
    cJSON *root = cJSON_Parse(json);
    if (!root || !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return err_set(err, MF_ERR_FORMAT, "%s: not a JSON object", what);
    }
    mf_status st = MF_OK;
    cfg c = {root, root, what, err};
    const char *mt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(root, "model_type"));
    if (!mt) {
        st = err_set(err, MF_ERR_FORMAT, "%s: missing field 'model_type'", what);
        goto done;
    }
    snprintf(hp->model_type, sizeof hp->model_type, "%s", mt);
    if (!strcmp(mt, "qwen3_5_moe")) {
        hp->arch = MF_ARCH_QWEN3_5_MOE;
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(root, "text_config");
        if (t && cJSON_IsObject(t)) c.text = t;
    } else if (!strcmp(mt, "qwen3_5_moe_text")) {
        hp->arch = MF_ARCH_QWEN3_5_MOE;
    } else if (!strcmp(mt, "qwen3_next")) {
        hp->arch = MF_ARCH_QWEN3_NEXT;
    } else if (!strcmp(mt, "qwen3_moe")) {
        hp->arch = MF_ARCH_QWEN3_MOE;
    } else {
        st = err_set(err, MF_ERR_UNSUPPORTED,
                     "%s: model_type '%s' is not supported (supported: qwen3_5_moe, qwen3_5_moe_text, "
                     "qwen3_next, qwen3_moe)",
                     what, mt);
        goto done;
    }
    int hybrid = hp->arch != MF_ARCH_QWEN3_MOE;
    double eps = 1e-6;
#define T(x)                                                                                       \
    do {                                                                                           \
        if ((st = (x))) goto done;                                                                 \
    } while (0)
    T(cfg_int(&c, "num_hidden_layers", 1, 0, 1, MF_MAX_LAYERS, &hp->n_layers));
    T(cfg_int(&c, "hidden_size", 1, 0, 1, 1 << 20, &hp->hidden));
    T(cfg_int(&c, "vocab_size", 1, 0, 1, 1 << 24, &hp->vocab));
    T(cfg_int(&c, "max_position_embeddings", 0, 32768, 1, 1 << 30, &hp->max_position));
    T(cfg_num(&c, "rms_norm_eps", 0, 1e-6, &eps));
    if (!(eps > 0 && eps < 1)) {
        st = err_set(err, MF_ERR_FORMAT, "%s: field 'rms_norm_eps' = %g out of range", what, eps);
        goto done;
    }
    hp->rms_eps = eps;
    T(cfg_bool(&c, "tie_word_embeddings", 0, &hp->tie_word_embeddings));
    T(cfg_int(&c, "num_attention_heads", 1, 0, 1, 1 << 12, &hp->n_heads));
    T(cfg_int(&c, "num_key_value_heads", 0, hp->n_heads, 1, 1 << 12, &hp->n_kv_heads));
    /* Qwen3_5MoeTextConfig and Qwen3NextConfig default head_dim to 256; qwen3_moe has none */
    T(cfg_int(&c, "head_dim", 0, hybrid ? 256 : hp->hidden / hp->n_heads, 1, 1 << 12,
              &hp->head_dim));
    T(cfg_rope(&c, "rope_theta", 10000.0, &hp->rope_theta));
    T(cfg_rope(&c, "partial_rotary_factor", hybrid ? 0.25 : 1.0, &hp->partial_rotary));
    if (hybrid) {
        T(cfg_bool(&c, "attn_output_gate", 1, &hp->attn_output_gate));
        T(cfg_int(&c, "linear_num_key_heads", 1, 0, 1, 1 << 12, &hp->lin_k_heads));
        T(cfg_int(&c, "linear_num_value_heads", 1, 0, 1, 1 << 12, &hp->lin_v_heads));
        T(cfg_int(&c, "linear_key_head_dim", 1, 0, 1, 1 << 12, &hp->lin_k_dim));
        T(cfg_int(&c, "linear_value_head_dim", 1, 0, 1, 1 << 12, &hp->lin_v_dim));
        T(cfg_int(&c, "linear_conv_kernel_dim", 0, 4, 1, 64, &hp->lin_conv_kernel));
        T(cfg_int(&c, "shared_expert_intermediate_size", 1, 0, 1, 1 << 20, &hp->shared_inter));
    }
    /* transformers 5 writes qwen3_moe's expert count as num_local_experts */
    T(cfg_int(&c, cfg_item(&c, "num_experts") ? "num_experts" : "num_local_experts", 1, 0, 1,
              1 << 16, &hp->n_experts));
    T(cfg_int(&c, "num_experts_per_tok", 1, 0, 1, 1 << 16, &hp->top_k));
    T(cfg_int(&c, "moe_intermediate_size", 1, 0, 1, 1 << 20, &hp->moe_inter));
    if (hp->arch == MF_ARCH_QWEN3_5_MOE) hp->norm_topk_prob = 1;
    else T(cfg_bool(&c, "norm_topk_prob", hp->arch == MF_ARCH_QWEN3_NEXT, &hp->norm_topk_prob));
    T(cfg_int(&c, "intermediate_size", 0, 0, 0, 1 << 20, &hp->dense_inter));
    T(parse_layer_types(&c, hp));
    T(parse_moe_layers(&c, hp));
#undef T
    st = check_hparams(hp, what, err);
done:
    cJSON_Delete(root);
    return st;
}

mf_status hparams_from_config_file(mf_hparams *hp, const char *path, mf_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return err_set(err, MF_ERR_IO, "%s: cannot open (missing config.json?)", path);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 65536;
            if (cap > (64u << 20)) {
                free(buf);
                fclose(f);
                return err_set(err, MF_ERR_FORMAT, "%s: larger than 64 MiB, not a config", path);
            }
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                return err_set(err, MF_ERR_NOMEM, "%s: out of memory", path);
            }
            buf = nb;
        }
        size_t n = fread(buf + len, 1, cap - len - 1, f);
        len += n;
        if (n == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return err_set(err, MF_ERR_IO, "%s: read error", path);
    }
    buf[len] = '\0';
    mf_status st = hparams_from_config_json(hp, buf, path, err);
    free(buf);
    return st;
}

/* ---- manifest form ---- */

char *hparams_to_json(const mf_hparams *hp) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "arch", mf_arch_name(hp->arch));
    cJSON_AddStringToObject(o, "model_type", hp->model_type);
    cJSON_AddNumberToObject(o, "n_layers", hp->n_layers);
    cJSON_AddNumberToObject(o, "hidden_size", hp->hidden);
    cJSON_AddNumberToObject(o, "vocab_size", hp->vocab);
    cJSON_AddNumberToObject(o, "max_position_embeddings", hp->max_position);
    cJSON_AddNumberToObject(o, "rms_norm_eps", hp->rms_eps);
    cJSON_AddBoolToObject(o, "tie_word_embeddings", hp->tie_word_embeddings);
    cJSON_AddNumberToObject(o, "n_heads", hp->n_heads);
    cJSON_AddNumberToObject(o, "n_kv_heads", hp->n_kv_heads);
    cJSON_AddNumberToObject(o, "head_dim", hp->head_dim);
    cJSON_AddNumberToObject(o, "rope_theta", hp->rope_theta);
    cJSON_AddNumberToObject(o, "partial_rotary_factor", hp->partial_rotary);
    cJSON_AddBoolToObject(o, "attn_output_gate", hp->attn_output_gate);
    cJSON_AddNumberToObject(o, "linear_num_key_heads", hp->lin_k_heads);
    cJSON_AddNumberToObject(o, "linear_num_value_heads", hp->lin_v_heads);
    cJSON_AddNumberToObject(o, "linear_key_head_dim", hp->lin_k_dim);
    cJSON_AddNumberToObject(o, "linear_value_head_dim", hp->lin_v_dim);
    cJSON_AddNumberToObject(o, "linear_conv_kernel_dim", hp->lin_conv_kernel);
    cJSON_AddNumberToObject(o, "n_experts", hp->n_experts);
    cJSON_AddNumberToObject(o, "n_experts_per_tok", hp->top_k);
    cJSON_AddBoolToObject(o, "norm_topk_prob", hp->norm_topk_prob);
    cJSON_AddNumberToObject(o, "moe_intermediate_size", hp->moe_inter);
    cJSON_AddNumberToObject(o, "shared_expert_intermediate_size", hp->shared_inter);
    cJSON_AddNumberToObject(o, "intermediate_size", hp->dense_inter);
    cJSON *lt = cJSON_AddArrayToObject(o, "layer_types");
    cJSON *lm = cJSON_AddArrayToObject(o, "moe_layers");
    for (int i = 0; i < hp->n_layers; i++) {
        cJSON_AddItemToArray(lt, cJSON_CreateString(hp->layer_kind[i] == MF_LAYER_FULL_ATTENTION
                                                        ? "full_attention"
                                                        : "linear_attention"));
        cJSON_AddItemToArray(lm, cJSON_CreateBool(hp->layer_moe[i]));
    }
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

static mf_status man_num(const cJSON *o, const char *name, double *out, mf_err *err) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!cJSON_IsNumber(it) && !cJSON_IsBool(it))
        return err_set(err, MF_ERR_FORMAT, "manifest hparams: missing or bad field '%s'", name);
    *out = cJSON_IsBool(it) ? (double)cJSON_IsTrue(it) : it->valuedouble;
    return MF_OK;
}

mf_status hparams_from_manifest(mf_hparams *hp, const cJSON *o, mf_err *err) {
    memset(hp, 0, sizeof *hp);
    if (!cJSON_IsObject(o)) return err_set(err, MF_ERR_FORMAT, "manifest: 'hparams' is not an object");
    const char *arch = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "arch"));
    const char *mt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "model_type"));
    int found = 0;
    for (int a = 0; arch && a < MF_ARCH_COUNT; a++)
        if (!strcmp(arch, mf_arch_name((mf_arch)a))) {
            hp->arch = (mf_arch)a;
            found = 1;
        }
    if (!found)
        return err_set(err, MF_ERR_UNSUPPORTED, "manifest hparams: unknown arch '%s'", arch ? arch : "(none)");
    snprintf(hp->model_type, sizeof hp->model_type, "%s", mt ? mt : arch);
    struct { const char *name; int *dst; int lo; } ints[] = {
        {"n_layers", &hp->n_layers, 1}, {"hidden_size", &hp->hidden, 1}, {"vocab_size", &hp->vocab, 1},
        {"max_position_embeddings", &hp->max_position, 1},
        {"tie_word_embeddings", &hp->tie_word_embeddings, 0}, {"n_heads", &hp->n_heads, 1},
        {"n_kv_heads", &hp->n_kv_heads, 1}, {"head_dim", &hp->head_dim, 1},
        {"attn_output_gate", &hp->attn_output_gate, 0}, {"linear_num_key_heads", &hp->lin_k_heads, 0},
        {"linear_num_value_heads", &hp->lin_v_heads, 0}, {"linear_key_head_dim", &hp->lin_k_dim, 0},
        {"linear_value_head_dim", &hp->lin_v_dim, 0}, {"linear_conv_kernel_dim", &hp->lin_conv_kernel, 0},
        {"n_experts", &hp->n_experts, 1}, {"n_experts_per_tok", &hp->top_k, 1},
        {"norm_topk_prob", &hp->norm_topk_prob, 0}, {"moe_intermediate_size", &hp->moe_inter, 1},
        {"shared_expert_intermediate_size", &hp->shared_inter, 0},
        {"intermediate_size", &hp->dense_inter, 0},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        double v;
        TRY(man_num(o, ints[i].name, &v, err));
        if (v != floor(v) || v < ints[i].lo || v > (1 << 30))
            return err_set(err, MF_ERR_FORMAT, "manifest hparams: field '%s' out of range", ints[i].name);
        *ints[i].dst = (int)v;
    }
    if (hp->n_layers > MF_MAX_LAYERS)
        return err_set(err, MF_ERR_FORMAT, "manifest hparams: n_layers %d exceeds %d", hp->n_layers, MF_MAX_LAYERS);
    TRY(man_num(o, "rms_norm_eps", &hp->rms_eps, err));
    TRY(man_num(o, "rope_theta", &hp->rope_theta, err));
    TRY(man_num(o, "partial_rotary_factor", &hp->partial_rotary, err));
    const cJSON *lt = cJSON_GetObjectItemCaseSensitive(o, "layer_types");
    const cJSON *lm = cJSON_GetObjectItemCaseSensitive(o, "moe_layers");
    if (!cJSON_IsArray(lt) || cJSON_GetArraySize(lt) != hp->n_layers || !cJSON_IsArray(lm) ||
        cJSON_GetArraySize(lm) != hp->n_layers)
        return err_set(err, MF_ERR_FORMAT, "manifest hparams: layer_types/moe_layers must have n_layers entries");
    for (int i = 0; i < hp->n_layers; i++) {
        const char *s = cJSON_GetStringValue(cJSON_GetArrayItem(lt, i));
        if (!s || (strcmp(s, "full_attention") && strcmp(s, "linear_attention")))
            return err_set(err, MF_ERR_FORMAT, "manifest hparams: bad layer_types[%d]", i);
        hp->layer_kind[i] = !strcmp(s, "full_attention") ? MF_LAYER_FULL_ATTENTION : MF_LAYER_LINEAR_ATTENTION;
        hp->layer_moe[i] = (uint8_t)cJSON_IsTrue(cJSON_GetArrayItem(lm, i));
    }
    return check_hparams(hp, "manifest hparams", err);
}
