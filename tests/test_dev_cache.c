/* test_dev_cache.c - tests of src/experts/dev_cache.c on the CPU backend (its memory is host
 * memory, so blobs can be compared directly): blob bytes against independent preads, and
 * hits, misses, evictions and residency after every step of random scripts against the policy
 * simulated here (evict the unpinned slot used least of late, use counts halving as they age,
 * then the least recently used; a prefetch never evicts the ids it was given). Pins, and a get
 * with every slot pinned. Host-read mode: table entries (slots or host copies) and the admission
 * of noted misses against the policy simulated here. Not the host store (test_store.c). */
#include <criterion/criterion.h>

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "experts/dev_cache.h"
#include "format/mfpack.h"
#include "helpers.h"

TestSuite(dev_cache, .init = th_tmp_setup, .fini = th_tmp_teardown, .timeout = 120);

#define MAX_LAYERS 16
#define MAX_EXPERTS 16
#define MAX_SLOTS 64

typedef struct fixture {
    char *path;
    mfpack_file f;
    mf_backend *be;
    expert_store *store;
    dev_cache *c;
    unsigned char *ref[MAX_LAYERS][MAX_EXPERTS]; /* by MoE layer index */
} fixture;

/* The converted fixture, every blob read with plain pread, a host store holding them all and a
 * device cache of `slots` slots on the CPU backend. */
static void fixture_open(fixture *x, int slots) {
    memset(x, 0, sizeof *x);
    x->path = th_convert("qwen3_moe_experts", NULL, NULL);
    mf_err err;
    err_clear(&err);
    cr_assert_eq(mfpack_open(&x->f, x->path, &err), MF_OK, "%s", err.msg);
    const mfpack_layout *L = &x->f.L;
    cr_assert(L->n_expert_layers >= 2 && L->n_expert_layers <= MAX_LAYERS);
    int fd = open(x->path, O_RDONLY);
    cr_assert(fd >= 0);
    uint64_t slot = 0;
    for (int m = 0; m < L->n_expert_layers; m++) {
        const mfpack_expert_layer *E = &L->expert_layers[m];
        cr_assert(E->count >= 4 && E->count <= MAX_EXPERTS);
        if (E->stride > slot) slot = E->stride;
        for (int e = 0; e < E->count; e++) {
            cr_assert((x->ref[m][e] = malloc(E->stride)));
            cr_assert_eq(pread(fd, x->ref[m][e], E->stride, (off_t)(E->offset + (uint64_t)e * E->stride)),
                         (ssize_t)E->stride);
        }
    }
    close(fd);
    cr_assert((x->be = cpu_backend_create(1, 1)));
    expert_store_options so;
    expert_store_options_init(&so);
    so.budget_bytes = UINT64_MAX;
    cr_assert_eq(expert_store_open(&x->store, &x->f, &so, &err), MF_OK, "%s", err.msg);
    cr_assert_eq(dev_cache_open(&x->c, x->be, x->store, L, (uint64_t)slots * slot, &err), MF_OK, "%s", err.msg);
    cr_assert_eq(dev_cache_slots(x->c), slots);
}

static void fixture_close(fixture *x) {
    dev_cache_close(x->c);
    expert_store_close(x->store);
    x->be->ops->destroy(x->be);
    for (int m = 0; m < x->f.L.n_expert_layers; m++)
        for (int e = 0; e < x->f.L.expert_layers[m].count; e++) free(x->ref[m][e]);
    mfpack_close(&x->f);
    free(x->path);
}

/* ---- the policy, simulated ---- */

typedef struct sim {
    int n_slots, n_alloc;
    int layer[MAX_SLOTS], id[MAX_SLOTS], pins[MAX_SLOTS];
    uint64_t last[MAX_SLOTS];
    uint32_t uses[64][MAX_EXPERTS]; /* by layer number */
    uint64_t clock, gets, age_every;
    uint64_t hits, misses, evictions;
} sim;

static void sim_init(sim *s, int slots) {
    memset(s, 0, sizeof *s);
    s->n_slots = slots;
    s->age_every = 16 * (uint64_t)slots + 4096; /* as documented in dev_cache.c */
}

static int sim_find(const sim *s, int layer, int id) {
    for (int i = 0; i < s->n_alloc; i++)
        if (s->layer[i] == layer && s->id[i] == id) return i;
    return -1;
}

/* An empty slot, a new one, or the victim: unpinned, not one of keep (ids of keep_layer), fewest
 * uses, then oldest use, then lowest slot, taken only when it has fewer uses than below. -1 when
 * none. */
static int sim_slot(sim *s, int keep_layer, const int32_t *keep, int n_keep, uint32_t below) {
    for (int i = 0; i < s->n_alloc; i++)
        if (s->layer[i] < 0) return i;
    if (s->n_alloc < s->n_slots) {
        s->layer[s->n_alloc] = -1;
        return s->n_alloc++;
    }
    int best = -1;
    for (int i = 0; i < s->n_alloc; i++) {
        if (s->pins[i]) continue;
        int kept = 0;
        for (int k = 0; k < n_keep; k++) kept |= s->layer[i] == keep_layer && s->id[i] == keep[k];
        if (kept) continue;
        uint32_t u = s->uses[s->layer[i]][s->id[i]];
        if (best < 0) {
            best = i;
            continue;
        }
        uint32_t bu = s->uses[s->layer[best]][s->id[best]];
        if (u < bu || (u == bu && s->last[i] < s->last[best])) best = i;
    }
    if (best >= 0 && s->uses[s->layer[best]][s->id[best]] >= below) best = -1;
    if (best >= 0) {
        s->layer[best] = -1;
        s->evictions++;
    }
    return best;
}

static void sim_fill(sim *s, int i, int layer, int id) {
    s->layer[i] = layer;
    s->id[i] = id;
    s->pins[i] = 0;
    s->last[i] = ++s->clock;
}

/* Returns 0 when every slot is pinned. */
static int sim_get(sim *s, int layer, int id) {
    int i = sim_find(s, layer, id);
    if (i >= 0) {
        if (s->last[i]) s->hits++;
    } else {
        if ((i = sim_slot(s, -1, NULL, 0, UINT32_MAX)) < 0) return 0;
        sim_fill(s, i, layer, id);
        s->misses++;
    }
    s->pins[i]++;
    s->last[i] = ++s->clock;
    s->uses[layer][id]++;
    if (++s->gets % s->age_every == 0)
        for (int l = 0; l < 64; l++)
            for (int e = 0; e < MAX_EXPERTS; e++) s->uses[l][e] >>= 1;
    return 1;
}

static void sim_release(sim *s, int layer, int id) {
    int i = sim_find(s, layer, id);
    if (i >= 0 && s->pins[i] > 0) s->pins[i]--;
}

/* ids distinct: the missing ones in order, as many as fit; a prefetched blob's first get is not a hit */
static void sim_prefetch(sim *s, int layer, const int32_t *ids, int n) {
    int32_t missing[MAX_EXPERTS];
    int nm = 0;
    for (int k = 0; k < n; k++)
        if (sim_find(s, layer, ids[k]) < 0) missing[nm++] = ids[k];
    for (int k = 0; k < nm; k++) {
        int i = sim_slot(s, layer, ids, n, UINT32_MAX);
        if (i < 0) break;
        sim_fill(s, i, layer, missing[k]);
        s->misses++;
        s->last[i] = 0;
    }
}

static void check_state(const fixture *x, const sim *s, int step) {
    dev_cache_stats st;
    dev_cache_stats_get(x->c, &st);
    cr_assert(st.hits == s->hits && st.misses == s->misses && st.evictions == s->evictions,
              "step %d: cache hits/misses/evictions %llu/%llu/%llu, simulated %llu/%llu/%llu", step,
              (unsigned long long)st.hits, (unsigned long long)st.misses, (unsigned long long)st.evictions,
              (unsigned long long)s->hits, (unsigned long long)s->misses, (unsigned long long)s->evictions);
    const mfpack_layout *L = &x->f.L;
    for (int m = 0; m < L->n_expert_layers; m++)
        for (int e = 0; e < L->expert_layers[m].count; e++) {
            const int layer = L->expert_layers[m].layer;
            cr_assert_eq(dev_cache_has(x->c, layer, e), sim_find(s, layer, e) >= 0,
                         "step %d: layer %d expert %d resident %d, simulated %d", step, layer, e,
                         dev_cache_has(x->c, layer, e), sim_find(s, layer, e) >= 0);
        }
}

/* A get checked byte for byte against the pread copy. */
static void get_checked(fixture *x, int m, int e) {
    const mfpack_expert_layer *E = &x->f.L.expert_layers[m];
    const void *blob = NULL;
    mf_err err;
    err_clear(&err);
    cr_assert_eq(dev_cache_get(x->c, E->layer, e, &blob, &err), MF_OK, "get layer %d expert %d: %s", E->layer, e,
                 err.msg);
    cr_assert(blob && !memcmp(blob, x->ref[m][e], E->stride), "layer %d expert %d: bytes differ", E->layer, e);
}

/* A script's start: the fixture with a cache of `slots`, its simulation, the random stream. */
static void script_open(fixture *x, sim *s, int slots, uint64_t seed) {
    fixture_open(x, slots);
    sim_init(s, slots);
    th_rng_seed(seed);
}

/* Random gets (some held pinned for a few steps), prefetches of distinct ids and releases; the
 * cache must match the simulation after every step. Long enough for use counts to age. */
static void scripted(int slots, uint64_t seed, int steps) {
    fixture x;
    sim s;
    script_open(&x, &s, slots, seed);
    const mfpack_layout *L = &x.f.L;
    int held_m[4], held_e[4], n_held = 0;
    for (int step = 0; step < steps; step++) {
        const int m = (int)(th_rng_next() % (uint64_t)L->n_expert_layers);
        const int layer = L->expert_layers[m].layer, count = L->expert_layers[m].count;
        /* skewed: low ids far more often, as trained routers pick experts */
        const double u = th_rng_unif();
        const int e = (int)(u * u * u * count);
        const uint64_t what = th_rng_next() % 10;
        if (what < 6) {
            const int ok = sim_get(&s, layer, e);
            if (!ok) { /* every slot pinned: the cache must refuse too */
                const void *blob;
                mf_err err;
                err_clear(&err);
                cr_assert_eq(dev_cache_get(x.c, layer, e, &blob, &err), MF_ERR_NOMEM, "step %d", step);
                cr_assert(strstr(err.msg, "pinned"), "step %d: %s", step, err.msg);
            } else {
                get_checked(&x, m, e);
                if (n_held < 4 && what == 0 && n_held < slots - 1) {
                    held_m[n_held] = m, held_e[n_held++] = e; /* stays pinned a while */
                } else {
                    dev_cache_release(x.c, layer, e);
                    sim_release(&s, layer, e);
                }
            }
        } else if (what < 9) {
            int32_t ids[MAX_EXPERTS];
            int n = 1 + (int)(th_rng_next() % 4);
            for (int k = 0; k < n; k++) { /* distinct ids */
                int32_t v;
                int dup;
                do {
                    v = (int32_t)(th_rng_next() % (uint64_t)count);
                    dup = 0;
                    for (int j = 0; j < k; j++) dup |= ids[j] == v;
                } while (dup);
                ids[k] = v;
            }
            mf_err err;
            err_clear(&err);
            cr_assert_eq(dev_cache_prefetch(x.c, layer, ids, n, &err), MF_OK, "step %d: %s", step, err.msg);
            sim_prefetch(&s, layer, ids, n);
        } else if (n_held) {
            n_held--;
            const int hl = L->expert_layers[held_m[n_held]].layer;
            dev_cache_release(x.c, hl, held_e[n_held]);
            sim_release(&s, hl, held_e[n_held]);
        }
        check_state(&x, &s, step);
    }
    cr_assert(s.evictions > 0 && s.hits > 0, "the script must both hit and evict");
    cr_assert(s.gets > s.age_every, "the script must age the use counts (%llu gets)", (unsigned long long)s.gets);
    while (n_held--) dev_cache_release(x.c, L->expert_layers[held_m[n_held]].layer, held_e[n_held]);
    fixture_close(&x);
}

Test(dev_cache, matches_simulated_policy_2_slots) { scripted(2, 11, 9000); }
Test(dev_cache, matches_simulated_policy_5_slots) { scripted(5, 12, 9000); }
Test(dev_cache, matches_simulated_policy_13_slots) { scripted(13, 13, 9000); }

/* Pinned blobs stay, whatever else is asked for; once released they can go. */
Test(dev_cache, pinned_slots_are_not_evicted) {
    fixture x;
    fixture_open(&x, 3);
    const mfpack_layout *L = &x.f.L;
    const int l0 = L->expert_layers[0].layer, l1 = L->expert_layers[1].layer;
    get_checked(&x, 0, 0);
    get_checked(&x, 0, 1); /* both stay pinned */
    for (int e = 0; e < L->expert_layers[1].count; e++) {
        get_checked(&x, 1, e);
        dev_cache_release(x.c, l1, e);
        cr_assert(dev_cache_has(x.c, l0, 0) && dev_cache_has(x.c, l0, 1), "a pinned blob was evicted");
    }
    const void *blob;
    mf_err err;
    err_clear(&err);
    get_checked(&x, 1, 0); /* the third slot pinned too: nothing can go */
    cr_assert_eq(dev_cache_get(x.c, l1, 1, &blob, &err), MF_ERR_NOMEM);
    dev_cache_release(x.c, l0, 0);
    get_checked(&x, 1, 1); /* now the released one goes */
    cr_assert(!dev_cache_has(x.c, l0, 0) && dev_cache_has(x.c, l0, 1));
    dev_cache_release(x.c, l0, 1);
    dev_cache_release(x.c, l1, 0);
    dev_cache_release(x.c, l1, 1);
    fixture_close(&x);
}

/* An id given twice to one prefetch takes one slot (the other stays free for the next miss). */
Test(dev_cache, prefetch_of_a_repeated_id) {
    fixture x;
    fixture_open(&x, 2);
    const int l0 = x.f.L.expert_layers[0].layer;
    const int32_t ids[3] = {3, 3, 3};
    mf_err err;
    err_clear(&err);
    cr_assert_eq(dev_cache_prefetch(x.c, l0, ids, 3, &err), MF_OK, "%s", err.msg);
    dev_cache_stats st;
    dev_cache_stats_get(x.c, &st);
    cr_assert_eq(st.misses, 1, "one blob fetched, not %llu", (unsigned long long)st.misses);
    get_checked(&x, 0, 1); /* takes the free slot, evicts nothing */
    cr_assert(dev_cache_has(x.c, l0, 3) && dev_cache_has(x.c, l0, 1));
    dev_cache_stats_get(x.c, &st);
    cr_assert_eq(st.evictions, 0);
    dev_cache_release(x.c, l0, 1);
    get_checked(&x, 0, 3);
    dev_cache_release(x.c, l0, 3);
    fixture_close(&x);
}

/* ---- host-read mode ---- */

/* One more use of (layer, id), the counts halving every age_every uses (gets and noted uses). */
static void sim_count(sim *s, int layer, int id) {
    s->uses[layer][id]++;
    if (++s->gets % s->age_every == 0)
        for (int l = 0; l < 64; l++)
            for (int e = 0; e < MAX_EXPERTS; e++) s->uses[l][e] >>= 1;
}

/* A slot for a noted miss (promote): a free one, a new one, or the least used unpinned slot
 * (then the oldest) when that one has fewer uses than (layer, id) has now. */
static void sim_promote(sim *s, int layer, int id) {
    if (sim_find(s, layer, id) >= 0) return; /* noted twice */
    const int i = sim_slot(s, -1, NULL, 0, s->uses[layer][id]);
    if (i >= 0) sim_fill(s, i, layer, id);
}

/* A step's noted uses of layer (ids [n], distinct) then the send that gives the noted misses
 * slots: counts as the cache does, with the state the step saw. */
static void sim_step(sim *s, int layer, const int32_t *ids, int n, uint64_t *from_host) {
    int32_t missed[MAX_EXPERTS];
    int nm = 0;
    for (int k = 0; k < n; k++) {
        const int i = sim_find(s, layer, ids[k]);
        if (i >= 0) {
            s->hits++;
            s->last[i] = ++s->clock;
        } else {
            s->misses++;
            (*from_host)++;
            missed[nm++] = ids[k];
        }
        sim_count(s, layer, ids[k]);
    }
    for (int k = 0; k < nm; k++) sim_promote(s, layer, missed[k]);
}

/* Every table entry: a slot holding the blob's bytes where the simulation has it resident,
 * else the host store's own copy of the blob. */
static void check_table(fixture *x, const sim *s, int step) {
    const mfpack_layout *L = &x->f.L;
    dev_cache_send_tables(x->c);
    for (int m = 0; m < L->n_expert_layers; m++) {
        const mfpack_expert_layer *E = &L->expert_layers[m];
        cr_assert(dev_cache_layer_ready(x->c, E->layer));
        const void *const *table = dev_cache_table(x->c, E->layer);
        for (int e = 0; e < E->count; e++) {
            const void *host;
            mf_err err;
            err_clear(&err);
            cr_assert_eq(expert_store_get(x->store, E->layer, e, &host, &err), MF_OK, "%s", err.msg);
            expert_store_release(x->store, E->layer, e);
            const int resident = sim_find(s, E->layer, e) >= 0;
            cr_assert_eq(dev_cache_has(x->c, E->layer, e), resident, "step %d: layer %d expert %d resident %d, simulated %d",
                         step, E->layer, e, dev_cache_has(x->c, E->layer, e), resident);
            cr_assert(table[e] && (table[e] == host) == !resident,
                      "step %d: layer %d expert %d: table entry %p, host copy %p, resident %d", step, E->layer, e,
                      table[e], host, resident);
            cr_assert(!memcmp(table[e], x->ref[m][e], E->stride), "step %d: layer %d expert %d: bytes differ", step,
                      E->layer, e);
        }
    }
}

/* Distinct ids of a layer of `count` experts, skewed to low ids as trained routers pick. */
static int random_ids(int32_t *ids, int max, int count) {
    const int n = 1 + (int)(th_rng_next() % (uint64_t)max);
    for (int k = 0; k < n; k++) {
        int dup;
        do {
            const double u = th_rng_unif();
            ids[k] = (int32_t)(u * u * u * count);
            dup = 0;
            for (int j = 0; j < k; j++) dup |= ids[j] == ids[k];
        } while (dup);
    }
    return n;
}

/* Host-read mode: every entry set from the start (host copies for experts without a slot),
 * then random steps (the choices of steps run as one op, noted, then the send that gives
 * misses slots) mixed with gets and releases (the large prefill chunks),
 * checked after every step against the admission policy simulated here: hits, misses, blobs
 * read from host memory, evictions, residency and each table entry. */
static void host_reads_scripted(int slots, uint64_t seed, int steps) {
    fixture x;
    sim s;
    script_open(&x, &s, slots, seed);
    const mfpack_layout *L = &x.f.L;
    /* one expert resident before the mode starts: it keeps its slot */
    get_checked(&x, 0, 1);
    dev_cache_release(x.c, L->expert_layers[0].layer, 1);
    cr_assert(sim_get(&s, L->expert_layers[0].layer, 1));
    sim_release(&s, L->expert_layers[0].layer, 1);
    mf_err err;
    err_clear(&err);
    cr_assert(!dev_cache_host_mapped(x.c));
    cr_assert_eq(dev_cache_map_host(x.c, &err), MF_OK, "%s", err.msg);
    cr_assert(dev_cache_host_mapped(x.c));
    check_table(&x, &s, -1);
    uint64_t from_host = 0;
    for (int step = 0; step < steps; step++) {
        const int m = (int)(th_rng_next() % (uint64_t)L->n_expert_layers);
        const int layer = L->expert_layers[m].layer, count = L->expert_layers[m].count;
        if (th_rng_next() % 5) {
            int32_t ids[4];
            const int n = random_ids(ids, 4, count);
            dev_cache_note_uses(x.c, layer, ids, n);
            dev_cache_send_tables(x.c);
            sim_step(&s, layer, ids, n, &from_host);
        } else {
            const int e = (int)(th_rng_next() % (uint64_t)count);
            cr_assert(sim_get(&s, layer, e));
            get_checked(&x, m, e);
            dev_cache_release(x.c, layer, e);
            sim_release(&s, layer, e);
        }
        check_state(&x, &s, step);
        dev_cache_stats st;
        dev_cache_stats_get(x.c, &st);
        const uint64_t payload = mfpack_expert_payload(&L->expert_layers[0]);
        cr_assert(st.host_reads == from_host && st.bytes_from_host == from_host * payload,
                  "step %d: %llu blobs read from host memory (%llu bytes), simulated %llu", step,
                  (unsigned long long)st.host_reads, (unsigned long long)st.bytes_from_host,
                  (unsigned long long)from_host);
        if (step % 50 == 0 || step == steps - 1) check_table(&x, &s, step);
    }
    cr_assert(s.evictions > 0 && from_host > 0 && s.hits > 0, "the script must hit, read from host memory and evict");
    cr_assert(s.gets > s.age_every, "the script must age the use counts (%llu uses)", (unsigned long long)s.gets);
    fixture_close(&x);
}

Test(dev_cache, host_reads_match_simulated_policy_2_slots) { host_reads_scripted(2, 21, 6000); }
Test(dev_cache, host_reads_match_simulated_policy_7_slots) { host_reads_scripted(7, 22, 6000); }

/* A host store that cannot hold every expert leaves the mode off. */
Test(dev_cache, host_reads_need_every_expert_in_the_store) {
    fixture x;
    fixture_open(&x, 2);
    expert_store_close(x.store);
    expert_store_options so;
    expert_store_options_init(&so);
    const mfpack_expert_layer *E = &x.f.L.expert_layers[0];
    so.budget_bytes = E->stride * (uint64_t)E->count; /* one layer's worth */
    mf_err err;
    err_clear(&err);
    cr_assert_eq(expert_store_open(&x.store, &x.f, &so, &err), MF_OK, "%s", err.msg);
    dev_cache_close(x.c);
    cr_assert_eq(dev_cache_open(&x.c, x.be, x.store, &x.f.L, 2 * E->stride, &err), MF_OK, "%s", err.msg);
    cr_assert_eq(dev_cache_map_host(x.c, &err), MF_OK, "%s", err.msg);
    cr_assert(!dev_cache_host_mapped(x.c));
    cr_assert(!dev_cache_layer_ready(x.c, E->layer));
    fixture_close(&x);
}
