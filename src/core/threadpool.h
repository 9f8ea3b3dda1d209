/* threadpool.h - a fixed pool of worker threads that split index ranges (parallel for).
 * Not a task queue: one job at a time, and the calling thread takes part in it. */
#ifndef MF_CORE_THREADPOOL_H
#define MF_CORE_THREADPOOL_H

#include <stdint.h>

typedef struct mf_pool mf_pool;

/* Runs for indices [begin, end) on thread `thread` (0 = the caller). */
typedef void (*pool_fn)(void *ctx, int64_t begin, int64_t end, int thread);

/* n_threads counts the caller; 1 gives a pool that runs everything inline.
 * n_threads <= 0 picks the number of online CPUs. Returns NULL when out of memory. */
mf_pool *pool_create(int n_threads);
void pool_destroy(mf_pool *p);
int pool_size(const mf_pool *p);
/* Splits [0, n) into chunks of at least `grain` indices over the threads and waits for all.
 * A NULL pool runs fn(ctx, 0, n, 0) inline. Not reentrant: fn must not call pool_for on the
 * same pool. */
void pool_for(mf_pool *p, int64_t n, int64_t grain, pool_fn fn, void *ctx);

#endif
