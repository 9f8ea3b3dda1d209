/* cuda_backend.cu - the CUDA backend: device choice, a compute stream and a copy stream, memory (alloc, page-locked host
 * memory, copies direct or through pinned staging, scratch), the sticky error and the ops table.
 * Not the kernels (one .cu per op family). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_internal.cuh"

int cb_check(cuda_backend *c, cudaError_t e, const char *what) {
    if (e == cudaSuccess) return 0;
    if (!c->failed) {
        c->failed = 1;
        snprintf(c->err, sizeof c->err, "CUDA %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
    }
    return 1;
}

void cb_fail(cuda_backend *c, const char *fmt, ...) {
    if (c->failed) return;
    c->failed = 1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
}

extern "C" const char *cuda_backend_last_error(mf_backend *b) {
    if (!b || strcmp(b->ops->name, "cuda")) return NULL;
    cuda_backend *c = cb_of(b);
    return c->failed ? c->err : NULL;
}

static void cb_destroy(mf_backend *b) {
    if (!b) return;
    cuda_backend *c = cb_of(b);
    cudaSetDevice(c->device);
    if (c->main_stream) cudaStreamSynchronize(c->main_stream);
    if (c->side_stream) cudaStreamSynchronize(c->side_stream);
    if (c->copy_stream) cudaStreamSynchronize(c->copy_stream);
    cudaFree(c->scratch);
    cuda_sample_free(c);
    cudaFree(c->arg_v);
    cudaFree(c->arg_i);
    cudaFree(c->arg_done);
    cudaFree(c->att_done);
    cudaFree(c->moe_act);
    free(c->pinned);
    pthread_mutex_destroy(&c->pinned_lock);
    for (int i = 0; i < CB_STAGE_SLOTS; i++) {
        if (c->stage[i]) cudaFreeHost(c->stage[i]);
        if (c->stage_done[i]) cudaEventDestroy(c->stage_done[i]);
    }
    for (int i = 0; i < CB_UP_RING; i++)
        if (c->up_done[i]) cudaEventDestroy(c->up_done[i]);
    if (c->compute_mark) cudaEventDestroy(c->compute_mark);
    if (c->fork_mark) cudaEventDestroy(c->fork_mark);
    if (c->side_done) cudaEventDestroy(c->side_done);
    if (c->copy_stream) cudaStreamDestroy(c->copy_stream);
    if (c->side_stream) cudaStreamDestroy(c->side_stream);
    if (c->main_stream) cudaStreamDestroy(c->main_stream);
    cudaGetLastError();
    free(c);
}

/* Grows *buf [*have floats] to need floats (contents not kept). */
static mf_status cb_grow(cuda_backend *c, float **buf, size_t *have, size_t need) {
    if (need <= *have) return MF_OK;
    if (c->failed) return MF_ERR_INTERNAL;
    if (cb_check(c, cudaStreamSynchronize(c->stream), "reserve")) return MF_ERR_INTERNAL;
    float *p = NULL;
    if (cudaMalloc((void **)&p, need * sizeof(float)) != cudaSuccess) {
        cudaGetLastError(); /* out of memory is an answer, not a sticky failure */
        return MF_ERR_NOMEM;
    }
    cudaFree(*buf);
    *buf = p;
    *have = need;
    return MF_OK;
}

static mf_status cb_reserve(mf_backend *b, const mf_backend_limits *lim) {
    cuda_backend *c = cb_of(b);
    mf_status st = cb_grow(c, &c->scratch, &c->scratch_floats, cuda_attention_scratch_floats(lim));
    if (st == MF_OK) st = cb_grow(c, &c->moe_act, &c->moe_act_floats, cuda_moe_act_floats(lim));
    return st;
}

/* ---- memory ---- */

static void *cb_alloc(mf_backend *b, size_t bytes) {
    cuda_backend *c = cb_of(b);
    if (c->failed) return NULL;
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 256) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    if (cb_check(c, cudaMemsetAsync(p, 0, bytes, c->stream), "memset")) {
        cudaFree(p);
        return NULL;
    }
    return p;
}

static void cb_free(mf_backend *b, void *p) {
    if (!p) return;
    cuda_backend *c = cb_of(b);
    cb_check(c, cudaFree(p), "free"); /* waits for the work that may still read p */
}

/* Index of the first registered range whose begin is above a (pinned_lock held). */
static int cb_pinned_after(const cuda_backend *c, uintptr_t a) {
    int lo = 0, hi = c->n_pinned;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (c->pinned[mid].begin <= a) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Whether [p, p + bytes) lies inside one host_alloc range. */
static int cb_is_pinned(cuda_backend *c, const void *p, size_t bytes) {
    uintptr_t a = (uintptr_t)p;
    pthread_mutex_lock(&c->pinned_lock);
    int i = cb_pinned_after(c, a) - 1;
    int in = i >= 0 && a + bytes <= c->pinned[i].end;
    pthread_mutex_unlock(&c->pinned_lock);
    return in;
}

/* Page-locked, portable, zeroed host memory, remembered so that uploads from it go direct. */
static void *cb_host_alloc(mf_backend *b, size_t bytes) {
    cuda_backend *c = cb_of(b);
    if (c->failed) return NULL;
    void *p = NULL;
    if (cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
        cudaGetLastError(); /* out of page-locked memory is an answer, not a sticky failure */
        return NULL;
    }
    memset(p, 0, bytes);
    pthread_mutex_lock(&c->pinned_lock);
    int ok = 1;
    if (c->n_pinned == c->cap_pinned) {
        int cap = c->cap_pinned ? 2 * c->cap_pinned : 16;
        void *np = realloc(c->pinned, sizeof *c->pinned * (size_t)cap);
        if (np) c->pinned = (cuda_backend::cb_host_range *)np, c->cap_pinned = cap;
        else ok = 0;
    }
    if (ok) {
        int i = cb_pinned_after(c, (uintptr_t)p);
        memmove(c->pinned + i + 1, c->pinned + i, sizeof *c->pinned * (size_t)(c->n_pinned - i));
        c->pinned[i].begin = (uintptr_t)p;
        c->pinned[i].end = (uintptr_t)p + bytes;
        c->n_pinned++;
    }
    pthread_mutex_unlock(&c->pinned_lock);
    if (!ok) {
        cudaFreeHost(p);
        return NULL;
    }
    return p;
}

static void cb_host_free(mf_backend *b, void *p) {
    if (!p) return;
    cuda_backend *c = cb_of(b);
    pthread_mutex_lock(&c->pinned_lock);
    int i = cb_pinned_after(c, (uintptr_t)p) - 1;
    if (i >= 0 && c->pinned[i].begin == (uintptr_t)p) {
        memmove(c->pinned + i, c->pinned + i + 1, sizeof *c->pinned * (size_t)(c->n_pinned - i - 1));
        c->n_pinned--;
    }
    pthread_mutex_unlock(&c->pinned_lock);
    cb_check(c, cudaFreeHost(p), "host_free"); /* waits for copies that may still read p */
}

/* Copy semantics: src may be reused as soon as this returns. A source in page-locked memory
 * (host_alloc's, or any other when large) is copied directly at the bus's speed, then the stream
 * is synchronized (so the call also waits for the work queued before it). Any other source goes
 * through pinned staging buffers (memcpy, then an async DMA on the stream), so small uploads do
 * not wait for the device; a staging buffer is reused once its previous DMA has finished. */
/* Whether src is page-locked, so a DMA may read it directly. */
static int cb_src_direct(cuda_backend *c, const void *src, size_t bytes) {
    int direct = cb_is_pinned(c, src, bytes);
    if (!direct && bytes > 2 * CB_STAGE_BYTES) {
        cudaPointerAttributes a;
        direct = cudaPointerGetAttributes(&a, src) == cudaSuccess && a.type == cudaMemoryTypeHost;
        cudaGetLastError();
    }
    return direct;
}

static void cb_upload_fence(mf_backend *b);

static void cb_upload(mf_backend *b, void *dst, const void *src, size_t bytes) {
    cuda_backend *c = cb_of(b);
    if (c->failed || !bytes) return;
    if (cb_src_direct(c, src, bytes)) {
        cb_upload_fence(b); /* it waits anyway: order it after the async uploads too */
        if (!cb_check(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream), "upload"))
            cb_check(c, cudaStreamSynchronize(c->stream), "upload");
        return;
    }
    for (size_t done = 0; done < bytes;) {
        size_t n = bytes - done < CB_STAGE_BYTES ? bytes - done : CB_STAGE_BYTES;
        int s = c->stage_next;
        c->stage_next = (s + 1) % CB_STAGE_SLOTS;
        if (c->stage_busy[s] && cb_check(c, cudaEventSynchronize(c->stage_done[s]), "upload")) return;
        memcpy(c->stage[s], (const char *)src + done, n);
        if (cb_check(c, cudaMemcpyAsync((char *)dst + done, c->stage[s], n, cudaMemcpyHostToDevice, c->stream),
                     "upload") ||
            cb_check(c, cudaEventRecord(c->stage_done[s], c->stream), "upload"))
            return;
        c->stage_busy[s] = 1;
        done += n;
    }
}

/* A direct copy on copy_stream after the work issued on stream so far (dst may be a slot that
 * work still reads); a pageable source goes through upload (staging on stream), done at once. */
static uint64_t cb_upload_async(mf_backend *b, void *dst, const void *src, size_t bytes) {
    cuda_backend *c = cb_of(b);
    if (c->failed || !bytes) return 0;
    if (!cb_src_direct(c, src, bytes)) {
        cb_upload(b, dst, src, bytes);
        return 0;
    }
    uint64_t t = c->up_issued + 1;
    cudaEvent_t ev = c->up_done[t % CB_UP_RING];
    if (t > CB_UP_RING && t - CB_UP_RING > c->up_floor) {
        /* the ring wrapped onto a copy still in flight: wait for it (copies finish in order) */
        if (cb_check(c, cudaEventSynchronize(ev), "upload_async")) return 0;
        c->up_floor = t - CB_UP_RING;
    }
    if (cb_check(c, cudaEventRecord(c->compute_mark, c->stream), "upload_async") ||
        cb_check(c, cudaStreamWaitEvent(c->copy_stream, c->compute_mark, 0), "upload_async") ||
        cb_check(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->copy_stream), "upload_async") ||
        cb_check(c, cudaEventRecord(ev, c->copy_stream), "upload_async"))
        return 0;
    c->up_issued = t;
    return t;
}

static int cb_upload_done(mf_backend *b, uint64_t ticket) {
    cuda_backend *c = cb_of(b);
    if (c->failed || ticket <= c->up_floor || ticket > c->up_issued) return 1;
    cudaError_t e = cudaEventQuery(c->up_done[ticket % CB_UP_RING]);
    if (e == cudaErrorNotReady) {
        cudaGetLastError();
        return 0;
    }
    if (cb_check(c, e, "upload_done")) return 1;
    c->up_floor = ticket; /* copy_stream runs in order: every earlier ticket is done too */
    return 1;
}

static void cb_upload_fence(mf_backend *b) {
    cuda_backend *c = cb_of(b);
    if (c->failed || c->up_fenced >= c->up_issued) return;
    if (c->up_issued > c->up_floor)
        cb_check(c, cudaStreamWaitEvent(c->stream, c->up_done[c->up_issued % CB_UP_RING], 0), "upload_fence");
    c->up_fenced = c->up_issued;
}

static void cb_download(mf_backend *b, void *dst, const void *src, size_t bytes) {
    cuda_backend *c = cb_of(b);
    if (!bytes) return;
    if (!c->failed && !cb_check(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream), "download"))
        cb_check(c, cudaStreamSynchronize(c->stream), "download");
    if (c->failed) memset(dst, 0xff, bytes); /* NaN floats, -1 ids: never stale values */
}

static void cb_copy(mf_backend *b, void *dst, const void *src, size_t bytes) {
    cuda_backend *c = cb_of(b);
    if (c->failed || !bytes || dst == src) return;
    cb_check(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c->stream), "copy");
}

static void cb_sync(mf_backend *b) {
    cuda_backend *c = cb_of(b);
    cb_upload_fence(b);
    if (!c->failed) cb_check(c, cudaStreamSynchronize(c->side_stream), "sync");
    if (!c->failed) cb_check(c, cudaStreamSynchronize(c->stream), "sync");
    if (!c->failed) c->up_floor = c->up_issued;
}

static uint64_t cb_mem_free(mf_backend *b) {
    (void)b;
    size_t fr = 0, total = 0;
    if (cudaMemGetInfo(&fr, &total) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return fr;
}

/* ---- side branches: a second stream forked from and joined to the compute stream ---- */

static void cb_branch_begin(mf_backend *b) {
    cuda_backend *c = cb_of(b);
    if (c->failed || c->stream != c->main_stream) return;
    if (!cb_check(c, cudaEventRecord(c->fork_mark, c->main_stream), "branch_begin") &&
        !cb_check(c, cudaStreamWaitEvent(c->side_stream, c->fork_mark, 0), "branch_begin"))
        c->stream = c->side_stream;
}

static void cb_branch_end(mf_backend *b) {
    cuda_backend *c = cb_of(b);
    if (c->stream != c->side_stream) return;
    cb_check(c, cudaEventRecord(c->side_done, c->side_stream), "branch_end");
    c->stream = c->main_stream;
}

static void cb_branch_join(mf_backend *b) {
    cuda_backend *c = cb_of(b);
    if (c->failed) return;
    cb_check(c, cudaStreamWaitEvent(c->main_stream, c->side_done, 0), "branch_join");
}

/* ---- captured op sequences: CUDA graphs of the compute stream ---- */

static mf_status cb_graph_begin(mf_backend *b) {
    cuda_backend *c = cb_of(b);
    if (c->failed) return MF_ERR_INTERNAL;
    cb_upload_fence(b); /* the fence's wait must not be part of the recording */
    /* thread-local: the expert store's threads may go on calling CUDA meanwhile */
    if (cb_check(c, cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal), "graph_begin"))
        return MF_ERR_INTERNAL;
    return MF_OK;
}

static void *cb_graph_end(mf_backend *b) {
    cuda_backend *c = cb_of(b);
    cudaGraph_t g = NULL;
    cudaGraphExec_t exec = NULL;
    cudaError_t e = cudaStreamEndCapture(c->stream, &g);
    if (!c->failed && !cb_check(c, e, "graph_end"))
        cb_check(c, cudaGraphInstantiate(&exec, g, 0), "graph_instantiate");
    if (g) cudaGraphDestroy(g);
    if (c->failed && exec) {
        cudaGraphExecDestroy(exec);
        exec = NULL;
    }
    return exec;
}

static void cb_graph_launch(mf_backend *b, void *graph) {
    cuda_backend *c = cb_of(b);
    if (c->failed || !graph) return;
    cb_check(c, cudaGraphLaunch((cudaGraphExec_t)graph, c->stream), "graph_launch");
}

static void cb_graph_free(mf_backend *b, void *graph) {
    if (!graph) return;
    cuda_backend *c = cb_of(b);
    cudaStreamSynchronize(c->stream);
    cb_check(c, cudaGraphExecDestroy((cudaGraphExec_t)graph), "graph_free");
}

static const mf_backend_ops cuda_ops = {
    /* .name = */ "cuda",
    /* .host_memory = */ 0,
    /* .host_alloc_readable = */ 1, /* page-locked memory is mapped at the same address (UVA) */
    /* .destroy = */ cb_destroy,
    /* .reserve = */ cb_reserve,
    /* .alloc = */ cb_alloc,
    /* .free = */ cb_free,
    /* .upload = */ cb_upload,
    /* .download = */ cb_download,
    /* .copy = */ cb_copy,
    /* .sync = */ cb_sync,
    /* .mem_free = */ cb_mem_free,
    /* .matmul = */ cuda_op_matmul,
    /* .matmul_multi = */ cuda_op_matmul_multi,
    /* .embed = */ cuda_op_embed,
    /* .rmsnorm = */ cuda_op_rmsnorm,
    /* .add_rmsnorm = */ cuda_op_add_rmsnorm,
    /* .rope = */ cuda_op_rope,
    /* .attention_prep = */ cuda_op_attention_prep,
    /* .attention = */ cuda_op_attention,
    /* .conv1d_silu = */ cuda_op_conv1d_silu,
    /* .deltanet = */ cuda_op_deltanet,
    /* .deltanet_step = */ cuda_op_deltanet_step,
    /* .add = */ cuda_op_add,
    /* .copy_rows = */ cuda_op_copy_rows,
    /* .mul_sigmoid = */ cuda_op_mul_sigmoid,
    /* .swiglu = */ cuda_op_swiglu,
    /* .gated_norm = */ cuda_op_gated_norm,
    /* .router_topk = */ cuda_op_router_topk,
    /* .gather_rows = */ cuda_op_gather_rows,
    /* .argmax = */ cuda_op_argmax,
    /* .scatter_add = */ cuda_op_scatter_add,
    /* .add_gated = */ cuda_op_add_gated,
    /* .moe_experts = */ cuda_op_moe_experts,
    /* .host_alloc = */ cb_host_alloc,
    /* .host_free = */ cb_host_free,
    /* .upload_async = */ cb_upload_async,
    /* .upload_done = */ cb_upload_done,
    /* .upload_fence = */ cb_upload_fence,
    /* .branch_begin = */ cb_branch_begin,
    /* .branch_end = */ cb_branch_end,
    /* .branch_join = */ cb_branch_join,
    /* .graph_begin = */ cb_graph_begin,
    /* .graph_end = */ cb_graph_end,
    /* .graph_launch = */ cb_graph_launch,
    /* .graph_free = */ cb_graph_free,
    /* .sample = */ cuda_op_sample,
};

extern "C" int cuda_backend_available(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n > 0;
}

extern "C" mf_backend *cuda_backend_create(int device, mf_err *err) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n <= 0) {
        cudaGetLastError();
        err_set(err, MF_ERR_UNSUPPORTED, "no usable CUDA device: %s",
                e != cudaSuccess ? cudaGetErrorString(e) : "none found");
        return NULL;
    }
    if (device < 0 || device >= n) {
        err_set(err, MF_ERR_ARG, "CUDA device %d does not exist (%d found)", device, n);
        return NULL;
    }
    cudaDeviceProp prop;
    if ((e = cudaSetDevice(device)) != cudaSuccess || (e = cudaGetDeviceProperties(&prop, device)) != cudaSuccess) {
        cudaGetLastError();
        err_set(err, MF_ERR_UNSUPPORTED, "CUDA device %d: %s", device, cudaGetErrorString(e));
        return NULL;
    }
    /* kernels read page-locked host memory at its host address (host_alloc_readable) */
    int uva = 0;
    if (cudaDeviceGetAttribute(&uva, cudaDevAttrUnifiedAddressing, device) != cudaSuccess || !uva) {
        cudaGetLastError();
        err_set(err, MF_ERR_UNSUPPORTED, "CUDA device %d (%s) lacks unified addressing", device, prop.name);
        return NULL;
    }
    cuda_backend *c = (cuda_backend *)calloc(1, sizeof *c);
    if (!c) {
        err_set(err, MF_ERR_NOMEM, "out of memory");
        return NULL;
    }
    c->base.ops = &cuda_ops;
    c->device = device;
    c->n_sm = prop.multiProcessorCount;
    c->smem_optin = (int)prop.sharedMemPerBlockOptin;
    c->pdl = prop.major >= 9;
    pthread_mutex_init(&c->pinned_lock, NULL);
    e = cudaStreamCreateWithFlags(&c->main_stream, cudaStreamNonBlocking);
    c->stream = c->main_stream;
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&c->side_stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&c->fork_mark, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&c->side_done, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&c->copy_stream, cudaStreamNonBlocking);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&c->compute_mark, cudaEventDisableTiming);
    for (int i = 0; e == cudaSuccess && i < CB_UP_RING; i++)
        e = cudaEventCreateWithFlags(&c->up_done[i], cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaMalloc((void **)&c->arg_v, ARGMAX_PARTS * sizeof(float));
    if (e == cudaSuccess) e = cudaMalloc((void **)&c->arg_i, ARGMAX_PARTS * sizeof(int64_t));
    if (e == cudaSuccess) e = cudaMalloc((void **)&c->arg_done, sizeof(unsigned));
    if (e == cudaSuccess) e = cudaMemset(c->arg_done, 0, sizeof(unsigned));
    if (e == cudaSuccess) e = cudaMalloc((void **)&c->att_done, ATT_MERGE_ROWS * sizeof(unsigned));
    if (e == cudaSuccess) e = cudaMemset(c->att_done, 0, ATT_MERGE_ROWS * sizeof(unsigned));
    for (int i = 0; e == cudaSuccess && i < CB_STAGE_SLOTS; i++) {
        e = cudaHostAlloc((void **)&c->stage[i], CB_STAGE_BYTES, cudaHostAllocDefault);
        if (e == cudaSuccess) e = cudaEventCreateWithFlags(&c->stage_done[i], cudaEventDisableTiming);
    }
    if (e != cudaSuccess) {
        err_set(err, MF_ERR_UNSUPPORTED, "CUDA device %d (%s): %s", device, prop.name, cudaGetErrorString(e));
        cb_destroy(&c->base);
        return NULL;
    }
    return &c->base;
}
