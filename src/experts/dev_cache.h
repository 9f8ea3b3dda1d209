/* dev_cache.h - the expert tier in a backend's own memory (GPU memory for CUDA): fixed slots
 * under a byte budget, pins, eviction of the expert used least of late (aged use counts) and then
 * least recently, filled from the host expert store. Not the host RAM cache (store.h) and not
 * used by backends that compute on host memory. */
#ifndef MF_EXPERTS_DEV_CACHE_H
#define MF_EXPERTS_DEV_CACHE_H

#include <stdint.h>

#include "backend/backend.h"
#include "experts/store.h"

typedef struct dev_cache dev_cache;

typedef struct dev_cache_stats {
    uint64_t hits, misses, evictions;
    uint64_t bytes_uploaded;
    /* host-read mode: blobs ops read in place from host RAM, over the bus, and their bytes */
    uint64_t host_reads, bytes_from_host;
    double upload_seconds;
    uint64_t budget_bytes, resident_bytes, peak_bytes;
} dev_cache_stats;

/* budget_bytes below one slot is raised to one slot, above every blob cut to every blob. */
mf_status dev_cache_open(dev_cache **out, mf_backend *be, expert_store *host, const mfpack_layout *L,
                         uint64_t budget_bytes, mf_err *err);
void dev_cache_close(dev_cache *c);
/* Makes as many of ids[0..n) of layer resident as fit (best effort, like the store's; an id may
 * repeat). The uploads may still be running when it returns; dev_cache_get fences them. */
mf_status dev_cache_prefetch(dev_cache *c, int layer, const int32_t *ids, int n, mf_err *err);
/* Backend pointer to the blob of (layer, id), pinned until dev_cache_release. Backend ops
 * issued after it see every blob uploaded so far (upload_fence), so also the table's. */
mf_status dev_cache_get(dev_cache *c, int layer, int32_t id, const void **blob, mf_err *err);
void dev_cache_release(dev_cache *c, int layer, int32_t id);
/* Whether (layer, id) is resident. */
int dev_cache_has(const dev_cache *c, int layer, int32_t id);
/* How many blobs the cache can hold at once. */
int dev_cache_slots(const dev_cache *c);
/* Whether the budget holds every expert of the file. */
int dev_cache_holds_all(const dev_cache *c);
/* Loads every expert (when dev_cache_holds_all), layer by layer in parallel reads. */
mf_status dev_cache_preload(dev_cache *c, mf_err *err);
/* Whether every expert of layer is resident now (then its table entries are all set). */
int dev_cache_layer_resident(const dev_cache *c, int layer);
/* Whether every entry of layer's table is set: all resident, or host-read mode. */
int dev_cache_layer_ready(const dev_cache *c, int layer);

/* Host-read mode, for a backend whose ops can read host_alloc memory in place (a GPU reading
 * page-locked RAM over the bus) and a host store whose slots come from host_alloc: when the
 * store's budget holds every expert, reads them all into it and pins them until
 * dev_cache_close; the table then points each expert that has no slot at its host copy, so an op
 * can compute any expert without waiting for an upload. Does nothing (MF_OK) when the store
 * cannot hold them all; fails on a failed read, leaving the mode off. */
mf_status dev_cache_map_host(dev_cache *c, mf_err *err);
int dev_cache_host_mapped(const dev_cache *c);
/* Host-read mode: the experts a step that has run computed in layer (the router's choice, ids
 * [n]): counts hits and misses (read in place from host RAM) as the tables are now (the sends
 * since that step, if any, changed them), and notes the misses. The next dev_cache_send_tables gives each noted expert a slot, in
 * order, when one is free or when it has been used more of late than the least used unpinned
 * slot (whose expert goes back to its host copy); its upload runs on the copy stream, and its
 * entry switches to the slot only once the upload finished (seen by a later send), so nothing
 * waits for it. */
void dev_cache_note_uses(dev_cache *c, int layer, const int32_t *ids, int n);
/* The layer's table in backend memory: [n_experts] backend pointers to resident blobs (NULL
 * for absent experts, or their host copies in host-read mode); a row that changed since it was
 * last read is uploaded first (an op on the compute stream). Fences like dev_cache_get. */
const void *const *dev_cache_table(dev_cache *c, int layer);
/* Host-read mode: gives the noted experts slots, and the slots whose uploads finished their
 * entries. Then uploads every changed row of the tables (before recording or replaying ops
 * that read them) and fences like dev_cache_get. */
void dev_cache_send_tables(dev_cache *c);
void dev_cache_stats_get(const dev_cache *c, dev_cache_stats *st);
void dev_cache_reset_stats(dev_cache *c);

#endif
