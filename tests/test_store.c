/* test_store.c - tests of src/experts/store.c on small converted fixtures: blob bytes against
 * independent preads, hit/miss/eviction counts against an LRU simulated here, pins, O_DIRECT, I/O errors.
 * Not the converter or the file reader: those have their own tests. */
#include <criterion/criterion.h>

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "experts/store.h"
#include "format/mfpack.h"
#include "helpers.h"

static char *g_tmp;

static void setup(void) {
    g_tmp = th_tmpdir();
    cr_assert(g_tmp, "cannot create a temporary directory");
}
static void teardown(void) {
    th_rmtree(g_tmp);
    free(g_tmp);
}

TestSuite(store, .init = setup, .fini = teardown, .timeout = 60);

/* ---- a converted model and every blob read independently ---- */

#define MAX_LAYERS 8
#define MAX_EXPERTS 16

typedef struct pack {
    char *path;
    mfpack_file f;
    int n_moe;                       /* MoE layers */
    int layers[MAX_LAYERS];          /* [n_moe] their layer numbers */
    int count[MAX_LAYERS];           /* [n_moe] experts per MoE layer */
    uint64_t stride[MAX_LAYERS];     /* [n_moe] */
    unsigned char *ref[MAX_LAYERS][MAX_EXPERTS]; /* [n_moe][count] -> stride bytes each */
} pack;

/* Converts fixture `name` into dir/name.moeflux (extra converter flags e1, e2 may be NULL). */
static char *convert(const char *dir, const char *name, const char *e1, const char *e2) {
    char src[4096], file[256];
    snprintf(src, sizeof src, "%s/%s", th_fixtures(), name);
    snprintf(file, sizeof file, "%s.moeflux", name);
    char *out = th_join(dir, file);
    char *argv[] = {(char *)th_bin(), "convert", src, out, "--quiet", (char *)e1, (char *)e2, NULL};
    char *err = NULL;
    int rc = th_run(argv, NULL, &err);
    cr_assert_eq(rc, 0, "convert %s failed (%d): %s", name, rc, err ? err : "");
    free(err);
    return out;
}

/* Reads exactly n bytes at off with plain pread, as the format spec says a blob is laid out. */
static void pread_all(int fd, void *buf, size_t n, off_t off) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, (char *)buf + done, n - done, off + (off_t)done);
        cr_assert(r > 0, "reference pread failed at %lld", (long long)(off + (off_t)done));
        done += (size_t)r;
    }
}

static void pack_open_path(pack *p, char *path) {
    memset(p, 0, sizeof *p);
    p->path = path;
    mf_err err;
    err_clear(&err);
    cr_assert_eq(mfpack_open(&p->f, path, &err), MF_OK, "mfpack_open: %s", err.msg);
    cr_assert(p->f.L.n_expert_layers > 0 && p->f.L.n_expert_layers <= MAX_LAYERS);
    int fd = open(path, O_RDONLY);
    cr_assert(fd >= 0);
    p->n_moe = p->f.L.n_expert_layers;
    for (int m = 0; m < p->n_moe; m++) {
        const mfpack_expert_layer *E = &p->f.L.expert_layers[m];
        cr_assert(E->count <= MAX_EXPERTS);
        p->layers[m] = E->layer;
        p->count[m] = E->count;
        p->stride[m] = E->stride;
        for (int e = 0; e < E->count; e++) {
            p->ref[m][e] = malloc(E->stride);
            cr_assert(p->ref[m][e]);
            pread_all(fd, p->ref[m][e], E->stride, (off_t)(E->offset + (uint64_t)e * E->stride));
        }
    }
    close(fd);
    /* the blobs must differ, or comparing bytes would prove little */
    cr_assert(memcmp(p->ref[0][0], p->ref[0][1], p->stride[0]) != 0);
    if (p->n_moe > 1) cr_assert(memcmp(p->ref[0][0], p->ref[1][0], p->stride[0]) != 0);
}

static void pack_open(pack *p, const char *fixture, const char *e1, const char *e2) {
    pack_open_path(p, convert(g_tmp, fixture, e1, e2));
}

static void pack_close(pack *p) {
    for (int m = 0; m < p->n_moe; m++)
        for (int e = 0; e < p->count[m]; e++) free(p->ref[m][e]);
    mfpack_close(&p->f);
    free(p->path);
}

static uint64_t max_stride(const pack *p) {
    uint64_t s = 0;
    for (int m = 0; m < p->n_moe; m++) s = p->stride[m] > s ? p->stride[m] : s;
    return s;
}

static expert_store *store_new(pack *p, uint64_t blobs, int io_threads, int o_direct) {
    expert_store_options opt;
    expert_store_options_init(&opt);
    opt.budget_bytes = blobs == UINT64_MAX ? UINT64_MAX : blobs * max_stride(p);
    opt.io_threads = io_threads;
    opt.o_direct = o_direct;
    expert_store *s = NULL;
    mf_err err;
    err_clear(&err);
    cr_assert_eq(expert_store_open(&s, &p->f, &opt, &err), MF_OK, "expert_store_open: %s", err.msg);
    return s;
}

/* get + byte check + release */
static void check_get(expert_store *s, pack *p, int m, int e) {
    const void *blob = NULL;
    mf_err err;
    err_clear(&err);
    mf_status st = expert_store_get(s, p->layers[m], e, &blob, &err);
    cr_assert_eq(st, MF_OK, "get layer %d expert %d: %s", p->layers[m], e, err.msg);
    cr_assert(blob && ((uintptr_t)blob % 4096) == 0, "blob not 4096-aligned");
    cr_assert(memcmp(blob, p->ref[m][e], p->stride[m]) == 0, "layer %d expert %d: bytes differ",
              p->layers[m], e);
    expert_store_release(s, p->layers[m], e);
}

static uint32_t lcg(uint32_t *state) {
    *state = *state * 1664525u + 1013904223u;
    return *state >> 8;
}

/* ---- every blob, with budgets of 1, 3, 10 and all blobs ---- */

static void check_bytes(pack *p, uint64_t blobs, int io_threads, int o_direct) {
    expert_store *s = store_new(p, blobs, io_threads, o_direct);
    for (int round = 0; round < 2; round++) /* cold, then warm (hits when everything fits) */
        for (int m = 0; m < p->n_moe; m++)
            for (int e = 0; e < p->count[m]; e++) check_get(s, p, m, e);
    uint32_t rng = 12345u + (uint32_t)blobs;
    mf_err err;
    for (int it = 0; it < 200; it++) {
        int m = (int)(lcg(&rng) % (uint32_t)p->n_moe);
        if (lcg(&rng) % 3 == 0) {
            int32_t ids[6];
            int n = 1 + (int)(lcg(&rng) % 6);
            for (int k = 0; k < n; k++) ids[k] = (int32_t)(lcg(&rng) % (uint32_t)p->count[m]);
            err_clear(&err);
            cr_assert_eq(expert_store_prefetch(s, p->layers[m], ids, n, &err), MF_OK, "%s", err.msg);
            for (int k = 0; k < n; k++) check_get(s, p, m, ids[k]);
        } else {
            check_get(s, p, m, (int)(lcg(&rng) % (uint32_t)p->count[m]));
        }
    }
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert(st.resident_bytes <= st.budget_bytes && st.peak_bytes <= st.budget_bytes);
    cr_assert(st.allocated_bytes <= st.budget_bytes && st.allocated_bytes >= st.slot_bytes);
    cr_assert_eq(st.bytes_read, st.reads * p->stride[0]); /* one stride per read in this model */
    if (blobs == 1) cr_assert_eq(st.budget_bytes, max_stride(p));
    uint64_t total = 0;
    for (int m = 0; m < p->n_moe; m++) total += (uint64_t)p->count[m];
    if (blobs >= total) {
        cr_assert_eq(st.reads, total, "everything fits: each blob is read once (%llu reads)",
                     (unsigned long long)st.reads);
        cr_assert_eq(st.evictions, 0);
    }
    cr_assert(st.read_seconds >= 0);
    expert_store_close(s);
}

Test(store, bytes_every_blob_all_budgets) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    const uint64_t budgets[] = {1, 3, 10, UINT64_MAX};
    for (int b = 0; b < 4; b++) {
        check_bytes(&p, budgets[b], 4, 0);
        check_bytes(&p, budgets[b], 1, 0);
    }
    pack_close(&p);
}

Test(store, bytes_q4_with_dense_layer) {
    pack p;
    pack_open(&p, "qwen3_moe_fused", NULL, NULL);
    cr_assert_eq(p.n_moe, 3, "layer 1 is a dense MLP");
    check_bytes(&p, 3, 8, 0);
    check_bytes(&p, UINT64_MAX, 8, 0);
    expert_store *s = store_new(&p, 3, 2, 0);
    const void *blob = (const void *)1;
    mf_err err;
    err_clear(&err);
    cr_assert_eq(expert_store_get(s, 1, 0, &blob, &err), MF_ERR_ARG);
    cr_assert(strstr(err.msg, "layer 1"), "%s", err.msg);
    cr_assert_null(blob);
    cr_assert_eq(expert_store_get(s, 0, 8, &blob, &err), MF_ERR_ARG);
    cr_assert_eq(expert_store_get(s, 0, -1, &blob, &err), MF_ERR_ARG);
    cr_assert_eq(expert_store_get(s, 4, 0, &blob, &err), MF_ERR_ARG);
    int32_t bad[] = {0, 9};
    cr_assert_eq(expert_store_prefetch(s, 0, bad, 2, &err), MF_ERR_ARG);
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert_eq(st.reads + st.hits + st.misses, 0, "refused calls touch nothing");
    expert_store_close(s);
    pack_close(&p);
}

/* ---- counts against an LRU simulated here ---- */

#define SIM_MAX 64

/* Entries ordered most recent first. */
typedef struct sim {
    int cap, n;
    int key[SIM_MAX], pins[SIM_MAX], pending[SIM_MAX];
    uint64_t hits, misses, evictions, reads;
} sim;

static int sim_find(const sim *m, int key) {
    for (int i = 0; i < m->n; i++)
        if (m->key[i] == key) return i;
    return -1;
}

/* Moves entry i to the front. */
static void sim_front(sim *m, int i) {
    int k = m->key[i], p = m->pins[i], d = m->pending[i];
    memmove(&m->key[1], &m->key[0], (size_t)i * sizeof(int));
    memmove(&m->pins[1], &m->pins[0], (size_t)i * sizeof(int));
    memmove(&m->pending[1], &m->pending[0], (size_t)i * sizeof(int));
    m->key[0] = k, m->pins[0] = p, m->pending[0] = d;
}

/* Room for one more entry at the front: grows, or evicts the last entry that is unpinned and
 * not in keep[0..nkeep). Returns 0 when there is none. */
static int sim_room(sim *m, const int *keep, int nkeep) {
    if (m->n < m->cap) {
        m->key[m->n] = -1, m->pins[m->n] = 0, m->pending[m->n] = 0;
        sim_front(m, m->n++);
        return 1;
    }
    for (int i = m->n - 1; i >= 0; i--) {
        int kept = 0;
        for (int j = 0; j < nkeep; j++) kept |= keep[j] == m->key[i];
        if (m->pins[i] || kept) continue;
        m->evictions++;
        m->key[i] = -1, m->pending[i] = 0;
        sim_front(m, i);
        return 1;
    }
    return 0;
}

static int sim_get(sim *m, int key) {
    int i = sim_find(m, key);
    if (i >= 0) {
        if (m->pending[i]) m->pending[i] = 0;
        else m->hits++;
        sim_front(m, i);
        m->pins[0]++;
        return 1;
    }
    if (!sim_room(m, NULL, 0)) return 0;
    m->misses++, m->reads++;
    m->key[0] = key, m->pins[0] = 1, m->pending[0] = 0;
    return 1;
}

static void sim_release(sim *m, int key) {
    int i = sim_find(m, key);
    if (i >= 0 && m->pins[i] > 0) m->pins[i]--;
}

static void sim_prefetch(sim *m, const int *keys, int n) {
    int claimed[SIM_MAX], nc = 0;
    for (int k = 0; k < n; k++) {
        int i = sim_find(m, keys[k]), seen = 0;
        for (int j = 0; j < nc; j++) seen |= claimed[j] == keys[k];
        if (i < 0 || seen) continue;
        claimed[nc++] = keys[k];
        sim_front(m, i);
        if (!m->pending[0]) m->hits++, m->pending[0] = 1;
    }
    for (int k = 0; k < n; k++) {
        if (sim_find(m, keys[k]) >= 0) continue;
        if (!sim_room(m, claimed, nc)) break;
        m->misses++, m->reads++;
        m->key[0] = keys[k], m->pins[0] = 0, m->pending[0] = 1;
        claimed[nc++] = keys[k];
    }
}

static void assert_counts(expert_store *s, const sim *m, int step) {
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert(st.hits == m->hits && st.misses == m->misses && st.evictions == m->evictions &&
                  st.reads == m->reads,
              "step %d: store hits/misses/evictions/reads %llu/%llu/%llu/%llu, simulated %llu/%llu/%llu/%llu",
              step, (unsigned long long)st.hits, (unsigned long long)st.misses,
              (unsigned long long)st.evictions, (unsigned long long)st.reads,
              (unsigned long long)m->hits, (unsigned long long)m->misses,
              (unsigned long long)m->evictions, (unsigned long long)m->reads);
}

Test(store, counts_hand_checked) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    expert_store *s = store_new(&p, 2, 2, 0);
    int L = p.layers[0];
    check_get(s, &p, 0, 0); /* miss */
    check_get(s, &p, 0, 1); /* miss */
    check_get(s, &p, 0, 0); /* hit; LRU is now 1 */
    check_get(s, &p, 0, 2); /* miss, evicts 1 */
    check_get(s, &p, 0, 1); /* miss, evicts 0 */
    check_get(s, &p, 0, 2); /* hit */
    int32_t ids[] = {2, 3};
    mf_err err;
    cr_assert_eq(expert_store_prefetch(s, L, ids, 2, &err), MF_OK); /* 2 hit, 3 miss evicting 1 */
    check_get(s, &p, 0, 2); /* counted by the prefetch */
    check_get(s, &p, 0, 3); /* counted by the prefetch */
    check_get(s, &p, 0, 3); /* hit */
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert_eq(st.hits, 4);
    cr_assert_eq(st.misses, 5);
    cr_assert_eq(st.evictions, 3);
    cr_assert_eq(st.reads, 5);
    cr_assert_eq(st.bytes_read, 5 * p.stride[0]);
    cr_assert_eq(st.resident_bytes, 2 * p.stride[0]);
    expert_store_reset_stats(s);
    expert_store_stats(s, &st);
    cr_assert(st.hits + st.misses + st.evictions + st.reads + st.bytes_read == 0);
    cr_assert_eq(st.peak_bytes, st.resident_bytes);
    expert_store_close(s);
    pack_close(&p);
}

static void scripted(pack *p, int cap, uint32_t seed) {
    expert_store *s = store_new(p, (uint64_t)cap, 3, 0);
    sim m = {.cap = cap};
    int held[SIM_MAX], held_m[SIM_MAX], held_e[SIM_MAX], nheld = 0;
    uint32_t rng = seed;
    mf_err err;
    for (int step = 0; step < 600; step++) {
        uint32_t op = lcg(&rng) % 10;
        int mi = (int)(lcg(&rng) % (uint32_t)p->n_moe);
        int layer = p->layers[mi];
        if (op < 2) { /* prefetch up to cap + 2 ids, duplicates allowed */
            int32_t ids[SIM_MAX];
            int keys[SIM_MAX], n = 1 + (int)(lcg(&rng) % (uint32_t)(cap + 2));
            for (int k = 0; k < n; k++) {
                ids[k] = (int32_t)(lcg(&rng) % (uint32_t)p->count[mi]);
                keys[k] = layer * MAX_EXPERTS + ids[k];
            }
            err_clear(&err);
            cr_assert_eq(expert_store_prefetch(s, layer, ids, n, &err), MF_OK, "%s", err.msg);
            sim_prefetch(&m, keys, n);
        } else if ((op < 6 || nheld == 0) && nheld < SIM_MAX) { /* get, kept pinned */
            int e = (int)(lcg(&rng) % (uint32_t)p->count[mi]);
            const void *blob = NULL;
            err_clear(&err);
            mf_status st = expert_store_get(s, layer, e, &blob, &err);
            int ok = sim_get(&m, layer * MAX_EXPERTS + e);
            cr_assert_eq(st == MF_OK, ok, "step %d: get %s, simulation says %s (%s)", step,
                         st == MF_OK ? "worked" : "failed", ok ? "ok" : "all pinned", err.msg);
            if (ok) {
                cr_assert(memcmp(blob, p->ref[mi][e], p->stride[mi]) == 0);
                held[nheld] = layer, held_m[nheld] = mi, held_e[nheld++] = e;
            } else {
                cr_assert_eq(st, MF_ERR_NOMEM);
            }
        } else { /* release one held */
            int h = (int)(lcg(&rng) % (uint32_t)nheld);
            expert_store_release(s, held[h], held_e[h]);
            sim_release(&m, held[h] * MAX_EXPERTS + held_e[h]);
            held[h] = held[nheld - 1], held_m[h] = held_m[nheld - 1], held_e[h] = held_e[--nheld];
        }
        assert_counts(s, &m, step);
    }
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert(st.hits > 0 && st.misses > 0 && st.evictions > 0, "the script exercises all three");
    expert_store_close(s);
}

Test(store, counts_match_simulated_lru) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    scripted(&p, 1, 7u);
    scripted(&p, 3, 11u);
    scripted(&p, 5, 13u);
    scripted(&p, 10, 17u);
    pack_close(&p);
}

/* ---- prefetch with less room than ids ---- */

Test(store, prefetch_budget_smaller_than_ids) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    expert_store *s = store_new(&p, 3, 8, 0);
    int L = p.layers[1];
    int32_t ids[] = {5, 1, 7, 0, 2, 6, 3, 4};
    mf_err err;
    err_clear(&err);
    cr_assert_eq(expert_store_prefetch(s, L, ids, 8, &err), MF_OK, "%s", err.msg);
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert_eq(st.reads, 3, "only what fits is read");
    cr_assert_eq(st.resident_bytes, 3 * p.stride[1]);
    for (int k = 0; k < 3; k++) check_get(s, &p, 1, ids[k]);
    expert_store_stats(s, &st);
    cr_assert_eq(st.reads, 3, "the first three were prefetched");
    for (int k = 3; k < 8; k++) check_get(s, &p, 1, ids[k]);
    expert_store_stats(s, &st);
    cr_assert_eq(st.reads, 8);
    cr_assert_eq(st.misses, 8);
    cr_assert_eq(st.hits, 0);

    /* two of three slots pinned: a prefetch of four loads one */
    const void *a, *b;
    cr_assert_eq(expert_store_get(s, L, 0, &a, &err), MF_OK);
    cr_assert_eq(expert_store_get(s, L, 1, &b, &err), MF_OK);
    expert_store_reset_stats(s);
    int32_t more[] = {4, 5, 6, 7};
    cr_assert_eq(expert_store_prefetch(s, L, more, 4, &err), MF_OK);
    expert_store_stats(s, &st);
    cr_assert_eq(st.hits, 1, "4 was resident");
    cr_assert_eq(st.reads, 0, "no unpinned slot beyond 4's own");
    cr_assert(memcmp(a, p.ref[1][0], p.stride[1]) == 0 && memcmp(b, p.ref[1][1], p.stride[1]) == 0,
              "pinned blobs kept their bytes");
    expert_store_release(s, L, 0);
    expert_store_release(s, L, 1);
    cr_assert_eq(expert_store_prefetch(s, L, more, 4, &err), MF_OK);
    expert_store_stats(s, &st);
    cr_assert_eq(st.reads, 2, "5 and 6 now fit beside 4");
    cr_assert_eq(expert_store_prefetch(s, L, NULL, 0, &err), MF_OK);
    expert_store_close(s);
    pack_close(&p);
}

/* ---- pins ---- */

Test(store, pinned_slots_are_not_evicted) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    expert_store *s = store_new(&p, 2, 2, 0);
    int L = p.layers[2];
    const void *a = NULL, *b = NULL, *c = (const void *)1;
    mf_err err;
    err_clear(&err);
    cr_assert_eq(expert_store_get(s, L, 3, &a, &err), MF_OK);
    cr_assert_eq(expert_store_get(s, L, 4, &b, &err), MF_OK);
    mf_status st = expert_store_get(s, L, 5, &c, &err);
    cr_assert_eq(st, MF_ERR_NOMEM, "a third get with two pinned slots fails (%d)", st);
    cr_assert_null(c);
    char want[64];
    snprintf(want, sizeof want, "layer %d expert 5", L);
    cr_assert(strstr(err.msg, want), "the error names the expert: %s", err.msg);
    cr_assert(memcmp(a, p.ref[2][3], p.stride[2]) == 0 && memcmp(b, p.ref[2][4], p.stride[2]) == 0);
    expert_store_release(s, L, 3);
    err_clear(&err);
    cr_assert_eq(expert_store_get(s, L, 5, &c, &err), MF_OK, "%s", err.msg);
    cr_assert(memcmp(c, p.ref[2][5], p.stride[2]) == 0);
    cr_assert(memcmp(b, p.ref[2][4], p.stride[2]) == 0, "the pinned blob survived");
    /* pins count: two gets need two releases */
    const void *b2;
    cr_assert_eq(expert_store_get(s, L, 4, &b2, &err), MF_OK);
    cr_assert_eq(b2, b);
    expert_store_release(s, L, 4);
    expert_store_release(s, L, 5);
    cr_assert_eq(expert_store_get(s, L, 6, &c, &err), MF_OK, "5 is free to go");
    expert_store_release(s, L, 6);
    expert_store_release(s, L, 4);
    expert_store_release(s, L, 4); /* one too many: ignored */
    expert_store_release(s, L, 7); /* never got: ignored */
    check_get(s, &p, 2, 3);
    check_get(s, &p, 2, 4);
    expert_stats stt;
    expert_store_stats(s, &stt);
    cr_assert_eq(stt.resident_bytes, 2 * p.stride[2]);
    expert_store_close(s);
    pack_close(&p);
}

/* ---- O_DIRECT ---- */

static void check_direct(pack *p) {
    expert_store *s = store_new(p, 3, 4, 1);
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert(st.o_direct || st.note[0], "no O_DIRECT and no note saying why");
    for (int m = 0; m < p->n_moe; m++) {
        int32_t ids[MAX_EXPERTS];
        for (int e = 0; e < p->count[m]; e++) ids[e] = e;
        mf_err err;
        err_clear(&err);
        cr_assert_eq(expert_store_prefetch(s, p->layers[m], ids, p->count[m], &err), MF_OK, "%s",
                     err.msg);
        for (int e = 0; e < p->count[m]; e++) check_get(s, p, m, e);
    }
    expert_store_stats(s, &st);
    cr_assert(st.o_direct || st.note[0], "no O_DIRECT and no note saying why");
    cr_log_info("O_DIRECT %s %s", st.o_direct ? "on" : "off", st.note);
    expert_store_close(s);
}

Test(store, o_direct_same_bytes) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    check_direct(&p);
    pack_close(&p);
    /* tmpfs may refuse O_DIRECT: then the store falls back */
    struct stat sb;
    if (stat("/dev/shm", &sb) == 0 && S_ISDIR(sb.st_mode) && access("/dev/shm", W_OK) == 0) {
        char tmpl[] = "/dev/shm/moeflux-store-XXXXXX";
        if (mkdtemp(tmpl)) {
            pack q;
            pack_open_path(&q, convert(tmpl, "qwen3_5_moe_text", "--experts", "bf16"));
            check_direct(&q);
            pack_close(&q);
            th_rmtree(tmpl);
        }
    }
}

/* ---- a file cut short after open ---- */

static void check_truncated(int o_direct) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    expert_store *s = store_new(&p, 4, 4, o_direct);
    int last = p.n_moe - 1, L = p.layers[last];
    const mfpack_expert_layer *E = mfpack_experts(&p.f.L, L);
    cr_assert(E);
    /* cut inside expert 5 of the last layer: 0..4 whole, 5 partial, 6 and 7 gone */
    cr_assert_eq(truncate(p.path, (off_t)(E->offset + 5 * E->stride + 4096)), 0);
    const void *blob = (const void *)1;
    mf_err err;
    err_clear(&err);
    mf_status st = expert_store_get(s, L, 5, &blob, &err);
    cr_assert(st == MF_ERR_IO || st == MF_ERR_FORMAT, "status %d", st);
    cr_assert_null(blob);
    char want[64];
    snprintf(want, sizeof want, "layer %d expert 5", L);
    cr_assert(strstr(err.msg, want) && strstr(err.msg, p.path), "message: %s", err.msg);
    err_clear(&err);
    cr_assert_neq(expert_store_get(s, L, 7, &blob, &err), MF_OK);
    cr_assert(err.msg[0]);
    int32_t ids[] = {4, 6, 7, 3};
    err_clear(&err);
    st = expert_store_prefetch(s, L, ids, 4, &err);
    cr_assert(st == MF_ERR_IO || st == MF_ERR_FORMAT, "status %d", st);
    cr_assert(strstr(err.msg, "expert 6") || strstr(err.msg, "expert 7"), "message: %s", err.msg);
    expert_stats stt;
    expert_store_stats(s, &stt);
    cr_assert_eq(stt.resident_bytes, 2 * E->stride, "4 and 3 stay, 6 and 7 do not");
    check_get(s, &p, last, 4);
    check_get(s, &p, last, 3);
    check_get(s, &p, last, 0);
    check_get(s, &p, 0, 1);
    expert_store_close(s);
    pack_close(&p);
}

Test(store, truncated_after_open) { check_truncated(0); }
Test(store, truncated_after_open_o_direct) { check_truncated(1); }

Test(store, options_defaults_and_tiny_budget) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    expert_store *s = NULL;
    mf_err err;
    err_clear(&err);
    cr_assert_eq(expert_store_open(&s, &p.f, NULL, &err), MF_OK, "%s", err.msg);
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert_eq(st.budget_bytes, max_stride(&p), "a budget below one blob is one blob");
    cr_assert_eq(st.allocated_bytes, 0, "slots come on first use");
    check_get(s, &p, 0, 0);
    check_get(s, &p, 3, 7);
    expert_store_stats(s, &st);
    cr_assert_eq(st.allocated_bytes, max_stride(&p));
    cr_assert_eq(st.evictions, 1);
    expert_store_close(s);
    expert_store_close(NULL);
    cr_assert_eq(expert_store_open(&s, NULL, NULL, &err), MF_ERR_ARG);
    pack_close(&p);
}

/* ---- async prefetch ---- */

static uint64_t total_blobs(const pack *p) {
    uint64_t t = 0;
    for (int m = 0; m < p->n_moe; m++) t += (uint64_t)p->count[m];
    return t;
}

static void prefetch_async_ok(expert_store *s, int layer, const int32_t *ids, int n) {
    mf_err err;
    err_clear(&err);
    cr_assert_eq(expert_store_prefetch_async(s, layer, ids, n, &err), MF_OK, "%s", err.msg);
}

/* Polls until the background thread has read every queued blob (no failures expected). */
static void wait_async_done(expert_store *s) {
    expert_stats st;
    for (int t = 0; t < 100000; t++) {
        expert_store_stats(s, &st);
        if (st.prefetch_async_reads == st.prefetch_async_requests) return;
        usleep(100);
    }
    cr_assert_fail("async reads did not finish: %llu of %llu",
                   (unsigned long long)st.prefetch_async_reads,
                   (unsigned long long)st.prefetch_async_requests);
}

/* Counters that hold whatever the interleaving. */
static void assert_async_sane(expert_store *s, const pack *p) {
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert(st.resident_bytes <= st.budget_bytes && st.peak_bytes <= st.budget_bytes);
    cr_assert(st.prefetched_used <= st.prefetch_async_reads);
    cr_assert(st.prefetch_async_reads <= st.prefetch_async_requests);
    cr_assert(st.prefetch_async_reads <= st.reads);
    cr_assert_eq(st.bytes_read, st.reads * p->stride[0]);
    cr_assert(st.wait_seconds >= 0 && st.read_seconds >= 0);
}

static void check_async_bytes(pack *p, uint64_t blobs, int io_threads) {
    expert_store *s = store_new(p, blobs, io_threads, 0);
    uint64_t total = total_blobs(p), gets = 0;
    for (int round = 0; round < 3; round++) {
        for (int m = 0; m < p->n_moe; m++) {
            int32_t ids[MAX_EXPERTS];
            for (int e = 0; e < p->count[m]; e++) ids[e] = (int32_t)((e * 3 + round) % p->count[m]);
            prefetch_async_ok(s, p->layers[m], ids, p->count[m]);
            for (int e = 0; e < p->count[m]; e++, gets++) check_get(s, p, m, ids[e]);
        }
        assert_async_sane(s, p);
    }
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert_eq(st.hits + st.misses, gets, "each get is one use");
    uint64_t n_slots = blobs < total ? blobs : total;
    cr_assert(st.prefetch_async_requests >= (n_slots < 8 ? n_slots : 8));
    if (blobs >= total) {
        cr_assert_eq(st.reads, total, "everything fits: each blob read once (%llu)",
                     (unsigned long long)st.reads);
        cr_assert_eq(st.prefetch_async_reads, total);
        cr_assert_eq(st.prefetched_used, total);
        cr_assert_eq(st.evictions, 0);
        cr_assert(st.hits >= gets - total, "rounds 2 and 3 hit");
    }
    /* after the reads end, a get of a prefetched blob is a hit and waits for nothing */
    expert_store_reset_stats(s);
    int32_t ids[] = {7, 2, 5};
    int n = blobs < 3 ? (int)blobs : 3, L = p->layers[p->n_moe - 1];
    prefetch_async_ok(s, L, ids, 3);
    wait_async_done(s);
    for (int k = 0; k < n; k++) check_get(s, p, p->n_moe - 1, ids[k]);
    expert_store_stats(s, &st);
    cr_assert_eq(st.hits, (uint64_t)n, "finished async reads are hits (%llu)", (unsigned long long)st.hits);
    cr_assert_eq(st.misses, 0);
    cr_assert_eq(st.wait_seconds, 0);
    expert_store_close(s);
}

Test(store, async_bytes_budgets_1_3_all) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    const uint64_t budgets[] = {1, 3, UINT64_MAX};
    for (int b = 0; b < 3; b++) {
        check_async_bytes(&p, budgets[b], 4);
        check_async_bytes(&p, budgets[b], 1);
    }
    pack_close(&p);
    pack_open(&p, "qwen3_moe_fused", NULL, NULL); /* q4 blobs, a dense layer between */
    check_async_bytes(&p, 3, 8);
    check_async_bytes(&p, UINT64_MAX, 8);
    pack_close(&p);
}

/* Every blob of every layer queued at once, then got in another order while reads run. */
Test(store, async_gets_race_reads) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    uint64_t total = total_blobs(&p);
    uint32_t rng = 99u;
    int waited_rounds = 0;
    for (int round = 0; round < 60; round++) {
        expert_store *s = store_new(&p, UINT64_MAX, 1 + round % 4, 0);
        for (int m = 0; m < p.n_moe; m++) {
            int32_t ids[MAX_EXPERTS];
            for (int e = 0; e < p.count[m]; e++) ids[e] = (int32_t)e;
            prefetch_async_ok(s, p.layers[m], ids, p.count[m]);
        }
        int order_m[MAX_LAYERS * MAX_EXPERTS], order_e[MAX_LAYERS * MAX_EXPERTS], n = 0;
        for (int m = p.n_moe - 1; m >= 0; m--)
            for (int e = p.count[m] - 1; e >= 0; e--) order_m[n] = m, order_e[n++] = e;
        for (int k = n - 1; k > 0 && round % 2; k--) { /* odd rounds: shuffled, else reversed */
            int j = (int)(lcg(&rng) % (uint32_t)(k + 1)), tm = order_m[k], te = order_e[k];
            order_m[k] = order_m[j], order_e[k] = order_e[j];
            order_m[j] = tm, order_e[j] = te;
        }
        const void *held[MAX_LAYERS * MAX_EXPERTS];
        mf_err err;
        for (int k = 0; k < n; k++) { /* kept pinned: the bytes must stay while later reads land */
            err_clear(&err);
            cr_assert_eq(expert_store_get(s, p.layers[order_m[k]], order_e[k], &held[k], &err), MF_OK,
                         "%s", err.msg);
            cr_assert(memcmp(held[k], p.ref[order_m[k]][order_e[k]], p.stride[order_m[k]]) == 0,
                      "round %d: layer %d expert %d: bytes differ", round, p.layers[order_m[k]],
                      order_e[k]);
        }
        for (int k = 0; k < n; k++) {
            cr_assert(memcmp(held[k], p.ref[order_m[k]][order_e[k]], p.stride[order_m[k]]) == 0);
            expert_store_release(s, p.layers[order_m[k]], order_e[k]);
        }
        expert_stats st;
        expert_store_stats(s, &st);
        cr_assert_eq(st.reads, total, "no get read a blob the background was reading");
        cr_assert_eq(st.prefetch_async_reads, total);
        cr_assert_eq(st.prefetched_used, total);
        cr_assert_eq(st.hits + st.misses, total);
        cr_assert_eq(st.misses > 0, st.wait_seconds > 0, "a miss here is a get that waited");
        waited_rounds += st.misses > 0;
        expert_store_close(s);
    }
    cr_log_info("gets waited for in-flight reads in %d of 60 rounds", waited_rounds);
    pack_close(&p);
}

Test(store, async_budget_smaller_than_ids) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    expert_store *s = store_new(&p, 3, 4, 0);
    int L = p.layers[1];
    int32_t ids[] = {5, 1, 7, 0, 2, 6, 3, 4};
    prefetch_async_ok(s, L, ids, 8);
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert_eq(st.prefetch_async_requests, 3, "only what fits is queued");
    cr_assert_eq(st.resident_bytes, 3 * p.stride[1]);
    cr_assert_eq(st.hits + st.misses, 0, "an async prefetch is not a use");
    for (int k = 0; k < 8; k++) check_get(s, &p, 1, ids[k]);
    expert_store_stats(s, &st);
    cr_assert_eq(st.reads, 8);
    cr_assert_eq(st.prefetch_async_reads, 3);
    cr_assert_eq(st.prefetched_used, 3);
    cr_assert_eq(st.hits + st.misses, 8);

    /* two of three slots pinned: an async prefetch of four queues at most one */
    const void *a, *b;
    mf_err err;
    cr_assert_eq(expert_store_get(s, L, 0, &a, &err), MF_OK);
    cr_assert_eq(expert_store_get(s, L, 1, &b, &err), MF_OK);
    expert_store_reset_stats(s);
    int32_t more[] = {4, 5, 6, 7};
    prefetch_async_ok(s, L, more, 4);
    expert_store_stats(s, &st);
    cr_assert_eq(st.prefetch_async_requests, 0, "4 is resident; no unpinned slot beyond it");
    cr_assert_eq(st.evictions, 0);
    int32_t other[] = {6, 7};
    prefetch_async_ok(s, L, other, 2);
    expert_store_stats(s, &st);
    cr_assert_eq(st.prefetch_async_requests, 1, "6 replaces 4, 7 has no room");
    /* a second call never evicts what the first is reading: it queues 3 only when 6 is read */
    prefetch_async_ok(s, L, (int32_t[]){3}, 1);
    expert_store_stats(s, &st);
    cr_assert_eq(st.evictions, st.prefetch_async_requests, "every slot taken was a READY blob");
    cr_assert(memcmp(a, p.ref[1][0], p.stride[1]) == 0 && memcmp(b, p.ref[1][1], p.stride[1]) == 0,
              "pinned blobs kept their bytes");
    expert_store_release(s, L, 0);
    expert_store_release(s, L, 1);
    check_get(s, &p, 1, 3);
    check_get(s, &p, 1, 6);
    assert_async_sane(s, &p);
    expert_store_close(s);

    /* blobs a prefetch fetched for gets that have not come are not evicted by a guess */
    s = store_new(&p, 3, 2, 0);
    int32_t three[] = {0, 1, 2};
    err_clear(&err);
    cr_assert_eq(expert_store_prefetch(s, L, three, 3, &err), MF_OK, "%s", err.msg);
    prefetch_async_ok(s, L, (int32_t[]){3, 4}, 2);
    expert_store_stats(s, &st);
    cr_assert_eq(st.prefetch_async_requests, 0, "0, 1 and 2 wait for their gets");
    check_get(s, &p, 1, 0);
    check_get(s, &p, 1, 1);
    prefetch_async_ok(s, L, (int32_t[]){3, 4}, 2);
    expert_store_stats(s, &st);
    cr_assert_eq(st.prefetch_async_requests, 2, "0 and 1 were used: they may go, 2 stays");
    cr_assert_eq(st.evictions, 2);
    for (int e = 2; e <= 4; e++) check_get(s, &p, 1, e);
    expert_store_stats(s, &st);
    cr_assert_eq(st.reads, 5);
    cr_assert_eq(st.hits + st.misses, 5);
    expert_store_close(s);

    /* one slot, read in the background: a get of another blob waits for it, then evicts it */
    for (int round = 0; round < 50; round++) {
        s = store_new(&p, 1, 2, 0);
        prefetch_async_ok(s, L, (int32_t[]){round % 8}, 1);
        check_get(s, &p, 1, (round + 3) % 8);
        check_get(s, &p, 1, round % 8);
        expert_store_stats(s, &st);
        cr_assert_eq(st.prefetch_async_reads, 1);
        cr_assert_eq(st.prefetched_used, 0, "evicted before its get");
        cr_assert_eq(st.reads, 3);
        expert_store_close(s);
    }
    pack_close(&p);
}

static void check_truncated_async(int o_direct) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    expert_store *s = store_new(&p, 4, 4, o_direct);
    int last = p.n_moe - 1, L = p.layers[last];
    const mfpack_expert_layer *E = mfpack_experts(&p.f.L, L);
    cr_assert(E);
    /* cut inside expert 5 of the last layer: 0..4 whole, 5 partial, 6 and 7 gone */
    cr_assert_eq(truncate(p.path, (off_t)(E->offset + 5 * E->stride + 4096)), 0);
    int32_t ids[] = {4, 6, 7, 3};
    prefetch_async_ok(s, L, ids, 4);
    const void *blob = (const void *)1;
    mf_err err;
    err_clear(&err);
    mf_status st = expert_store_get(s, L, 6, &blob, &err);
    cr_assert_eq(st, MF_ERR_FORMAT, "status %d: %s", st, err.msg);
    cr_assert_null(blob);
    char want[64];
    snprintf(want, sizeof want, "layer %d expert 6", L);
    cr_assert(strstr(err.msg, want) && strstr(err.msg, p.path) && strstr(err.msg, "truncated"),
              "message: %s", err.msg);
    check_get(s, &p, last, 4);
    check_get(s, &p, last, 3);
    /* 7's failure is reported once, by the sync prefetch that meets it; 0 is read */
    int32_t ids2[] = {7, 0};
    err_clear(&err);
    st = expert_store_prefetch(s, L, ids2, 2, &err);
    cr_assert_eq(st, MF_ERR_FORMAT, "status %d", st);
    snprintf(want, sizeof want, "layer %d expert 7", L);
    cr_assert(strstr(err.msg, want), "message: %s", err.msg);
    check_get(s, &p, last, 0);
    /* reported once: the next get of 6 reads again, and fails again on its own */
    err_clear(&err);
    cr_assert_eq(expert_store_get(s, L, 6, &blob, &err), MF_ERR_FORMAT);
    cr_assert(err.msg[0]);
    expert_stats stt;
    expert_store_stats(s, &stt);
    cr_assert_eq(stt.prefetch_async_requests, 4);
    cr_assert_eq(stt.prefetch_async_reads, 2, "4 and 3");
    cr_assert_eq(stt.prefetched_used, 2);
    cr_assert_eq(stt.resident_bytes, 3 * E->stride, "4, 3 and 0; no failed slot is left");
    check_get(s, &p, 0, 1);
    /* failed slots left unclaimed are reused without counting an eviction */
    prefetch_async_ok(s, L, (int32_t[]){5, 6, 7}, 3);
    check_get(s, &p, 0, 2);
    check_get(s, &p, 1, 2);
    expert_store_stats(s, &stt);
    cr_assert(stt.resident_bytes <= stt.budget_bytes);
    expert_store_close(s);
    pack_close(&p);
}

Test(store, async_truncated_after_open) {
    check_truncated_async(0);
    check_truncated_async(1);
}

Test(store, async_close_and_cancel_in_flight) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    mf_err err;
    for (int round = 0; round < 100; round++) {
        expert_store *s = store_new(&p, round % 3 ? UINT64_MAX : 5, 1 + round % 3, 0);
        const void *blob = NULL;
        if (round % 4 == 1) { /* a pinned blob across close */
            err_clear(&err);
            cr_assert_eq(expert_store_get(s, p.layers[0], 3, &blob, &err), MF_OK, "%s", err.msg);
        }
        for (int m = 0; m < p.n_moe; m++) { /* several calls: some queue behind a running batch */
            int32_t ids[MAX_EXPERTS];
            for (int e = 0; e < p.count[m]; e++) ids[e] = (int32_t)(p.count[m] - 1 - e);
            prefetch_async_ok(s, p.layers[m], ids, p.count[m]);
        }
        if (round % 2) {
            expert_store_cancel_async(s);
            assert_async_sane(s, &p);
            for (int m = 0; m < p.n_moe; m++)
                for (int e = 0; e < p.count[m]; e++) check_get(s, &p, m, e);
            expert_stats st;
            expert_store_stats(s, &st);
            cr_assert(st.prefetch_async_reads <= st.prefetch_async_requests);
            cr_assert(st.reads >= total_blobs(&p) || st.evictions > 0);
            /* a queue emptied by cancel takes new work */
            prefetch_async_ok(s, p.layers[0], (int32_t[]){1, 2}, 2);
            check_get(s, &p, 0, 2);
            check_get(s, &p, 0, 1);
        }
        expert_store_close(s);
    }
    /* close and cancel with no async ever started, and cancel on NULL */
    expert_store *s = store_new(&p, 3, 2, 0);
    expert_store_cancel_async(s);
    expert_store_cancel_async(NULL);
    expert_store_close(s);
    pack_close(&p);
}

Test(store, async_bad_arguments) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    expert_store *s = store_new(&p, 3, 2, 0);
    mf_err err;
    int32_t bad[] = {0, 8};
    cr_assert_eq(expert_store_prefetch_async(s, p.layers[0], bad, 2, &err), MF_ERR_ARG);
    cr_assert_eq(expert_store_prefetch_async(s, 99, bad, 1, &err), MF_ERR_ARG);
    cr_assert_eq(expert_store_prefetch_async(s, p.layers[0], NULL, 1, &err), MF_ERR_ARG);
    cr_assert_eq(expert_store_prefetch_async(s, p.layers[0], bad, -1, &err), MF_ERR_ARG);
    cr_assert_eq(expert_store_prefetch_async(NULL, p.layers[0], bad, 1, &err), MF_ERR_ARG);
    cr_assert_eq(expert_store_prefetch_async(s, p.layers[0], NULL, 0, &err), MF_OK);
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert_eq(st.prefetch_async_requests + st.resident_bytes, 0, "refused calls queue nothing");
    /* duplicates are read once */
    prefetch_async_ok(s, p.layers[0], (int32_t[]){4, 4, 4}, 3);
    check_get(s, &p, 0, 4);
    expert_store_stats(s, &st);
    cr_assert_eq(st.prefetch_async_requests, 1);
    cr_assert_eq(st.reads, 1);
    expert_store_close(s);
    pack_close(&p);
}

/* Random async and sync prefetches, gets (held pinned for a while), releases and cancels on a
 * budget of 5 blobs, every byte checked against independent preads. */
static void async_random(pack *p, uint32_t seed, int io_threads) {
    enum { CAP = 5 };
    expert_store *s = store_new(p, CAP, io_threads, 0);
    int held_m[64], held_e[64], nheld = 0;
    const void *held_blob[64];
    uint32_t rng = seed;
    mf_err err;
    int n_ok = 0, last_m = 0, last_n = 0; /* the last async prefetch, whose ids gets favour */
    int32_t last_ids[CAP + 2];
    for (int step = 0; step < 200; step++) {
        uint32_t op = lcg(&rng) % 12;
        int mi = (int)(lcg(&rng) % (uint32_t)p->n_moe), layer = p->layers[mi];
        if (op < 4 || op == 11) { /* async prefetch or sync prefetch, up to CAP + 2 ids */
            int32_t ids[CAP + 2];
            int n = 1 + (int)(lcg(&rng) % (CAP + 2));
            for (int k = 0; k < n; k++) ids[k] = (int32_t)(lcg(&rng) % (uint32_t)p->count[mi]);
            err_clear(&err);
            mf_status st = op == 11 ? expert_store_prefetch(s, layer, ids, n, &err)
                                    : expert_store_prefetch_async(s, layer, ids, n, &err);
            cr_assert_eq(st, MF_OK, "step %d: %s", step, err.msg);
            if (op != 11) {
                last_m = mi, last_n = n;
                memcpy(last_ids, ids, sizeof(int32_t) * (size_t)n);
            }
        } else if (op < 7 && nheld < 64) { /* get, held */
            int e = (int)(lcg(&rng) % (uint32_t)p->count[mi]);
            if (last_n > 0 && lcg(&rng) % 3) { /* mostly what was just prefetched, maybe in flight */
                mi = last_m, layer = p->layers[mi];
                e = last_ids[lcg(&rng) % (uint32_t)last_n];
            }
            /* distinct blobs pinned: with CAP of them and e not among them, the get must fail */
            int distinct = 0, mine = 0;
            for (int h = 0; h < nheld; h++) {
                int first = 1;
                for (int g = 0; g < h; g++)
                    first &= !(held_m[g] == held_m[h] && held_e[g] == held_e[h]);
                distinct += first;
                mine |= held_m[h] == mi && held_e[h] == e;
            }
            const void *blob = NULL;
            err_clear(&err);
            mf_status st = expert_store_get(s, layer, e, &blob, &err);
            if (distinct == CAP && !mine) {
                cr_assert_eq(st, MF_ERR_NOMEM, "step %d: every slot is pinned", step);
                continue;
            }
            cr_assert_eq(st, MF_OK, "step %d: get layer %d expert %d: %s", step, layer, e, err.msg);
            cr_assert(memcmp(blob, p->ref[mi][e], p->stride[mi]) == 0,
                      "step %d: layer %d expert %d: bytes differ", step, layer, e);
            held_m[nheld] = mi, held_e[nheld] = e, held_blob[nheld++] = blob;
            n_ok++;
        } else if (op < 10 && nheld > 0) { /* release one held, its bytes intact */
            int h = (int)(lcg(&rng) % (uint32_t)nheld);
            cr_assert(memcmp(held_blob[h], p->ref[held_m[h]][held_e[h]], p->stride[held_m[h]]) == 0,
                      "step %d: a pinned blob changed", step);
            expert_store_release(s, p->layers[held_m[h]], held_e[h]);
            nheld--;
            held_m[h] = held_m[nheld], held_e[h] = held_e[nheld], held_blob[h] = held_blob[nheld];
        } else if (op == 10) {
            expert_store_cancel_async(s);
        }
        if (step % 20 == 0) assert_async_sane(s, p);
    }
    for (int h = 0; h < nheld; h++) {
        cr_assert(memcmp(held_blob[h], p->ref[held_m[h]][held_e[h]], p->stride[held_m[h]]) == 0);
        expert_store_release(s, p->layers[held_m[h]], held_e[h]);
    }
    assert_async_sane(s, p);
    expert_stats st;
    expert_store_stats(s, &st);
    cr_assert(n_ok > 20 && st.prefetch_async_requests > 10 && st.evictions > 0,
              "seed %u: the mix exercises too little: %d gets, %llu async requests, %llu evictions",
              seed, n_ok, (unsigned long long)st.prefetch_async_requests,
              (unsigned long long)st.evictions);
    cr_log_info("seed %u: %d gets, %llu async requests, %llu used, %llu evictions", seed, n_ok,
                (unsigned long long)st.prefetch_async_requests,
                (unsigned long long)st.prefetched_used, (unsigned long long)st.evictions);
    expert_store_close(s);
}

Test(store, async_random_mixed_budget_5) {
    pack p;
    pack_open(&p, "qwen3_5_moe_text", "--experts", "bf16");
    for (uint32_t seed = 1; seed <= 8; seed++) async_random(&p, seed * 7919u, 1 + (int)(seed % 4));
    pack_close(&p);
}
