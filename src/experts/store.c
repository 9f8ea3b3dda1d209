/* store.c - the expert store: a RAM cache of fixed 4096-aligned slots over the expert blobs of
 * a .moeflux file, LRU eviction of unpinned slots, parallel preads on its own thread pool.
 * Not thread-safe: one caller thread; the pool's workers only pread into slots chosen for them. */
#include "experts/store.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/threadpool.h"

#define STORE_DEFAULT_IO_THREADS 8

/* One blob read, prepared by the caller thread, run by a pool worker. */
typedef struct read_job {
    int slot, layer, id;
    int err_no;              /* errno of a failed pread, 0 otherwise */
    int eof;                 /* the file ended before the blob did */
    uint64_t got;            /* bytes read */
} read_job;

struct expert_store {
    const mfpack_file *f;    /* borrowed */
    int fd;                  /* buffered reads: f->fd, borrowed */
    int fd_direct;           /* O_DIRECT reads, owned; -1 when none */
    atomic_int direct_refused; /* set by a reader whose O_DIRECT pread got EINVAL */

    int n_layers, max_experts;
    uint64_t *layer_off;     /* [n_layers] absolute offset of expert 0 */
    uint64_t *layer_stride;  /* [n_layers] bytes per blob; 0 for a dense layer */
    int *layer_count;        /* [n_layers] experts; 0 for a dense layer */
    int *index;              /* [n_layers * max_experts] slot holding (layer, id), or -1 */

    uint64_t slot_bytes;     /* largest stride */
    int n_slots;             /* capacity (budget / slot_bytes, at least 1) */
    int n_alloc;             /* slots allocated so far (lazily) */
    unsigned char **slot_buf;/* [n_slots] -> slot_bytes each, 4096-aligned; NULL until needed */
    int *slot_key;           /* [n_slots] layer * max_experts + id, or -1 when empty */
    int *slot_pins;          /* [n_slots] outstanding gets */
    int *slot_prev, *slot_next; /* [n_slots] LRU list of filled slots, head = most recent */
    uint64_t *slot_epoch;    /* [n_slots] last prefetch call that claimed the slot */
    unsigned char *slot_pending; /* [n_slots] 1: a prefetch counted this use, its get has not come */
    int *free_slots;         /* [n_slots] stack of allocated empty slots */
    int n_free;
    int lru_head, lru_tail;
    uint64_t epoch;          /* prefetch calls so far */

    mf_pool *pool;           /* io_threads, owned (pool_for is not reentrant) */
    read_job *jobs;          /* [n_slots] reads of one prefetch */

    uint64_t budget_bytes;
    uint64_t hits, misses, evictions, reads, bytes_read;
    double read_seconds;
    uint64_t resident_bytes, peak_bytes;
    char note[256];
};

void expert_store_options_init(expert_store_options *opt) {
    memset(opt, 0, sizeof *opt);
    opt->io_threads = STORE_DEFAULT_IO_THREADS;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- LRU list ---- */

static void lru_unlink(expert_store *s, int i) {
    int p = s->slot_prev[i], n = s->slot_next[i];
    if (p >= 0) s->slot_next[p] = n;
    else s->lru_head = n;
    if (n >= 0) s->slot_prev[n] = p;
    else s->lru_tail = p;
    s->slot_prev[i] = s->slot_next[i] = -1;
}

static void lru_push_head(expert_store *s, int i) {
    s->slot_prev[i] = -1;
    s->slot_next[i] = s->lru_head;
    if (s->lru_head >= 0) s->slot_prev[s->lru_head] = i;
    s->lru_head = i;
    if (s->lru_tail < 0) s->lru_tail = i;
}

static void lru_touch(expert_store *s, int i) {
    if (s->lru_head == i) return;
    lru_unlink(s, i);
    lru_push_head(s, i);
}

/* ---- slots ---- */

static int key_of(const expert_store *s, int layer, int id) { return layer * s->max_experts + id; }

/* Empties a filled slot (off the LRU list and the index); the caller reuses or frees it. */
static void slot_clear(expert_store *s, int i) {
    int key = s->slot_key[i];
    s->index[key] = -1;
    s->resident_bytes -= s->layer_stride[key / s->max_experts];
    lru_unlink(s, i);
    s->slot_key[i] = -1;
    s->slot_pins[i] = 0;
    s->slot_pending[i] = 0;
}

/* An empty slot: a freed one, a newly allocated one, or the least recently used filled slot
 * that is unpinned and not claimed by prefetch call `keep_epoch` (0: none). Returns -1 when
 * every slot is pinned or kept, -2 when the first slot cannot be allocated. */
static int slot_take(expert_store *s, uint64_t keep_epoch) {
    if (s->n_free > 0) return s->free_slots[--s->n_free];
    if (s->n_alloc < s->n_slots) {
        void *buf = NULL;
        if (posix_memalign(&buf, MFPACK_ALIGN, (size_t)s->slot_bytes) == 0) {
            int i = s->n_alloc++;
            s->slot_buf[i] = buf;
            return i;
        }
        if (s->n_alloc == 0) return -2;
        snprintf(s->note, sizeof s->note, "out of memory after %d of %d slots; budget cut", s->n_alloc,
                 s->n_slots);
        s->n_slots = s->n_alloc;
        s->budget_bytes = (uint64_t)s->n_alloc * s->slot_bytes;
    }
    for (int i = s->lru_tail; i >= 0; i = s->slot_prev[i]) {
        if (s->slot_pins[i] > 0 || (keep_epoch && s->slot_epoch[i] == keep_epoch)) continue;
        slot_clear(s, i);
        s->evictions++;
        return i;
    }
    return -1;
}

static void slot_fill(expert_store *s, int i, int layer, int id) {
    int key = key_of(s, layer, id);
    s->slot_key[i] = key;
    s->index[key] = i;
    s->slot_pins[i] = 0;
    s->slot_pending[i] = 0;
    lru_push_head(s, i);
    s->resident_bytes += s->layer_stride[layer];
    if (s->resident_bytes > s->peak_bytes) s->peak_bytes = s->resident_bytes;
}

/* ---- reads ---- */

/* Reads the blob of job->(layer, id) into its slot: exactly `stride` bytes at
 * offset + id * stride, retrying on EINTR and short reads. Safe on pool workers. */
static void blob_read(expert_store *s, read_job *job) {
    uint64_t bytes = s->layer_stride[job->layer];
    uint64_t off = s->layer_off[job->layer] + (uint64_t)job->id * bytes;
    unsigned char *buf = s->slot_buf[job->slot];
    int fd = s->fd_direct >= 0 && !atomic_load(&s->direct_refused) ? s->fd_direct : s->fd;
    job->err_no = 0;
    job->eof = 0;
    job->got = 0;
    while (job->got < bytes) {
        ssize_t r = pread(fd, buf + job->got, (size_t)(bytes - job->got), (off_t)(off + job->got));
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EINVAL && fd == s->fd_direct) { /* O_DIRECT refused at read time */
                atomic_store(&s->direct_refused, 1);
                fd = s->fd;
                continue;
            }
            job->err_no = errno;
            return;
        }
        if (r == 0) {
            job->eof = 1;
            return;
        }
        job->got += (uint64_t)r;
    }
}

static void read_range(void *ctx, int64_t begin, int64_t end, int thread) {
    (void)thread;
    expert_store *s = ctx;
    for (int64_t i = begin; i < end; i++) blob_read(s, &s->jobs[i]);
}

/* After reads: drops the O_DIRECT fd if a reader found it refused. */
static void direct_check(expert_store *s) {
    if (s->fd_direct < 0 || !atomic_load(&s->direct_refused)) return;
    close(s->fd_direct);
    s->fd_direct = -1;
    snprintf(s->note, sizeof s->note, "O_DIRECT reads refused by the filesystem; reads are buffered");
}

static mf_status job_error(const expert_store *s, const read_job *job, mf_err *err) {
    uint64_t bytes = s->layer_stride[job->layer];
    unsigned long long off = s->layer_off[job->layer] + (uint64_t)job->id * bytes;
    if (job->eof)
        return err_set(err, MF_ERR_FORMAT,
                       "%s: truncated: layer %d expert %d: got %llu of %llu bytes at offset %llu",
                       s->f->path, job->layer, job->id, (unsigned long long)job->got,
                       (unsigned long long)bytes, off);
    return err_set(err, MF_ERR_IO, "%s: cannot read layer %d expert %d (%llu bytes at offset %llu): %s",
                   s->f->path, job->layer, job->id, (unsigned long long)bytes, off,
                   strerror(job->err_no));
}

static int job_failed(const read_job *job) { return job->err_no != 0 || job->eof; }

static mf_status check_id(const expert_store *s, int layer, int32_t id, mf_err *err) {
    if (layer < 0 || layer >= s->n_layers || s->layer_count[layer] == 0)
        return err_set(err, MF_ERR_ARG, "expert store: layer %d has no experts (%d layers)", layer,
                       s->n_layers);
    if (id < 0 || id >= s->layer_count[layer])
        return err_set(err, MF_ERR_ARG, "expert store: layer %d has no expert %d (%d experts)", layer,
                       (int)id, s->layer_count[layer]);
    return MF_OK;
}

/* ---- open / close ---- */

void expert_store_close(expert_store *s) {
    if (!s) return;
    pool_destroy(s->pool);
    if (s->fd_direct >= 0) close(s->fd_direct);
    for (int i = 0; i < s->n_alloc; i++) free(s->slot_buf[i]);
    free(s->slot_buf);
    free(s->slot_key);
    free(s->slot_pins);
    free(s->slot_prev);
    free(s->slot_next);
    free(s->slot_epoch);
    free(s->slot_pending);
    free(s->free_slots);
    free(s->jobs);
    free(s->index);
    free(s->layer_off);
    free(s->layer_stride);
    free(s->layer_count);
    free(s);
}

mf_status expert_store_open(expert_store **out, const mfpack_file *f, const expert_store_options *opt,
                            mf_err *err) {
    if (!out || !f) return err_set(err, MF_ERR_ARG, "expert_store_open: NULL argument");
    *out = NULL;
    expert_store_options def;
    expert_store_options_init(&def);
    if (!opt) opt = &def;
    const mfpack_layout *L = &f->L;
    int n_layers = L->hp.n_layers;
    if (n_layers <= 0 || L->n_expert_layers <= 0)
        return err_set(err, MF_ERR_ARG, "%s: the model has no routed experts", f->path);

    int max_experts = 0;
    uint64_t slot_bytes = 0, total_blobs = 0;
    for (int i = 0; i < L->n_expert_layers; i++) {
        const mfpack_expert_layer *E = &L->expert_layers[i];
        if (E->layer < 0 || E->layer >= n_layers || E->count <= 0 || E->stride == 0 ||
            E->stride % MFPACK_ALIGN || E->offset % MFPACK_ALIGN)
            return err_set(err, MF_ERR_FORMAT, "%s: bad expert entry for layer %d", f->path, E->layer);
        if (E->count > max_experts) max_experts = E->count;
        if (E->stride > slot_bytes) slot_bytes = E->stride;
        total_blobs += (uint64_t)E->count;
    }
    if ((int64_t)n_layers * max_experts > INT32_MAX)
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: %d layers x %d experts is too many", f->path,
                       n_layers, max_experts);

    expert_store *s = calloc(1, sizeof *s);
    if (!s) return err_set(err, MF_ERR_NOMEM, "out of memory");
    s->f = f;
    s->fd = f->fd;
    s->fd_direct = -1;
    atomic_init(&s->direct_refused, 0);
    s->n_layers = n_layers;
    s->max_experts = max_experts;
    s->slot_bytes = slot_bytes;
    uint64_t want = opt->budget_bytes / slot_bytes;
    if (want < 1) want = 1;
    if (want > total_blobs) want = total_blobs;
    s->n_slots = (int)want;
    s->budget_bytes = want * slot_bytes;
    s->lru_head = s->lru_tail = -1;

    size_t n_index = (size_t)n_layers * (size_t)max_experts, ns = (size_t)s->n_slots;
    s->layer_off = calloc((size_t)n_layers, sizeof *s->layer_off);
    s->layer_stride = calloc((size_t)n_layers, sizeof *s->layer_stride);
    s->layer_count = calloc((size_t)n_layers, sizeof *s->layer_count);
    s->index = malloc(n_index * sizeof *s->index);
    s->slot_buf = calloc(ns, sizeof *s->slot_buf);
    s->slot_key = malloc(ns * sizeof *s->slot_key);
    s->slot_pins = calloc(ns, sizeof *s->slot_pins);
    s->slot_prev = malloc(ns * sizeof *s->slot_prev);
    s->slot_next = malloc(ns * sizeof *s->slot_next);
    s->slot_epoch = calloc(ns, sizeof *s->slot_epoch);
    s->slot_pending = calloc(ns, sizeof *s->slot_pending);
    s->free_slots = malloc(ns * sizeof *s->free_slots);
    s->jobs = calloc(ns, sizeof *s->jobs);
    int io_threads = opt->io_threads > 0 ? opt->io_threads : STORE_DEFAULT_IO_THREADS;
    s->pool = pool_create(io_threads);
    if (!s->layer_off || !s->layer_stride || !s->layer_count || !s->index || !s->slot_buf ||
        !s->slot_key || !s->slot_pins || !s->slot_prev || !s->slot_next || !s->slot_epoch ||
        !s->slot_pending || !s->free_slots || !s->jobs || !s->pool) {
        expert_store_close(s);
        return err_set(err, MF_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < n_index; i++) s->index[i] = -1;
    for (size_t i = 0; i < ns; i++) s->slot_key[i] = s->slot_prev[i] = s->slot_next[i] = -1;
    for (int i = 0; i < L->n_expert_layers; i++) {
        const mfpack_expert_layer *E = &L->expert_layers[i];
        s->layer_off[E->layer] = E->offset;
        s->layer_stride[E->layer] = E->stride;
        s->layer_count[E->layer] = E->count;
    }

    if (opt->o_direct) {
        s->fd_direct = open(f->path, O_RDONLY | O_DIRECT | O_CLOEXEC);
        if (s->fd_direct < 0)
            snprintf(s->note, sizeof s->note, "O_DIRECT refused (%s); reads are buffered",
                     strerror(errno));
    }
    *out = s;
    return MF_OK;
}

/* ---- the calls ---- */

mf_status expert_store_prefetch(expert_store *s, int layer, const int32_t *ids, int n, mf_err *err) {
    if (!s || n < 0 || (n > 0 && !ids))
        return err_set(err, MF_ERR_ARG, "expert_store_prefetch: bad argument");
    for (int k = 0; k < n; k++) {
        mf_status st = check_id(s, layer, ids[k], err);
        if (st != MF_OK) return st;
    }
    uint64_t epoch = ++s->epoch;
    /* Resident ids first, so that making room below never evicts one of them. */
    for (int k = 0; k < n; k++) {
        int i = s->index[key_of(s, layer, ids[k])];
        if (i < 0 || s->slot_epoch[i] == epoch) continue;
        s->slot_epoch[i] = epoch;
        lru_touch(s, i);
        if (!s->slot_pending[i]) {
            s->hits++;
            s->slot_pending[i] = 1;
        }
    }
    int n_jobs = 0;
    for (int k = 0; k < n; k++) {
        if (s->index[key_of(s, layer, ids[k])] >= 0) continue; /* resident or a duplicate */
        int i = slot_take(s, epoch);
        if (i == -2) return err_set(err, MF_ERR_NOMEM, "expert store: out of memory for one slot");
        if (i < 0) break; /* the budget is full of pinned blobs and this call's blobs */
        slot_fill(s, i, layer, ids[k]);
        s->slot_epoch[i] = epoch;
        s->slot_pending[i] = 1;
        s->misses++;
        s->jobs[n_jobs++] = (read_job){.slot = i, .layer = layer, .id = ids[k]};
    }
    if (n_jobs == 0) return MF_OK;
    double t0 = now_seconds();
    pool_for(s->pool, n_jobs, 1, read_range, s);
    s->read_seconds += now_seconds() - t0;
    direct_check(s);
    mf_status st = MF_OK;
    for (int j = 0; j < n_jobs; j++) {
        const read_job *job = &s->jobs[j];
        if (job_failed(job)) {
            if (st == MF_OK) st = job_error(s, job, err);
            slot_clear(s, job->slot);
            s->free_slots[s->n_free++] = job->slot;
            continue;
        }
        s->reads++;
        s->bytes_read += job->got;
    }
    return st;
}

mf_status expert_store_get(expert_store *s, int layer, int32_t id, const void **blob, mf_err *err) {
    if (!s || !blob) return err_set(err, MF_ERR_ARG, "expert_store_get: NULL argument");
    *blob = NULL;
    mf_status st = check_id(s, layer, id, err);
    if (st != MF_OK) return st;
    int i = s->index[key_of(s, layer, id)];
    if (i >= 0) {
        if (s->slot_pending[i]) s->slot_pending[i] = 0; /* the prefetch counted this use */
        else s->hits++;
        lru_touch(s, i);
        s->slot_pins[i]++;
        *blob = s->slot_buf[i];
        return MF_OK;
    }
    i = slot_take(s, 0);
    if (i == -2)
        return err_set(err, MF_ERR_NOMEM, "expert store: out of memory for layer %d expert %d", layer,
                       (int)id);
    if (i < 0)
        return err_set(err, MF_ERR_NOMEM,
                       "expert store: cannot load layer %d expert %d: all %d slots (%llu bytes) "
                       "are pinned",
                       layer, (int)id, s->n_slots, (unsigned long long)s->budget_bytes);
    s->misses++;
    slot_fill(s, i, layer, id);
    read_job job = {.slot = i, .layer = layer, .id = id};
    double t0 = now_seconds();
    blob_read(s, &job);
    s->read_seconds += now_seconds() - t0;
    direct_check(s);
    if (job_failed(&job)) {
        st = job_error(s, &job, err);
        slot_clear(s, i);
        s->free_slots[s->n_free++] = i;
        return st;
    }
    s->reads++;
    s->bytes_read += job.got;
    s->slot_pins[i] = 1;
    *blob = s->slot_buf[i];
    return MF_OK;
}

void expert_store_release(expert_store *s, int layer, int32_t id) {
    if (!s || check_id(s, layer, id, NULL) != MF_OK) return;
    int i = s->index[key_of(s, layer, id)];
    if (i >= 0 && s->slot_pins[i] > 0) s->slot_pins[i]--;
}

void expert_store_stats(const expert_store *s, expert_stats *st) {
    memset(st, 0, sizeof *st);
    st->note = "";
    if (!s) return;
    st->hits = s->hits;
    st->misses = s->misses;
    st->evictions = s->evictions;
    st->reads = s->reads;
    st->bytes_read = s->bytes_read;
    st->read_seconds = s->read_seconds;
    st->budget_bytes = s->budget_bytes;
    st->slot_bytes = s->slot_bytes;
    st->resident_bytes = s->resident_bytes;
    st->peak_bytes = s->peak_bytes;
    st->allocated_bytes = (uint64_t)s->n_alloc * s->slot_bytes;
    st->o_direct = s->fd_direct >= 0 && !atomic_load(&s->direct_refused);
    st->note = s->note;
}

void expert_store_reset_stats(expert_store *s) {
    if (!s) return;
    s->hits = s->misses = s->evictions = s->reads = s->bytes_read = 0;
    s->read_seconds = 0;
    s->peak_bytes = s->resident_bytes;
}
