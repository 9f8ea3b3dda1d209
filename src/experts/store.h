/* store.h - the expert store: every routed expert blob of a .moeflux file reaches the engine
 * through expert_store_get, served from a RAM cache of fixed slots (LRU, pin counts) or pread,
 * optionally read ahead by a background thread (expert_store_prefetch_async).
 * Not a GPU cache and not a router or predictor: callers say which experts they want.
 * Threads: every call comes from one caller thread; the store's own background thread and I/O
 * pools are the only other threads that touch it. */
#ifndef MF_EXPERTS_STORE_H
#define MF_EXPERTS_STORE_H

#include <stdint.h>

#include "core/err.h"
#include "format/mfpack.h"

typedef struct expert_store expert_store;

typedef struct expert_store_options {
    uint64_t budget_bytes;   /* RAM for cached blobs; below one slot (the largest stride) it is
                                raised to one slot, above all blobs it is cut to all blobs */
    int io_threads;          /* parallel preads in prefetch, and again in async prefetch, which
                                has its own pool (<= 0: 8) */
    int o_direct;            /* nonzero: read through a second fd opened with O_DIRECT; when the
                                filesystem refuses, reads stay buffered and stats.note says why */
    /* Optional slot allocator (for example page-locked memory a GPU copies from at full PCIe
     * speed); it must return 4096-aligned memory or NULL. NULL: posix_memalign / free. */
    void *(*slot_alloc)(void *user, size_t bytes);
    void (*slot_free)(void *user, void *p);
    void *slot_user;
} expert_store_options;

/* Fills the defaults: budget 0 (one slot), 8 I/O threads, buffered reads. */
void expert_store_options_init(expert_store_options *opt);

typedef struct expert_stats {
    /* Counted per use of an expert: a prefetch of (layer, id) followed by its get is one use.
     * A use is a hit when the blob was resident and read at its first get or prefetch, else a
     * miss. An async prefetch is not a use and counts neither: the get (or prefetch) after it
     * is a hit when the background read had finished by then, and a miss (its wait in
     * wait_seconds) when it had to wait; a failed background read is a miss of the call that
     * reports it. */
    uint64_t hits, misses;
    uint64_t evictions;      /* resident blobs dropped to make room */
    uint64_t reads;          /* blobs read from the file (prefetch, async prefetch and get) */
    uint64_t bytes_read;
    double read_seconds;     /* wall time spent reading (a parallel batch counts once; background
                                batches count too, overlapping the caller's time) */
    uint64_t prefetch_async_requests; /* blobs async prefetch gave a slot and queued */
    uint64_t prefetch_async_reads;    /* of those, blobs the background thread read (cancelled
                                         and failed ones are not) */
    uint64_t prefetched_used;/* blobs read by async prefetch that a get used before eviction */
    double wait_seconds;     /* time get and prefetch waited for background reads */
    uint64_t budget_bytes;   /* effective budget: slots x slot_bytes */
    uint64_t slot_bytes;     /* one slot: the largest stride of any layer */
    uint64_t resident_bytes; /* bytes of the blobs held or being read now (their strides) */
    uint64_t peak_bytes;     /* largest resident_bytes since open or the last reset */
    uint64_t allocated_bytes;/* RAM held by slots allocated so far (never above budget_bytes) */
    int o_direct;            /* nonzero while reads go through O_DIRECT */
    const char *note;        /* "" or why O_DIRECT or slot allocation fell back; owned by the store */
} expert_stats;

/* f must stay open while the store lives. opt may be NULL (defaults). */
mf_status expert_store_open(expert_store **out, const mfpack_file *f,
                            const expert_store_options *opt, mf_err *err);
/* Drops queued async reads, waits for the ones in flight, stops the background thread, frees. */
void expert_store_close(expert_store *s);

/* Makes as many of layer's experts ids[0..n) resident as the budget allows, reading the missing
 * ones in parallel (one pread per blob, io_threads at a time) and waiting for those an async
 * prefetch is reading. Pinned blobs, blobs being read and blobs of ids stay; others are evicted
 * least recently used first. Best effort: never fails for lack of budget; fails on a bad
 * layer/id (MF_ERR_ARG) or a failed read (MF_ERR_IO / MF_ERR_FORMAT), its own or a failed async
 * read of one of ids (reported once, then that slot is freed), in which case the blobs that were
 * read stay resident. */
mf_status expert_store_prefetch(expert_store *s, int layer, const int32_t *ids, int n, mf_err *err);

/* Like expert_store_prefetch, but returns as soon as the missing blobs have slots: the store's
 * background thread reads them (io_threads in parallel, on a pool of its own) while the caller
 * computes. Slots are chosen now under the same rules (pinned blobs, blobs being read and blobs
 * of ids are never evicted; best effort within the budget: ids past the room are skipped), and
 * one more: blobs that expert_store_prefetch made resident and whose get has not come yet stay.
 * Resident ids and ids already being read are only made most recent. A failed read is kept in
 * its slot and reported by the next get or prefetch of that expert. Fails only on a bad
 * layer/id (MF_ERR_ARG, nothing queued) or when the thread cannot start (MF_ERR_NOMEM). The
 * background thread and its pool start on the first call. */
mf_status expert_store_prefetch_async(expert_store *s, int layer, const int32_t *ids, int n,
                                      mf_err *err);
/* Drops the async reads that are queued and not yet started (their slots become free); reads in
 * flight finish. */
void expert_store_cancel_async(expert_store *s);

/* Points *blob at the bytes of (layer, id) (its layer's `stride` bytes, 4096-aligned), resident
 * and pinned until expert_store_release; waits if an async prefetch is reading it, reads it now
 * if absent, evicting the least recently used unpinned blob (when every slot is pinned or being
 * read, it waits for a background read to finish). Every get needs its own release (pins count).
 * Fails on a bad layer/id (MF_ERR_ARG), a failed read (MF_ERR_IO, or MF_ERR_FORMAT for a file
 * cut short; a failed async read is reported once, then its slot is freed and the next get reads
 * again), or when every slot is pinned (MF_ERR_NOMEM); the message names the layer and expert. */
mf_status expert_store_get(expert_store *s, int layer, int32_t id, const void **blob, mf_err *err);
/* Whether (layer, id) is resident and read (never waits; a bad layer or id is simply 0). */
int expert_store_is_ready(expert_store *s, int layer, int32_t id);
/* Drops one pin of (layer, id); a blob that is not pinned is left alone. */
void expert_store_release(expert_store *s, int layer, int32_t id);

void expert_store_stats(const expert_store *s, expert_stats *st);
/* Zeroes the counters; peak_bytes restarts from resident_bytes. */
void expert_store_reset_stats(expert_store *s);

#endif
