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

/* ---- packed models ---- */

typedef struct mf_model mf_model;

/* Opens a .moeflux file. On failure *out still receives a handle (unless out of memory)
 * whose mf_model_error tells why; free it with mf_model_free. */
mf_status mf_model_open(const char *path, mf_model **out);
const char *mf_model_error(const mf_model *m);
void mf_model_free(mf_model *m);

/* A JSON description of the model: arch, hyperparameters, sizes. Owned by the model. */
const char *mf_model_info_json(mf_model *m);

#ifdef __cplusplus
}
#endif
#endif
