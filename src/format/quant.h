/* quant.h - number formats of moeflux weights: bf16/f16/f8-e4m3 scalars, and affine
 * group-64 q4/q8 in MLX's bit layout (u32 words, element j at bits (j % per_word) * bits
 * of word j / per_word, lowest first; bf16 scale and bias per group: w = scale * q + bias).
 * Not kernels: these are the plain reference routines for conversion and tests. */
#ifndef MF_FORMAT_QUANT_H
#define MF_FORMAT_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "moeflux.h"

#define QUANT_GROUP 64

float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);          /* round to nearest even; NaN stays NaN */
uint16_t f32_to_bf16_floor(float f);    /* largest bf16 <= f (toward -inf) */
uint16_t f32_to_bf16_ceil(float f);     /* smallest bf16 >= f (toward +inf) */
float f16_to_f32(uint16_t h);
float f8e4m3_to_f32(uint8_t b);         /* OCP e4m3fn: no infinities, 0x7f/0xff are NaN */

/* Bytes of one row of `cols` values stored as t (q4/q8 rows include their scales and
 * biases when stored together; see quant_tensor_bytes). cols must be a multiple of 64 for q4/q8. */
/* Bytes of a [rows, cols] tensor stored as t. For q4/q8 the layout is three consecutive
 * arrays: words u32 [rows][cols*bits/32], scales bf16 [rows][cols/64], biases bf16 [rows][cols/64]. */
uint64_t quant_tensor_bytes(mf_qtype t, int64_t rows, int64_t cols);
/* Whether a [*, cols] matrix can be stored as t (q4/q8 need cols % 64 == 0). */
int quant_type_fits(mf_qtype t, int64_t cols);
int quant_bits(mf_qtype t);             /* 4, 8, 16, 32 */

/* Quantizes rows x cols floats (row-major) to q4/q8. Per group: b = bf16 floor of the min,
 * s = bf16 ceil of (max - b) / (2^bits - 1), q = round((w - b) / s) clamped, so that
 * |w - (s q + b)| <= s / 2 for every element. words/scales/biases are row-major arrays
 * of [rows][cols*bits/32], [rows][cols/64], [rows][cols/64]. */
void quant_rows(mf_qtype t, const float *src, int64_t rows, int64_t cols,
                uint32_t *words, uint16_t *scales, uint16_t *biases);
/* The plain dequantization: dst[r][c] = scale * q + bias (f32 arithmetic). */
void dequant_rows(mf_qtype t, const uint32_t *words, const uint16_t *scales,
                  const uint16_t *biases, int64_t rows, int64_t cols, float *dst);

/* Encode rows of floats into a contiguous buffer laid out as quant_tensor_bytes describes
 * for a tensor of exactly `rows` rows (f32: raw; bf16: rounded; q4/q8: words, scales, biases). */
void quant_encode(mf_qtype t, const float *src, int64_t rows, int64_t cols, void *dst);
/* The inverse of quant_encode for a buffer of exactly `rows` rows. */
void quant_decode(mf_qtype t, const void *src, int64_t rows, int64_t cols, float *dst);

#endif
