/* safetensors.c - memory-mapped, strictly validated reader of safetensors checkpoints:
 * one file or the shards of an index. Not a writer; it copies no tensor data and knows no models. */
#include "format/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_HEADER_MAX (100ull * 1024 * 1024) /* larger header lengths are refused as absurd */
#define ST_INDEX_MAX (100ull * 1024 * 1024)  /* same cap for model.safetensors.index.json */
#define ST_JSON_INT_MAX 9007199254740992.0   /* 2^53: beyond it a JSON number is not exact */
#define ST_INDEX_NAME "model.safetensors.index.json"
#define ST_SINGLE_NAME "model.safetensors"

struct st_file {
    char *path;          /* as opened (dir/shard for shards); tensors' file points here */
    const uint8_t *map;  /* the whole file, PROT_READ; NULL when not mapped */
    size_t map_len;
    char *names;         /* this file's tensor names, NUL-separated; tensors' name points here */
};

/* One tensor's byte range inside a file's data area, for the overlap check. */
typedef struct st_range {
    uint64_t begin, end;
    const char *name;
} st_range;

static const char *const st_dtype_names[ST_DTYPE_COUNT] = {
    [ST_F32] = "F32", [ST_F16] = "F16", [ST_BF16] = "BF16", [ST_U32] = "U32",
    [ST_I32] = "I32", [ST_U8] = "U8", [ST_I8] = "I8", [ST_F8_E4M3] = "F8_E4M3",
};

static const size_t st_dtype_sizes[ST_DTYPE_COUNT] = {
    [ST_F32] = 4, [ST_F16] = 2, [ST_BF16] = 2, [ST_U32] = 4,
    [ST_I32] = 4, [ST_U8] = 1, [ST_I8] = 1, [ST_F8_E4M3] = 1,
};

const char *st_dtype_name(st_dtype t) {
    return (unsigned)t < ST_DTYPE_COUNT ? st_dtype_names[t] : "?";
}

size_t st_dtype_size(st_dtype t) {
    return (unsigned)t < ST_DTYPE_COUNT ? st_dtype_sizes[t] : 0;
}

static int st_dtype_parse(const char *s, st_dtype *out) {
    for (int i = 0; i < ST_DTYPE_COUNT; i++) {
        if (strcmp(s, st_dtype_names[i]) == 0) {
            *out = (st_dtype)i;
            return 1;
        }
    }
    return 0;
}

void st_close(st_checkpoint *ck) {
    if (!ck) return;
    for (size_t i = 0; i < ck->n_files; i++) {
        st_file *f = ck->files ? ck->files[i] : NULL;
        if (!f) continue;
        if (f->map) munmap((void *)f->map, f->map_len);
        free(f->names);
        free(f->path);
        free(f);
    }
    free(ck->files);
    free(ck->tensors);
    memset(ck, 0, sizeof *ck);
}

static int st_cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const st_tensor *)a)->name, ((const st_tensor *)b)->name);
}

const st_tensor *st_find(const st_checkpoint *ck, const char *name) {
    if (!ck || !ck->tensors || !name) return NULL;
    st_tensor key = {.name = name};
    return bsearch(&key, ck->tensors, ck->n_tensors, sizeof key, st_cmp_tensor_name);
}

/* ---- helpers ---- */

static char *st_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* A JSON number that is an exact non-negative integer (at most 2^53). */
static int st_json_uint(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v)) return 0;
    double d = v->valuedouble;
    if (!(d >= 0.0 && d <= ST_JSON_INT_MAX)) return 0; /* also refuses NaN */
    uint64_t u = (uint64_t)d;
    if ((double)u != d) return 0;
    *out = u;
    return 1;
}

/* Writes "[d0, d1, ...]" for messages. */
static const char *st_shape_str(char *buf, size_t cap, const st_tensor *t) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < t->ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%" PRId64, i ? ", " : "", t->shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
    return buf;
}

/* Appends one zeroed st_file to ck->files (so st_close frees whatever gets filled in). */
static st_file *st_file_add(st_checkpoint *ck, const char *path, mf_err *err) {
    st_file **nf = realloc(ck->files, (ck->n_files + 1) * sizeof *nf);
    if (!nf) return err_set(err, MF_ERR_NOMEM, "%s: out of memory", path), NULL;
    ck->files = nf;
    st_file *f = calloc(1, sizeof *f);
    if (!f) return err_set(err, MF_ERR_NOMEM, "%s: out of memory", path), NULL;
    ck->files[ck->n_files++] = f;
    f->path = strdup(path);
    if (!f->path) return err_set(err, MF_ERR_NOMEM, "%s: out of memory", path), NULL;
    return f;
}

/* Maps f->path read-only; refuses non-regular files and files too short for the 8-byte length. */
static mf_status st_file_map(st_file *f, mf_err *err) {
    int fd = open(f->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_set(err, MF_ERR_IO, "%s: cannot open: %s", f->path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int e = errno;
        close(fd);
        return err_set(err, MF_ERR_IO, "%s: cannot stat: %s", f->path, strerror(e));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return err_set(err, MF_ERR_IO, "%s: not a regular file", f->path);
    }
    if (sb.st_size < 8) {
        close(fd);
        return err_set(err, MF_ERR_FORMAT,
                       "%s: file is %lld bytes, too short for the 8-byte safetensors header length",
                       f->path, (long long)sb.st_size);
    }
    if ((uint64_t)sb.st_size > SIZE_MAX) {
        close(fd);
        return err_set(err, MF_ERR_IO, "%s: file too large to map", f->path);
    }
    void *p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED) return err_set(err, MF_ERR_IO, "%s: cannot mmap: %s", f->path, strerror(e));
    f->map = p;
    f->map_len = (size_t)sb.st_size;
    return MF_OK;
}

/* Checks "__metadata__": an object of string values (its content is not kept). */
static mf_status st_check_metadata(const char *path, const cJSON *m, mf_err *err) {
    if (!cJSON_IsObject(m))
        return err_set(err, MF_ERR_FORMAT, "%s: __metadata__ is not a JSON object", path);
    for (const cJSON *kv = m->child; kv; kv = kv->next)
        if (!cJSON_IsString(kv))
            return err_set(err, MF_ERR_FORMAT, "%s: __metadata__ value \"%s\" is not a string",
                           path, kv->string);
    return MF_OK;
}

/* Validates one header entry e (its name already in t->name) against a data area of
 * data_size bytes at data; fills t and r. */
static mf_status st_entry_parse(const char *path, const cJSON *e, const uint8_t *data,
                                uint64_t data_size, st_tensor *t, st_range *r, mf_err *err) {
    const char *nm = t->name;
    if (!cJSON_IsObject(e))
        return err_set(err, MF_ERR_FORMAT, "%s: tensor \"%s\": entry is not a JSON object", path, nm);

    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    if (!cJSON_IsString(dt))
        return err_set(err, MF_ERR_FORMAT, "%s: tensor \"%s\": missing or non-string \"dtype\"",
                       path, nm);
    if (!st_dtype_parse(dt->valuestring, &t->dtype))
        return err_set(err, MF_ERR_UNSUPPORTED,
                       "%s: tensor \"%s\": dtype \"%s\" is not supported "
                       "(F32, F16, BF16, U32, I32, U8, I8, F8_E4M3)", path, nm, dt->valuestring);

    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    if (!cJSON_IsArray(sh))
        return err_set(err, MF_ERR_FORMAT, "%s: tensor \"%s\": missing or non-array \"shape\"",
                       path, nm);
    int nd = cJSON_GetArraySize(sh);
    if (nd > ST_MAX_DIMS)
        return err_set(err, MF_ERR_FORMAT, "%s: tensor \"%s\": shape has %d dims (at most %d)",
                       path, nm, nd, ST_MAX_DIMS);
    t->ndim = nd;
    int has_zero = 0;
    int i = 0;
    for (const cJSON *d = sh->child; d; d = d->next, i++) {
        uint64_t v;
        if (!st_json_uint(d, &v)) {
            char tmp[64] = "not a number";
            if (cJSON_IsNumber(d)) snprintf(tmp, sizeof tmp, "%.17g", d->valuedouble);
            return err_set(err, MF_ERR_FORMAT,
                           "%s: tensor \"%s\": shape[%d] (%s) is not a non-negative integer",
                           path, nm, i, tmp);
        }
        t->shape[i] = (int64_t)v;
        if (v == 0) has_zero = 1;
    }
    char sbuf[256];
    t->numel = 1;
    if (has_zero) {
        t->numel = 0;
    } else {
        for (i = 0; i < nd; i++) {
            if (t->numel > INT64_MAX / t->shape[i])
                return err_set(err, MF_ERR_FORMAT,
                               "%s: tensor \"%s\": shape %s has too many elements", path, nm,
                               st_shape_str(sbuf, sizeof sbuf, t));
            t->numel *= t->shape[i];
        }
    }

    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    uint64_t b, en;
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 || !st_json_uint(off->child, &b) ||
        !st_json_uint(off->child->next, &en))
        return err_set(err, MF_ERR_FORMAT,
                       "%s: tensor \"%s\": \"data_offsets\" must be two non-negative integers",
                       path, nm);
    if (b > en)
        return err_set(err, MF_ERR_FORMAT,
                       "%s: tensor \"%s\": data_offsets [%" PRIu64 ", %" PRIu64 "] begin after end",
                       path, nm, b, en);
    if (en > data_size)
        return err_set(err, MF_ERR_FORMAT,
                       "%s: tensor \"%s\": data_offsets end %" PRIu64 " is past the end of the "
                       "data area (%" PRIu64 " bytes; file truncated?)", path, nm, en, data_size);
    /* end - begin == numel * size, without forming the product (it may overflow). */
    uint64_t len = en - b, sz = st_dtype_sizes[t->dtype];
    if (len % sz != 0 || len / sz != (uint64_t)t->numel)
        return err_set(err, MF_ERR_FORMAT,
                       "%s: tensor \"%s\": data_offsets [%" PRIu64 ", %" PRIu64 "] span %" PRIu64
                       " bytes but shape %s of %s needs %" PRId64 " elements of %zu bytes",
                       path, nm, b, en, len, st_shape_str(sbuf, sizeof sbuf, t),
                       st_dtype_names[t->dtype], t->numel, (size_t)sz);
    t->data = data + b;
    t->nbytes = len;
    r->begin = b;
    r->end = en;
    r->name = nm;
    return MF_OK;
}

static int st_cmp_range(const void *a, const void *b) {
    const st_range *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Sorts ranges by begin and refuses any two non-empty ranges that share a byte. */
static mf_status st_check_overlap(const char *path, st_range *rg, size_t n, mf_err *err) {
    qsort(rg, n, sizeof *rg, st_cmp_range);
    const st_range *far = NULL; /* the range reaching furthest so far */
    for (size_t i = 0; i < n; i++) {
        if (rg[i].begin == rg[i].end) continue;
        if (far && rg[i].begin < far->end)
            return err_set(err, MF_ERR_FORMAT,
                           "%s: tensors \"%s\" [%" PRIu64 ", %" PRIu64 ") and \"%s\" [%" PRIu64
                           ", %" PRIu64 ") overlap", path, far->name, far->begin, far->end,
                           rg[i].name, rg[i].begin, rg[i].end);
        if (!far || rg[i].end > far->end) far = &rg[i];
    }
    return MF_OK;
}

/* Maps path, validates its header and appends the file and its tensors to ck (unsorted).
 * On error ck may hold a partial file; the caller closes ck. */
static mf_status st_file_load(st_checkpoint *ck, const char *path, mf_err *err) {
    st_file *f = st_file_add(ck, path, err);
    if (!f) return err ? err->status : MF_ERR_NOMEM;
    mf_status st = st_file_map(f, err);
    if (st != MF_OK) return st;
    path = f->path;

    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)f->map[i] << (8 * i);
    if (hlen > ST_HEADER_MAX)
        return err_set(err, MF_ERR_FORMAT,
                       "%s: header length %" PRIu64 " is absurd (more than 100 MB)", path, hlen);
    if (hlen > f->map_len - 8)
        return err_set(err, MF_ERR_FORMAT,
                       "%s: header length %" PRIu64 " runs past the end of the file (%zu bytes)",
                       path, hlen, f->map_len);
    const uint8_t *data = f->map + 8 + hlen;
    uint64_t data_size = f->map_len - 8 - hlen;

    /* cJSON gets a NUL-terminated copy so it can never read past the header. */
    char *hdr = malloc(hlen + 1);
    if (!hdr) return err_set(err, MF_ERR_NOMEM, "%s: out of memory for the header", path);
    memcpy(hdr, f->map + 8, hlen);
    hdr[hlen] = '\0';
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(hdr, hlen, &end, 0);
    st_range *rg = NULL;
    size_t n = 0, name_bytes = 0;
    if (!root) {
        st = err_set(err, MF_ERR_FORMAT, "%s: header is not valid JSON (near byte %td of %" PRIu64 ")",
                     path, end ? end - hdr : 0, hlen);
        goto done;
    }
    for (; end && end < hdr + hlen; end++) {
        if (*end != ' ' && *end != '\t' && *end != '\n' && *end != '\r') {
            st = err_set(err, MF_ERR_FORMAT, "%s: header has trailing bytes after the JSON (byte %td)",
                         path, end - hdr);
            goto done;
        }
    }
    if (!cJSON_IsObject(root)) {
        st = err_set(err, MF_ERR_FORMAT, "%s: header is not a JSON object", path);
        goto done;
    }
    for (const cJSON *e = root->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0) {
            st = st_check_metadata(path, e, err);
            if (st != MF_OK) goto done;
            continue;
        }
        n++;
        name_bytes += strlen(e->string) + 1;
    }

    st_tensor *nt = realloc(ck->tensors, (ck->n_tensors + n + 1) * sizeof *nt);
    f->names = malloc(name_bytes + 1);
    rg = malloc((n + 1) * sizeof *rg);
    if (nt) ck->tensors = nt;
    if (!nt || !f->names || !rg) {
        st = err_set(err, MF_ERR_NOMEM, "%s: out of memory for %zu tensors", path, n);
        goto done;
    }
    char *np = f->names;
    size_t k = 0;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0) continue;
        st_tensor *t = &ck->tensors[ck->n_tensors + k];
        memset(t, 0, sizeof *t);
        size_t l = strlen(e->string) + 1;
        memcpy(np, e->string, l);
        t->name = np;
        t->file = f->path;
        np += l;
        st = st_entry_parse(path, e, data, data_size, t, &rg[k], err);
        if (st != MF_OK) goto done;
        k++;
    }
    st = st_check_overlap(path, rg, n, err);
    if (st == MF_OK) ck->n_tensors += n;
done:
    free(rg);
    cJSON_Delete(root);
    free(hdr);
    return st;
}

/* Sorts ck->tensors by name and refuses duplicates (within a file or across shards). */
static mf_status st_finish(st_checkpoint *ck, mf_err *err) {
    if (ck->n_tensors > 1) qsort(ck->tensors, ck->n_tensors, sizeof *ck->tensors, st_cmp_tensor_name);
    for (size_t i = 1; i < ck->n_tensors; i++) {
        const st_tensor *a = &ck->tensors[i - 1], *b = &ck->tensors[i];
        if (strcmp(a->name, b->name) != 0) continue;
        if (a->file == b->file)
            return err_set(err, MF_ERR_FORMAT, "%s: tensor \"%s\" appears twice in the header",
                           a->file, a->name);
        return err_set(err, MF_ERR_FORMAT, "tensor \"%s\" appears in two shards: %s and %s",
                       a->name, a->file, b->file);
    }
    return MF_OK;
}

mf_status st_open_file(st_checkpoint *ck, const char *path, mf_err *err) {
    if (!ck || !path) return err_set(err, MF_ERR_ARG, "st_open_file: NULL checkpoint or path");
    memset(ck, 0, sizeof *ck);
    mf_status st = st_file_load(ck, path, err);
    if (st == MF_OK) st = st_finish(ck, err);
    if (st != MF_OK) st_close(ck);
    return st;
}

/* Reads a whole (small) file into a malloc'd NUL-terminated buffer. */
static mf_status st_read_all(const char *path, char **out, size_t *len, mf_err *err) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_set(err, MF_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    mf_status st = MF_OK;
    char *buf = NULL;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        st = err_set(err, MF_ERR_IO, "%s: cannot stat, or not a regular file", path);
        goto done;
    }
    if ((uint64_t)sb.st_size > ST_INDEX_MAX) {
        st = err_set(err, MF_ERR_FORMAT, "%s: %lld bytes is too large for an index (over 100 MB)",
                     path, (long long)sb.st_size);
        goto done;
    }
    size_t n = (size_t)sb.st_size, got = 0;
    buf = malloc(n + 1);
    if (!buf) {
        st = err_set(err, MF_ERR_NOMEM, "%s: out of memory", path);
        goto done;
    }
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            st = err_set(err, MF_ERR_IO, "%s: read failed: %s", path,
                         r < 0 ? strerror(errno) : "file shrank while reading");
            goto done;
        }
        got += (size_t)r;
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    buf = NULL;
done:
    free(buf);
    close(fd);
    return st;
}

static int st_cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* A shard name must be a plain file name in the checkpoint directory. */
static int st_shard_name_ok(const char *s) {
    return s[0] && !strchr(s, '/') && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

/* Opens every shard named by the index (each once), then checks the weight_map against them. */
static mf_status st_open_index(st_checkpoint *ck, const char *dir, const char *ipath, mf_err *err) {
    char *text = NULL, *spath = NULL;
    size_t len = 0, n = 0, nu = 0;
    const char **shards = NULL;
    cJSON *root = NULL;
    mf_status st = st_read_all(ipath, &text, &len, err);
    if (st != MF_OK) return st;
    root = cJSON_ParseWithOpts(text, NULL, 1); /* 1: nothing but whitespace may follow */
    if (!root || !cJSON_IsObject(root)) {
        st = err_set(err, MF_ERR_FORMAT, "%s: not a valid JSON object%s", ipath,
                     root ? "" : " (parse error)");
        goto done;
    }
    const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(wm)) {
        st = err_set(err, MF_ERR_FORMAT, "%s: missing or non-object \"weight_map\"", ipath);
        goto done;
    }
    for (const cJSON *e = wm->child; e; e = e->next) {
        if (!cJSON_IsString(e) || !st_shard_name_ok(e->valuestring)) {
            st = err_set(err, MF_ERR_FORMAT,
                         "%s: tensor \"%s\": shard must be a plain file name, got %s%s%s", ipath,
                         e->string, cJSON_IsString(e) ? "\"" : "",
                         cJSON_IsString(e) ? e->valuestring : "a non-string",
                         cJSON_IsString(e) ? "\"" : "");
            goto done;
        }
        n++;
    }
    if (n == 0) {
        st = err_set(err, MF_ERR_FORMAT, "%s: \"weight_map\" is empty", ipath);
        goto done;
    }
    shards = malloc(n * sizeof *shards);
    if (!shards) {
        st = err_set(err, MF_ERR_NOMEM, "%s: out of memory", ipath);
        goto done;
    }
    n = 0;
    for (const cJSON *e = wm->child; e; e = e->next) shards[n++] = e->valuestring;
    qsort(shards, n, sizeof *shards, st_cmp_str);
    for (size_t i = 0; i < n; i++)
        if (nu == 0 || strcmp(shards[nu - 1], shards[i]) != 0) shards[nu++] = shards[i];

    /* Shard i of the sorted unique list becomes ck->files[i]. */
    for (size_t i = 0; i < nu; i++) {
        spath = st_join(dir, shards[i]);
        if (!spath) {
            st = err_set(err, MF_ERR_NOMEM, "%s: out of memory", ipath);
            goto done;
        }
        st = st_file_load(ck, spath, err);
        if (st == MF_ERR_IO) err_wrap(err, "%s names shard \"%s\"", ipath, shards[i]);
        if (st != MF_OK) goto done;
        free(spath);
        spath = NULL;
    }
    st = st_finish(ck, err);
    if (st != MF_OK) goto done;

    for (const cJSON *e = wm->child; e; e = e->next) {
        const char **sh = bsearch(&e->valuestring, shards, nu, sizeof *shards, st_cmp_str);
        const char *want = ck->files[sh - shards]->path;
        const st_tensor *t = st_find(ck, e->string);
        if (t && t->file == want) continue;
        if (t)
            st = err_set(err, MF_ERR_FORMAT,
                         "%s: tensor \"%s\" is mapped to shard \"%s\" but is found in %s", ipath,
                         e->string, e->valuestring, t->file);
        else
            st = err_set(err, MF_ERR_FORMAT,
                         "%s: tensor \"%s\" is mapped to shard \"%s\" but %s does not contain it",
                         ipath, e->string, e->valuestring, want);
        goto done;
    }
done:
    free(spath);
    free(shards);
    cJSON_Delete(root);
    free(text);
    return st;
}

mf_status st_open_dir(st_checkpoint *ck, const char *dir, mf_err *err) {
    if (!ck || !dir) return err_set(err, MF_ERR_ARG, "st_open_dir: NULL checkpoint or directory");
    memset(ck, 0, sizeof *ck);
    struct stat sb;
    if (stat(dir, &sb) != 0)
        return err_set(err, MF_ERR_IO, "%s: cannot open directory: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) return err_set(err, MF_ERR_IO, "%s: not a directory", dir);

    char *ipath = st_join(dir, ST_INDEX_NAME), *spath = st_join(dir, ST_SINGLE_NAME);
    mf_status st;
    if (!ipath || !spath) {
        st = err_set(err, MF_ERR_NOMEM, "%s: out of memory", dir);
    } else if (stat(ipath, &sb) == 0) {
        st = st_open_index(ck, dir, ipath, err);
    } else if (errno != ENOENT) {
        st = err_set(err, MF_ERR_IO, "%s: cannot stat: %s", ipath, strerror(errno));
    } else if (stat(spath, &sb) == 0) {
        st = st_file_load(ck, spath, err);
        if (st == MF_OK) st = st_finish(ck, err);
    } else if (errno != ENOENT) {
        st = err_set(err, MF_ERR_IO, "%s: cannot stat: %s", spath, strerror(errno));
    } else {
        st = err_set(err, MF_ERR_IO, "no " ST_SINGLE_NAME " or " ST_INDEX_NAME " in %s", dir);
    }
    free(ipath);
    free(spath);
    if (st != MF_OK) st_close(ck);
    return st;
}
