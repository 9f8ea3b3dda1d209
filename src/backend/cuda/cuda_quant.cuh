/* cuda_quant.cuh - reading weight matrices on the device: one element of any storage type,
 * and 16-byte chunks of q4/q8/bf16/f32 rows turned into floats (docs/format.md layouts).
 * Not a kernel: cuda_matmul.cu and cuda_embed.cu use these. */
#ifndef MF_BACKEND_CUDA_QUANT_CUH
#define MF_BACKEND_CUDA_QUANT_CUH

#include "backend/cuda/cuda_internal.cuh"

/* A matrix as the kernels read it. q4/q8: words u32 [rows][cols*bits/32], then scales and
 * biases bf16 [rows][cols/64]; bf16/f32: [rows][cols]. */
struct cq_mat {
    const unsigned char *data;
    const unsigned short *scales, *biases; /* q4/q8 only */
    int64_t rows, cols;
};

static inline cq_mat cq_mat_of(const mf_wmat *w) {
    cq_mat m;
    m.data = (const unsigned char *)w->data;
    m.rows = w->rows;
    m.cols = w->cols;
    m.scales = m.biases = NULL;
    if (w->type == MF_QTYPE_Q4 || w->type == MF_QTYPE_Q8) {
        uint64_t n = (uint64_t)w->rows * (uint64_t)w->cols;
        m.scales = (const unsigned short *)(m.data + n * (uint64_t)quant_bits(w->type) / 8);
        m.biases = m.scales + n / QUANT_GROUP;
    }
    return m;
}

/* Elements per 16-byte chunk of a row: f32 4, bf16 8, q8 16, q4 32. */
template <int QT> struct cq_traits;
template <> struct cq_traits<MF_QTYPE_F32> { enum { EPC = 4, AFFINE = 0 }; };
template <> struct cq_traits<MF_QTYPE_BF16> { enum { EPC = 8, AFFINE = 0 }; };
template <> struct cq_traits<MF_QTYPE_Q8> { enum { EPC = 16, AFFINE = 1 }; };
template <> struct cq_traits<MF_QTYPE_Q4> { enum { EPC = 32, AFFINE = 1 }; };

/* W[r][c] as a float (q4/q8: scale * q + bias in f32, as the CPU reference). */
template <int QT>
__device__ __forceinline__ float cq_at(const cq_mat &m, int64_t r, int64_t c) {
    int64_t i = r * m.cols + c;
    if (QT == MF_QTYPE_F32) return ((const float *)m.data)[i];
    if (QT == MF_QTYPE_BF16) return cb_bf16(((const unsigned short *)m.data)[i]);
    const int bits = QT == MF_QTYPE_Q4 ? 4 : 8, per = 32 / bits;
    uint32_t word = ((const uint32_t *)m.data)[i / per];
    uint32_t q = (word >> ((i % per) * bits)) & ((1u << bits) - 1u);
    int64_t g = i / QUANT_GROUP;
    return cb_bf16(m.scales[g]) * (float)q + cb_bf16(m.biases[g]);
}

/* Byte k of v as the float 2^23 + byte (exact), by one byte permute. */
__device__ __forceinline__ float cq_byte_magic(uint32_t v, int k) {
    return __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7440u + (unsigned)k));
}

/* Byte k of v (at most 15) as the float 0.5 + byte / 256 (exact): the byte lands in bits
 * 16..22 under the exponent of 0.5, in one byte permute and no subtraction. */
__device__ __forceinline__ float cq_nibble_half(uint32_t v, int k) {
    return __uint_as_float(__byte_perm(v, 0x3F000000u, 0x7044u | ((unsigned)k << 8)));
}

/* A 16-byte chunk as EPC floats f in element order, with w = A f + B for the chunk's group:
 * q4: f = 0.5 + q / 256 (A = 256 s, B = b - 128 s, see cq_fold); q8: f = q (A = s, B = b);
 * bf16/f32: f = w. */
template <int QT>
__device__ __forceinline__ void cq_vals(uint4 w, float *f) {
    const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int m = 0; m < 4; m++) {
        if (QT == MF_QTYPE_F32) {
            f[m] = __uint_as_float(u[m]);
        } else if (QT == MF_QTYPE_BF16) {
            f[2 * m] = __uint_as_float(u[m] << 16);
            f[2 * m + 1] = __uint_as_float(u[m] & 0xffff0000u);
        } else if (QT == MF_QTYPE_Q8) {
#pragma unroll
            for (int k = 0; k < 4; k++) f[4 * m + k] = cq_byte_magic(u[m], k) - 8388608.0f;
        } else {
            /* element 8m + 2k is the low nibble of byte k, 8m + 2k + 1 the high one */
            const uint32_t lo = u[m] & 0x0f0f0f0fu, hi = (u[m] >> 4) & 0x0f0f0f0fu;
#pragma unroll
            for (int k = 0; k < 4; k++) {
                f[8 * m + 2 * k] = cq_nibble_half(lo, k);
                f[8 * m + 2 * k + 1] = cq_nibble_half(hi, k);
            }
        }
    }
}

/* The chunk's affine constants from its group's scale s and bias b (q4/q8). */
template <int QT>
__device__ __forceinline__ void cq_fold(float s, float b, float &A, float &B) {
    if (QT == MF_QTYPE_Q4) {
        A = 256.0f * s;
        B = b - 128.0f * s;
    } else {
        A = s;
        B = b;
    }
}

/* A 16-byte load that does not allocate in L1 (weights are read once; x stays cached). */
__device__ __forceinline__ uint4 cq_load_stream(const void *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

#endif
