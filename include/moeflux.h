/* moeflux.h - the whole public API of the moeflux MoE inference engine.
 * Not here: tensors, backends, file internals. Callers see opaque handles,
 * option structs and one status enum; a failed call leaves its message in the handle. */
#ifndef MOEFLUX_H
#define MOEFLUX_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MF_VERSION_STRING "0.1.0"

typedef enum mf_status {
    MF_OK = 0,
    MF_ERR_ARG,         /* bad argument or option */
    MF_ERR_IO,          /* a file could not be opened, read or written */
    MF_ERR_FORMAT,      /* a file is malformed, truncated or inconsistent */
    MF_ERR_UNSUPPORTED, /* a valid input this version does not handle (model type, dtype) */
    MF_ERR_NOMEM,       /* an allocation failed */
    MF_ERR_INTERNAL
} mf_status;

/* Storage types of weights in a .moeflux file. */
typedef enum mf_qtype {
    MF_QTYPE_F32 = 0,
    MF_QTYPE_BF16,
    MF_QTYPE_Q8, /* affine, group 64, MLX bit layout: u32 words + bf16 scales + bf16 biases */
    MF_QTYPE_Q4,
    MF_QTYPE_COUNT
} mf_qtype;

const char *mf_status_name(mf_status st);
const char *mf_qtype_name(mf_qtype t);
/* Parses "f32", "bf16", "q8", "q4"; returns MF_ERR_ARG for anything else. */
mf_status mf_qtype_parse(const char *s, mf_qtype *out);

/* ---- conversion: checkpoint directory -> one .moeflux file ---- */

typedef struct mf_converter mf_converter;

/* Called as conversion advances; done and total are payload bytes. */
typedef void (*mf_progress_fn)(void *user, uint64_t done, uint64_t total);

typedef struct mf_convert_options {
    const char *src_dir;      /* Hugging Face or MLX checkpoint directory */
    const char *out_path;     /* written as out_path + ".tmp-*", renamed when complete */
    int experts_set;          /* nonzero: experts_type overrides the default */
    mf_qtype experts_type;    /* default q4 (MLX-quantized sources: kept as they are) */
    int dense_set;            /* nonzero: dense_type overrides the default */
    mf_qtype dense_type;      /* default q8 (MLX-quantized sources: kept as they are) */
    mf_progress_fn progress;  /* may be NULL */
    void *progress_user;
} mf_convert_options;

void mf_convert_options_init(mf_convert_options *opt);
/* Always returns a handle (NULL only when out of memory); check mf_converter_error. */
mf_converter *mf_converter_new(void);
mf_status mf_convert(mf_converter *c, const mf_convert_options *opt);
const char *mf_converter_error(const mf_converter *c);
void mf_converter_free(mf_converter *c);

/* ---- synthetic models: random weights of a known shape, written as one .moeflux file ---- */

typedef struct mf_synthesizer mf_synthesizer;

typedef struct mf_synth_options {
    const char *shape;        /* a built-in shape name, see mf_synth_shape_name */
    const char *out_path;     /* written as out_path + ".tmp-*", renamed when complete */
    int n_layers;             /* 0: the shape's layer count; else its first n_layers layers */
    uint64_t seed;            /* same seed and options: byte-identical files */
    mf_qtype experts_type;    /* default q4 */
    mf_qtype dense_type;      /* default q8 (norms, conv1d, A_log, dt_bias f32; routers bf16) */
    double skew;              /* >= 0; router popularity skew, 0 = uniform (formula in synth.c) */
    int n_threads;            /* generating threads; 0 = every online CPU */
    const char *tokenizer_dir;/* NULL, or a directory whose tokenizer files the model carries */
    mf_progress_fn progress;  /* may be NULL; called from worker threads, one call at a time */
    void *progress_user;
} mf_synth_options;

void mf_synth_options_init(mf_synth_options *opt);
/* The i-th built-in shape name ("qwen3.6-35b-a3b", "tiny-qwen3.5", ...); NULL past the last. */
const char *mf_synth_shape_name(int i);
/* Always returns a handle (NULL only when out of memory); check mf_synthesizer_error. */
mf_synthesizer *mf_synthesizer_new(void);
/* Refuses an unknown shape, bad options, or an output whose filesystem lacks the space. */
mf_status mf_synth(mf_synthesizer *s, const mf_synth_options *opt);
const char *mf_synthesizer_error(const mf_synthesizer *s);
void mf_synthesizer_free(mf_synthesizer *s);

/* ---- packed models ---- */

typedef struct mf_model mf_model;

/* Opens a .moeflux file. On failure *out still receives a handle (unless out of memory)
 * whose mf_model_error tells why; free it with mf_model_free. */
mf_status mf_model_open(const char *path, mf_model **out);
const char *mf_model_error(const mf_model *m);
void mf_model_free(mf_model *m);

/* A JSON description of the model: arch, hyperparameters, sizes. Owned by the model. */
const char *mf_model_info_json(mf_model *m);


/* ---- running a model ---- */

typedef struct mf_engine_options {
    uint64_t expert_cache_bytes; /* RAM expert cache budget; 0 = default (a share of free RAM) */
    int n_threads;               /* compute threads; 0 = every online CPU */
    int io_threads;              /* parallel expert reads; 0 = default */
    int o_direct;                /* read experts with O_DIRECT */
    int reference;               /* plain reference kernels (no SIMD, one thread) */
    int use_cuda;                /* compute on the CUDA backend (see mf_cuda_available) */
    int cuda_device;
    uint64_t gpu_cache_bytes;    /* GPU expert cache budget; 0 = free GPU memory minus a reserve */
    int no_preload;              /* don't load every expert into GPU memory at load time even
                                    when they all fit (they then arrive on first use) */
    int no_host_reads;           /* GPU: never compute an expert from host RAM in place. By
                                    default, when the host expert cache holds every expert and
                                    the GPU cache does not, every expert is read into page-locked
                                    RAM at load time and the GPU reads those it lacks from there
                                    (decode then never waits for an upload) */
} mf_engine_options;

/* Whether this build has the CUDA backend and a usable device. */
int mf_cuda_available(void);

void mf_engine_options_init(mf_engine_options *o);
/* Reads the dense weights and opens the expert store; call once after mf_model_open. */
mf_status mf_model_load(mf_model *m, const mf_engine_options *o);
int mf_model_vocab(const mf_model *m);
/* Measures the loaded backend's memory bandwidth: device_gbps counts bytes read plus written by a
 * large copy in backend memory, upload_gbps host-to-backend bytes per second through the path
 * experts take. Both in GB/s (1e9). Takes about a second. */
mf_status mf_model_bandwidth(mf_model *m, double *device_gbps, double *upload_gbps);
/* The backend's name ("cpu", "cuda") once loaded. */
const char *mf_model_backend(const mf_model *m);

typedef struct mf_expert_stats {
    /* host tier: RAM cache in front of the file */
    uint64_t hits, misses, evictions, bytes_read, reads;
    double read_seconds;
    uint64_t budget_bytes, resident_bytes, peak_bytes;
    /* device tier (GPU memory), zero on the CPU backend */
    uint64_t gpu_hits, gpu_misses, gpu_evictions, gpu_bytes_uploaded;
    uint64_t gpu_host_reads, gpu_bytes_from_host; /* misses the GPU read in place from host RAM */
    double gpu_upload_seconds;
    uint64_t gpu_budget_bytes, gpu_peak_bytes;
} mf_expert_stats;
void mf_model_expert_stats(const mf_model *m, mf_expert_stats *st);
void mf_model_reset_expert_stats(mf_model *m);

typedef struct mf_session mf_session;

typedef struct mf_session_options {
    int max_ctx;       /* positions the session can hold; 0 = 4096 (capped by the model) */
    int prefill_chunk; /* tokens per batched forward step; 0 = 64 */
    int profile;       /* time each phase of the forward pass (waits for the backend at each
                          phase boundary, so it slows a GPU run a little) */
    int no_predict;    /* turn off next-layer expert prediction and background prefetch */
    int no_graph;      /* never record a decode step for replay (CUDA graphs); each op is issued */
} mf_session_options;

/* Seconds spent per phase since the session began or the last reset (profile on). */
typedef struct mf_profile {
    double mixer;          /* attention or Gated DeltaNet blocks */
    double router;         /* router, top-k, and the choice coming back to the host */
    double expert_wait;    /* making experts resident: reads, uploads */
    double expert_compute; /* routed and shared experts, dense MLPs */
    double other;          /* embedding, norms, residuals, lm_head */
    uint64_t tokens;       /* tokens run */
    /* next-layer expert prediction (the next MoE layer's router applied to the current hidden
     * state; its experts are fetched while this layer computes): routed experts that were
     * predicted, out of all routed experts of layers that had a prediction */
    uint64_t predicted_hits, predicted_total;
} mf_profile;
void mf_session_profile(const mf_session *s, mf_profile *p);
void mf_session_set_profile(mf_session *s, int on);
void mf_session_reset_profile(mf_session *s);

void mf_session_options_init(mf_session_options *o);
/* On failure *out still receives a handle (unless out of memory) holding the message. */
mf_status mf_session_new(mf_model *m, const mf_session_options *o, mf_session **out);
const char *mf_session_error(const mf_session *s);
void mf_session_free(mf_session *s);
/* Runs n >= 1 tokens from the current position (batched in prefill chunks). logits may be
 * NULL; else it receives float32 [n][vocab] when all_logits, or [vocab] for the last token. */
mf_status mf_session_eval(mf_session *s, const int32_t *tokens, int n, float *logits, int all_logits);
/* Runs n >= 1 tokens as mf_session_eval does and writes the greedy choice after the last one
 * (the lowest id among equal largest logits) to *next: the logits stay on the backend. */
mf_status mf_session_eval_greedy(mf_session *s, const int32_t *tokens, int n, int32_t *next);
int mf_session_pos(const mf_session *s);
void mf_session_reset(mf_session *s);
/* Drops every position >= pos. Exact: attention caches are cut, linear-attention state is
 * restored from the nearest checkpoint at or before pos and the tokens after it are re-run. */
mf_status mf_session_truncate(mf_session *s, int pos);
/* Saves / restores the whole state (positions, caches, recurrent state); a saved file is tied
 * to the model it came from. Saving writes a temporary name and renames it. */
mf_status mf_session_save(mf_session *s, const char *path);
mf_status mf_session_load(mf_session *s, const char *path);

/* ---- sampling ---- */

typedef struct mf_sampler_params {
    float temperature;        /* 0: greedy (argmax) */
    int top_k;                /* 0: off */
    float top_p;              /* 1: off */
    float min_p;              /* 0: off */
    float repetition_penalty; /* 1: off; transformers' rule: positive logits divided, negative multiplied */
    float presence_penalty;   /* 0: off; subtracted once from every token already seen */
    float frequency_penalty;  /* 0: off; subtracted per occurrence */
    int penalty_last_n;       /* how many recent tokens the penalties look at; 0: all */
    uint64_t seed;
} mf_sampler_params;

/* Greedy defaults: temperature 0, top_k 0, top_p 1, min_p 0, penalties off, seed 0. */
void mf_sampler_params_init(mf_sampler_params *p);
/* Refuses values out of range with a message in err (at least 128 bytes). */
mf_status mf_sampler_params_check(const mf_sampler_params *p, char *err, size_t errlen);

typedef struct mf_sampler mf_sampler;
mf_sampler *mf_sampler_new(const mf_sampler_params *p, int vocab);
/* logits [vocab] are modified; history: the tokens so far (prompt and output). */
int32_t mf_sampler_sample(mf_sampler *s, float *logits, const int32_t *history, int n_history);
void mf_sampler_free(mf_sampler *s);
/* Runs n >= 1 tokens as mf_session_eval does and writes the sampler's choice after the last one
 * to *next, with the session's tokens (these included) as the history: the same choice as
 * mf_sampler_sample over the logits mf_session_eval gives. A GPU backend samples on the device,
 * so only the token comes back. The sampler's vocabulary must be the model's. */
mf_status mf_session_eval_sample(mf_session *s, const int32_t *tokens, int n, mf_sampler *smp, int32_t *next);

/* ---- text: tokenizer, chat template, generation config ---- */

typedef struct mf_text mf_text;

/* Opens the text side of a .moeflux file (the files it carries) or of a directory holding
 * tokenizer.json (+ tokenizer_config.json, generation_config.json, chat_template.jinja).
 * On failure *out still receives a handle (unless out of memory) holding the message. */
mf_status mf_text_open(const char *model_or_dir, mf_text **out);
const char *mf_text_error(const mf_text *t);
void mf_text_free(mf_text *t);
/* Frees memory returned by mf_text_* calls. */
void mf_free(void *p);

/* parse_special: special tokens written in the text become tokens; add_special: BOS/EOS as
 * the tokenizer's post-processor adds them. *ids is freed with mf_free. */
mf_status mf_text_encode(mf_text *t, const char *text, size_t len, int parse_special, int add_special,
                         int32_t **ids, size_t *n);
mf_status mf_text_decode(mf_text *t, const int32_t *ids, size_t n, int skip_special, char **text, size_t *len);
int mf_text_vocab(const mf_text *t);
/* The ids that end generation: generation_config.json eos_token_id (one or a list), else the
 * tokenizer's eos token. Returns their count; *ids is owned by t. */
int mf_text_eos_ids(const mf_text *t, const int32_t **ids);

/* The recognised chat template family ("qwen3", "qwen3_5", "deepseek_v3"), or NULL. */
const char *mf_text_template_name(const mf_text *t);
/* Replaces the model's template with the text of a Jinja template file (recognised the same way). */
mf_status mf_text_set_template(mf_text *t, const char *jinja_text);
/* Renders a conversation (JSON array of messages; tools: JSON array or NULL) as the model's
 * template does. enable_thinking: -1 default, 0 off, 1 on. *out is freed with mf_free. */
mf_status mf_text_render_chat(mf_text *t, const char *messages_json, const char *tools_json,
                              int add_generation_prompt, int enable_thinking, char **out);

/* Streaming decode that never splits a UTF-8 character. */
typedef struct mf_detok mf_detok;
mf_detok *mf_detok_new(mf_text *t, int skip_special);
/* Writes the complete characters now available to out (cap >= 1024); returns bytes written. */
size_t mf_detok_push(mf_detok *d, int32_t id, char *out, size_t cap);
size_t mf_detok_flush(mf_detok *d, char *out, size_t cap);
void mf_detok_free(mf_detok *d);

#ifdef __cplusplus
}
#endif
#endif
