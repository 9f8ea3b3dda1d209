/* quant.c - reference conversions between f32 and moeflux's weight formats (bf16, f16,
 * f8-e4m3, MLX affine group-64 q4/q8). Not kernels: plain scalar code for conversion and tests. */
#include "format/quant.h"

#include <math.h>
#include <string.h>

/* ---- scalar formats ---- */

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float bf16_to_f32(uint16_t h) {
    return f32_from_bits((uint32_t)h << 16);
}

/* A NaN keeps its sign and top payload bits and is made quiet (it could otherwise
 * truncate to an infinity). */
static uint16_t bf16_quiet_nan(uint32_t u) {
    return (uint16_t)((u >> 16) | 0x0040u);
}

uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if (isnan(f)) return bf16_quiet_nan(u);
    /* Round to nearest even on the 16 dropped bits; a carry into the exponent is the
     * correct result (up to and including overflow to infinity). */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Truncation rounds toward zero: that is floor for positives and ceil for negatives.
 * Going the other way means one step up in magnitude, which for the largest finite
 * bf16 correctly reaches infinity. */
uint16_t f32_to_bf16_floor(float f) {
    uint32_t u = f32_bits(f);
    if (isnan(f)) return bf16_quiet_nan(u);
    uint16_t t = (uint16_t)(u >> 16);
    if ((u & 0xffffu) != 0 && (u & 0x80000000u)) t++;
    return t;
}

uint16_t f32_to_bf16_ceil(float f) {
    uint32_t u = f32_bits(f);
    if (isnan(f)) return bf16_quiet_nan(u);
    uint16_t t = (uint16_t)(u >> 16);
    if ((u & 0xffffu) != 0 && !(u & 0x80000000u)) t++;
    return t;
}

float f16_to_f32(uint16_t h) {
    int sign = (h >> 15) & 1;
    int exp = (h >> 10) & 0x1f;
    int mant = h & 0x3ff;
    float v;
    if (exp == 0)
        v = ldexpf((float)mant, -24);                 /* zero and subnormals */
    else if (exp == 31)
        v = mant ? NAN : INFINITY;
    else
        v = ldexpf((float)(1024 + mant), exp - 25);   /* (1 + m/1024) * 2^(e-15) */
    return sign ? -v : v;
}

float f8e4m3_to_f32(uint8_t b) {
    int sign = (b >> 7) & 1;
    int exp = (b >> 3) & 0xf;
    int mant = b & 0x7;
    float v;
    if (exp == 15 && mant == 7)
        v = NAN;                                      /* e4m3fn has no infinities */
    else if (exp == 0)
        v = ldexpf((float)mant, -9);                  /* zero and subnormals */
    else
        v = ldexpf((float)(8 + mant), exp - 10);      /* (1 + m/8) * 2^(e-7) */
    return sign ? -v : v;
}

/* ---- type names and sizes ---- */

const char *mf_qtype_name(mf_qtype t) {
    switch (t) {
    case MF_QTYPE_F32: return "f32";
    case MF_QTYPE_BF16: return "bf16";
    case MF_QTYPE_Q8: return "q8";
    case MF_QTYPE_Q4: return "q4";
    case MF_QTYPE_COUNT: break;
    }
    return "unknown";
}

mf_status mf_qtype_parse(const char *s, mf_qtype *out) {
    if (!s || !out) return MF_ERR_ARG;
    for (int t = 0; t < MF_QTYPE_COUNT; t++) {
        if (strcmp(s, mf_qtype_name((mf_qtype)t)) == 0) {
            *out = (mf_qtype)t;
            return MF_OK;
        }
    }
    return MF_ERR_ARG;
}

int quant_bits(mf_qtype t) {
    switch (t) {
    case MF_QTYPE_F32: return 32;
    case MF_QTYPE_BF16: return 16;
    case MF_QTYPE_Q8: return 8;
    case MF_QTYPE_Q4: return 4;
    case MF_QTYPE_COUNT: break;
    }
    return 0;
}

static int is_affine(mf_qtype t) {
    return t == MF_QTYPE_Q4 || t == MF_QTYPE_Q8;
}

int quant_type_fits(mf_qtype t, int64_t cols) {
    if (cols < 0 || quant_bits(t) == 0) return 0;
    if (is_affine(t)) return cols > 0 && cols % QUANT_GROUP == 0;
    return 1;
}

/* Returns 0 for a negative shape, an unknown type, cols that do not fit t, or more than
 * 2^60 elements (so that no size computed here or below can overflow). */
uint64_t quant_tensor_bytes(mf_qtype t, int64_t rows, int64_t cols) {
    if (rows < 0 || !quant_type_fits(t, cols)) return 0;
    uint64_t r = (uint64_t)rows, c = (uint64_t)cols;
    if (c != 0 && r > (UINT64_C(1) << 60) / c) return 0;
    uint64_t n = r * c;                               /* <= 2^60 */
    uint64_t bytes = n * (uint64_t)quant_bits(t) / 8; /* <= 2^62 */
    if (is_affine(t)) bytes += 2 * 2 * (n / QUANT_GROUP);
    return bytes;
}

/* ---- affine group-64 q4/q8 ----
 * The packed arrays are addressed as bytes and read/written with memcpy, so the same code
 * serves aligned uint32_t/uint16_t arrays and arbitrary offsets in a file buffer. Values are
 * stored in host byte order; moeflux files are little-endian and so is every supported host. */

static void put_u32(unsigned char *base, uint64_t i, uint32_t v) {
    memcpy(base + i * 4, &v, 4);
}

static uint32_t get_u32(const unsigned char *base, uint64_t i) {
    uint32_t v;
    memcpy(&v, base + i * 4, 4);
    return v;
}

static void put_u16(unsigned char *base, uint64_t i, uint16_t v) {
    memcpy(base + i * 2, &v, 2);
}

static uint16_t get_u16(const unsigned char *base, uint64_t i) {
    uint16_t v;
    memcpy(&v, base + i * 2, 2);
    return v;
}

#define BF16_MAX_NEG 0xff7fu  /* the lowest finite bf16 */

/* Quantizes one group of 64 floats to q[64] in [0, 2^bits - 1] with bf16 scale *s and bias *b.
 * Non-finite inputs: min and max are taken over the finite elements only, so a NaN or an
 * infinity does not poison the group; NaN and -inf become q = 0, +inf becomes q = max
 * (q = 0 when s = 0). A group with no finite element gets s = 0, b = 0, q = 0. A min below
 * the lowest finite bf16 clamps b to it (the error bound then does not hold for such values),
 * and near FLT_MAX s * q may dequantize to +inf; s and b stay finite, so never to NaN. */
static void quant_group(int bits, const float *w, uint8_t *q, uint16_t *s, uint16_t *b) {
    const int qmax = (1 << bits) - 1;
    float lo = INFINITY, hi = -INFINITY;
    for (int i = 0; i < QUANT_GROUP; i++) {
        if (!isfinite(w[i])) continue;
        if (w[i] < lo) lo = w[i];
        if (w[i] > hi) hi = w[i];
    }
    if (lo > hi) {                                    /* no finite element */
        *s = 0;
        *b = 0;
        memset(q, 0, QUANT_GROUP);
        return;
    }

    uint16_t bh = f32_to_bf16_floor(lo);
    if (bh == 0xff80u) bh = BF16_MAX_NEG;             /* lo below -bf16 max */
    double bias = bf16_to_f32(bh);

    /* The step (hi - bias) / qmax in double, then rounded up to a float and up again
     * to a bf16, so that bias + qmax * s >= hi (up to the double rounding of the step). */
    double step = ((double)hi - bias) / qmax;
    float stepf = (float)step;
    if ((double)stepf < step) stepf = nextafterf(stepf, INFINITY);
    uint16_t sh = f32_to_bf16_ceil(stepf);           /* finite: step <= 2 * FLT_MAX / 15 */
    double scale = bf16_to_f32(sh);

    *s = sh;
    *b = bh;
    if (scale == 0.0) {                               /* every finite element equals the bias */
        memset(q, 0, QUANT_GROUP);
        return;
    }
    for (int i = 0; i < QUANT_GROUP; i++) {
        double x = ((double)w[i] - bias) / scale;
        if (!(x > 0.0))                               /* also NaN */
            q[i] = 0;
        else if (x >= qmax)
            q[i] = (uint8_t)qmax;
        else
            q[i] = (uint8_t)rint(x);                  /* nearest, ties to even */
    }
}

/* Shared by quant_rows and quant_encode; the caller has checked the shape. */
static void quant_bytes(int bits, const float *src, int64_t rows, int64_t cols,
                        unsigned char *words, unsigned char *scales, unsigned char *biases) {
    const int per_word = 32 / bits;
    const uint64_t n_groups = (uint64_t)rows * (uint64_t)(cols / QUANT_GROUP);
    uint8_t q[QUANT_GROUP];
    /* Rows are contiguous and cols is a multiple of 64, so group g of the tensor covers
     * src[g*64 .. g*64+63] and words [g*64/per_word ..). */
    for (uint64_t g = 0; g < n_groups; g++) {
        uint16_t s, b;
        quant_group(bits, src + g * QUANT_GROUP, q, &s, &b);
        put_u16(scales, g, s);
        put_u16(biases, g, b);
        uint64_t w0 = g * (QUANT_GROUP / per_word);
        for (int k = 0; k < QUANT_GROUP / per_word; k++) {
            uint32_t word = 0;
            for (int i = 0; i < per_word; i++)
                word |= (uint32_t)q[k * per_word + i] << (i * bits);
            put_u32(words, w0 + (uint64_t)k, word);
        }
    }
}

static void dequant_bytes(int bits, const unsigned char *words, const unsigned char *scales,
                          const unsigned char *biases, int64_t rows, int64_t cols, float *dst) {
    const int per_word = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    const uint64_t n_groups = (uint64_t)rows * (uint64_t)(cols / QUANT_GROUP);
    for (uint64_t g = 0; g < n_groups; g++) {
        float s = bf16_to_f32(get_u16(scales, g));
        float b = bf16_to_f32(get_u16(biases, g));
        uint64_t w0 = g * (QUANT_GROUP / per_word);
        float *out = dst + g * QUANT_GROUP;
        for (int j = 0; j < QUANT_GROUP; j++) {
            uint32_t word = get_u32(words, w0 + (uint64_t)(j / per_word));
            uint32_t q = (word >> ((j % per_word) * bits)) & mask;
            out[j] = s * (float)q + b;
        }
    }
}

/* quant_rows and dequant_rows do nothing when t is not q4/q8, rows < 0, or cols does not
 * fit t (check quant_type_fits first). */
void quant_rows(mf_qtype t, const float *src, int64_t rows, int64_t cols,
                uint32_t *words, uint16_t *scales, uint16_t *biases) {
    if (!is_affine(t) || rows < 0 || !quant_type_fits(t, cols)) return;
    quant_bytes(quant_bits(t), src, rows, cols, (unsigned char *)words,
                (unsigned char *)scales, (unsigned char *)biases);
}

void dequant_rows(mf_qtype t, const uint32_t *words, const uint16_t *scales,
                  const uint16_t *biases, int64_t rows, int64_t cols, float *dst) {
    if (!is_affine(t) || rows < 0 || !quant_type_fits(t, cols)) return;
    dequant_bytes(quant_bits(t), (const unsigned char *)words, (const unsigned char *)scales,
                  (const unsigned char *)biases, rows, cols, dst);
}

/* ---- whole tensors in one buffer ---- */

/* Byte offsets of the scales and biases arrays in a q4/q8 tensor buffer. */
static void affine_offsets(mf_qtype t, int64_t rows, int64_t cols,
                           uint64_t *scales_off, uint64_t *biases_off) {
    uint64_t n = (uint64_t)rows * (uint64_t)cols;
    *scales_off = n * (uint64_t)quant_bits(t) / 8;
    *biases_off = *scales_off + 2 * (n / QUANT_GROUP);
}

/* quant_encode and quant_decode do nothing for shapes quant_tensor_bytes rejects (it
 * returns 0); dst/src need no particular alignment. */
void quant_encode(mf_qtype t, const float *src, int64_t rows, int64_t cols, void *dst) {
    if (quant_tensor_bytes(t, rows, cols) == 0) return;
    unsigned char *out = dst;
    uint64_t n = (uint64_t)rows * (uint64_t)cols;
    switch (t) {
    case MF_QTYPE_F32:
        memcpy(out, src, n * sizeof(float));
        break;
    case MF_QTYPE_BF16:
        for (uint64_t i = 0; i < n; i++) put_u16(out, i, f32_to_bf16(src[i]));
        break;
    case MF_QTYPE_Q8:
    case MF_QTYPE_Q4: {
        uint64_t so, bo;
        affine_offsets(t, rows, cols, &so, &bo);
        quant_bytes(quant_bits(t), src, rows, cols, out, out + so, out + bo);
        break;
    }
    case MF_QTYPE_COUNT:
        break;
    }
}

void quant_decode(mf_qtype t, const void *src, int64_t rows, int64_t cols, float *dst) {
    if (quant_tensor_bytes(t, rows, cols) == 0) return;
    const unsigned char *in = src;
    uint64_t n = (uint64_t)rows * (uint64_t)cols;
    switch (t) {
    case MF_QTYPE_F32:
        memcpy(dst, in, n * sizeof(float));
        break;
    case MF_QTYPE_BF16:
        for (uint64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(get_u16(in, i));
        break;
    case MF_QTYPE_Q8:
    case MF_QTYPE_Q4: {
        uint64_t so, bo;
        affine_offsets(t, rows, cols, &so, &bo);
        dequant_bytes(quant_bits(t), in, in + so, in + bo, rows, cols, dst);
        break;
    }
    case MF_QTYPE_COUNT:
        break;
    }
}
