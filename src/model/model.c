/* model.c - the public mf_model handle: an opened .moeflux file and its description.
 * Not the forward pass (a later part of src/model) and not the expert cache. */
#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

#include <stdio.h>
#include <time.h>

#include "core/err.h"
#include "format/mfpack.h"
#include "format/quant.h"
#include "model/hparams.h"
#include "model/model_internal.h"

mf_status mf_model_open(const char *path, mf_model **out) {
    mf_model *m = calloc(1, sizeof *m);
    *out = m;
    if (!m) return MF_ERR_NOMEM;
    m->file.fd = -1;
    mf_status st = mfpack_open(&m->file, path, &m->err);
    m->open = st == MF_OK;
    if (m->open) m->manifest_hash = mfpack_hash(m->file.manifest, strlen(m->file.manifest));
    return st;
}

void mf_engine_options_init(mf_engine_options *o) {
    memset(o, 0, sizeof *o);
}

/* Bytes of RAM the kernel says are available (0 when unknown). */
static uint64_t mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    fclose(f);
    return (uint64_t)kb * 1024;
}

static void slot_pool_free(struct slot_pool *p);

static void unload(mf_model *m) {
    dev_cache_close(m->dcache);
    m->dcache = NULL;
    if (m->store) expert_store_close(m->store);
    m->store = NULL;
    slot_pool_free(m->slots);
    m->slots = NULL;
    weights_free(&m->w);
    if (m->be) m->be->ops->destroy(m->be);
    m->be = NULL;
}

int mf_cuda_available(void) { return cuda_backend_available(); }

/* Host expert slots in page-locked memory, so a GPU copies them at full PCIe speed. Slots are
 * carved from arenas of up to SLOT_ARENA_SLOTS slots, one host_alloc each (page-locking is a
 * costly call, and one a slot slowed the host tier's first fill), never more in all than the
 * store's budget; an arena goes back with its last slot (the store frees slots when it closes). */
#define SLOT_ARENA_SLOTS 64
typedef struct slot_arena {
    char *base;
    size_t cap, used;
    int live; /* slots handed out and not freed */
} slot_arena;
struct slot_pool {
    mf_backend *be;
    uint64_t budget, reserved; /* the store's budget; bytes in arenas so far */
    slot_arena *a;
    int n, cap;
};

/* After the store closed: every arena went back with its last slot. */
static void slot_pool_free(struct slot_pool *p) {
    if (p) free(p->a);
    free(p);
}

static void *slot_alloc(void *user, size_t bytes) {
    struct slot_pool *p = user;
    slot_arena *last = p->n ? &p->a[p->n - 1] : NULL;
    if (!last || last->cap - last->used < bytes) {
        if (p->n == p->cap) {
            int cap = p->cap ? 2 * p->cap : 16;
            slot_arena *na = realloc(p->a, sizeof *na * (size_t)cap);
            if (!na) return NULL;
            p->a = na;
            p->cap = cap;
        }
        uint64_t left = p->budget > p->reserved ? p->budget - p->reserved : 0;
        size_t want = bytes * SLOT_ARENA_SLOTS;
        if (want > left) want = left < bytes ? bytes : left / bytes * bytes;
        char *base = p->be->ops->host_alloc(p->be, want);
        if (!base && want > bytes) base = p->be->ops->host_alloc(p->be, want = bytes);
        if (!base) return NULL;
        p->reserved += want;
        last = &p->a[p->n++];
        *last = (slot_arena){base, want, 0, 0};
    }
    void *r = last->base + last->used;
    last->used += bytes;
    last->live++;
    return r;
}

static void slot_free(void *user, void *ptr) {
    struct slot_pool *p = user;
    for (int i = 0; i < p->n; i++) {
        slot_arena *a = &p->a[i];
        if (a->base && (char *)ptr >= a->base && (char *)ptr < a->base + a->cap) {
            if (--a->live == 0) {
                p->be->ops->host_free(p->be, a->base);
                a->base = NULL;
            }
            return;
        }
    }
}

mf_status mf_model_load(mf_model *m, const mf_engine_options *o) {
    if (!m || !m->open) return MF_ERR_ARG;
    if (m->loaded) return err_set(&m->err, MF_ERR_ARG, "model already loaded");
    mf_engine_options def;
    mf_engine_options_init(&def);
    m->opt = o ? *o : def;
    if (m->opt.use_cuda) {
        m->be = cuda_backend_create(m->opt.cuda_device, &m->err);
        if (!m->be) return m->err.status ? m->err.status : MF_ERR_UNSUPPORTED;
    } else {
        m->be = cpu_backend_create(m->opt.n_threads, m->opt.reference);
        if (!m->be) return err_set(&m->err, MF_ERR_NOMEM, "cannot create the CPU backend");
    }
    mf_status st = weights_load(&m->w, &m->file, m->be, &m->err);
    if (st) {
        unload(m);
        return st;
    }
    expert_store_options so;
    expert_store_options_init(&so);
    so.budget_bytes = m->opt.expert_cache_bytes;
    if (!so.budget_bytes) {
        /* default: 40% of the available RAM, never more than all experts */
        so.budget_bytes = mem_available() / 10 * 4;
        if (so.budget_bytes > m->file.L.experts_bytes) so.budget_bytes = m->file.L.experts_bytes;
    }
    if (m->opt.io_threads > 0) so.io_threads = m->opt.io_threads;
    so.o_direct = m->opt.o_direct;
    if (!m->be->ops->host_memory && m->be->ops->host_alloc) {
        if (!(m->slots = calloc(1, sizeof *m->slots))) {
            unload(m);
            return err_set(&m->err, MF_ERR_NOMEM, "out of memory");
        }
        m->slots->be = m->be;
        so.slot_alloc = slot_alloc;
        so.slot_free = slot_free;
        so.slot_user = m->slots;
    }
    st = expert_store_open(&m->store, &m->file, &so, &m->err);
    if (!st && m->slots) {
        expert_stats es;
        expert_store_stats(m->store, &es);
        m->slots->budget = es.budget_bytes; /* slots x slot_bytes, as the store settled it */
    }
    if (!st && !m->be->ops->host_memory) {
        uint64_t budget = m->opt.gpu_cache_bytes;
        if (!budget) {
            /* default: the free device memory less a reserve for sessions (KV cache, activations) */
            uint64_t free_b = m->be->ops->mem_free(m->be), reserve = (uint64_t)4 << 30;
            budget = free_b > reserve ? free_b - reserve : 0;
        }
        st = dev_cache_open(&m->dcache, m->be, m->store, &m->file.L, budget, &m->err);
        /* when every expert fits, load them all now: decoding then never waits on the host */
        if (!st && !m->opt.no_preload && dev_cache_holds_all(m->dcache)) st = dev_cache_preload(m->dcache, &m->err);
        /* else, when host RAM holds them all, the GPU reads those it lacks from there */
        else if (!st && !m->opt.no_preload && !m->opt.no_host_reads && m->slots && m->be->ops->host_alloc_readable)
            st = dev_cache_map_host(m->dcache, &m->err);
    }
    if (st) {
        unload(m);
        return st;
    }
    m->loaded = 1;
    return MF_OK;
}

mf_status experts_prefetch(mf_model *m, int layer, const int32_t *ids, int n, mf_err *err) {
    if (m->dcache) return dev_cache_prefetch(m->dcache, layer, ids, n, err);
    return expert_store_prefetch(m->store, layer, ids, n, err);
}

mf_status experts_get(mf_model *m, int layer, int32_t id, const void **blob, mf_err *err) {
    if (m->dcache) return dev_cache_get(m->dcache, layer, id, blob, err);
    return expert_store_get(m->store, layer, id, blob, err);
}

int experts_capacity(const mf_model *m) {
    expert_stats st;
    expert_store_stats(m->store, &st);
    uint64_t host = st.slot_bytes ? st.budget_bytes / st.slot_bytes : 1;
    int cap = host > (uint64_t)1 << 30 ? 1 << 30 : (int)host;
    if (m->dcache && dev_cache_slots(m->dcache) < cap) cap = dev_cache_slots(m->dcache);
    return cap;
}

void experts_prefetch_async(mf_model *m, int layer, const int32_t *ids, int n, int to_device) {
    /* the host tier reads what it lacks in the background */
    mf_err ignored;
    expert_store_prefetch_async(m->store, layer, ids, n, &ignored);
    if (!m->dcache || !to_device) return;
    /* the device tier starts copying those already in host RAM (copies run on their own
     * stream, so this does not wait) */
    int32_t ready[256];
    int k = 0;
    for (int i = 0; i < n && k < 256; i++)
        if (!dev_cache_has(m->dcache, layer, ids[i]) && expert_store_is_ready(m->store, layer, ids[i])) ready[k++] = ids[i];
    if (k) dev_cache_prefetch(m->dcache, layer, ready, k, &ignored);
}

void experts_release(mf_model *m, int layer, int32_t id) {
    if (m->dcache) dev_cache_release(m->dcache, layer, id);
    else expert_store_release(m->store, layer, id);
}

const char *mf_model_backend(const mf_model *m) { return m && m->loaded ? m->be->ops->name : NULL; }

static double clock_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

mf_status mf_model_bandwidth(mf_model *m, double *device_gbps, double *upload_gbps) {
    if (!m || !m->loaded) return MF_ERR_ARG;
    mf_backend *be = m->be;
    size_t bytes = (size_t)256 << 20;
    void *a = be->ops->alloc(be, bytes), *b = be->ops->alloc(be, bytes);
    /* the upload path experts take: from the store's slots (page-locked on a GPU) */
    int pinned = !be->ops->host_memory && be->ops->host_alloc;
    char *host = pinned ? be->ops->host_alloc(be, bytes) : NULL;
    if (!pinned && posix_memalign((void **)&host, 4096, bytes)) host = NULL;
    mf_status st = MF_OK;
    if (!a || !b || !host) {
        st = err_set(&m->err, MF_ERR_NOMEM, "bandwidth: cannot allocate 2 x %zu MB", bytes >> 20);
    } else {
        memset(host, 1, bytes);
        be->ops->copy(be, b, a, bytes);
        be->ops->sync(be);
        int reps = 8;
        double t0 = clock_s();
        for (int i = 0; i < reps; i++) be->ops->copy(be, (i & 1) ? a : b, (i & 1) ? b : a, bytes);
        be->ops->sync(be);
        double t1 = clock_s();
        for (int i = 0; i < reps; i++) be->ops->upload(be, a, host, bytes);
        be->ops->sync(be);
        double t2 = clock_s();
        *device_gbps = 2.0 * bytes * reps / (t1 - t0) / 1e9;
        *upload_gbps = (double)bytes * reps / (t2 - t1) / 1e9;
    }
    if (a) be->ops->free(be, a);
    if (b) be->ops->free(be, b);
    if (pinned && host) be->ops->host_free(be, host);
    else free(host);
    return st;
}

int mf_model_vocab(const mf_model *m) { return m && m->open ? m->file.L.hp.vocab : 0; }

void mf_model_expert_stats(const mf_model *m, mf_expert_stats *out) {
    memset(out, 0, sizeof *out);
    if (!m || !m->loaded) return;
    expert_stats st;
    expert_store_stats(m->store, &st);
    out->hits = st.hits;
    out->misses = st.misses;
    out->evictions = st.evictions;
    out->bytes_read = st.bytes_read;
    out->reads = st.reads;
    out->read_seconds = st.read_seconds;
    out->budget_bytes = st.budget_bytes;
    out->resident_bytes = st.resident_bytes;
    out->peak_bytes = st.peak_bytes;
    if (m->dcache) {
        dev_cache_stats d;
        dev_cache_stats_get(m->dcache, &d);
        out->gpu_hits = d.hits;
        out->gpu_misses = d.misses;
        out->gpu_evictions = d.evictions;
        out->gpu_bytes_uploaded = d.bytes_uploaded;
        out->gpu_host_reads = d.host_reads;
        out->gpu_bytes_from_host = d.bytes_from_host;
        out->gpu_upload_seconds = d.upload_seconds;
        out->gpu_budget_bytes = d.budget_bytes;
        out->gpu_peak_bytes = d.peak_bytes;
    }
}

void mf_model_reset_expert_stats(mf_model *m) {
    if (m && m->loaded) {
        expert_store_reset_stats(m->store);
        if (m->dcache) dev_cache_reset_stats(m->dcache);
    }
}

const char *mf_model_error(const mf_model *m) { return m ? m->err.msg : "out of memory"; }

void mf_model_free(mf_model *m) {
    if (!m) return;
    if (m->loaded) unload(m);
    if (m->open) mfpack_close(&m->file);
    free(m->info);
    free(m);
}

const char *mf_model_info_json(mf_model *m) {
    if (!m || !m->open) return NULL;
    if (m->info) return m->info;
    const mfpack_layout *L = &m->file.L;
    const mf_hparams *hp = &L->hp;
    char *hj = hparams_to_json(hp);
    cJSON *o = cJSON_Parse(hj);
    free(hj);
    if (!o) return NULL;
    cJSON_AddStringToObject(o, "path", m->file.path);
    uint64_t expert_bytes = 0, expert_stride = 0;
    const char *expert_type = "none";
    if (L->n_expert_layers > 0) {
        const mfpack_expert_layer *E = &L->expert_layers[0];
        expert_bytes = mfpack_expert_payload(E);
        expert_stride = E->stride;
        expert_type = mf_qtype_name(E->parts[0].type);
    }
    cJSON_AddNumberToObject(o, "n_moe_layers", L->n_expert_layers);
    cJSON_AddNumberToObject(o, "expert_bytes", (double)expert_bytes);
    cJSON_AddNumberToObject(o, "expert_stride", (double)expert_stride);
    cJSON_AddStringToObject(o, "experts_type", expert_type);
    uint64_t payload = 0;
    int counts[MF_QTYPE_COUNT] = {0};
    for (int i = 0; i < L->n_tensors; i++) {
        payload += L->tensors[i].bytes;
        counts[L->tensors[i].type]++;
    }
    cJSON_AddNumberToObject(o, "n_dense_tensors", L->n_tensors);
    cJSON *dt = cJSON_AddObjectToObject(o, "dense_types");
    for (int t = 0; t < MF_QTYPE_COUNT; t++)
        if (counts[t]) cJSON_AddNumberToObject(dt, mf_qtype_name((mf_qtype)t), counts[t]);
    cJSON_AddNumberToObject(o, "dense_bytes", (double)payload);
    const mfpack_tensor *emb = mfpack_find(L, "embed_tokens");
    cJSON_AddNumberToObject(o, "embed_bytes", emb ? (double)emb->bytes : 0.0);
    cJSON_AddNumberToObject(o, "experts_bytes", (double)L->experts_bytes);
    cJSON_AddNumberToObject(o, "file_bytes", (double)L->file_bytes);
    if (L->extra_json) {
        cJSON *src = cJSON_Parse(L->extra_json);
        if (src) cJSON_AddItemToObject(o, "source", src);
    }
    m->info = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return m->info;
}
