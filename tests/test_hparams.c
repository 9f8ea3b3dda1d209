/* test_hparams.c - tests of src/model/hparams.c: config.json parsing for every supported family,
 * refusals, and the manifest round trip. Not a converter test: no weights are involved. */
#include <criterion/criterion.h>

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "helpers.h"
#include "model/hparams.h"

/* ---- configs (the expected values in each test are read off these texts) ---- */

/* Vision-language form: text fields nested in text_config, tie_word_embeddings at the top, rope
 * fields in text_config.rope_parameters. layer_types is explicit and deliberately differs from
 * what full_attention_interval would give; vision_config has its own hidden_size and heads. */
static const char *cfg_vl =
    "{\"architectures\": [\"Qwen3_5MoeForConditionalGeneration\"],"
    " \"model_type\": \"qwen3_5_moe\", \"tie_word_embeddings\": true, \"image_token_id\": 248056,"
    " \"vision_config\": {\"model_type\": \"qwen3_5_moe_vision\", \"depth\": 2, \"hidden_size\": 96,"
    "   \"num_heads\": 3, \"intermediate_size\": 192, \"out_hidden_size\": 128},"
    " \"text_config\": {\"model_type\": \"qwen3_5_moe_text\", \"num_hidden_layers\": 6,"
    "   \"hidden_size\": 128, \"vocab_size\": 1000, \"max_position_embeddings\": 4096,"
    "   \"rms_norm_eps\": 1e-06, \"num_attention_heads\": 8, \"num_key_value_heads\": 2,"
    "   \"head_dim\": 32, \"attn_output_gate\": true,"
    "   \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 10000000,"
    "     \"partial_rotary_factor\": 0.25, \"mrope_section\": [11, 11, 10], \"mrope_interleaved\": true},"
    "   \"linear_num_key_heads\": 4, \"linear_num_value_heads\": 8, \"linear_key_head_dim\": 16,"
    "   \"linear_value_head_dim\": 24, \"linear_conv_kernel_dim\": 4,"
    "   \"num_experts\": 16, \"num_experts_per_tok\": 4, \"moe_intermediate_size\": 64,"
    "   \"shared_expert_intermediate_size\": 96, \"full_attention_interval\": 4,"
    "   \"layer_types\": [\"linear_attention\", \"full_attention\", \"linear_attention\","
    "     \"linear_attention\", \"full_attention\", \"full_attention\"]}}";

/* Flat text-only form: no layer_types (default interval 4), no tie_word_embeddings, no
 * partial_rotary_factor (default 0.25), no max_position_embeddings (default 32768). */
static const char *cfg_text =
    "{\"model_type\": \"qwen3_5_moe_text\", \"num_hidden_layers\": 8, \"hidden_size\": 256,"
    " \"vocab_size\": 2048, \"rms_norm_eps\": 1e-05, \"num_attention_heads\": 4,"
    " \"num_key_value_heads\": 1, \"head_dim\": 64,"
    " \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 5000000},"
    " \"linear_num_key_heads\": 2, \"linear_num_value_heads\": 4, \"linear_key_head_dim\": 32,"
    " \"linear_value_head_dim\": 32, \"linear_conv_kernel_dim\": 3,"
    " \"num_experts\": 8, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 128,"
    " \"shared_expert_intermediate_size\": 192}";

/* Qwen3-Next: rope_theta and partial_rotary_factor at the top level, decoder_sparse_step 2 with
 * mlp_only_layers [3], so MoE layers are 1, 5, 7 and layers 0, 2, 3, 4, 6 are dense. */
static const char *cfg_next =
    "{\"architectures\": [\"Qwen3NextForCausalLM\"], \"model_type\": \"qwen3_next\","
    " \"num_hidden_layers\": 8, \"hidden_size\": 192, \"vocab_size\": 3000,"
    " \"max_position_embeddings\": 262144, \"rms_norm_eps\": 1e-06, \"tie_word_embeddings\": false,"
    " \"num_attention_heads\": 6, \"num_key_value_heads\": 2, \"head_dim\": 64,"
    " \"rope_theta\": 10000000, \"partial_rotary_factor\": 0.5,"
    " \"linear_num_key_heads\": 2, \"linear_num_value_heads\": 6, \"linear_key_head_dim\": 32,"
    " \"linear_value_head_dim\": 48, \"linear_conv_kernel_dim\": 4,"
    " \"num_experts\": 10, \"num_experts_per_tok\": 3, \"moe_intermediate_size\": 64,"
    " \"shared_expert_intermediate_size\": 128, \"intermediate_size\": 320,"
    " \"decoder_sparse_step\": 2, \"mlp_only_layers\": [3], \"full_attention_interval\": 4}";

/* Qwen3-MoE: attention everywhere, no head_dim (hidden / heads = 24), norm_topk_prob absent
 * (false), mlp_only_layers [1] makes layer 1 a dense MLP of intermediate_size. */
static const char *cfg_moe =
    "{\"architectures\": [\"Qwen3MoeForCausalLM\"], \"model_type\": \"qwen3_moe\","
    " \"num_hidden_layers\": 4, \"hidden_size\": 192, \"vocab_size\": 500,"
    " \"max_position_embeddings\": 40960, \"rms_norm_eps\": 1e-06, \"tie_word_embeddings\": true,"
    " \"num_attention_heads\": 8, \"num_key_value_heads\": 4, \"rope_theta\": 1000000,"
    " \"num_experts\": 6, \"num_experts_per_tok\": 2, \"moe_intermediate_size\": 32,"
    " \"intermediate_size\": 384, \"mlp_only_layers\": [1], \"decoder_sparse_step\": 1,"
    " \"use_sliding_window\": false, \"sliding_window\": null}";

/* ---- helpers ---- */

static mf_hparams parse_ok(const char *json, const char *what) {
    mf_hparams hp;
    mf_err err = {0};
    mf_status st = hparams_from_config_json(&hp, json, what, &err);
    cr_assert_eq(st, MF_OK, "%s: refused: %s", what, err.msg);
    return hp;
}

/* A copy of `base` with `field` (inside `sub` when not NULL) replaced by `value`, or removed
 * when value is NULL. Returns malloc'd JSON text. */
static char *mutate(const char *base, const char *sub, const char *field, cJSON *value) {
    cJSON *root = cJSON_Parse(base);
    cr_assert(root, "base config is not JSON");
    cJSON *obj = sub ? cJSON_GetObjectItemCaseSensitive(root, sub) : root;
    cr_assert(cJSON_IsObject(obj));
    if (value) {
        if (cJSON_GetObjectItemCaseSensitive(obj, field))
            cJSON_ReplaceItemInObjectCaseSensitive(obj, field, value);
        else
            cJSON_AddItemToObject(obj, field, value);
    } else {
        cJSON_DeleteItemFromObjectCaseSensitive(obj, field);
    }
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

/* Parses `json` and expects status `want` with a message containing `needle` and `what`. */
static void expect_refused(const char *json, mf_status want, const char *needle) {
    const char *what = "test-config.json";
    mf_hparams hp;
    mf_err err = {0};
    mf_status st = hparams_from_config_json(&hp, json, what, &err);
    cr_assert_eq(st, want, "expected %s, got %s (%s) for: %s", mf_status_name(want),
                 mf_status_name(st), err.msg, json);
    cr_assert_eq(err.status, want);
    cr_assert(strstr(err.msg, needle), "message '%s' does not name %s", err.msg, needle);
    cr_assert(strstr(err.msg, what), "message '%s' does not name the source", err.msg);
}

static void expect_refused_mut(const char *base, const char *sub, const char *field, cJSON *value,
                               mf_status want, const char *needle) {
    char *json = mutate(base, sub, field, value);
    expect_refused(json, want, needle);
    free(json);
}

/* Kinds from a list of 'F' (full) / 'L' (linear) characters. */
static void expect_kinds(const mf_hparams *hp, const char *kinds) {
    cr_assert_eq(hp->n_layers, (int)strlen(kinds));
    for (int i = 0; i < hp->n_layers; i++) {
        int want = kinds[i] == 'F' ? MF_LAYER_FULL_ATTENTION : MF_LAYER_LINEAR_ATTENTION;
        cr_assert_eq(hp->layer_kind[i], want, "layer %d kind %d, want %c", i, hp->layer_kind[i],
                     kinds[i]);
    }
}

/* MoE flags from a list of 'M' (MoE) / 'D' (dense MLP) characters. */
static void expect_moe(const mf_hparams *hp, const char *moe) {
    cr_assert_eq(hp->n_layers, (int)strlen(moe));
    for (int i = 0; i < hp->n_layers; i++)
        cr_assert_eq(hp->layer_moe[i], moe[i] == 'M', "layer %d moe %d, want %c", i, hp->layer_moe[i],
                     moe[i]);
}

static void expect_same(const mf_hparams *a, const mf_hparams *b) {
    cr_assert_eq(a->arch, b->arch);
    cr_assert_str_eq(a->model_type, b->model_type);
    cr_assert_eq(a->n_layers, b->n_layers);
    cr_assert_eq(a->hidden, b->hidden);
    cr_assert_eq(a->vocab, b->vocab);
    cr_assert_eq(a->max_position, b->max_position);
    cr_assert(a->rms_eps == b->rms_eps, "rms_eps %.17g vs %.17g", a->rms_eps, b->rms_eps);
    cr_assert_eq(a->tie_word_embeddings, b->tie_word_embeddings);
    cr_assert_eq(a->n_heads, b->n_heads);
    cr_assert_eq(a->n_kv_heads, b->n_kv_heads);
    cr_assert_eq(a->head_dim, b->head_dim);
    cr_assert(a->rope_theta == b->rope_theta, "rope_theta %.17g vs %.17g", a->rope_theta, b->rope_theta);
    cr_assert(a->partial_rotary == b->partial_rotary);
    cr_assert_eq(a->attn_output_gate, b->attn_output_gate);
    cr_assert_eq(a->lin_k_heads, b->lin_k_heads);
    cr_assert_eq(a->lin_v_heads, b->lin_v_heads);
    cr_assert_eq(a->lin_k_dim, b->lin_k_dim);
    cr_assert_eq(a->lin_v_dim, b->lin_v_dim);
    cr_assert_eq(a->lin_conv_kernel, b->lin_conv_kernel);
    cr_assert_eq(a->n_experts, b->n_experts);
    cr_assert_eq(a->top_k, b->top_k);
    cr_assert_eq(a->norm_topk_prob, b->norm_topk_prob);
    cr_assert_eq(a->moe_inter, b->moe_inter);
    cr_assert_eq(a->shared_inter, b->shared_inter);
    cr_assert_eq(a->dense_inter, b->dense_inter);
    for (int i = 0; i < a->n_layers; i++) {
        cr_assert_eq(a->layer_kind[i], b->layer_kind[i], "layer %d kind", i);
        cr_assert_eq(a->layer_moe[i], b->layer_moe[i], "layer %d moe", i);
    }
}

/* ---- families ---- */

Test(hparams, qwen3_5_moe_vision_language) {
    mf_hparams hp = parse_ok(cfg_vl, "vl");
    cr_assert_eq(hp.arch, MF_ARCH_QWEN3_5_MOE);
    cr_assert_str_eq(hp.model_type, "qwen3_5_moe");
    cr_assert_eq(hp.n_layers, 6);
    cr_assert_eq(hp.hidden, 128, "hidden_size must come from text_config, not vision_config");
    cr_assert_eq(hp.vocab, 1000);
    cr_assert_eq(hp.max_position, 4096);
    cr_assert(hp.rms_eps == 1e-6);
    cr_assert_eq(hp.tie_word_embeddings, 1, "tie_word_embeddings sits at the top level");
    cr_assert_eq(hp.n_heads, 8);
    cr_assert_eq(hp.n_kv_heads, 2);
    cr_assert_eq(hp.head_dim, 32);
    cr_assert(hp.rope_theta == 1e7, "rope_theta %g from text_config.rope_parameters", hp.rope_theta);
    cr_assert(hp.partial_rotary == 0.25);
    cr_assert_eq(hp.attn_output_gate, 1);
    cr_assert_eq(hp.lin_k_heads, 4);
    cr_assert_eq(hp.lin_v_heads, 8);
    cr_assert_eq(hp.lin_k_dim, 16);
    cr_assert_eq(hp.lin_v_dim, 24);
    cr_assert_eq(hp.lin_conv_kernel, 4);
    cr_assert_eq(hp.n_experts, 16);
    cr_assert_eq(hp.top_k, 4);
    cr_assert_eq(hp.norm_topk_prob, 1, "Qwen3.5-MoE always renormalizes the top-k weights");
    cr_assert_eq(hp.moe_inter, 64);
    cr_assert_eq(hp.shared_inter, 96);
    cr_assert_eq(hp.dense_inter, 0);
    expect_kinds(&hp, "LFLLFF");
    expect_moe(&hp, "MMMMMM");
    cr_assert(hparams_norm_plus_one(&hp));
}

Test(hparams, qwen3_5_moe_text_flat) {
    mf_hparams hp = parse_ok(cfg_text, "text");
    cr_assert_eq(hp.arch, MF_ARCH_QWEN3_5_MOE);
    cr_assert_str_eq(hp.model_type, "qwen3_5_moe_text");
    cr_assert_eq(hp.n_layers, 8);
    cr_assert_eq(hp.hidden, 256);
    cr_assert_eq(hp.vocab, 2048);
    cr_assert_eq(hp.max_position, 32768, "HF default max_position_embeddings");
    cr_assert(hp.rms_eps == 1e-5);
    cr_assert_eq(hp.tie_word_embeddings, 0);
    cr_assert_eq(hp.n_heads, 4);
    cr_assert_eq(hp.n_kv_heads, 1);
    cr_assert_eq(hp.head_dim, 64);
    cr_assert(hp.rope_theta == 5e6);
    cr_assert(hp.partial_rotary == 0.25, "HF default partial_rotary_factor is 0.25");
    cr_assert_eq(hp.attn_output_gate, 1);
    cr_assert_eq(hp.lin_k_heads, 2);
    cr_assert_eq(hp.lin_v_heads, 4);
    cr_assert_eq(hp.lin_k_dim, 32);
    cr_assert_eq(hp.lin_v_dim, 32);
    cr_assert_eq(hp.lin_conv_kernel, 3);
    cr_assert_eq(hp.n_experts, 8);
    cr_assert_eq(hp.top_k, 2);
    cr_assert_eq(hp.norm_topk_prob, 1);
    cr_assert_eq(hp.moe_inter, 128);
    cr_assert_eq(hp.shared_inter, 192);
    /* full_attention_interval absent: 4, layer i full iff (i + 1) % 4 == 0 */
    expect_kinds(&hp, "LLLFLLLF");
    expect_moe(&hp, "MMMMMMMM");
}

Test(hparams, qwen3_next_top_level_rope_and_sparse_step) {
    mf_hparams hp = parse_ok(cfg_next, "next");
    cr_assert_eq(hp.arch, MF_ARCH_QWEN3_NEXT);
    cr_assert_str_eq(hp.model_type, "qwen3_next");
    cr_assert_eq(hp.n_layers, 8);
    cr_assert_eq(hp.hidden, 192);
    cr_assert_eq(hp.vocab, 3000);
    cr_assert_eq(hp.max_position, 262144);
    cr_assert(hp.rms_eps == 1e-6);
    cr_assert_eq(hp.tie_word_embeddings, 0);
    cr_assert_eq(hp.n_heads, 6);
    cr_assert_eq(hp.n_kv_heads, 2);
    cr_assert_eq(hp.head_dim, 64);
    cr_assert(hp.rope_theta == 1e7);
    cr_assert(hp.partial_rotary == 0.5);
    cr_assert_eq(hp.attn_output_gate, 1);
    cr_assert_eq(hp.lin_k_heads, 2);
    cr_assert_eq(hp.lin_v_heads, 6);
    cr_assert_eq(hp.lin_k_dim, 32);
    cr_assert_eq(hp.lin_v_dim, 48);
    cr_assert_eq(hp.lin_conv_kernel, 4);
    cr_assert_eq(hp.n_experts, 10);
    cr_assert_eq(hp.top_k, 3);
    cr_assert_eq(hp.norm_topk_prob, 1, "Qwen3NextConfig defaults norm_topk_prob to True");
    cr_assert_eq(hp.moe_inter, 64);
    cr_assert_eq(hp.shared_inter, 128);
    cr_assert_eq(hp.dense_inter, 320);
    expect_kinds(&hp, "LLLFLLLF");
    /* (i + 1) % 2 == 0 -> layers 1, 3, 5, 7; mlp_only_layers removes 3 */
    expect_moe(&hp, "DMDDDMDM");
    cr_assert(hparams_norm_plus_one(&hp));
}

Test(hparams, qwen3_moe_all_attention) {
    mf_hparams hp = parse_ok(cfg_moe, "moe");
    cr_assert_eq(hp.arch, MF_ARCH_QWEN3_MOE);
    cr_assert_str_eq(hp.model_type, "qwen3_moe");
    cr_assert_eq(hp.n_layers, 4);
    cr_assert_eq(hp.hidden, 192);
    cr_assert_eq(hp.vocab, 500);
    cr_assert_eq(hp.max_position, 40960);
    cr_assert_eq(hp.tie_word_embeddings, 1);
    cr_assert_eq(hp.n_heads, 8);
    cr_assert_eq(hp.n_kv_heads, 4);
    cr_assert_eq(hp.head_dim, 192 / 8, "head_dim absent: hidden_size / num_attention_heads");
    cr_assert(hp.rope_theta == 1e6);
    cr_assert(hp.partial_rotary == 1.0, "qwen3_moe rotates the whole head");
    cr_assert_eq(hp.attn_output_gate, 0);
    cr_assert_eq(hp.lin_k_heads, 0);
    cr_assert_eq(hp.lin_v_heads, 0);
    cr_assert_eq(hp.shared_inter, 0, "qwen3_moe has no shared expert");
    cr_assert_eq(hp.n_experts, 6);
    cr_assert_eq(hp.top_k, 2);
    cr_assert_eq(hp.norm_topk_prob, 0, "Qwen3MoeConfig defaults norm_topk_prob to False");
    cr_assert_eq(hp.moe_inter, 32);
    cr_assert_eq(hp.dense_inter, 384);
    expect_kinds(&hp, "FFFF");
    expect_moe(&hp, "MDMM");
    cr_assert(!hparams_norm_plus_one(&hp));
}

Test(hparams, qwen3_moe_norm_topk_prob_and_kv_default) {
    char *a = mutate(cfg_moe, NULL, "norm_topk_prob", cJSON_CreateTrue());
    char *b = mutate(a, NULL, "num_key_value_heads", NULL);
    mf_hparams hp = parse_ok(b, "moe-variant");
    cr_assert_eq(hp.norm_topk_prob, 1);
    cr_assert_eq(hp.n_kv_heads, 8, "num_key_value_heads absent: num_attention_heads");
    free(a);
    free(b);
}

Test(hparams, qwen3_moe_ignores_layer_types) {
    /* qwen3_moe has no linear attention: every layer is full attention whatever is written. */
    cJSON *lt = cJSON_CreateArray();
    for (int i = 0; i < 4; i++) cJSON_AddItemToArray(lt, cJSON_CreateString("linear_attention"));
    char *json = mutate(cfg_moe, NULL, "layer_types", lt);
    mf_hparams hp = parse_ok(json, "moe-lt");
    expect_kinds(&hp, "FFFF");
    free(json);
}

Test(hparams, qwen3_moe_mlp_only_needs_intermediate_size) {
    expect_refused_mut(cfg_moe, NULL, "intermediate_size", NULL, MF_ERR_FORMAT, "intermediate_size");
}

Test(hparams, hybrid_head_dim_default_is_hf_default) {
    /* Qwen3_5MoeTextConfig and Qwen3NextConfig both default head_dim to 256 (not hidden/heads). */
    char *json = mutate(cfg_text, NULL, "head_dim", NULL);
    mf_hparams hp = parse_ok(json, "text-no-head-dim");
    cr_assert_eq(hp.head_dim, 256, "head_dim %d", hp.head_dim);
    free(json);
    json = mutate(cfg_next, NULL, "head_dim", NULL);
    hp = parse_ok(json, "next-no-head-dim");
    cr_assert_eq(hp.head_dim, 256, "head_dim %d", hp.head_dim);
    free(json);
}

/* ---- layer_types: explicit vs derived ---- */

Test(hparams, layer_types_from_interval) {
    int intervals[] = {1, 2, 3, 4, 5, 8};
    for (size_t k = 0; k < sizeof intervals / sizeof intervals[0]; k++) {
        char *json = mutate(cfg_text, NULL, "full_attention_interval",
                            cJSON_CreateNumber(intervals[k]));
        mf_hparams hp = parse_ok(json, "interval");
        char want[16] = {0};
        for (int i = 0; i < 8; i++) want[i] = (i + 1) % intervals[k] == 0 ? 'F' : 'L';
        expect_kinds(&hp, want);
        free(json);
    }
}

Test(hparams, layer_types_explicit_wins_over_interval) {
    const char *kinds[] = {"FFFFFFFF", "LLLLLLLL", "FLFLFLFL", "LLFLLLLF"};
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        cJSON *lt = cJSON_CreateArray();
        for (int i = 0; i < 8; i++)
            cJSON_AddItemToArray(lt, cJSON_CreateString(kinds[k][i] == 'F' ? "full_attention"
                                                                           : "linear_attention"));
        char *a = mutate(cfg_text, NULL, "full_attention_interval", cJSON_CreateNumber(4));
        char *b = mutate(a, NULL, "layer_types", lt);
        mf_hparams hp = parse_ok(b, "explicit");
        expect_kinds(&hp, kinds[k]);
        free(a);
        free(b);
    }
}

Test(hparams, layer_types_vl_derived_when_absent) {
    /* Without layer_types, text_config's full_attention_interval (4) applies to 6 layers. */
    char *json = mutate(cfg_vl, "text_config", "layer_types", NULL);
    mf_hparams hp = parse_ok(json, "vl-derived");
    expect_kinds(&hp, "LLLFLL");
    free(json);
}

Test(hparams, layer_types_refusals) {
    cJSON *short_lt = cJSON_CreateArray();
    for (int i = 0; i < 7; i++) cJSON_AddItemToArray(short_lt, cJSON_CreateString("linear_attention"));
    expect_refused_mut(cfg_text, NULL, "layer_types", short_lt, MF_ERR_FORMAT, "layer_types");

    cJSON *long_lt = cJSON_CreateArray();
    for (int i = 0; i < 9; i++) cJSON_AddItemToArray(long_lt, cJSON_CreateString("full_attention"));
    expect_refused_mut(cfg_text, NULL, "layer_types", long_lt, MF_ERR_FORMAT, "layer_types");

    expect_refused_mut(cfg_text, NULL, "layer_types", cJSON_CreateString("full_attention"),
                       MF_ERR_FORMAT, "layer_types");

    /* A kind this engine does not implement: a valid config it cannot run. */
    cJSON *odd = cJSON_CreateArray();
    for (int i = 0; i < 8; i++)
        cJSON_AddItemToArray(odd, cJSON_CreateString(i == 5 ? "sliding_attention" : "full_attention"));
    char *json = mutate(cfg_text, NULL, "layer_types", odd);
    expect_refused(json, MF_ERR_UNSUPPORTED, "layer_types[5]");
    expect_refused(json, MF_ERR_UNSUPPORTED, "sliding_attention");
    free(json);

    /* An entry that is not a string at all is a malformed file. */
    cJSON *num = cJSON_CreateArray();
    for (int i = 0; i < 8; i++)
        cJSON_AddItemToArray(num, i == 2 ? cJSON_CreateNumber(1) : cJSON_CreateString("full_attention"));
    expect_refused_mut(cfg_text, NULL, "layer_types", num, MF_ERR_FORMAT, "layer_types[2]");

    expect_refused_mut(cfg_text, NULL, "full_attention_interval", cJSON_CreateNumber(0),
                       MF_ERR_FORMAT, "full_attention_interval");
}

/* ---- refusals ---- */

Test(hparams, refuses_unknown_model_type) {
    char *json = mutate(cfg_moe, NULL, "model_type", cJSON_CreateString("llama"));
    expect_refused(json, MF_ERR_UNSUPPORTED, "'llama'");
    free(json);
}

Test(hparams, refuses_missing_model_type) {
    expect_refused_mut(cfg_moe, NULL, "model_type", NULL, MF_ERR_FORMAT, "model_type");
    expect_refused_mut(cfg_moe, NULL, "model_type", cJSON_CreateNumber(3), MF_ERR_FORMAT, "model_type");
}

Test(hparams, refuses_missing_required_fields) {
    const char *required[] = {"num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
                              "num_experts_per_tok", "moe_intermediate_size"};
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++)
        expect_refused_mut(cfg_moe, NULL, required[i], NULL, MF_ERR_FORMAT, required[i]);
    const char *hybrid_required[] = {"linear_num_key_heads", "linear_num_value_heads",
                                     "linear_key_head_dim", "linear_value_head_dim",
                                     "shared_expert_intermediate_size"};
    for (size_t i = 0; i < sizeof hybrid_required / sizeof hybrid_required[0]; i++)
        expect_refused_mut(cfg_text, NULL, hybrid_required[i], NULL, MF_ERR_FORMAT, hybrid_required[i]);
    /* in the vision-language form the text fields are looked up in text_config */
    expect_refused_mut(cfg_vl, "text_config", "hidden_size", NULL, MF_ERR_FORMAT, "'hidden_size'");
}

Test(hparams, num_local_experts_alias) {
    /* transformers 5 writes qwen3_moe's expert count as num_local_experts */
    char *a = mutate(cfg_moe, NULL, "num_experts", NULL);
    expect_refused(a, MF_ERR_FORMAT, "experts'");
    char *b = mutate(a, NULL, "num_local_experts", cJSON_CreateNumber(6));
    mf_hparams hp = parse_ok(b, "moe-local");
    cr_assert_eq(hp.n_experts, 6);
    free(a);
    free(b);
}

Test(hparams, refuses_non_number_fields) {
    expect_refused_mut(cfg_moe, NULL, "hidden_size", cJSON_CreateString("192"), MF_ERR_FORMAT,
                       "'hidden_size'");
    expect_refused_mut(cfg_moe, NULL, "num_experts", cJSON_CreateTrue(), MF_ERR_FORMAT, "'num_experts'");
    expect_refused_mut(cfg_moe, NULL, "vocab_size", cJSON_CreateArray(), MF_ERR_FORMAT, "'vocab_size'");
    expect_refused_mut(cfg_moe, NULL, "num_hidden_layers", cJSON_CreateNumber(2.5), MF_ERR_FORMAT,
                       "'num_hidden_layers'");
    expect_refused_mut(cfg_moe, NULL, "num_hidden_layers", cJSON_CreateNumber(MF_MAX_LAYERS + 1),
                       MF_ERR_FORMAT, "'num_hidden_layers'");
    expect_refused_mut(cfg_moe, NULL, "hidden_size", cJSON_CreateNumber(-192), MF_ERR_FORMAT,
                       "'hidden_size'");
    expect_refused_mut(cfg_moe, NULL, "tie_word_embeddings", cJSON_CreateString("true"), MF_ERR_FORMAT,
                       "'tie_word_embeddings'");
    expect_refused_mut(cfg_moe, NULL, "norm_topk_prob", cJSON_CreateNumber(1), MF_ERR_FORMAT,
                       "'norm_topk_prob'");
    expect_refused_mut(cfg_moe, NULL, "rope_theta", cJSON_CreateString("1e6"), MF_ERR_FORMAT,
                       "'rope_theta'");
    expect_refused_mut(cfg_moe, NULL, "mlp_only_layers", cJSON_CreateNumber(1), MF_ERR_FORMAT,
                       "mlp_only_layers");
    cJSON *bad_only = cJSON_CreateArray();
    cJSON_AddItemToArray(bad_only, cJSON_CreateNumber(4)); /* n_layers is 4: out of range */
    expect_refused_mut(cfg_moe, NULL, "mlp_only_layers", bad_only, MF_ERR_FORMAT, "mlp_only_layers");
}

Test(hparams, refuses_heads_not_multiple_of_kv_heads) {
    expect_refused_mut(cfg_moe, NULL, "num_key_value_heads", cJSON_CreateNumber(3), MF_ERR_FORMAT,
                       "num_key_value_heads");
    expect_refused_mut(cfg_text, NULL, "linear_num_value_heads", cJSON_CreateNumber(3), MF_ERR_FORMAT,
                       "linear_num_value_heads");
}

Test(hparams, refuses_top_k_above_experts) {
    expect_refused_mut(cfg_moe, NULL, "num_experts_per_tok", cJSON_CreateNumber(7), MF_ERR_FORMAT,
                       "num_experts_per_tok");
    /* top_k == experts is allowed */
    char *json = mutate(cfg_moe, NULL, "num_experts_per_tok", cJSON_CreateNumber(6));
    mf_hparams hp = parse_ok(json, "topk-eq");
    cr_assert_eq(hp.top_k, hp.n_experts);
    free(json);
}

Test(hparams, refuses_bad_rms_norm_eps) {
    double bad[] = {0.0, -1e-6, 1.0, 2.5};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_refused_mut(cfg_moe, NULL, "rms_norm_eps", cJSON_CreateNumber(bad[i]), MF_ERR_FORMAT,
                           "rms_norm_eps");
    expect_refused_mut(cfg_moe, NULL, "rms_norm_eps", cJSON_CreateString("1e-6"), MF_ERR_FORMAT,
                       "'rms_norm_eps'");
}

Test(hparams, refuses_bad_rotary) {
    /* 64 * 0.3 is not a whole number of dims */
    expect_refused_mut(cfg_next, NULL, "partial_rotary_factor", cJSON_CreateNumber(0.3), MF_ERR_FORMAT,
                       "partial_rotary_factor");
    expect_refused_mut(cfg_next, NULL, "partial_rotary_factor", cJSON_CreateNumber(-0.5), MF_ERR_FORMAT,
                       "partial_rotary_factor");
    expect_refused_mut(cfg_next, NULL, "rope_theta", cJSON_CreateNumber(0), MF_ERR_FORMAT, "rope_theta");
}

Test(hparams, refuses_non_object) {
    const char *bad[] = {"", "[1, 2, 3]", "\"qwen3_moe\"", "42", "null", "{\"model_type\": ", "not json"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_refused(bad[i], MF_ERR_FORMAT, "not a JSON object");
}

/* ---- manifest round trip ---- */

static void round_trip(const char *json, const char *what) {
    mf_hparams a = parse_ok(json, what), b;
    char *text = hparams_to_json(&a);
    cr_assert(text);
    cJSON *o = cJSON_Parse(text);
    cr_assert(o, "%s: hparams_to_json gave no JSON: %s", what, text);
    /* the fields the format spec requires */
    cr_assert(cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(o, "layer_types")));
    cr_assert(cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(o, "moe_layers")));
    cr_assert(cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(o, "n_experts_per_tok")));
    mf_err err = {0};
    mf_status st = hparams_from_manifest(&b, o, &err);
    cr_assert_eq(st, MF_OK, "%s: manifest refused: %s", what, err.msg);
    expect_same(&a, &b);
    cJSON_Delete(o);
    free(text);
}

Test(hparams, manifest_round_trip) {
    round_trip(cfg_vl, "vl");
    round_trip(cfg_text, "text");
    round_trip(cfg_next, "next");
    round_trip(cfg_moe, "moe");
    char *odd = mutate(cfg_text, NULL, "rms_norm_eps", cJSON_CreateNumber(1.0 / 3.0 * 1e-5));
    round_trip(odd, "odd-eps");
    free(odd);
}

Test(hparams, manifest_refusals) {
    mf_hparams hp = parse_ok(cfg_next, "next");
    char *text = hparams_to_json(&hp);
    mf_err err = {0};
    mf_hparams out;

    cJSON *o = cJSON_Parse(text);
    cJSON_ReplaceItemInObjectCaseSensitive(o, "arch", cJSON_CreateString("llama"));
    cr_assert_eq(hparams_from_manifest(&out, o, &err), MF_ERR_UNSUPPORTED);
    cr_assert(strstr(err.msg, "llama"), "%s", err.msg);
    cJSON_Delete(o);

    o = cJSON_Parse(text);
    cJSON_DeleteItemFromObjectCaseSensitive(o, "hidden_size");
    cr_assert_eq(hparams_from_manifest(&out, o, &err), MF_ERR_FORMAT);
    cr_assert(strstr(err.msg, "hidden_size"), "%s", err.msg);
    cJSON_Delete(o);

    o = cJSON_Parse(text);
    cJSON_DeleteItemFromArray(cJSON_GetObjectItemCaseSensitive(o, "moe_layers"), 0);
    cr_assert_eq(hparams_from_manifest(&out, o, &err), MF_ERR_FORMAT);
    cr_assert(strstr(err.msg, "moe_layers"), "%s", err.msg);
    cJSON_Delete(o);

    o = cJSON_CreateArray();
    cr_assert_eq(hparams_from_manifest(&out, o, &err), MF_ERR_FORMAT);
    cJSON_Delete(o);
    free(text);
}

/* ---- files ---- */

Test(hparams, config_file) {
    char *dir = th_tmpdir();
    cr_assert(dir);
    char *path = th_join(dir, "config.json");
    cr_assert_eq(th_write_file(path, cfg_next, strlen(cfg_next)), 0);
    mf_hparams a, b = parse_ok(cfg_next, "next");
    mf_err err = {0};
    cr_assert_eq(hparams_from_config_file(&a, path, &err), MF_OK, "%s", err.msg);
    expect_same(&a, &b);

    /* a broken file's message names the file */
    char *bad = mutate(cfg_next, NULL, "hidden_size", NULL);
    cr_assert_eq(th_write_file(path, bad, strlen(bad)), 0);
    cr_assert_eq(hparams_from_config_file(&a, path, &err), MF_ERR_FORMAT);
    cr_assert(strstr(err.msg, path) && strstr(err.msg, "hidden_size"), "%s", err.msg);
    free(bad);

    th_rmtree(dir);
    free(path);
    free(dir);
}

Test(hparams, config_file_missing) {
    char *dir = th_tmpdir();
    cr_assert(dir);
    char *path = th_join(dir, "no-such-config.json");
    mf_hparams hp;
    mf_err err = {0};
    cr_assert_eq(hparams_from_config_file(&hp, path, &err), MF_ERR_IO);
    cr_assert_eq(err.status, MF_ERR_IO);
    cr_assert(strstr(err.msg, path), "message '%s' does not name %s", err.msg, path);
    th_rmtree(dir);
    free(path);
    free(dir);
}
