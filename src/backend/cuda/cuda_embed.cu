/* cuda_embed.cu - embedding lookup on the GPU: out[t] = row ids[t] of W dequantized, any storage
 * type. Not the matrix product (cuda_matmul.cu). */
#include "backend/cuda/cuda_quant.cuh"

/* One block per token; ids [n_tok] in device memory, out [n_tok][cols]. An id outside the
 * matrix leaves its row untouched, as the CPU op does. */
template <int QT>
__global__ void embed_kernel(cq_mat m, const int32_t *__restrict__ ids, float *__restrict__ out) {
    cb_pdl_enter(); /* launched dependent: the ops before wrote what it reads */
    const int64_t t = blockIdx.x;
    const int32_t r = ids[t];
    if (r < 0 || r >= m.rows) return;
    for (int64_t c = threadIdx.x; c < m.cols; c += blockDim.x) out[t * m.cols + c] = cq_at<QT>(m, r, c);
}

void cuda_op_embed(mf_backend *b, const mf_wmat *w, const int32_t *ids, int64_t n_tok, float *out) {
    cuda_backend *c = cb_of(b);
    if (c->failed || n_tok <= 0) return;
    if (w->type >= MF_QTYPE_COUNT || !quant_type_fits(w->type, w->cols) || n_tok > 0x7fffffffLL) {
        cb_fail(c, "embed: %s table of %lld columns, %lld tokens", mf_qtype_name(w->type), (long long)w->cols,
                (long long)n_tok);
        return;
    }
    const cq_mat m = cq_mat_of(w);
    auto k = w->type == MF_QTYPE_Q4    ? embed_kernel<MF_QTYPE_Q4>
             : w->type == MF_QTYPE_Q8   ? embed_kernel<MF_QTYPE_Q8>
             : w->type == MF_QTYPE_BF16 ? embed_kernel<MF_QTYPE_BF16>
                                        : embed_kernel<MF_QTYPE_F32>;
    cb_launch_dependent(c, k, dim3((unsigned)n_tok), dim3(256), 0, m, ids, out);
    CB_LAUNCHED(c, "embed");
}
