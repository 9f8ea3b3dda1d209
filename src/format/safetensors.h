/* safetensors.h - read-only view of a safetensors checkpoint (one file, or shards listed
 * by model.safetensors.index.json), memory-mapped and strictly validated.
 * Not a writer, and it knows nothing of model families or tensor names. */
#ifndef MF_FORMAT_SAFETENSORS_H
#define MF_FORMAT_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"

typedef enum st_dtype {
    ST_F32 = 0,
    ST_F16,
    ST_BF16,
    ST_U32,
    ST_I32,
    ST_U8,
    ST_I8,
    ST_F8_E4M3,
    ST_DTYPE_COUNT
} st_dtype;

#define ST_MAX_DIMS 8

typedef struct st_tensor {
    const char *name;               /* owned by the checkpoint */
    st_dtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;                  /* product of shape (1 for a scalar) */
    const void *data;               /* points into the mapped file; nbytes long */
    uint64_t nbytes;
    const char *file;               /* path of the file holding it; owned by the checkpoint */
} st_tensor;

typedef struct st_file st_file;     /* one mapped file (private) */

typedef struct st_checkpoint {
    st_tensor *tensors;             /* sorted by name */
    size_t n_tensors;
    st_file **files;
    size_t n_files;
} st_checkpoint;

const char *st_dtype_name(st_dtype t);
size_t st_dtype_size(st_dtype t);

/* Opens dir/model.safetensors, or every shard named in dir/model.safetensors.index.json
 * (each shard opened once; every tensor of the weight_map must be found in the shard it
 * names). Validation: header length within the file, header is a JSON object, every entry
 * has a known dtype, a shape of non-negative ints and data_offsets [begin, end] with
 * begin <= end <= data size, end - begin == numel * dtype size, ranges do not overlap,
 * no duplicate names across shards. Errors name the file and the tensor.
 * Statuses: MF_ERR_IO when a file cannot be opened, stat'ed, read or mapped (a missing
 * shard, no checkpoint in dir, dir missing); MF_ERR_UNSUPPORTED for a dtype string outside
 * st_dtype (e.g. "F64"); MF_ERR_FORMAT for everything malformed (short or truncated file,
 * bad header length, bad JSON, bad entries, overlaps, duplicates, index/shard mismatch);
 * MF_ERR_NOMEM; MF_ERR_ARG for NULL arguments. ck need not be initialised; on any failure
 * it is left zeroed with nothing held, so st_close on it is a no-op. Gaps between tensor
 * ranges are allowed. */
mf_status st_open_dir(st_checkpoint *ck, const char *dir, mf_err *err);
/* Opens a single file. */
mf_status st_open_file(st_checkpoint *ck, const char *path, mf_err *err);
void st_close(st_checkpoint *ck);

/* Binary search by exact name; NULL when absent. */
const st_tensor *st_find(const st_checkpoint *ck, const char *name);

#endif
