/* mfpack.c - layout, manifest, header writing and validated reading of .moeflux files.
 * Not the tensor payload writer: format/convert.c fills the ranges this file assigns. */
#include "format/mfpack.h"

#include <cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "format/quant.h"

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

uint64_t mfpack_hash(const void *data, size_t n) {
    const unsigned char *p = data;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_u32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

void mfpack_layout_init(mfpack_layout *L, const mf_hparams *hp) {
    memset(L, 0, sizeof *L);
    if (hp) L->hp = *hp;
}

void mfpack_layout_free(mfpack_layout *L) {
    free(L->tensors);
    free(L->expert_layers);
    free(L->extra_json);
    memset(L, 0, sizeof *L);
}

static int64_t shape_rows(int ndim, const int64_t *shape) {
    int64_t r = 1;
    for (int i = 0; i < ndim - 1; i++) r *= shape[i];
    return r;
}

mf_status mfpack_layout_add_tensor(mfpack_layout *L, const char *name, mf_qtype type, int ndim,
                                   const int64_t *shape, mf_err *err) {
    if (strlen(name) >= MFPACK_NAME_MAX)
        return err_set(err, MF_ERR_ARG, "tensor name too long: %s", name);
    if (ndim < 1 || ndim > MFPACK_MAX_DIMS)
        return err_set(err, MF_ERR_ARG, "tensor %s: %d dims not supported", name, ndim);
    if (!quant_type_fits(type, shape[ndim - 1]))
        return err_set(err, MF_ERR_ARG, "tensor %s: %s needs a last dim multiple of %d", name,
                       mf_qtype_name(type), QUANT_GROUP);
    if (L->n_tensors == L->cap_tensors) {
        int cap = L->cap_tensors ? 2 * L->cap_tensors : 256;
        mfpack_tensor *nt = realloc(L->tensors, (size_t)cap * sizeof *nt);
        if (!nt) return err_set(err, MF_ERR_NOMEM, "out of memory");
        L->tensors = nt;
        L->cap_tensors = cap;
    }
    mfpack_tensor *t = &L->tensors[L->n_tensors++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->type = type;
    t->ndim = ndim;
    memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->bytes = quant_tensor_bytes(type, shape_rows(ndim, shape), shape[ndim - 1]);
    return MF_OK;
}

static const char *part_names[MFPACK_EXPERT_PARTS] = {"gate_proj", "up_proj", "down_proj"};

mf_status mfpack_layout_add_experts(mfpack_layout *L, int layer, int count, const mf_qtype types[3],
                                    int64_t inter, int64_t hidden, mf_err *err) {
    mfpack_expert_layer *ne =
        realloc(L->expert_layers, (size_t)(L->n_expert_layers + 1) * sizeof *ne);
    if (!ne) return err_set(err, MF_ERR_NOMEM, "out of memory");
    L->expert_layers = ne;
    mfpack_expert_layer *E = &ne[L->n_expert_layers++];
    memset(E, 0, sizeof *E);
    E->layer = layer;
    E->count = count;
    uint64_t off = 0;
    for (int p = 0; p < MFPACK_EXPERT_PARTS; p++) {
        mfpack_part *P = &E->parts[p];
        snprintf(P->name, sizeof P->name, "%s", part_names[p]);
        P->type = types[p];
        P->rows = p == 2 ? hidden : inter;
        P->cols = p == 2 ? inter : hidden;
        if (!quant_type_fits(P->type, P->cols)) {
            L->n_expert_layers--; /* leave the layout as it was */
            return err_set(err, MF_ERR_ARG, "layer %d experts: %s needs in-dim multiple of %d",
                           layer, mf_qtype_name(P->type), QUANT_GROUP);
        }
        P->offset = off;
        P->bytes = quant_tensor_bytes(P->type, P->rows, P->cols);
        off = align_up(off + P->bytes, MFPACK_PART_ALIGN);
    }
    E->stride = align_up(off, MFPACK_ALIGN);
    return MF_OK;
}

uint64_t mfpack_expert_payload(const mfpack_expert_layer *E) {
    uint64_t s = 0;
    for (int p = 0; p < MFPACK_EXPERT_PARTS; p++) s += E->parts[p].bytes;
    return s;
}

static void assign_offsets(mfpack_layout *L, uint64_t dense_offset) {
    uint64_t off = dense_offset;
    L->dense_offset = dense_offset;
    for (int i = 0; i < L->n_tensors; i++) {
        L->tensors[i].offset = off;
        off = align_up(off + L->tensors[i].bytes, MFPACK_ALIGN);
    }
    L->dense_bytes = off - dense_offset;
    L->experts_offset = off;
    for (int i = 0; i < L->n_expert_layers; i++) {
        mfpack_expert_layer *E = &L->expert_layers[i];
        E->offset = off;
        off += E->stride * (uint64_t)E->count;
    }
    L->experts_bytes = off - L->experts_offset;
    for (int i = 0; i < L->n_files; i++) {
        off = align_up(off, MFPACK_PART_ALIGN);
        L->files[i].offset = off;
        off += L->files[i].bytes;
    }
    L->file_bytes = off;
}

mf_status mfpack_layout_add_file(mfpack_layout *L, const char *name, uint64_t bytes, mf_err *err) {
    if (L->n_files == MFPACK_MAX_FILES) return err_set(err, MF_ERR_ARG, "too many carried files");
    if (strlen(name) >= sizeof L->files[0].name || !name[0] || strchr(name, '/'))
        return err_set(err, MF_ERR_ARG, "bad carried file name '%s'", name);
    if (mfpack_find_blob(L, name)) return err_set(err, MF_ERR_ARG, "file '%s' carried twice", name);
    mfpack_blob *b = &L->files[L->n_files++];
    snprintf(b->name, sizeof b->name, "%s", name);
    b->bytes = bytes;
    b->offset = 0;
    return MF_OK;
}

static mf_status pwrite_all(int fd, const void *buf, size_t n, uint64_t off, const char *path,
                            mf_err *err);

static const char *dir_files[] = {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                  "chat_template.jinja", "special_tokens_map.json"};

mf_status mfpack_add_dir_files(mfpack_layout *L, const char *dir, mf_err *err) {
    for (size_t i = 0; i < sizeof dir_files / sizeof dir_files[0]; i++) {
        char p[4200];
        snprintf(p, sizeof p, "%s/%s", dir, dir_files[i]);
        struct stat sb;
        if (stat(p, &sb) != 0) continue;
        if (!S_ISREG(sb.st_mode) || sb.st_size > (1 << 30))
            return err_set(err, MF_ERR_FORMAT, "%s: not a regular file of sane size", p);
        mf_status st = mfpack_layout_add_file(L, dir_files[i], (uint64_t)sb.st_size, err);
        if (st) return st;
    }
    return MF_OK;
}

mf_status mfpack_write_dir_files(const mfpack_layout *L, const char *dir, int fd, const char *path, mf_err *err) {
    for (int i = 0; i < L->n_files; i++) {
        const mfpack_blob *b = &L->files[i];
        char p[4200];
        snprintf(p, sizeof p, "%s/%s", dir, b->name);
        FILE *f = fopen(p, "rb");
        char *buf = malloc(b->bytes ? b->bytes : 1);
        size_t got = (f && buf) ? fread(buf, 1, b->bytes, f) : 0;
        if (f) fclose(f);
        if (!buf || got != b->bytes) {
            free(buf);
            return err_set(err, MF_ERR_IO, "%s: cannot read (changed meanwhile?)", p);
        }
        mf_status st = pwrite_all(fd, buf, b->bytes, b->offset, path, err);
        free(buf);
        if (st) return st;
    }
    return MF_OK;
}

const mfpack_blob *mfpack_find_blob(const mfpack_layout *L, const char *name) {
    for (int i = 0; i < L->n_files; i++)
        if (!strcmp(L->files[i].name, name)) return &L->files[i];
    return NULL;
}

mf_status mfpack_read_blob(const mfpack_file *f, const char *name, char **data, size_t *len, mf_err *err) {
    const mfpack_blob *b = mfpack_find_blob(&f->L, name);
    if (!b) return err_set(err, MF_ERR_ARG, "%s: the model carries no %s", f->path, name);
    char *buf = malloc(b->bytes + 1);
    if (!buf) return err_set(err, MF_ERR_NOMEM, "%s: out of memory reading %s", f->path, name);
    uint64_t done = 0;
    while (done < b->bytes) {
        ssize_t r = pread(f->fd, buf + done, b->bytes - done, (off_t)(b->offset + done));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            free(buf);
            return err_set(err, MF_ERR_IO, "%s: cannot read %s", f->path, name);
        }
        done += (uint64_t)r;
    }
    buf[b->bytes] = '\0';
    *data = buf;
    if (len) *len = b->bytes;
    return MF_OK;
}

void mfpack_layout_finish(mfpack_layout *L) {
    uint64_t dense = MFPACK_ALIGN;
    for (;;) {
        assign_offsets(L, dense);
        char *m = mfpack_manifest_json(L);
        uint64_t need = MFPACK_HEADER_BYTES + (m ? strlen(m) : 0);
        free(m);
        if (need <= dense) break;
        dense = align_up(need + 256, MFPACK_ALIGN);
    }
}

static cJSON *shape_json(int ndim, const int64_t *shape) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < ndim; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber((double)shape[i]));
    return a;
}

char *mfpack_manifest_json(const mfpack_layout *L) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "format", "moeflux");
    cJSON_AddNumberToObject(o, "version", MFPACK_VERSION);
    cJSON_AddNumberToObject(o, "group_size", QUANT_GROUP);
    char *hj = hparams_to_json(&L->hp);
    cJSON_AddItemToObject(o, "hparams", cJSON_Parse(hj));
    free(hj);
    if (L->extra_json) {
        cJSON *src = cJSON_Parse(L->extra_json);
        if (src) cJSON_AddItemToObject(o, "source", src);
    }
    cJSON_AddNumberToObject(o, "dense_offset", (double)L->dense_offset);
    cJSON_AddNumberToObject(o, "dense_bytes", (double)L->dense_bytes);
    cJSON_AddNumberToObject(o, "experts_offset", (double)L->experts_offset);
    cJSON_AddNumberToObject(o, "experts_bytes", (double)L->experts_bytes);
    cJSON_AddNumberToObject(o, "file_bytes", (double)L->file_bytes);
    cJSON *ts = cJSON_AddArrayToObject(o, "tensors");
    for (int i = 0; i < L->n_tensors; i++) {
        const mfpack_tensor *t = &L->tensors[i];
        cJSON *e = cJSON_CreateObject();
        cJSON_AddStringToObject(e, "name", t->name);
        cJSON_AddStringToObject(e, "type", mf_qtype_name(t->type));
        cJSON_AddItemToObject(e, "shape", shape_json(t->ndim, t->shape));
        cJSON_AddNumberToObject(e, "offset", (double)t->offset);
        cJSON_AddNumberToObject(e, "bytes", (double)t->bytes);
        cJSON_AddItemToArray(ts, e);
    }
    if (L->n_files) {
        cJSON *fs = cJSON_AddArrayToObject(o, "files");
        for (int i = 0; i < L->n_files; i++) {
            cJSON *e = cJSON_CreateObject();
            cJSON_AddStringToObject(e, "name", L->files[i].name);
            cJSON_AddNumberToObject(e, "offset", (double)L->files[i].offset);
            cJSON_AddNumberToObject(e, "bytes", (double)L->files[i].bytes);
            cJSON_AddItemToArray(fs, e);
        }
    }
    cJSON *es = cJSON_AddArrayToObject(o, "experts");
    for (int i = 0; i < L->n_expert_layers; i++) {
        const mfpack_expert_layer *E = &L->expert_layers[i];
        cJSON *e = cJSON_CreateObject();
        cJSON_AddNumberToObject(e, "layer", E->layer);
        cJSON_AddNumberToObject(e, "count", E->count);
        cJSON_AddNumberToObject(e, "offset", (double)E->offset);
        cJSON_AddNumberToObject(e, "stride", (double)E->stride);
        cJSON *ps = cJSON_AddArrayToObject(e, "parts");
        for (int p = 0; p < MFPACK_EXPERT_PARTS; p++) {
            const mfpack_part *P = &E->parts[p];
            cJSON *pe = cJSON_CreateObject();
            int64_t sh[2] = {P->rows, P->cols};
            cJSON_AddStringToObject(pe, "name", P->name);
            cJSON_AddStringToObject(pe, "type", mf_qtype_name(P->type));
            cJSON_AddItemToObject(pe, "shape", shape_json(2, sh));
            cJSON_AddNumberToObject(pe, "offset", (double)P->offset);
            cJSON_AddNumberToObject(pe, "bytes", (double)P->bytes);
            cJSON_AddItemToArray(ps, pe);
        }
        cJSON_AddItemToArray(es, e);
    }
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

static mf_status pwrite_all(int fd, const void *buf, size_t n, uint64_t off, const char *path,
                            mf_err *err) {
    const char *p = buf;
    while (n) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0)
            return err_set(err, MF_ERR_IO, "%s: write failed: %s", path,
                           w < 0 ? strerror(errno) : "no space");
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return MF_OK;
}

mf_status mfpack_write_header(const mfpack_layout *L, int fd, const char *path, mf_err *err) {
    char *m = mfpack_manifest_json(L);
    if (!m) return err_set(err, MF_ERR_NOMEM, "out of memory");
    size_t mlen = strlen(m);
    if (MFPACK_HEADER_BYTES + mlen > L->dense_offset) {
        free(m);
        return err_set(err, MF_ERR_INTERNAL, "%s: manifest does not fit before the dense data", path);
    }
    unsigned char h[MFPACK_HEADER_BYTES] = {0};
    memcpy(h, MFPACK_MAGIC, 8);
    put_u32(h + 8, MFPACK_VERSION);
    put_u32(h + 12, MFPACK_HEADER_BYTES);
    put_u64(h + 16, MFPACK_HEADER_BYTES);
    put_u64(h + 24, mlen);
    put_u64(h + 32, mfpack_hash(m, mlen));
    put_u64(h + 40, L->dense_offset);
    put_u64(h + 48, L->experts_offset);
    put_u64(h + 56, L->file_bytes);
    mf_status st = MF_OK;
    if (ftruncate(fd, (off_t)L->file_bytes) != 0)
        st = err_set(err, MF_ERR_IO, "%s: cannot size the file to %llu bytes: %s", path,
                     (unsigned long long)L->file_bytes, strerror(errno));
    if (!st) st = pwrite_all(fd, h, sizeof h, 0, path, err);
    if (!st) st = pwrite_all(fd, m, mlen, MFPACK_HEADER_BYTES, path, err);
    free(m);
    return st;
}

const mfpack_tensor *mfpack_find(const mfpack_layout *L, const char *name) {
    for (int i = 0; i < L->n_tensors; i++)
        if (!strcmp(L->tensors[i].name, name)) return &L->tensors[i];
    return NULL;
}

const mfpack_expert_layer *mfpack_experts(const mfpack_layout *L, int layer) {
    for (int i = 0; i < L->n_expert_layers; i++)
        if (L->expert_layers[i].layer == layer) return &L->expert_layers[i];
    return NULL;
}

/* ---- reading ---- */

static int json_u64(const cJSON *o, const char *name, uint64_t *out) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!cJSON_IsNumber(it) || it->valuedouble < 0 || it->valuedouble > 9007199254740992.0 ||
        it->valuedouble != floor(it->valuedouble))
        return 0;
    *out = (uint64_t)it->valuedouble;
    return 1;
}

static int json_qtype(const cJSON *o, mf_qtype *out) {
    const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "type"));
    return s && mf_qtype_parse(s, out) == MF_OK;
}

static int json_shape(const cJSON *o, int64_t *shape, int max, int *ndim) {
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(o, "shape");
    if (!cJSON_IsArray(a)) return 0;
    int n = cJSON_GetArraySize(a);
    if (n < 1 || n > max) return 0;
    for (int i = 0; i < n; i++) {
        const cJSON *e = cJSON_GetArrayItem(a, i);
        if (!cJSON_IsNumber(e) || e->valuedouble < 1 || e->valuedouble > 1e12 ||
            e->valuedouble != floor(e->valuedouble))
            return 0;
        shape[i] = (int64_t)e->valuedouble;
    }
    *ndim = n;
    return 1;
}

static mf_status parse_manifest(mfpack_file *f, const cJSON *o, mf_err *err) {
    mfpack_layout *L = &f->L;
    const char *path = f->path;
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(o, "format");
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "moeflux"))
        return err_set(err, MF_ERR_FORMAT, "%s: manifest is not a moeflux manifest", path);
    uint64_t gs;
    if (!json_u64(o, "group_size", &gs) || gs != QUANT_GROUP)
        return err_set(err, MF_ERR_FORMAT, "%s: manifest group_size must be %d", path, QUANT_GROUP);
    mf_status st = hparams_from_manifest(&L->hp, cJSON_GetObjectItemCaseSensitive(o, "hparams"), err);
    if (st) return err_wrap(err, "%s", path);
    const cJSON *src = cJSON_GetObjectItemCaseSensitive(o, "source");
    if (src) L->extra_json = cJSON_PrintUnformatted(src);
    if (!json_u64(o, "dense_bytes", &L->dense_bytes) || !json_u64(o, "experts_bytes", &L->experts_bytes))
        return err_set(err, MF_ERR_FORMAT, "%s: manifest lacks dense_bytes/experts_bytes", path);
    const cJSON *ts = cJSON_GetObjectItemCaseSensitive(o, "tensors");
    const cJSON *es = cJSON_GetObjectItemCaseSensitive(o, "experts");
    if (!cJSON_IsArray(ts) || !cJSON_IsArray(es))
        return err_set(err, MF_ERR_FORMAT, "%s: manifest lacks the tensors/experts tables", path);
    const cJSON *e;
    cJSON_ArrayForEach(e, ts) {
        const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "name"));
        mf_qtype type;
        int64_t shape[MFPACK_MAX_DIMS];
        int ndim;
        uint64_t off, bytes;
        if (!name || !json_qtype(e, &type) || !json_shape(e, shape, MFPACK_MAX_DIMS, &ndim) ||
            !json_u64(e, "offset", &off) || !json_u64(e, "bytes", &bytes))
            return err_set(err, MF_ERR_FORMAT, "%s: manifest tensor entry '%s' is malformed", path,
                           name ? name : "(unnamed)");
        if (mfpack_find(L, name))
            return err_set(err, MF_ERR_FORMAT, "%s: tensor '%s' listed twice", path, name);
        if (mfpack_layout_add_tensor(L, name, type, ndim, shape, err))
            return err_wrap(err, "%s", path);
        mfpack_tensor *t = &L->tensors[L->n_tensors - 1];
        if (t->bytes != bytes)
            return err_set(err, MF_ERR_FORMAT, "%s: tensor '%s' has %llu bytes, its shape and type need %llu",
                           path, name, (unsigned long long)bytes, (unsigned long long)t->bytes);
        if (off < L->dense_offset || off + bytes < off || off + bytes > L->experts_offset)
            return err_set(err, MF_ERR_FORMAT, "%s: tensor '%s' lies outside the dense region", path, name);
        if (off % MFPACK_ALIGN)
            return err_set(err, MF_ERR_FORMAT, "%s: tensor '%s' is not %u-byte aligned", path, name,
                           MFPACK_ALIGN);
        t->offset = off;
    }
    cJSON_ArrayForEach(e, es) {
        uint64_t layer, count, off, stride;
        const cJSON *ps = cJSON_GetObjectItemCaseSensitive(e, "parts");
        if (!json_u64(e, "layer", &layer) || !json_u64(e, "count", &count) ||
            !json_u64(e, "offset", &off) || !json_u64(e, "stride", &stride) || !cJSON_IsArray(ps) ||
            cJSON_GetArraySize(ps) != MFPACK_EXPERT_PARTS || layer >= (uint64_t)L->hp.n_layers ||
            count == 0 || count > (1u << 20))
            return err_set(err, MF_ERR_FORMAT, "%s: manifest experts entry is malformed", path);
        mf_qtype types[3];
        int64_t sh[3][2];
        for (int p = 0; p < 3; p++) {
            const cJSON *pe = cJSON_GetArrayItem(ps, p);
            int nd;
            if (!json_qtype(pe, &types[p]) || !json_shape(pe, sh[p], 2, &nd) || nd != 2)
                return err_set(err, MF_ERR_FORMAT, "%s: layer %llu expert part %d is malformed", path,
                               (unsigned long long)layer, p);
        }
        if (sh[0][0] != sh[1][0] || sh[0][1] != sh[1][1] || sh[2][0] != sh[0][1] || sh[2][1] != sh[0][0])
            return err_set(err, MF_ERR_FORMAT, "%s: layer %llu expert shapes disagree", path,
                           (unsigned long long)layer);
        if (mfpack_layout_add_experts(L, (int)layer, (int)count, types, sh[0][0], sh[0][1], err))
            return err_wrap(err, "%s", path);
        mfpack_expert_layer *E = &L->expert_layers[L->n_expert_layers - 1];
        for (int p = 0; p < 3; p++) {
            uint64_t poff, pbytes;
            const cJSON *pe = cJSON_GetArrayItem(ps, p);
            if (!json_u64(pe, "offset", &poff) || !json_u64(pe, "bytes", &pbytes) ||
                pbytes != E->parts[p].bytes || poff + pbytes > stride || poff % MFPACK_PART_ALIGN)
                return err_set(err, MF_ERR_FORMAT, "%s: layer %llu expert part %s range is wrong", path,
                               (unsigned long long)layer, E->parts[p].name);
            E->parts[p].offset = poff;
        }
        if (stride == 0 || stride % MFPACK_ALIGN || off % MFPACK_ALIGN || off < L->experts_offset ||
            stride > L->file_bytes ||
            count > (L->file_bytes - off) / stride || off > L->file_bytes)
            return err_set(err, MF_ERR_FORMAT, "%s: layer %llu experts are misaligned or lie outside the file",
                           path,
                           (unsigned long long)layer);
        E->offset = off;
        E->stride = stride;
    }
    const cJSON *fs = cJSON_GetObjectItemCaseSensitive(o, "files");
    if (fs) {
        uint64_t lo = L->experts_offset + L->experts_bytes;
        if (!cJSON_IsArray(fs) || lo < L->experts_offset)
            return err_set(err, MF_ERR_FORMAT, "%s: manifest files table is malformed", path);
        cJSON_ArrayForEach(e, fs) {
            const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(e, "name"));
            uint64_t off, bytes;
            if (!name || !json_u64(e, "offset", &off) || !json_u64(e, "bytes", &bytes) ||
                mfpack_layout_add_file(L, name, bytes, err))
                return err_set(err, MF_ERR_FORMAT, "%s: manifest file entry '%s' is malformed", path,
                               name ? name : "(unnamed)");
            if (off < lo || off + bytes < off || off + bytes > L->file_bytes)
                return err_set(err, MF_ERR_FORMAT, "%s: carried file '%s' lies outside the file", path, name);
            L->files[L->n_files - 1].offset = off;
        }
    }
    for (int i = 0; i < L->hp.n_layers; i++)
        if (L->hp.layer_moe[i] && !mfpack_experts(L, i))
            return err_set(err, MF_ERR_FORMAT, "%s: MoE layer %d has no experts entry", path, i);
    return MF_OK;
}

mf_status mfpack_open(mfpack_file *f, const char *path, mf_err *err) {
    memset(f, 0, sizeof *f);
    f->fd = -1;
    f->path = strdup(path);
    if (!f->path) return err_set(err, MF_ERR_NOMEM, "out of memory");
    mf_status st = MF_OK;
    cJSON *o = NULL;
    f->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (f->fd < 0) {
        st = err_set(err, MF_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    struct stat sb;
    if (fstat(f->fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        st = err_set(err, MF_ERR_IO, "%s: not a regular file", path);
        goto fail;
    }
    unsigned char h[MFPACK_HEADER_BYTES];
    if (sb.st_size < (off_t)sizeof h || pread(f->fd, h, sizeof h, 0) != (ssize_t)sizeof h) {
        st = err_set(err, MF_ERR_FORMAT, "%s: too short to be a .moeflux file", path);
        goto fail;
    }
    if (memcmp(h, MFPACK_MAGIC, 8)) {
        st = err_set(err, MF_ERR_FORMAT, "%s: not a .moeflux file (bad magic)", path);
        goto fail;
    }
    uint32_t version = get_u32(h + 8);
    if (version != MFPACK_VERSION) {
        st = err_set(err, MF_ERR_UNSUPPORTED, "%s: format version %u, this build reads %u", path,
                     version, MFPACK_VERSION);
        goto fail;
    }
    uint64_t moff = get_u64(h + 16), mlen = get_u64(h + 24), sum = get_u64(h + 32);
    f->L.dense_offset = get_u64(h + 40);
    f->L.experts_offset = get_u64(h + 48);
    f->L.file_bytes = get_u64(h + 56);
    if (f->L.file_bytes != (uint64_t)sb.st_size) {
        st = err_set(err, MF_ERR_FORMAT, "%s: file is %llu bytes, its header says %llu (truncated?)",
                     path, (unsigned long long)sb.st_size, (unsigned long long)f->L.file_bytes);
        goto fail;
    }
    if (get_u32(h + 12) != MFPACK_HEADER_BYTES || moff != MFPACK_HEADER_BYTES || mlen == 0 ||
        mlen > (256u << 20) || moff + mlen > f->L.dense_offset ||
        f->L.dense_offset > f->L.experts_offset || f->L.experts_offset > f->L.file_bytes ||
        f->L.dense_offset % MFPACK_ALIGN || f->L.experts_offset % MFPACK_ALIGN) {
        st = err_set(err, MF_ERR_FORMAT, "%s: header offsets are inconsistent", path);
        goto fail;
    }
    f->manifest = malloc(mlen + 1);
    if (!f->manifest) {
        st = err_set(err, MF_ERR_NOMEM, "%s: out of memory for the manifest", path);
        goto fail;
    }
    if (pread(f->fd, f->manifest, mlen, (off_t)moff) != (ssize_t)mlen) {
        st = err_set(err, MF_ERR_IO, "%s: cannot read the manifest", path);
        goto fail;
    }
    f->manifest[mlen] = '\0';
    if (mfpack_hash(f->manifest, mlen) != sum) {
        st = err_set(err, MF_ERR_FORMAT, "%s: manifest checksum mismatch (corrupt file)", path);
        goto fail;
    }
    o = cJSON_Parse(f->manifest);
    if (!o || !cJSON_IsObject(o)) {
        st = err_set(err, MF_ERR_FORMAT, "%s: manifest is not valid JSON", path);
        goto fail;
    }
    uint64_t dense_offset = f->L.dense_offset, experts_offset = f->L.experts_offset,
             file_bytes = f->L.file_bytes;
    st = parse_manifest(f, o, err);
    f->L.dense_offset = dense_offset;
    f->L.experts_offset = experts_offset;
    f->L.file_bytes = file_bytes;
    if (st) goto fail;
    cJSON_Delete(o);
    return MF_OK;
fail:
    cJSON_Delete(o);
    mfpack_close(f);
    return st;
}

void mfpack_close(mfpack_file *f) {
    if (f->fd >= 0) close(f->fd);
    free(f->path);
    free(f->manifest);
    mfpack_layout_free(&f->L);
    memset(f, 0, sizeof *f);
    f->fd = -1;
}
