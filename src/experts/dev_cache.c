/* dev_cache.c - expert blobs in backend memory: slots allocated lazily up to the budget, an
 * index (layer, expert) -> slot, eviction of the least used unpinned slot (aged use counts,
 * then recency, kept as one number a slot so that choosing a victim is one pass over a compact
 * array: a cache of thousands of slots chooses several a layer); misses come
 * from the host expert store and uploaded on the backend's copy stream (upload_async), their
 * host blobs pinned until the copy finished; dev_cache_get fences. In host-read mode the tables
 * point experts without a slot at their pinned host copies, and noted misses get slots whose
 * entries switch over once their uploads finished. Not thread-safe: the forward pass calls it. */
#include "experts/dev_cache.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct slot {
    void *mem;          /* backend memory, slot_bytes */
    int layer;          /* -1: empty */
    int32_t id;
    int pins;
    int pending;        /* host-read mode: filled, its table entry set once the upload finished */
    uint64_t last_use;
} slot;

struct dev_cache {
    mf_backend *be;
    expert_store *host;
    const mfpack_layout *L;
    uint64_t slot_bytes;
    int n_slots, n_alloc;
    slot *slots;        /* [n_slots] */
    uint64_t *key;      /* [n_slots]: eviction order (slot_key), smallest first */
    int n_empty;        /* allocated slots holding no expert */
    int32_t *index;     /* [n_layers][max_experts] -> slot, -1 when absent */
    int max_experts;
    int *layer_row;     /* [n_layers] -> expert-layer index in L, -1 for dense layers */
    int *resident;      /* [n_layers] experts resident */
    void **table;       /* backend memory [n_layers][max_experts]: blob pointers or NULL */
    void **table_host;  /* [n_layers][max_experts]: what table holds once the dirty rows are sent */
    unsigned char *dirty; /* [n_layers]: the row changed since it was last sent */
    uint32_t *uses;     /* [n_layers][max_experts]: gets, halved every `age_every` gets */
    uint64_t gets, age_every;
    uint64_t clock;
    dev_cache_stats st;
    /* host blobs whose upload_async is in flight: kept pinned in the store until it finishes */
    struct pending { int layer; int32_t id; uint64_t ticket; } *pend;
    int n_pend, cap_pend;
    /* host-read mode (dev_cache_map_host): every blob pinned in the host store, and the table
     * points each expert that is not in a slot at that host copy, which the backend reads in
     * place; slots are filled by dev_cache_note_uses and enter the table once their upload
     * finished (act) */
    const void **host_blob; /* [n_layers][max_experts] or NULL */
    struct act { int slot; uint64_t ticket; } *act;
    int n_act, cap_act;
    struct cand { int layer; int32_t id; } *cand; /* noted misses, given slots by promote */
    int n_cand, cap_cand;
    int unfenced;       /* an entry points at a slot whose upload no fence has covered yet */
};

static void activate_done(dev_cache *c);
static void unmap_host(dev_cache *c);
static void promote(dev_cache *c);

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

mf_status dev_cache_open(dev_cache **out, mf_backend *be, expert_store *host, const mfpack_layout *L,
                         uint64_t budget_bytes, mf_err *err) {
    *out = NULL;
    dev_cache *c = calloc(1, sizeof *c);
    if (!c) return err_set(err, MF_ERR_NOMEM, "out of memory");
    c->be = be;
    c->host = host;
    c->L = L;
    uint64_t all = 0;
    for (int i = 0; i < L->n_expert_layers; i++) {
        const mfpack_expert_layer *E = &L->expert_layers[i];
        if (E->stride > c->slot_bytes) c->slot_bytes = E->stride;
        if (E->count > c->max_experts) c->max_experts = E->count;
        all += E->stride * (uint64_t)E->count;
    }
    if (!c->slot_bytes) c->slot_bytes = 4096;
    if (budget_bytes > all) budget_bytes = all;
    uint64_t n = budget_bytes / c->slot_bytes;
    if (n < 1) n = 1;
    if (n > (1u << 30)) n = 1u << 30;
    c->n_slots = (int)n;
    c->slots = calloc((size_t)c->n_slots, sizeof *c->slots);
    c->key = calloc((size_t)c->n_slots, sizeof *c->key);
    int nl = L->hp.n_layers;
    c->index = malloc(sizeof(int32_t) * (size_t)nl * (size_t)(c->max_experts ? c->max_experts : 1));
    c->layer_row = malloc(sizeof(int) * (size_t)nl);
    c->resident = calloc((size_t)nl, sizeof(int));
    c->table = be->ops->alloc(be, sizeof(void *) * (size_t)nl * (size_t)(c->max_experts ? c->max_experts : 1));
    c->table_host = calloc((size_t)nl * (size_t)(c->max_experts ? c->max_experts : 1), sizeof(void *));
    c->dirty = calloc((size_t)nl, 1);
    c->uses = calloc((size_t)nl * (size_t)(c->max_experts ? c->max_experts : 1), sizeof(uint32_t));
    c->age_every = 16 * (uint64_t)c->n_slots + 4096;
    if (!c->slots || !c->key || !c->index || !c->layer_row || !c->resident || !c->table || !c->table_host || !c->dirty || !c->uses) {
        dev_cache_close(c);
        return err_set(err, MF_ERR_NOMEM, "out of memory for the device expert cache index");
    }
    for (size_t i = 0; i < (size_t)nl * (size_t)c->max_experts; i++) c->index[i] = -1;
    for (int l = 0; l < nl; l++) c->layer_row[l] = -1;
    for (int i = 0; i < L->n_expert_layers; i++) c->layer_row[L->expert_layers[i].layer] = i;
    for (int i = 0; i < c->n_slots; i++) c->slots[i].layer = -1;
    c->st.budget_bytes = (uint64_t)c->n_slots * c->slot_bytes;
    *out = c;
    return MF_OK;
}

/* Releases the host blobs whose uploads have finished (all of them when wait: after a sync). */
static void release_uploaded(dev_cache *c, int wait) {
    if (!c->n_pend) return;
    if (wait) c->be->ops->sync(c->be);
    for (int k = 0; k < c->n_pend;) {
        struct pending *p = &c->pend[k];
        if (wait || c->be->ops->upload_done(c->be, p->ticket)) {
            expert_store_release(c->host, p->layer, p->id);
            *p = c->pend[--c->n_pend];
        } else {
            k++;
        }
    }
}

void dev_cache_close(dev_cache *c) {
    if (!c) return;
    release_uploaded(c, 1);
    unmap_host(c);
    free(c->act);
    free(c->cand);
    free(c->pend);
    for (int i = 0; c->slots && i < c->n_alloc; i++) c->be->ops->free(c->be, c->slots[i].mem);
    free(c->slots);
    free(c->key);
    free(c->index);
    free(c->layer_row);
    free(c->resident);
    if (c->table) c->be->ops->free(c->be, c->table);
    free(c->table_host);
    free(c->dirty);
    free(c->uses);
    free(c);
}

static mf_status check(dev_cache *c, int layer, int32_t id, mf_err *err) {
    if (layer < 0 || layer >= c->L->hp.n_layers || c->layer_row[layer] < 0)
        return err_set(err, MF_ERR_ARG, "device expert cache: layer %d has no experts", layer);
    if (id < 0 || id >= c->L->expert_layers[c->layer_row[layer]].count)
        return err_set(err, MF_ERR_ARG, "device expert cache: layer %d has no expert %d", layer, id);
    return MF_OK;
}

/* A slot's eviction order: its aged use count (capped) above its last use, with flags above both
 * for slots that may not go (pinned, or empty: find_slot takes those first). */
#define KEY_PINNED (1ull << 63)
#define KEY_KEEP (1ull << 62) /* set during find_slot for the ids wanted now */
#define KEY_USES_MAX ((1ull << 22) - 1)
#define KEY_CLOCK_MASK ((1ull << 40) - 1)

static void slot_key(dev_cache *c, int i) {
    const slot *s = &c->slots[i];
    if (s->layer < 0) {
        c->key[i] = KEY_PINNED;
        return;
    }
    uint64_t u = c->uses[(size_t)s->layer * c->max_experts + s->id];
    if (u > KEY_USES_MAX) u = KEY_USES_MAX;
    c->key[i] = (s->pins ? KEY_PINNED : 0) | u << 40 | (s->last_use & KEY_CLOCK_MASK);
}

/* Sets one entry of the table; the backend's copy of the row follows when it is next read
 * (dev_cache_table), so a layer's misses cost one small upload, not one each. */
static void set_entry(dev_cache *c, int layer, int32_t id, void *blob) {
    c->table_host[(size_t)layer * c->max_experts + id] = blob;
    c->dirty[layer] = 1;
}

/* Sends row `layer` of the table to the backend if it changed. */
static void send_row(dev_cache *c, int layer) {
    if (!c->dirty[layer]) return;
    const size_t at = (size_t)layer * c->max_experts;
    c->be->ops->upload(c->be, c->table + at, c->table_host + at, sizeof(void *) * (size_t)c->max_experts);
    c->dirty[layer] = 0;
}

void dev_cache_send_tables(dev_cache *c) {
    promote(c);
    activate_done(c);
    for (int l = 0; l < c->L->hp.n_layers; l++) send_row(c, l);
    if (c->unfenced) c->be->ops->upload_fence(c->be); /* ops replayed next read those slots */
    c->unfenced = 0;
}

/* The table entry of (layer, id) when it holds no slot: its host copy in host-read mode, else
 * none. */
static void *absent_entry(const dev_cache *c, int layer, int32_t id) {
    return c->host_blob ? (void *)c->host_blob[(size_t)layer * c->max_experts + id] : NULL;
}

/* A free or evictable slot, never one of `keep` (ids of this layer wanted now); -1 if none.
 * A victim is taken only when its key is below `below` (KEY_KEEP: any unpinned slot).
 * The slot returned is empty until fill puts an expert in it. */
static int find_slot(dev_cache *c, int layer, const int32_t *keep, int n_keep, uint64_t below) {
    if (c->n_empty)
        for (int i = 0; i < c->n_alloc; i++)
            if (c->slots[i].layer < 0) return i;
    if (c->n_alloc < c->n_slots) {
        void *mem = c->be->ops->alloc(c->be, c->slot_bytes);
        if (mem) {
            c->slots[c->n_alloc].mem = mem;
            c->slots[c->n_alloc].layer = -1;
            c->key[c->n_alloc] = KEY_PINNED;
            c->n_empty++;
            return c->n_alloc++;
        }
        c->n_slots = c->n_alloc; /* the backend is out of memory: stay at what we have */
    }
    /* the least used of late (uses halve as they age), then the least recently used: experts
     * with a steady share of the routing stay while one-off ones come and go */
    for (int k = 0; k < n_keep; k++) {
        const int32_t j = c->index[(size_t)layer * c->max_experts + keep[k]];
        if (j >= 0) c->key[j] |= KEY_KEEP;
    }
    int best = -1;
    uint64_t best_key = below < KEY_KEEP ? below : KEY_KEEP;
    for (int i = 0; i < c->n_alloc; i++)
        if (c->key[i] < best_key) {
            best_key = c->key[i];
            best = i;
        }
    for (int k = 0; k < n_keep; k++) {
        const int32_t j = c->index[(size_t)layer * c->max_experts + keep[k]];
        if (j >= 0) c->key[j] &= ~KEY_KEEP;
    }
    if (best >= 0) {
        slot *s = &c->slots[best];
        c->index[(size_t)s->layer * c->max_experts + s->id] = -1;
        set_entry(c, s->layer, s->id, absent_entry(c, s->layer, s->id));
        c->resident[s->layer]--;
        s->layer = -1;
        c->key[best] = KEY_PINNED;
        c->n_empty++;
        c->st.evictions++;
        c->st.resident_bytes -= c->slot_bytes;
    }
    return best;
}

/* Starts the upload of (layer, id) into slot i on the backend's copy stream; the host blob
 * stays pinned until the copy finished (release_uploaded). Readers wait for it through
 * upload_fence (dev_cache_get), or, deferred, the table keeps the host copy until the upload
 * finished (activate_done) and the slot stays pinned until then. */
static mf_status fill(dev_cache *c, int i, int layer, int32_t id, int deferred, mf_err *err) {
    const void *hb;
    mf_status st = expert_store_get(c->host, layer, id, &hb, err);
    if (st == MF_ERR_NOMEM && c->n_pend) {
        /* the store's slots are held by uploads in flight: let them finish */
        release_uploaded(c, 1);
        st = expert_store_get(c->host, layer, id, &hb, err);
    }
    if (st) return st;
    const mfpack_expert_layer *E = &c->L->expert_layers[c->layer_row[layer]];
    double t0 = now_s();
    uint64_t ticket = c->be->ops->upload_async(c->be, c->slots[i].mem, hb, E->stride);
    c->st.upload_seconds += now_s() - t0;
    c->st.bytes_uploaded += E->stride;
    if (ticket && c->n_pend == c->cap_pend) {
        int cap = c->cap_pend ? 2 * c->cap_pend : 64;
        void *np = realloc(c->pend, sizeof *c->pend * (size_t)cap);
        if (np) {
            c->pend = np;
            c->cap_pend = cap;
        } else {
            c->be->ops->sync(c->be); /* no room to remember it: wait for it instead */
            ticket = 0;
        }
    }
    if (ticket) c->pend[c->n_pend++] = (struct pending){layer, id, ticket};
    else expert_store_release(c->host, layer, id);
    slot *s = &c->slots[i];
    s->layer = layer;
    s->id = id;
    s->pins = 0;
    s->pending = 0;
    s->last_use = ++c->clock;
    if (deferred && ticket) {
        if (c->n_act == c->cap_act) {
            int cap = c->cap_act ? 2 * c->cap_act : 64;
            void *na = realloc(c->act, sizeof *c->act * (size_t)cap);
            if (!na) {
                c->be->ops->sync(c->be); /* no room to remember it: wait for it instead */
                ticket = 0;
            } else {
                c->act = na;
                c->cap_act = cap;
            }
        }
        if (ticket) {
            c->act[c->n_act++] = (struct act){i, ticket};
            s->pins = 1;
            s->pending = 1;
        }
    }
    c->n_empty--;
    slot_key(c, i);
    c->index[(size_t)layer * c->max_experts + id] = i;
    if (!s->pending) set_entry(c, layer, id, s->mem);
    if (!s->pending && ticket) c->unfenced = 1;
    c->resident[layer]++;
    c->st.resident_bytes += c->slot_bytes;
    if (c->st.resident_bytes > c->st.peak_bytes) c->st.peak_bytes = c->st.resident_bytes;
    return MF_OK;
}

mf_status dev_cache_prefetch(dev_cache *c, int layer, const int32_t *ids, int n, mf_err *err) {
    mf_status st;
    release_uploaded(c, 0);
    /* the host tier reads the missing ones in parallel first */
    int32_t missing[1024];
    int nm = 0;
    for (int k = 0; k < n; k++) {
        if ((st = check(c, layer, ids[k], err))) return st;
        if (c->index[(size_t)layer * c->max_experts + ids[k]] < 0 && nm < 1024) missing[nm++] = ids[k];
    }
    if (!nm) return MF_OK;
    if ((st = expert_store_prefetch(c->host, layer, missing, nm, err))) return st;
    for (int k = 0; k < nm; k++) {
        if (c->index[(size_t)layer * c->max_experts + missing[k]] >= 0) continue; /* an id given twice */
        int i = find_slot(c, layer, ids, n, KEY_KEEP);
        if (i < 0) break; /* the budget holds no more */
        if ((st = fill(c, i, layer, missing[k], 0, err))) return st;
        c->st.misses++;
        c->slots[i].last_use = 0; /* counted as a miss now; its get is then not a hit */
        c->slots[i].pins = 0;
        slot_key(c, i);
    }
    return MF_OK;
}

/* One more use of (layer, id), whose slot is i (-1: none); every age_every uses the counts halve. */
static void count_use(dev_cache *c, int layer, int32_t id, int i) {
    uint32_t *u = &c->uses[(size_t)layer * c->max_experts + id];
    if (*u < UINT32_MAX) (*u)++;
    if (++c->gets % c->age_every == 0) {
        for (size_t k = 0; k < (size_t)c->L->hp.n_layers * (size_t)c->max_experts; k++) c->uses[k] >>= 1;
        for (int k = 0; k < c->n_alloc; k++) slot_key(c, k);
    } else if (i >= 0) {
        slot_key(c, i);
    }
}

mf_status dev_cache_get(dev_cache *c, int layer, int32_t id, const void **blob, mf_err *err) {
    mf_status st = check(c, layer, id, err);
    if (st) return st;
    release_uploaded(c, 0);
    int i = c->index[(size_t)layer * c->max_experts + id];
    if (i >= 0) {
        if (c->slots[i].last_use) c->st.hits++;
    } else {
        i = find_slot(c, layer, NULL, 0, KEY_KEEP);
        if (i < 0 && c->n_act) {
            /* the slots are held by host-read uploads in flight: let them finish */
            c->be->ops->sync(c->be);
            activate_done(c);
            i = find_slot(c, layer, NULL, 0, KEY_KEEP);
        }
        if (i < 0)
            return err_set(err, MF_ERR_NOMEM, "device expert cache: every slot is pinned (layer %d expert %d)",
                           layer, id);
        if ((st = fill(c, i, layer, id, 0, err))) return st;
        c->st.misses++;
    }
    slot *s = &c->slots[i];
    s->pins++;
    s->last_use = ++c->clock;
    count_use(c, layer, id, i);
    *blob = s->mem;
    c->be->ops->upload_fence(c->be); /* ops issued from now on see its bytes */
    c->unfenced = 0;
    return MF_OK;
}

void dev_cache_release(dev_cache *c, int layer, int32_t id) {
    if (layer < 0 || layer >= c->L->hp.n_layers || id < 0 || id >= c->max_experts) return;
    int i = c->index[(size_t)layer * c->max_experts + id];
    if (i >= 0 && c->slots[i].pins > c->slots[i].pending && !--c->slots[i].pins) slot_key(c, i);
}

int dev_cache_slots(const dev_cache *c) { return c->n_slots; }

int dev_cache_has(const dev_cache *c, int layer, int32_t id) {
    if (layer < 0 || layer >= c->L->hp.n_layers || c->layer_row[layer] < 0 || id < 0 || id >= c->max_experts) return 0;
    return c->index[(size_t)layer * c->max_experts + id] >= 0;
}

int dev_cache_holds_all(const dev_cache *c) {
    uint64_t need = 0;
    for (int i = 0; i < c->L->n_expert_layers; i++) need += (uint64_t)c->L->expert_layers[i].count;
    return (uint64_t)c->n_slots >= need;
}

mf_status dev_cache_preload(dev_cache *c, mf_err *err) {
    if (!dev_cache_holds_all(c)) return MF_OK;
    int32_t ids[64];
    for (int i = 0; i < c->L->n_expert_layers; i++) {
        const mfpack_expert_layer *E = &c->L->expert_layers[i];
        for (int e0 = 0; e0 < E->count; e0 += 64) {
            int n = E->count - e0 < 64 ? E->count - e0 : 64;
            for (int k = 0; k < n; k++) ids[k] = e0 + k;
            mf_status st = dev_cache_prefetch(c, E->layer, ids, n, err);
            if (st) return st;
        }
    }
    release_uploaded(c, 1); /* every blob on the device (and fenced): free the host slots */
    dev_cache_reset_stats(c);
    return MF_OK;
}

int dev_cache_layer_resident(const dev_cache *c, int layer) {
    return layer >= 0 && layer < c->L->hp.n_layers && c->layer_row[layer] >= 0 &&
           c->resident[layer] == c->L->expert_layers[c->layer_row[layer]].count;
}

int dev_cache_layer_ready(const dev_cache *c, int layer) {
    return dev_cache_layer_resident(c, layer) ||
           (c->host_blob && layer >= 0 && layer < c->L->hp.n_layers && c->layer_row[layer] >= 0);
}

const void *const *dev_cache_table(dev_cache *c, int layer) {
    send_row(c, layer); /* may be recording: no queries of uploads here */
    /* the ops that read the table see the blobs' bytes (slots filled for host reads enter the
     * table only once their upload finished, and need no fence) */
    if (c->unfenced || !c->host_blob) c->be->ops->upload_fence(c->be);
    c->unfenced = 0;
    return (const void *const *)(c->table + (size_t)layer * c->max_experts);
}

int dev_cache_host_mapped(const dev_cache *c) { return c->host_blob != NULL; }

/* Drops the host-read pins (every blob's first pin in the store). */
static void unmap_host(dev_cache *c) {
    if (!c->host_blob) return;
    for (int m = 0; m < c->L->n_expert_layers; m++) {
        const mfpack_expert_layer *E = &c->L->expert_layers[m];
        for (int e = 0; e < E->count; e++) {
            const size_t at = (size_t)E->layer * c->max_experts + e;
            if (c->host_blob[at]) expert_store_release(c->host, E->layer, e);
            if (c->index[at] < 0) set_entry(c, E->layer, e, NULL);
        }
    }
    free(c->host_blob);
    c->host_blob = NULL;
}

mf_status dev_cache_map_host(dev_cache *c, mf_err *err) {
    if (c->host_blob) return MF_OK;
    const mfpack_layout *L = c->L;
    expert_stats hs;
    expert_store_stats(c->host, &hs);
    uint64_t need = 0;
    for (int m = 0; m < L->n_expert_layers; m++) need += (uint64_t)L->expert_layers[m].count;
    if (!need || !hs.slot_bytes || hs.budget_bytes / hs.slot_bytes < need) return MF_OK; /* not all fit */
    c->host_blob = calloc((size_t)L->hp.n_layers * (size_t)c->max_experts, sizeof *c->host_blob);
    if (!c->host_blob) return err_set(err, MF_ERR_NOMEM, "out of memory for the host-read table");
    int32_t ids[64];
    for (int m = 0; m < L->n_expert_layers; m++) {
        const mfpack_expert_layer *E = &L->expert_layers[m];
        for (int e0 = 0; e0 < E->count; e0 += 64) {
            const int n = E->count - e0 < 64 ? E->count - e0 : 64;
            for (int k = 0; k < n; k++) ids[k] = e0 + k;
            /* parallel reads, then one pin each that lasts until dev_cache_close */
            mf_status st = expert_store_prefetch(c->host, E->layer, ids, n, err);
            for (int k = 0; !st && k < n; k++) {
                const size_t at = (size_t)E->layer * c->max_experts + ids[k];
                st = expert_store_get(c->host, E->layer, ids[k], &c->host_blob[at], err);
                if (!st && c->index[at] < 0) set_entry(c, E->layer, ids[k], (void *)c->host_blob[at]);
            }
            if (st) {
                unmap_host(c);
                return st;
            }
        }
    }
    return MF_OK;
}

/* Host-read mode: slots whose upload finished enter the table (their rows go with the next send). */
static void activate_done(dev_cache *c) {
    for (int k = 0; k < c->n_act;) {
        if (!c->be->ops->upload_done(c->be, c->act[k].ticket)) {
            k++;
            continue;
        }
        slot *s = &c->slots[c->act[k].slot];
        s->pending = 0;
        s->pins--;
        slot_key(c, c->act[k].slot);
        set_entry(c, s->layer, s->id, s->mem);
        c->act[k] = c->act[--c->n_act];
    }
}

/* Whether ops replayed now read (layer, id) from its slot: resident, its upload finished. */
static int active(const dev_cache *c, int layer, int32_t id) {
    const int i = c->index[(size_t)layer * c->max_experts + id];
    return i >= 0 && !c->slots[i].pending;
}

void dev_cache_note_uses(dev_cache *c, int layer, const int32_t *ids, int n) {
    if (!c->host_blob || layer < 0 || layer >= c->L->hp.n_layers || c->layer_row[layer] < 0) return;
    const mfpack_expert_layer *E = &c->L->expert_layers[c->layer_row[layer]];
    const uint64_t payload = mfpack_expert_payload(E);
    for (int k = 0; k < n; k++) {
        const int32_t id = ids[k];
        if (id < 0 || id >= E->count) continue;
        const int i = c->index[(size_t)layer * c->max_experts + id];
        if (active(c, layer, id)) {
            c->st.hits++;
            c->slots[i].last_use = ++c->clock;
            count_use(c, layer, id, i);
            continue;
        }
        c->st.misses++; /* read in place */
        c->st.host_reads++;
        c->st.bytes_from_host += payload;
        count_use(c, layer, id, i);
        if (i >= 0) continue; /* its upload is under way */
        if (c->n_cand == c->cap_cand) {
            int cap = c->cap_cand ? 2 * c->cap_cand : 256;
            void *nc = realloc(c->cand, sizeof *c->cand * (size_t)cap);
            if (!nc) continue; /* it may get a slot another time */
            c->cand = nc;
            c->cap_cand = cap;
        }
        c->cand[c->n_cand++] = (struct cand){layer, id};
    }
}

/* Host-read mode: a slot for each expert noted missing, in the order noted, when one is free or
 * when the least used unpinned slot has had fewer uses of late; its upload starts now. Most are
 * turned away: the least key is kept between admissions, so those cost no scan of the slots. */
static void promote(dev_cache *c) {
    release_uploaded(c, 0);
    uint64_t least = 0;
    int least_known = 0; /* least: the least key of all slots, while no slot has changed */
    for (int k = 0; k < c->n_cand; k++) {
        const int layer = c->cand[k].layer;
        int32_t id = c->cand[k].id;
        if (c->index[(size_t)layer * c->max_experts + id] >= 0) continue; /* noted twice */
        uint64_t u = c->uses[(size_t)layer * c->max_experts + id];
        if (u > KEY_USES_MAX) u = KEY_USES_MAX;
        if (!c->n_empty && c->n_alloc == c->n_slots) { /* only an eviction could make room */
            if (!least_known) {
                least = KEY_PINNED;
                for (int j = 0; j < c->n_alloc; j++) least = c->key[j] < least ? c->key[j] : least;
                least_known = 1;
            }
            if (least >= u << 40) continue; /* find_slot would find no slot below it */
        }
        least_known = 0;
        const int i = find_slot(c, layer, &id, 1, u << 40);
        mf_err ignored;
        if (i >= 0 && fill(c, i, layer, id, 1, &ignored) != MF_OK) c->key[i] = KEY_PINNED; /* stays empty */
    }
    c->n_cand = 0;
}

void dev_cache_stats_get(const dev_cache *c, dev_cache_stats *st) { *st = c->st; }

void dev_cache_reset_stats(dev_cache *c) {
    uint64_t budget = c->st.budget_bytes, res = c->st.resident_bytes;
    memset(&c->st, 0, sizeof c->st);
    c->st.budget_bytes = budget;
    c->st.resident_bytes = res;
    c->st.peak_bytes = res;
}
