/* store.h - the expert store: every routed expert blob of a .moeflux file reaches the engine
 * through expert_store_get, served from a RAM cache of fixed slots (LRU, pin counts) or pread.
 * Not a GPU cache and not a router or predictor: callers say which experts they want. */
#ifndef MF_EXPERTS_STORE_H
#define MF_EXPERTS_STORE_H

#include <stdint.h>

#include "core/err.h"
#include "format/mfpack.h"

typedef struct expert_store expert_store;

typedef struct expert_store_options {
    uint64_t budget_bytes;   /* RAM for cached blobs; below one slot (the largest stride) it is
                                raised to one slot, above all blobs it is cut to all blobs */
    int io_threads;          /* parallel preads in prefetch (<= 0: 8) */
    int o_direct;            /* nonzero: read through a second fd opened with O_DIRECT; when the
                                filesystem refuses, reads stay buffered and stats.note says why */
} expert_store_options;

/* Fills the defaults: budget 0 (one slot), 8 I/O threads, buffered reads. */
void expert_store_options_init(expert_store_options *opt);

typedef struct expert_stats {
    /* Counted per use of an expert: a prefetch of (layer, id) followed by its get is one use.
     * A use is a hit when the blob was resident at its first request, else a miss. */
    uint64_t hits, misses;
    uint64_t evictions;      /* resident blobs dropped to make room */
    uint64_t reads;          /* blobs read from the file (prefetch and get) */
    uint64_t bytes_read;
    double read_seconds;     /* wall time spent reading (a parallel batch counts once) */
    uint64_t budget_bytes;   /* effective budget: slots x slot_bytes */
    uint64_t slot_bytes;     /* one slot: the largest stride of any layer */
    uint64_t resident_bytes; /* bytes of the blobs held now (their strides) */
    uint64_t peak_bytes;     /* largest resident_bytes since open or the last reset */
    uint64_t allocated_bytes;/* RAM held by slots allocated so far (never above budget_bytes) */
    int o_direct;            /* nonzero while reads go through O_DIRECT */
    const char *note;        /* "" or why O_DIRECT or slot allocation fell back; owned by the store */
} expert_stats;

/* f must stay open while the store lives. opt may be NULL (defaults). */
mf_status expert_store_open(expert_store **out, const mfpack_file *f,
                            const expert_store_options *opt, mf_err *err);
void expert_store_close(expert_store *s);

/* Makes as many of layer's experts ids[0..n) resident as the budget allows, reading the missing
 * ones in parallel (one pread per blob, io_threads at a time). Pinned blobs and blobs of ids
 * stay; others are evicted least recently used first. Best effort: never fails for lack of
 * budget; fails on a bad layer/id (MF_ERR_ARG) or a failed read (MF_ERR_IO / MF_ERR_FORMAT),
 * in which case the blobs that were read stay resident. */
mf_status expert_store_prefetch(expert_store *s, int layer, const int32_t *ids, int n, mf_err *err);

/* Points *blob at the bytes of (layer, id) (its layer's `stride` bytes, 4096-aligned), resident
 * and pinned until expert_store_release; reads it now if absent, evicting the least recently used
 * unpinned blob. Every get needs its own release (pins count). Fails on a bad layer/id
 * (MF_ERR_ARG), a failed read (MF_ERR_IO, or MF_ERR_FORMAT for a file cut short), or when every
 * slot is pinned (MF_ERR_NOMEM); the message names the layer and expert. */
mf_status expert_store_get(expert_store *s, int layer, int32_t id, const void **blob, mf_err *err);
/* Drops one pin of (layer, id); a blob that is not pinned is left alone. */
void expert_store_release(expert_store *s, int layer, int32_t id);

void expert_store_stats(const expert_store *s, expert_stats *st);
/* Zeroes the counters; peak_bytes restarts from resident_bytes. */
void expert_store_reset_stats(expert_store *s);

#endif
