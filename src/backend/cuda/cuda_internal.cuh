/* cuda_internal.cuh - what the CUDA backend's files share: the backend struct with its stream,
 * sticky error and scratch, launch helpers, block reductions and every op's entry point.
 * Not for the rest of the library: C callers see backend.h and cuda_backend.h only. */
#ifndef MF_BACKEND_CUDA_INTERNAL_CUH
#define MF_BACKEND_CUDA_INTERNAL_CUH

#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>

extern "C" {
#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "format/quant.h"
}

#define CB_STAGE_SLOTS 8               /* pinned staging buffers for host -> device copies */
#define CB_STAGE_BYTES ((size_t)4 << 20)
#define CB_UP_RING 256               /* events of upload_async tickets in flight */
#define ARGMAX_PARTS 256             /* blocks one argmax row is spread over, at most */
#define ATT_MERGE_ROWS 1024          /* token-heads whose attention may be split (att_done) */

typedef struct cuda_backend {
    mf_backend base;
    int device;
    int n_sm;                          /* multiprocessors, for grid sizes */
    cudaStream_t stream;               /* every op runs on this stream, in call order (main_stream
                                          but in a side branch) */
    int failed;                        /* sticky: after the first CUDA error every op is a no-op */
    char err[512];
    int smem_optin;                    /* shared memory a block may opt in to, bytes */
    int pdl;                           /* programmatic dependent launch (compute capability 9.0+) */
    float *arg_v;                      /* device [ARGMAX_PARTS]: argmax's per-block bests */
    int64_t *arg_i;                    /* device [ARGMAX_PARTS] */
    unsigned *arg_done;                /* device: blocks of the running argmax done (0 between calls) */
    unsigned *att_done;                /* device [ATT_MERGE_ROWS]: split blocks of each token-head of the
                                          running attention done (0 between calls) */
    cudaStream_t main_stream;          /* the compute stream; `stream` is side_stream in a side branch */
    cudaStream_t side_stream;
    cudaEvent_t fork_mark, side_done;  /* branch_begin / branch_end */
    float *scratch;                    /* device [scratch_floats]: attention split partials */
    size_t scratch_floats;
    float *moe_act;                    /* device [moe_act_floats]: moe_experts' silu(g) * u per pair */
    size_t moe_act_floats;
    /* host_alloc's page-locked ranges [begin, end), sorted by begin: uploads from them go direct */
    struct cb_host_range { uintptr_t begin, end; } *pinned;
    int n_pinned, cap_pinned;
    pthread_mutex_t pinned_lock;
    unsigned char *stage[CB_STAGE_SLOTS]; /* pinned host [CB_STAGE_BYTES] each */
    cudaEvent_t stage_done[CB_STAGE_SLOTS];
    int stage_busy[CB_STAGE_SLOTS];
    int stage_next;
    /* upload_async: its own stream; ticket t's completion is up_done[t % CB_UP_RING] */
    cudaStream_t copy_stream;
    cudaEvent_t compute_mark;          /* recorded on stream, waited for by copy_stream */
    cudaEvent_t up_done[CB_UP_RING];
    uint64_t up_issued;                /* last ticket handed out */
    uint64_t up_floor;                 /* every ticket <= up_floor has finished */
    uint64_t up_fenced;                /* last ticket stream waits for */
    struct cb_sampler *samp;           /* the sample op's device state, made on its first call */
    const void *state_written;         /* the recurrent state (conv window, delta-rule S) the last
                                          op wrote, NULL after any other op: an op reading it next
                                          may not read it before cb_pdl_wait */
} cuda_backend;

static inline cuda_backend *cb_of(mf_backend *b) { return (cuda_backend *)b; }

/* Records the first failure (sticky) and returns 1 when e is an error. */
int cb_check(cuda_backend *c, cudaError_t e, const char *what);
/* A contract violation (shape the kernels do not handle): sticky, like a CUDA error. */
void cb_fail(cuda_backend *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* After a launch: picks up launch errors (bad configuration, no kernel image). */
#define CB_LAUNCHED(c, what) ((c)->state_written = NULL, cb_check((c), cudaGetLastError(), (what)))

static inline unsigned cb_blocks(int64_t n, int threads, int64_t max_blocks) {
    int64_t b = (n + threads - 1) / threads;
    if (b > max_blocks) b = max_blocks;
    return (unsigned)(b < 1 ? 1 : b);
}
/* Blocks for a grid-stride loop over n items: enough to fill the device, no more. */
static inline unsigned cb_grid(const cuda_backend *c, int64_t n, int threads) {
    return cb_blocks(n, threads, (int64_t)c->n_sm * 16);
}

/* ---- programmatic dependent launch (sm_90 and later; no-ops before) ----
 * A kernel launched by cb_launch_dependent may start while the kernel before it still runs: up
 * to cb_pdl_wait it may only read what no kernel still running writes (weights, and outputs of
 * kernels two or more launches back), after it everything its predecessors wrote. Every kernel
 * calls cb_pdl_trigger once all its own predecessors are complete (at its start, or after its
 * cb_pdl_wait), which lets the next one start early. */
__device__ __forceinline__ void cb_pdl_trigger(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void cb_pdl_wait(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
/* Where a kernel's work on its predecessors' outputs begins: waits for them, then lets the next
 * kernel start. */
__device__ __forceinline__ void cb_pdl_enter(void) {
    cb_pdl_wait();
    cb_pdl_trigger();
}

/* Launches kernel on the compute stream so that it may overlap the end of the kernel before it
 * (programmatic stream serialization) where the device has it, as a plain launch elsewhere. */
template <typename... KArgs, typename... Args>
static inline void cb_launch_dependent(const cuda_backend *c, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                                       size_t smem, Args... args) {
    if (!c->pdl) {
        kernel<<<grid, block, smem, c->stream>>>(args...);
        return;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = c->stream;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    cudaLaunchKernelEx(&cfg, kernel, ((KArgs)args)...); /* errors surface in CB_LAUNCHED */
}

/* ---- device helpers ---- */

__device__ __forceinline__ float cb_bf16(unsigned short h) { return __uint_as_float((unsigned)h << 16); }
__device__ __forceinline__ float cb_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float cb_silu(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float cb_warp_sum(float v) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float cb_warp_max(float v) {
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
/* Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
 * sh: __shared__ float [32]. */
__device__ __forceinline__ float cb_block_sum(float v, float *sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cb_warp_sum(v);
    __syncthreads(); /* sh may still be read by a previous call */
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return cb_warp_sum(v);
}

/* ---- the ops (one family per .cu file) ---- */

/* cuda_matmul.cu */
void cuda_op_matmul(mf_backend *b, const mf_wmat *w, const float *x, int64_t n_tok, float *y);
void cuda_op_matmul_multi(mf_backend *b, int n_w, const mf_wmat *w, const float *x, int64_t n_tok, float *const *y);
/* cuda_embed.cu */
void cuda_op_embed(mf_backend *b, const mf_wmat *w, const int32_t *ids, int64_t n_tok, float *out);
/* cuda_norm.cu */
void cuda_op_rmsnorm(mf_backend *b, const float *x, const float *w, int64_t n_rows, int64_t dim, float eps,
                     float *y);
void cuda_op_add_rmsnorm(mf_backend *b, float *x, const float *a, const float *w, int64_t n_rows, int64_t dim,
                         float eps, float *y);
void cuda_op_gated_norm(mf_backend *b, float *o, const float *w, const float *z, int64_t rows, int dim,
                        float eps);
/* cuda_rope.cu */
void cuda_op_rope(mf_backend *b, float *x, int64_t n_tok, int n_heads, int head_dim, int rot_dim,
                  const int32_t *pos, double theta);
/* cuda_attn_prep.cu */
void cuda_op_attention_prep(mf_backend *b, const mf_attn_prep *p);
/* cuda_attention.cu */
void cuda_op_attention(mf_backend *b, const float *q, const float *k_cache, const float *v_cache, const int32_t *pos,
                       int64_t n_ctx, int64_t n_tok, int n_heads, int n_kv, int hd, float scale, float *out);
size_t cuda_attention_scratch_floats(const mf_backend_limits *lim);
/* cuda_conv1d.cu */
void cuda_op_conv1d_silu(mf_backend *b, const float *x, float *state, const float *w, int64_t n_tok, int64_t C,
                         int K, float *out);
/* cuda_deltanet.cu */
void cuda_op_deltanet_step(mf_backend *b, const mf_deltanet_step *p);
void cuda_op_deltanet(mf_backend *b, const float *q, const float *k, const float *v, const float *g,
                      const float *beta, float *S, int64_t n_tok, int Hk, int Hv, int dk, int dv, float *out);
/* cuda_router.cu */
void cuda_op_router_topk(mf_backend *b, const float *logits, int64_t n_tok, int E, int K, int norm, int32_t *ids,
                         float *w);
/* cuda_elementwise.cu */
void cuda_op_add(mf_backend *b, float *y, const float *x, int64_t n);
void cuda_op_mul_sigmoid(mf_backend *b, float *x, const float *gate, int64_t n);
void cuda_op_swiglu(mf_backend *b, float *g, const float *u, int64_t n);
void cuda_op_add_gated(mf_backend *b, float *y, const float *x, const float *gate, int64_t n_tok, int64_t cols);
/* cuda_moe.cu */
void cuda_op_moe_experts(mf_backend *b, const float *x, const int32_t *ids, const float *w, int64_t n_tok, int K,
                         const void *const *blobs, const mf_expert_layout *lay, float *y);
size_t cuda_moe_act_floats(const mf_backend_limits *lim);
/* cuda_sample.cu */
void cuda_op_sample(mf_backend *b, float *logits, int64_t vocab, const mf_sample_args *a, int32_t *out);
void cuda_sample_free(cuda_backend *c);
/* cuda_rows.cu */
void cuda_op_copy_rows(mf_backend *b, float *dst, int64_t dst_stride, const float *src, int64_t src_stride,
                       int64_t rows, int64_t cols);
void cuda_op_gather_rows(mf_backend *b, float *dst, const float *src, const int32_t *idx, int64_t n, int64_t cols);
void cuda_op_argmax(mf_backend *b, const float *x, int64_t rows, int64_t cols, int32_t *out);
void cuda_op_scatter_add(mf_backend *b, float *y, const float *src, const int32_t *idx, const float *w, int64_t n,
                         int64_t cols);

#endif
