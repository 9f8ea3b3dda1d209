/* store.c - the expert store: a RAM cache of fixed 4096-aligned slots over the expert blobs of
 * a .moeflux file, LRU eviction of unpinned slots, parallel preads on its own thread pool, and
 * a background thread (with a second pool) that reads slots async prefetch chose.
 * Not safe for several caller threads. Threads: only the caller assigns, pins, evicts and frees
 * slots; the background side only preads into LOADING slots and marks them READY or FAILED.
 * `mu` guards slot states, the LRU, the queue and the counters; no pread runs under it. Slot
 * index and pins are written only by the caller, so release reads them without the lock. */
#include "experts/store.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/threadpool.h"

#define STORE_DEFAULT_IO_THREADS 8
#define STORE_DIRECT_NOTE "O_DIRECT reads refused by the filesystem; reads are buffered"

enum {
    SLOT_EMPTY,              /* free, or allocated and not holding a blob */
    SLOT_LOADING,            /* holds (layer, id) whose read is queued or running */
    SLOT_READY,              /* holds the bytes of (layer, id) */
    SLOT_FAILED              /* its async read failed; slot_fail says how; no bytes */
};

/* One blob read, prepared by the caller thread, run by a pool worker. */
typedef struct read_job {
    int slot, layer, id;
    unsigned char *buf;      /* the slot's buffer (slot_bytes, 4096-aligned) */
    int err_no;              /* errno of a failed pread, 0 otherwise */
    int eof;                 /* the file ended before the blob did */
    uint64_t got;            /* bytes read */
} read_job;

struct expert_store {
    const mfpack_file *f;    /* borrowed */
    int fd;                  /* buffered reads: f->fd, borrowed */
    int fd_direct;           /* O_DIRECT reads, owned; -1 when none; open until close (a reader
                                may be using it when another finds it refused) */
    atomic_int direct_refused; /* set by a reader whose O_DIRECT pread got EINVAL */

    pthread_mutex_t mu;      /* guards everything below that is not fixed at open */
    pthread_cond_t changed;  /* a LOADING slot became READY or FAILED */
    pthread_cond_t work;     /* the queue gained jobs, or bg_stop was set */

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
    unsigned char *slot_state;   /* [n_slots] SLOT_* */
    unsigned char *slot_async;   /* [n_slots] 1: read by async prefetch, no get has used it yet */
    read_job *slot_fail;     /* [n_slots] the failed read of a FAILED slot */
    int *free_slots;         /* [n_slots] stack of allocated empty slots */
    expert_store_options opt;/* as given at open (the slot allocator) */
    int n_free;
    int lru_head, lru_tail;
    uint64_t epoch;          /* prefetch calls so far */

    mf_pool *pool;           /* io_threads, owned, used by the caller (pool_for is not reentrant) */
    read_job *jobs;          /* [n_slots] reads of one prefetch */

    /* async prefetch: jobs queue here; the background thread takes them all as one batch */
    int io_threads;
    int q_cap;               /* n_slots at open: LOADING slots, hence queued jobs, never exceed it */
    read_job *queue;         /* [q_cap] ring of jobs not yet started */
    int q_head, q_len;
    read_job *batch;         /* [q_cap] the batch being read; background side only */
    int n_loading;           /* async LOADING slots (queued or being read) */
    mf_pool *async_pool;     /* io_threads, owned, used by the background thread; NULL until
                                the first async prefetch */
    pthread_t bg;
    int bg_started, bg_stop;

    uint64_t budget_bytes;
    uint64_t hits, misses, evictions, reads, bytes_read;
    uint64_t prefetch_async_requests, prefetch_async_reads, prefetched_used;
    double read_seconds, wait_seconds;
    uint64_t resident_bytes, peak_bytes;
    char note[256];          /* written by the caller thread only */
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
    s->slot_state[i] = SLOT_EMPTY;
    s->slot_async[i] = 0;
}

/* Empties a filled slot and puts it on the free stack. */
static void slot_free(expert_store *s, int i) {
    slot_clear(s, i);
    s->free_slots[s->n_free++] = i;
}

/* An empty slot: a freed one, a newly allocated one, or the least recently used filled slot
 * that is unpinned, not being read, not claimed by prefetch call `keep_epoch` (0: none) and,
 * with keep_pending, not waiting for the get of a prefetch; a FAILED slot is reused without
 * counting an eviction. Returns -1 when every slot is pinned, loading or kept, -2 when the
 * first slot cannot be allocated. */
static int slot_take(expert_store *s, uint64_t keep_epoch, int keep_pending) {
    if (s->n_free > 0) return s->free_slots[--s->n_free];
    if (s->n_alloc < s->n_slots) {
        void *buf = NULL;
        if (s->opt.slot_alloc) buf = s->opt.slot_alloc(s->opt.slot_user, (size_t)s->slot_bytes);
        else if (posix_memalign(&buf, MFPACK_ALIGN, (size_t)s->slot_bytes)) buf = NULL;
        if (buf) {
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
        if (s->slot_pins[i] > 0 || s->slot_state[i] == SLOT_LOADING ||
            (keep_epoch && s->slot_epoch[i] == keep_epoch) || (keep_pending && s->slot_pending[i]))
            continue;
        if (s->slot_state[i] == SLOT_READY) s->evictions++;
        slot_clear(s, i);
        return i;
    }
    return -1;
}

/* Gives empty slot i to (layer, id), most recently used, in `state` (LOADING until read). */
static void slot_fill(expert_store *s, int i, int layer, int id, int state) {
    int key = key_of(s, layer, id);
    s->slot_key[i] = key;
    s->index[key] = i;
    s->slot_pins[i] = 0;
    s->slot_pending[i] = 0;
    s->slot_state[i] = (unsigned char)state;
    s->slot_async[i] = 0;
    lru_push_head(s, i);
    s->resident_bytes += s->layer_stride[layer];
    if (s->resident_bytes > s->peak_bytes) s->peak_bytes = s->resident_bytes;
}

/* Waits (mu held) until slot i is no longer LOADING, timing the wait. Only the caller thread
 * reassigns slots, so i keeps its blob meanwhile. */
static void slot_wait(expert_store *s, int i) {
    if (s->slot_state[i] != SLOT_LOADING) return;
    double t0 = now_seconds();
    while (s->slot_state[i] == SLOT_LOADING) pthread_cond_wait(&s->changed, &s->mu);
    s->wait_seconds += now_seconds() - t0;
}

/* ---- reads ---- */

/* Reads the blob of job->(layer, id) into job->buf: exactly `stride` bytes at
 * offset + id * stride, retrying on EINTR and short reads. Touches only fields fixed at open,
 * the job and direct_refused: safe on any thread without mu. */
static void blob_read(expert_store *s, read_job *job) {
    uint64_t bytes = s->layer_stride[job->layer];
    uint64_t off = s->layer_off[job->layer] + (uint64_t)job->id * bytes;
    unsigned char *buf = job->buf;
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

/* ---- the background thread ---- */

/* Pool worker of the background thread: reads its share of the batch, marking each slot as
 * soon as its read ends so a waiting get need not wait for the whole batch. */
static void batch_range(void *ctx, int64_t begin, int64_t end, int thread) {
    (void)thread;
    expert_store *s = ctx;
    for (int64_t j = begin; j < end; j++) {
        read_job *job = &s->batch[j];
        blob_read(s, job);
        pthread_mutex_lock(&s->mu);
        s->n_loading--;
        if (job_failed(job)) {
            s->slot_state[job->slot] = SLOT_FAILED;
            s->slot_fail[job->slot] = *job;
        } else {
            s->slot_state[job->slot] = SLOT_READY;
            s->slot_async[job->slot] = 1;
            s->reads++;
            s->prefetch_async_reads++;
            s->bytes_read += job->got;
        }
        pthread_cond_broadcast(&s->changed);
        pthread_mutex_unlock(&s->mu);
    }
}

static void *async_main(void *arg) {
    expert_store *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->bg_stop && s->q_len == 0) pthread_cond_wait(&s->work, &s->mu);
        if (s->bg_stop) break;
        int n = s->q_len;
        for (int j = 0; j < n; j++) s->batch[j] = s->queue[(s->q_head + j) % s->q_cap];
        s->q_head = (s->q_head + n) % s->q_cap;
        s->q_len = 0;
        pthread_mutex_unlock(&s->mu);
        double t0 = now_seconds();
        pool_for(s->async_pool, n, 1, batch_range, s);
        double dt = now_seconds() - t0;
        pthread_mutex_lock(&s->mu);
        s->read_seconds += dt;
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Starts the background thread and its pool on first use. Caller thread, mu not held. */
static mf_status async_start(expert_store *s, mf_err *err) {
    if (s->bg_started) return MF_OK;
    if (!s->async_pool) s->async_pool = pool_create(s->io_threads);
    if (!s->async_pool)
        return err_set(err, MF_ERR_NOMEM, "expert store: out of memory for the prefetch pool");
    int rc = pthread_create(&s->bg, NULL, async_main, s);
    if (rc)
        return err_set(err, MF_ERR_NOMEM, "expert store: cannot start the prefetch thread: %s",
                       strerror(rc));
    s->bg_started = 1;
    return MF_OK;
}

/* Drops queued jobs (mu held): their slots become free. */
static void async_cancel_locked(expert_store *s) {
    for (int j = 0; j < s->q_len; j++) slot_free(s, s->queue[(s->q_head + j) % s->q_cap].slot);
    s->n_loading -= s->q_len;
    s->q_len = 0;
}

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
    if (s->bg_started) { /* reads in flight finish; the thread sees bg_stop once they have */
        pthread_mutex_lock(&s->mu);
        async_cancel_locked(s);
        s->bg_stop = 1;
        pthread_cond_signal(&s->work);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->bg, NULL);
    }
    pool_destroy(s->async_pool);
    pool_destroy(s->pool);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->changed);
    pthread_cond_destroy(&s->work);
    if (s->fd_direct >= 0) close(s->fd_direct);
    for (int i = 0; i < s->n_alloc; i++) {
        if (s->opt.slot_free) s->opt.slot_free(s->opt.slot_user, s->slot_buf[i]);
        else free(s->slot_buf[i]);
    }
    free(s->slot_buf);
    free(s->slot_key);
    free(s->slot_pins);
    free(s->slot_prev);
    free(s->slot_next);
    free(s->slot_epoch);
    free(s->slot_pending);
    free(s->slot_state);
    free(s->slot_async);
    free(s->slot_fail);
    free(s->free_slots);
    free(s->jobs);
    free(s->queue);
    free(s->batch);
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
    expert_store_options saved_opt = *opt;
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
    s->opt = saved_opt;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->changed, NULL);
    pthread_cond_init(&s->work, NULL);
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
    s->slot_state = calloc(ns, sizeof *s->slot_state);
    s->slot_async = calloc(ns, sizeof *s->slot_async);
    s->slot_fail = calloc(ns, sizeof *s->slot_fail);
    s->free_slots = malloc(ns * sizeof *s->free_slots);
    s->jobs = calloc(ns, sizeof *s->jobs);
    s->q_cap = s->n_slots;
    s->queue = calloc(ns, sizeof *s->queue);
    s->batch = calloc(ns, sizeof *s->batch);
    s->io_threads = opt->io_threads > 0 ? opt->io_threads : STORE_DEFAULT_IO_THREADS;
    s->pool = pool_create(s->io_threads);
    if (!s->layer_off || !s->layer_stride || !s->layer_count || !s->index || !s->slot_buf ||
        !s->slot_key || !s->slot_pins || !s->slot_prev || !s->slot_next || !s->slot_epoch ||
        !s->slot_pending || !s->slot_state || !s->slot_async || !s->slot_fail || !s->free_slots ||
        !s->jobs || !s->queue || !s->batch || !s->pool) {
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
    pthread_mutex_lock(&s->mu);
    uint64_t epoch = ++s->epoch;
    /* Resident ids first, so that making room below never evicts one of them. A blob still
     * being read by async prefetch is a miss (waited for below); a failed one is reported. */
    int n_wait = 0;
    for (int k = 0; k < n; k++) {
        int i = s->index[key_of(s, layer, ids[k])];
        if (i < 0 || s->slot_epoch[i] == epoch) continue;
        s->slot_epoch[i] = epoch;
        lru_touch(s, i);
        n_wait += s->slot_state[i] == SLOT_LOADING;
        if (s->slot_pending[i]) continue;
        if (s->slot_state[i] == SLOT_READY) s->hits++;
        else s->misses++;
        if (s->slot_state[i] != SLOT_FAILED) s->slot_pending[i] = 1;
    }
    int n_jobs = 0;
    for (int k = 0; k < n; k++) {
        if (s->index[key_of(s, layer, ids[k])] >= 0) continue; /* resident or a duplicate */
        int i = slot_take(s, epoch, 0);
        if (i == -2) {
            pthread_mutex_unlock(&s->mu);
            return err_set(err, MF_ERR_NOMEM, "expert store: out of memory for one slot");
        }
        if (i < 0) break; /* the budget is full of pinned, loading and this call's blobs */
        slot_fill(s, i, layer, ids[k], SLOT_LOADING);
        s->slot_epoch[i] = epoch;
        s->slot_pending[i] = 1;
        s->misses++;
        s->jobs[n_jobs++] = (read_job){.slot = i, .layer = layer, .id = ids[k], .buf = s->slot_buf[i]};
    }
    mf_status st = MF_OK;
    if (n_jobs > 0) {
        pthread_mutex_unlock(&s->mu);
        double t0 = now_seconds();
        pool_for(s->pool, n_jobs, 1, read_range, s);
        double dt = now_seconds() - t0;
        pthread_mutex_lock(&s->mu);
        s->read_seconds += dt;
        for (int j = 0; j < n_jobs; j++) {
            const read_job *job = &s->jobs[j];
            if (job_failed(job)) {
                if (st == MF_OK) st = job_error(s, job, err);
                slot_free(s, job->slot);
                continue;
            }
            s->slot_state[job->slot] = SLOT_READY;
            s->reads++;
            s->bytes_read += job->got;
        }
    }
    /* Blobs of ids that async prefetch is reading: wait; failed ones are reported and freed. */
    for (int k = 0; k < n && n_wait > 0; k++) {
        int i = s->index[key_of(s, layer, ids[k])];
        if (i >= 0) slot_wait(s, i);
    }
    for (int k = 0; k < n; k++) {
        int i = s->index[key_of(s, layer, ids[k])];
        if (i < 0 || s->slot_state[i] != SLOT_FAILED) continue;
        if (st == MF_OK) st = job_error(s, &s->slot_fail[i], err);
        slot_free(s, i);
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

mf_status expert_store_prefetch_async(expert_store *s, int layer, const int32_t *ids, int n,
                                      mf_err *err) {
    if (!s || n < 0 || (n > 0 && !ids))
        return err_set(err, MF_ERR_ARG, "expert_store_prefetch_async: bad argument");
    for (int k = 0; k < n; k++) {
        mf_status st = check_id(s, layer, ids[k], err);
        if (st != MF_OK) return st;
    }
    if (n == 0) return MF_OK;
    mf_status st = async_start(s, err);
    if (st != MF_OK) return st;
    pthread_mutex_lock(&s->mu);
    uint64_t epoch = ++s->epoch;
    for (int k = 0; k < n; k++) { /* resident, loading or failed: kept, made most recent */
        int i = s->index[key_of(s, layer, ids[k])];
        if (i < 0 || s->slot_epoch[i] == epoch) continue;
        s->slot_epoch[i] = epoch;
        lru_touch(s, i);
    }
    int queued = 0;
    for (int k = 0; k < n; k++) {
        if (s->index[key_of(s, layer, ids[k])] >= 0) continue;
        int i = slot_take(s, epoch, 1); /* a guess never evicts what a prefetch fetched for a get */
        if (i == -2) {
            st = err_set(err, MF_ERR_NOMEM, "expert store: out of memory for one slot");
            break;
        }
        if (i < 0) break;
        slot_fill(s, i, layer, ids[k], SLOT_LOADING);
        s->slot_epoch[i] = epoch;
        s->queue[(s->q_head + s->q_len++) % s->q_cap] =
            (read_job){.slot = i, .layer = layer, .id = ids[k], .buf = s->slot_buf[i]};
        s->n_loading++;
        s->prefetch_async_requests++;
        queued++;
    }
    if (queued) pthread_cond_signal(&s->work);
    pthread_mutex_unlock(&s->mu);
    return st;
}

void expert_store_cancel_async(expert_store *s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    async_cancel_locked(s);
    pthread_mutex_unlock(&s->mu);
}

mf_status expert_store_get(expert_store *s, int layer, int32_t id, const void **blob, mf_err *err) {
    if (!s || !blob) return err_set(err, MF_ERR_ARG, "expert_store_get: NULL argument");
    *blob = NULL;
    mf_status st = check_id(s, layer, id, err);
    if (st != MF_OK) return st;
    pthread_mutex_lock(&s->mu);
    int i = s->index[key_of(s, layer, id)];
    if (i >= 0) {
        int waited = s->slot_state[i] == SLOT_LOADING;
        slot_wait(s, i);
        if (s->slot_state[i] == SLOT_FAILED) { /* an async read failed: reported once */
            s->misses++;
            st = job_error(s, &s->slot_fail[i], err);
            slot_free(s, i);
            pthread_mutex_unlock(&s->mu);
            return st;
        }
        if (s->slot_pending[i]) s->slot_pending[i] = 0; /* the prefetch counted this use */
        else if (waited) s->misses++;
        else s->hits++;
        if (s->slot_async[i]) {
            s->slot_async[i] = 0;
            s->prefetched_used++;
        }
        lru_touch(s, i);
        s->slot_pins[i]++;
        *blob = s->slot_buf[i];
        pthread_mutex_unlock(&s->mu);
        return MF_OK;
    }
    for (;;) { /* no room while background reads hold slots: wait for one to end */
        i = slot_take(s, 0, 0);
        if (i != -1 || s->n_loading == 0) break;
        double t0 = now_seconds();
        pthread_cond_wait(&s->changed, &s->mu);
        s->wait_seconds += now_seconds() - t0;
    }
    if (i < 0) {
        pthread_mutex_unlock(&s->mu);
        if (i == -2)
            return err_set(err, MF_ERR_NOMEM, "expert store: out of memory for layer %d expert %d",
                           layer, (int)id);
        return err_set(err, MF_ERR_NOMEM,
                       "expert store: cannot load layer %d expert %d: all %d slots (%llu bytes) "
                       "are pinned",
                       layer, (int)id, s->n_slots, (unsigned long long)s->budget_bytes);
    }
    s->misses++;
    slot_fill(s, i, layer, id, SLOT_LOADING);
    read_job job = {.slot = i, .layer = layer, .id = id, .buf = s->slot_buf[i]};
    pthread_mutex_unlock(&s->mu);
    double t0 = now_seconds();
    blob_read(s, &job);
    double dt = now_seconds() - t0;
    pthread_mutex_lock(&s->mu);
    s->read_seconds += dt;
    if (job_failed(&job)) {
        st = job_error(s, &job, err);
        slot_free(s, i);
        pthread_mutex_unlock(&s->mu);
        return st;
    }
    s->slot_state[i] = SLOT_READY;
    s->reads++;
    s->bytes_read += job.got;
    s->slot_pins[i] = 1;
    *blob = s->slot_buf[i];
    pthread_mutex_unlock(&s->mu);
    return MF_OK;
}

/* Unlocked: index and pins are written by the caller thread only (see the file comment). */
int expert_store_is_ready(expert_store *s, int layer, int32_t id) {
    if (layer < 0 || layer >= s->n_layers || id < 0 || id >= s->layer_count[layer]) return 0;
    pthread_mutex_lock(&s->mu);
    int i = s->index[key_of(s, layer, id)];
    int ready = i >= 0 && s->slot_state[i] == SLOT_READY;
    pthread_mutex_unlock(&s->mu);
    return ready;
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
    pthread_mutex_t *mu = (pthread_mutex_t *)&s->mu; /* the counters are not ours to read bare */
    pthread_mutex_lock(mu);
    st->hits = s->hits;
    st->misses = s->misses;
    st->evictions = s->evictions;
    st->reads = s->reads;
    st->bytes_read = s->bytes_read;
    st->read_seconds = s->read_seconds;
    st->prefetch_async_requests = s->prefetch_async_requests;
    st->prefetch_async_reads = s->prefetch_async_reads;
    st->prefetched_used = s->prefetched_used;
    st->wait_seconds = s->wait_seconds;
    st->budget_bytes = s->budget_bytes;
    st->slot_bytes = s->slot_bytes;
    st->resident_bytes = s->resident_bytes;
    st->peak_bytes = s->peak_bytes;
    st->allocated_bytes = (uint64_t)s->n_alloc * s->slot_bytes;
    pthread_mutex_unlock(mu);
    int refused = atomic_load(&s->direct_refused);
    st->o_direct = s->fd_direct >= 0 && !refused;
    st->note = s->note[0] ? s->note : refused ? STORE_DIRECT_NOTE : "";
}

void expert_store_reset_stats(expert_store *s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->hits = s->misses = s->evictions = s->reads = s->bytes_read = 0;
    s->prefetch_async_requests = s->prefetch_async_reads = s->prefetched_used = 0;
    s->read_seconds = s->wait_seconds = 0;
    s->peak_bytes = s->resident_bytes;
    pthread_mutex_unlock(&s->mu);
}
