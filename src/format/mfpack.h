/* mfpack.h - the .moeflux packed model file: a fixed header, a JSON manifest, the dense
 * tensors, then every (layer, expert) as one 4096-aligned blob [gate | up | down].
 * Not the converter (format/convert.c) and not the expert cache; docs/format.md is the spec. */
#ifndef MF_FORMAT_MFPACK_H
#define MF_FORMAT_MFPACK_H

#include <stdint.h>

#include "core/err.h"
#include "model/hparams.h"

#define MFPACK_MAGIC "MOEFLUX\0"
#define MFPACK_VERSION 1u
#define MFPACK_HEADER_BYTES 64u
#define MFPACK_ALIGN 4096u        /* dense tensors, the expert section and every expert blob */
#define MFPACK_PART_ALIGN 64u     /* parts inside an expert blob */
#define MFPACK_NAME_MAX 96
#define MFPACK_MAX_DIMS 4
#define MFPACK_EXPERT_PARTS 3     /* gate_proj, up_proj, down_proj */

typedef struct mfpack_tensor {
    char name[MFPACK_NAME_MAX];
    mf_qtype type;
    int ndim;
    int64_t shape[MFPACK_MAX_DIMS];  /* logical shape; rows = prod(shape[:-1]), cols = shape[-1] */
    uint64_t offset;                 /* absolute file offset */
    uint64_t bytes;
} mfpack_tensor;

typedef struct mfpack_part {
    char name[16];                   /* "gate_proj", "up_proj", "down_proj" */
    mf_qtype type;
    int64_t rows, cols;              /* [out, in] */
    uint64_t offset;                 /* from the start of the expert's blob */
    uint64_t bytes;
} mfpack_part;

typedef struct mfpack_expert_layer {
    int layer;
    int count;                       /* experts in this layer */
    uint64_t offset;                 /* absolute offset of expert 0 */
    uint64_t stride;                 /* bytes from one expert's blob to the next (4096-aligned) */
    mfpack_part parts[MFPACK_EXPERT_PARTS];
} mfpack_expert_layer;

#define MFPACK_MAX_FILES 16

/* A file carried along whole (tokenizer.json, tokenizer_config.json, generation_config.json),
 * stored after the experts. */
typedef struct mfpack_blob {
    char name[64];
    uint64_t offset;                 /* absolute */
    uint64_t bytes;
} mfpack_blob;

/* The whole table of contents; the writer fills it, the reader parses it. */
typedef struct mfpack_layout {
    mf_hparams hp;
    mfpack_tensor *tensors;
    int n_tensors, cap_tensors;
    mfpack_expert_layer *expert_layers;
    int n_expert_layers;             /* MoE layers, in layer order */
    uint64_t dense_offset, dense_bytes;    /* region holding the dense tensors (with padding) */
    uint64_t experts_offset, experts_bytes;
    uint64_t file_bytes;
    char *extra_json;                /* optional JSON object text stored as manifest "source" */
    mfpack_blob files[MFPACK_MAX_FILES];
    int n_files;
} mfpack_layout;

void mfpack_layout_init(mfpack_layout *L, const mf_hparams *hp);
void mfpack_layout_free(mfpack_layout *L);
/* Adds a dense tensor (offset assigned by mfpack_layout_finish). */
mf_status mfpack_layout_add_tensor(mfpack_layout *L, const char *name, mf_qtype type, int ndim,
                                   const int64_t *shape, mf_err *err);
/* Adds the experts of one MoE layer: count experts of [gate I x H | up I x H | down H x I]. */
mf_status mfpack_layout_add_experts(mfpack_layout *L, int layer, int count, const mf_qtype types[3],
                                    int64_t inter, int64_t hidden, mf_err *err);
/* Adds a carried file of `bytes` bytes (offset assigned by mfpack_layout_finish). */
mf_status mfpack_layout_add_file(mfpack_layout *L, const char *name, uint64_t bytes, mf_err *err);
/* Adds the text-side files found in dir (tokenizer.json, tokenizer_config.json,
 * generation_config.json, chat_template.jinja, special_tokens_map.json); absent ones are skipped. */
mf_status mfpack_add_dir_files(mfpack_layout *L, const char *dir, mf_err *err);
/* Writes the files added by mfpack_add_dir_files, read again from dir, at their offsets. */
mf_status mfpack_write_dir_files(const mfpack_layout *L, const char *dir, int fd, const char *path, mf_err *err);
/* Assigns every offset. */
void mfpack_layout_finish(mfpack_layout *L);
/* The manifest JSON text (malloc'd). */
char *mfpack_manifest_json(const mfpack_layout *L);
/* Writes header + manifest at the start of fd, and sets the file size. */
mf_status mfpack_write_header(const mfpack_layout *L, int fd, const char *path, mf_err *err);

const mfpack_tensor *mfpack_find(const mfpack_layout *L, const char *name);
/* The expert layout of `layer`, or NULL for a dense layer. */
const mfpack_expert_layer *mfpack_experts(const mfpack_layout *L, int layer);

/* Reading: validates magic, version, header fields against the file size, the manifest
 * checksum, every tensor's range and byte count. */
typedef struct mfpack_file {
    int fd;
    char *path;
    mfpack_layout L;
    char *manifest;                  /* the manifest text as stored */
} mfpack_file;

mf_status mfpack_open(mfpack_file *f, const char *path, mf_err *err);
void mfpack_close(mfpack_file *f);

/* Reads a carried file into a malloc'd NUL-terminated buffer. MF_ERR_ARG when the model carries
 * no such file. */
mf_status mfpack_read_blob(const mfpack_file *f, const char *name, char **data, size_t *len, mf_err *err);
const mfpack_blob *mfpack_find_blob(const mfpack_layout *L, const char *name);

/* FNV-1a 64 of bytes (the manifest checksum). */
uint64_t mfpack_hash(const void *data, size_t n);

/* Bytes of one expert of a layer (sum of its parts, without padding). */
uint64_t mfpack_expert_payload(const mfpack_expert_layer *E);

#endif
