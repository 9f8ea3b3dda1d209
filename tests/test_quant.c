/* test_quant.c - tests of src/format/quant.c: scalar formats against their definitions, and
 * q4/q8 against an independent unpacker. Not a speed test. */
#include <criterion/criterion.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "format/quant.h"

/* ---- helpers ---- */

static uint64_t rng_state;

static uint64_t rng_next(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static double rng_uniform(void) { /* [0, 1) */
    return (double)(rng_next() >> 11) * 0x1.0p-53;
}

static double rng_normal(void) {
    double u1 = rng_uniform(), u2 = rng_uniform();
    return sqrt(-2.0 * log(1.0 - u1)) * cos(2.0 * M_PI * u2);
}

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* A key that orders bf16 bit patterns by value (both zeros map to 0); not for NaN. */
static int bf16_key(uint16_t h) {
    return (h & 0x8000) ? -(int)(h & 0x7fff) : (int)h;
}

static int is_bf16_nan(uint16_t h) {
    return (h & 0x7f80) == 0x7f80 && (h & 0x007f) != 0;
}

/* ---- bf16 ---- */

Test(quant, bf16_round_to_nearest_even) {
    struct { uint32_t in; uint16_t out; } cases[] = {
        {0x3f800000, 0x3f80}, /* 1.0 exact */
        {0x3f808000, 0x3f80}, /* tie, even below: down */
        {0x3f818000, 0x3f82}, /* tie, odd below: up */
        {0x3f808001, 0x3f81}, /* just above the tie */
        {0x3f807fff, 0x3f80}, /* just below the tie */
        {0xbf818000, 0xbf82}, /* negative tie to even, away from zero here */
        {0xbf808000, 0xbf80},
        {0x3f80ffff, 0x3f81},
        {0x3fffffff, 0x4000}, /* carry into the exponent */
        {0x7f7f7fff, 0x7f7f}, /* stays the largest finite */
        {0x7f7f8000, 0x7f80}, /* tie at the top rounds to even: infinity */
        {0x7f7fffff, 0x7f80}, /* FLT_MAX overflows to infinity */
        {0xff7fffff, 0xff80},
        {0x7f800000, 0x7f80}, /* inf */
        {0xff800000, 0xff80}, /* -inf */
        {0x00000000, 0x0000},
        {0x80000000, 0x8000}, /* -0 keeps its sign */
        {0x00008000, 0x0000}, /* subnormal tie to even */
        {0x00018000, 0x0002},
        {0x00000001, 0x0000},
        {0x4048f5c3, 0x4049}, /* 3.14 */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint16_t got = f32_to_bf16(float_of(cases[i].in));
        cr_expect_eq(got, cases[i].out, "f32 bits 0x%08x: got 0x%04x, want 0x%04x",
                     cases[i].in, got, cases[i].out);
    }
}

Test(quant, bf16_nan_stays_quiet_nan) {
    uint32_t nans[] = {0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7f810000,
                       0x7fffffff, 0x7f80ffff};
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
        float f = float_of(nans[i]);
        uint16_t h[3] = {f32_to_bf16(f), f32_to_bf16_floor(f), f32_to_bf16_ceil(f)};
        for (int k = 0; k < 3; k++) {
            cr_expect(is_bf16_nan(h[k]), "0x%08x -> 0x%04x is not NaN", nans[i], h[k]);
            cr_expect(h[k] & 0x0040, "0x%08x -> 0x%04x is not quiet", nans[i], h[k]);
            cr_expect_eq(h[k] >> 15, nans[i] >> 31, "sign lost for 0x%08x", nans[i]);
            cr_expect(isnan(bf16_to_f32(h[k])));
        }
    }
}

Test(quant, bf16_to_f32_values) {
    cr_expect_eq(bf16_to_f32(0x3f80), 1.0f);
    cr_expect_eq(bf16_to_f32(0xc000), -2.0f);
    cr_expect_eq(bf16_to_f32(0x4049), 3.140625f);
    cr_expect_eq(bf16_to_f32(0x0001), ldexpf(1.0f, -133));
    cr_expect(isinf(bf16_to_f32(0x7f80)) && bf16_to_f32(0x7f80) > 0);
    cr_expect(signbit(bf16_to_f32(0x8000)) && bf16_to_f32(0x8000) == 0.0f);
}

Test(quant, bf16_exact_values_round_trip) {
    for (uint32_t h = 0; h < 0x10000; h++) {
        if (is_bf16_nan((uint16_t)h)) continue;
        float f = bf16_to_f32((uint16_t)h);
        cr_assert_eq(f32_to_bf16(f), h, "0x%04x", h);
        cr_assert_eq(f32_to_bf16_floor(f), h, "floor 0x%04x", h);
        cr_assert_eq(f32_to_bf16_ceil(f), h, "ceil 0x%04x", h);
    }
}

Test(quant, bf16_floor_ceil_edges) {
    cr_expect_eq(f32_to_bf16_floor(0.0f), 0x0000);
    cr_expect_eq(f32_to_bf16_ceil(0.0f), 0x0000);
    cr_expect_eq(f32_to_bf16_floor(-0.0f), 0x8000);
    cr_expect_eq(f32_to_bf16_ceil(-0.0f), 0x8000);
    cr_expect_eq(f32_to_bf16_floor(INFINITY), 0x7f80);
    cr_expect_eq(f32_to_bf16_ceil(INFINITY), 0x7f80);
    cr_expect_eq(f32_to_bf16_floor(-INFINITY), 0xff80);
    cr_expect_eq(f32_to_bf16_ceil(-INFINITY), 0xff80);
    cr_expect_eq(f32_to_bf16_floor(float_of(0x7f7fffff)), 0x7f7f);  /* FLT_MAX */
    cr_expect_eq(f32_to_bf16_ceil(float_of(0x7f7fffff)), 0x7f80);
    cr_expect_eq(f32_to_bf16_floor(float_of(0xff7fffff)), 0xff80);  /* -FLT_MAX */
    cr_expect_eq(f32_to_bf16_ceil(float_of(0xff7fffff)), 0xff7f);
    cr_expect_eq(f32_to_bf16_floor(float_of(0x00000001)), 0x0000);  /* tiny positive */
    cr_expect_eq(f32_to_bf16_ceil(float_of(0x00000001)), 0x0001);
    cr_expect_eq(f32_to_bf16_floor(float_of(0x80000001)), 0x8001);  /* tiny negative */
    cr_expect_eq(f32_to_bf16_ceil(float_of(0x80000001)), 0x8000);
    cr_expect_eq(f32_to_bf16_floor(1.5f + 0x1.0p-20f), 0x3fc0);
    cr_expect_eq(f32_to_bf16_ceil(1.5f + 0x1.0p-20f), 0x3fc1);
    cr_expect_eq(f32_to_bf16_floor(-1.5f - 0x1.0p-20f), 0xbfc1);
    cr_expect_eq(f32_to_bf16_ceil(-1.5f - 0x1.0p-20f), 0xbfc0);
}

static void check_floor_ceil(float f) {
    uint16_t lo = f32_to_bf16_floor(f), hi = f32_to_bf16_ceil(f), near = f32_to_bf16(f);
    float flo = bf16_to_f32(lo), fhi = bf16_to_f32(hi);
    cr_assert(flo <= f && f <= fhi, "%a: floor %a ceil %a", (double)f, (double)flo, (double)fhi);
    int d = bf16_key(hi) - bf16_key(lo);
    if (flo == f) {
        cr_assert_eq(d, 0, "%a exact but floor 0x%04x ceil 0x%04x", (double)f, lo, hi);
    } else {
        cr_assert_eq(d, 1, "%a: floor 0x%04x ceil 0x%04x not adjacent", (double)f, lo, hi);
        cr_assert(flo < f && f < fhi);
    }
    cr_assert(near == lo || near == hi || (f32_to_bf16(f) & 0x7fff) == 0x7f80,
              "%a: nearest 0x%04x outside [0x%04x, 0x%04x]", (double)f, near, lo, hi);
}

Test(quant, bf16_floor_ceil_random) {
    rng_state = 1;
    for (int i = 0; i < 1000000; i++) {
        float f = float_of((uint32_t)rng_next());
        if (isnan(f)) continue;
        check_floor_ceil(f);
    }
    for (int i = 0; i < 200000; i++) check_floor_ceil((float)(rng_normal() * 3.0));
}

/* ---- f16 and f8 against their definitions ---- */

static float f16_expected(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 0) v = ldexp(m, -24);                   /* m/1024 * 2^-14 */
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = ldexp(1.0 + m / 1024.0, e - 15);
    return (float)(s ? -v : v);
}

static float f8_expected(uint8_t b) {
    int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    double v;
    if (e == 15 && m == 7) v = NAN;
    else if (e == 0) v = ldexp(m / 8.0, -6);         /* subnormal: m/8 * 2^(1-7) */
    else v = ldexp(1.0 + m / 8.0, e - 7);
    return (float)(s ? -v : v);
}

Test(quant, f16_known_values) {
    cr_expect_eq(f16_to_f32(0x3c00), 1.0f);
    cr_expect_eq(f16_to_f32(0xc000), -2.0f);
    cr_expect_eq(f16_to_f32(0x3555), 0x1.554p-2f);   /* ~1/3 */
    cr_expect_eq(f16_to_f32(0x7bff), 65504.0f);
    cr_expect_eq(f16_to_f32(0x0400), ldexpf(1.0f, -14));
    cr_expect_eq(f16_to_f32(0x0001), ldexpf(1.0f, -24));
    cr_expect_eq(f16_to_f32(0x03ff), 1023.0f * ldexpf(1.0f, -24));
    cr_expect_eq(f16_to_f32(0x8001), -ldexpf(1.0f, -24));
    cr_expect(isinf(f16_to_f32(0x7c00)) && f16_to_f32(0x7c00) > 0);
    cr_expect(isinf(f16_to_f32(0xfc00)) && f16_to_f32(0xfc00) < 0);
    cr_expect(isnan(f16_to_f32(0x7e00)));
    cr_expect(isnan(f16_to_f32(0x7c01)));
    cr_expect(isnan(f16_to_f32(0xfe00)));
    cr_expect(signbit(f16_to_f32(0x8000)) && f16_to_f32(0x8000) == 0.0f);
}

Test(quant, f16_all_values) {
    for (uint32_t h = 0; h < 0x10000; h++) {
        float want = f16_expected((uint16_t)h), got = f16_to_f32((uint16_t)h);
        if (isnan(want)) cr_assert(isnan(got), "0x%04x", h);
        else cr_assert_eq(bits_of(got), bits_of(want), "0x%04x: %a vs %a", h,
                          (double)got, (double)want);
    }
}

Test(quant, f8e4m3_known_values) {
    cr_expect_eq(f8e4m3_to_f32(0x38), 1.0f);
    cr_expect_eq(f8e4m3_to_f32(0xc0), -2.0f);
    cr_expect_eq(f8e4m3_to_f32(0x7e), 448.0f);        /* max */
    cr_expect_eq(f8e4m3_to_f32(0xfe), -448.0f);
    cr_expect_eq(f8e4m3_to_f32(0x78), 256.0f);        /* exponent 15 is finite in e4m3fn */
    cr_expect_eq(f8e4m3_to_f32(0x01), ldexpf(1.0f, -9));
    cr_expect_eq(f8e4m3_to_f32(0x07), 7.0f * ldexpf(1.0f, -9));
    cr_expect_eq(f8e4m3_to_f32(0x08), ldexpf(1.0f, -6));
    cr_expect_eq(f8e4m3_to_f32(0x3c), 1.5f);
    cr_expect(isnan(f8e4m3_to_f32(0x7f)));
    cr_expect(isnan(f8e4m3_to_f32(0xff)));
    cr_expect_eq(f8e4m3_to_f32(0x00), 0.0f);
    cr_expect(signbit(f8e4m3_to_f32(0x80)) && f8e4m3_to_f32(0x80) == 0.0f);
}

Test(quant, f8e4m3_all_values) {
    int nans = 0;
    for (uint32_t b = 0; b < 256; b++) {
        float want = f8_expected((uint8_t)b), got = f8e4m3_to_f32((uint8_t)b);
        cr_assert(!isinf(got), "0x%02x gave an infinity", b);
        if (isnan(want)) {
            cr_assert(isnan(got), "0x%02x", b);
            nans++;
        } else {
            cr_assert_eq(bits_of(got), bits_of(want), "0x%02x: %a vs %a", b,
                         (double)got, (double)want);
        }
    }
    cr_expect_eq(nans, 2);
}

/* ---- q4 / q8: an independent reading of the MLX layout ---- */

/* q of element (r, c) of a [rows, cols] tensor: words are [rows][cols*bits/32], element c
 * of a row sits at bits (c % per_word) * bits of word c / per_word, lowest bits first. */
static uint32_t ref_q(int bits, const uint32_t *words, int64_t cols, int64_t r, int64_t c) {
    int64_t per_word = 32 / bits;
    int64_t words_per_row = cols / per_word;
    uint32_t w = words[r * words_per_row + c / per_word];
    return (w >> ((c % per_word) * bits)) & ((1u << bits) - 1u);
}

typedef struct qbuf {
    uint32_t *words;
    uint16_t *scales, *biases;
    float *deq;
} qbuf;

static qbuf qbuf_new(int bits, int64_t rows, int64_t cols) {
    qbuf q;
    q.words = calloc((size_t)(rows * cols * bits / 32), sizeof *q.words);
    q.scales = calloc((size_t)(rows * cols / 64), sizeof *q.scales);
    q.biases = calloc((size_t)(rows * cols / 64), sizeof *q.biases);
    q.deq = calloc((size_t)(rows * cols), sizeof *q.deq);
    cr_assert(q.words && q.scales && q.biases && q.deq);
    return q;
}

static void qbuf_free(qbuf *q) {
    free(q->words);
    free(q->scales);
    free(q->biases);
    free(q->deq);
}

/* Quantizes src, then checks every element against the s/2 bound using ref_q, and that
 * dequant_rows agrees exactly with the same formula. Non-finite src elements are skipped
 * by the bound (they are checked by their own test). */
static void check_round_trip(mf_qtype t, const float *src, int64_t rows, int64_t cols) {
    int bits = quant_bits(t);
    qbuf q = qbuf_new(bits, rows, cols);
    quant_rows(t, src, rows, cols, q.words, q.scales, q.biases);
    dequant_rows(t, q.words, q.scales, q.biases, rows, cols, q.deq);
    int64_t groups = cols / 64;
    uint32_t qmax = (1u << bits) - 1u;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            float s = bf16_to_f32(q.scales[r * groups + g]);
            float b = bf16_to_f32(q.biases[r * groups + g]);
            cr_assert(s >= 0.0f && isfinite(s) && isfinite(b), "row %ld group %ld: s %g b %g",
                      (long)r, (long)g, (double)s, (double)b);
            float lo = INFINITY, hi = -INFINITY;
            for (int64_t c = g * 64; c < g * 64 + 64; c++) {
                float w = src[r * cols + c];
                if (!isfinite(w)) continue;
                lo = fminf(lo, w);
                hi = fmaxf(hi, w);
            }
            cr_assert(b <= lo, "bias %g above the min %g", (double)b, (double)lo);
            cr_assert((double)s * qmax + b >= hi - 1e-7 * fabs((double)hi),
                      "range [%g, %g] not covered by s %g b %g", (double)lo, (double)hi,
                      (double)s, (double)b);
            for (int64_t c = g * 64; c < g * 64 + 64; c++) {
                float w = src[r * cols + c];
                uint32_t qq = ref_q(bits, q.words, cols, r, c);
                float ref = s * (float)qq + b;
                float got = q.deq[r * cols + c];
                cr_assert_eq(bits_of(got), bits_of(ref), "(%ld, %ld): dequant_rows %a, ref %a",
                             (long)r, (long)c, (double)got, (double)ref);
                if (!isfinite(w)) continue;
                double err = fabs((double)w - (double)ref);
                double tol = s / 2.0 + 1e-6 * (fabs((double)w) + fabs((double)b));
                cr_assert(err <= tol, "%s (%ld, %ld): w %.9g deq %.9g err %g > s/2 %g",
                          mf_qtype_name(t), (long)r, (long)c, (double)w, (double)ref, err,
                          (double)s / 2.0);
            }
        }
    }
    qbuf_free(&q);
}

enum dist { D_NORMAL, D_UNIFORM_OFFSET, D_CONSTANT, D_OUTLIER, D_NEGATIVE, D_TINY, D_COUNT };

static void fill(float *x, int64_t rows, int64_t cols, enum dist d) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * cols;
        double c0 = rng_normal() * 10.0;
        for (int64_t c = 0; c < cols; c++) {
            switch (d) {
            case D_NORMAL: row[c] = (float)(rng_normal() * 0.02); break;
            case D_UNIFORM_OFFSET: row[c] = (float)(7.5 + rng_uniform() * 0.25); break;
            case D_CONSTANT: row[c] = (r % 2) ? 1.0f : (float)c0; break;
            case D_OUTLIER: row[c] = (float)rng_normal(); break;
            case D_NEGATIVE: row[c] = (float)(-1.0 - rng_uniform() * 100.0); break;
            case D_TINY: row[c] = (float)(rng_normal() * 1e-30); break;
            case D_COUNT: break;
            }
        }
        if (d == D_OUTLIER) row[(int64_t)(rng_next() % (uint64_t)cols)] = (r % 2) ? 1e4f : -3e6f;
    }
}

Test(quant, q4_q8_round_trip) {
    rng_state = 42;
    const int64_t rows = 9, cols = 320;
    float *x = malloc(sizeof(float) * rows * cols);
    cr_assert(x);
    for (int d = 0; d < D_COUNT; d++) {
        fill(x, rows, cols, (enum dist)d);
        check_round_trip(MF_QTYPE_Q4, x, rows, cols);
        check_round_trip(MF_QTYPE_Q8, x, rows, cols);
    }
    free(x);
}

Test(quant, constant_exact_group_has_zero_scale) {
    float x[128];
    for (int i = 0; i < 128; i++) x[i] = (i < 64) ? -2.5f : 0.0f;
    mf_qtype types[] = {MF_QTYPE_Q4, MF_QTYPE_Q8};
    for (int k = 0; k < 2; k++) {
        qbuf q = qbuf_new(quant_bits(types[k]), 1, 128);
        memset(q.words, 0xff, sizeof(uint32_t) * 128 * (size_t)quant_bits(types[k]) / 32);
        quant_rows(types[k], x, 1, 128, q.words, q.scales, q.biases);
        dequant_rows(types[k], q.words, q.scales, q.biases, 1, 128, q.deq);
        cr_expect_eq(q.scales[0], 0);
        cr_expect_eq(q.scales[1], 0);
        cr_expect_eq(q.biases[0], 0xc020); /* -2.5 */
        cr_expect_eq(q.biases[1], 0x0000);
        for (int i = 0; i < 128 * quant_bits(types[k]) / 32; i++) cr_expect_eq(q.words[i], 0);
        for (int i = 0; i < 128; i++) cr_expect_eq(q.deq[i], x[i]);
        qbuf_free(&q);
    }
}

Test(quant, q4_bit_layout) {
    /* Row 0: group 0 is j % 16 (b = 0, s = 1), group 1 is 2 * (j % 16) + 10 (b = 10, s = 2),
     * so q = j % 16 in both. Row 1: 15 - j % 16 in group 0, zeros-and-one in group 1. */
    float x[2 * 128];
    for (int j = 0; j < 64; j++) {
        x[j] = (float)(j % 16);
        x[64 + j] = (float)(2 * (j % 16) + 10);
        x[128 + j] = (float)(15 - j % 16);
        x[192 + j] = (j == 5) ? 1.0f : 0.0f;
    }
    qbuf q = qbuf_new(4, 2, 128);
    quant_rows(MF_QTYPE_Q4, x, 2, 128, q.words, q.scales, q.biases);
    for (int k = 0; k < 8; k++) {
        uint32_t want = (k % 2) ? 0xfedcba98u : 0x76543210u;
        cr_expect_eq(q.words[k], want, "word %d: 0x%08x", k, q.words[k]);
        cr_expect_eq(q.words[8 + k], want, "word %d: 0x%08x", 8 + k, q.words[8 + k]);
        uint32_t want1 = (k % 2) ? 0x01234567u : 0x89abcdefu;
        cr_expect_eq(q.words[16 + k], want1, "word %d: 0x%08x", 16 + k, q.words[16 + k]);
    }
    /* 1.0 over 0 with qmax 15: s = ceil_bf16(1/15) = 0x3d89, q(1.0) = round(1/s) = 15. */
    cr_expect_eq(q.words[24], 0x00f00000u, "0x%08x", q.words[24]);
    for (int k = 25; k < 32; k++) cr_expect_eq(q.words[k], 0);
    cr_expect_eq(q.scales[0], 0x3f80);
    cr_expect_eq(q.biases[0], 0x0000);
    cr_expect_eq(q.scales[1], 0x4000);
    cr_expect_eq(q.biases[1], 0x4120);
    cr_expect_eq(q.scales[2], 0x3f80);
    cr_expect_eq(q.biases[2], 0x0000);
    cr_expect_eq(q.scales[3], f32_to_bf16_ceil(1.0f / 15.0f));
    cr_expect_eq(q.biases[3], 0x0000);
    qbuf_free(&q);
}

Test(quant, q8_bit_layout) {
    float x[64];
    for (int j = 0; j < 64; j++) x[j] = (float)(4 * j);
    x[63] = 255.0f;
    qbuf q = qbuf_new(8, 1, 64);
    quant_rows(MF_QTYPE_Q8, x, 1, 64, q.words, q.scales, q.biases);
    cr_expect_eq(q.scales[0], 0x3f80);
    cr_expect_eq(q.biases[0], 0x0000);
    cr_expect_eq(q.words[0], 0x0c080400u, "0x%08x", q.words[0]);
    cr_expect_eq(q.words[1], 0x1c181410u, "0x%08x", q.words[1]);
    cr_expect_eq(q.words[15], 0xfff8f4f0u, "0x%08x", q.words[15]);
    for (int k = 0; k < 15; k++) {
        uint32_t want = 0;
        for (int i = 0; i < 4; i++) want |= (uint32_t)(4 * (4 * k + i)) << (8 * i);
        cr_expect_eq(q.words[k], want, "word %d", k);
    }
    qbuf_free(&q);
}

Test(quant, non_finite_inputs_do_not_poison_group) {
    float x[128];
    rng_state = 7;
    for (int i = 0; i < 128; i++) x[i] = (float)rng_normal();
    x[3] = NAN;
    x[10] = INFINITY;
    x[11] = -INFINITY;
    for (int i = 64; i < 128; i++) x[i] = NAN;   /* a group with no finite value */
    mf_qtype types[] = {MF_QTYPE_Q4, MF_QTYPE_Q8};
    for (int k = 0; k < 2; k++) {
        int bits = quant_bits(types[k]);
        qbuf q = qbuf_new(bits, 1, 128);
        quant_rows(types[k], x, 1, 128, q.words, q.scales, q.biases);
        cr_expect_eq(ref_q(bits, q.words, 128, 0, 3), 0);
        cr_expect_eq(ref_q(bits, q.words, 128, 0, 10), (1u << bits) - 1u);
        cr_expect_eq(ref_q(bits, q.words, 128, 0, 11), 0);
        cr_expect_eq(q.scales[1], 0);
        cr_expect_eq(q.biases[1], 0);
        for (int c = 64; c < 128; c++) cr_expect_eq(ref_q(bits, q.words, 128, 0, c), 0);
        /* Group 0's scale and bias are those of its finite elements alone. */
        float clean[64];
        memcpy(clean, x, sizeof clean);
        clean[3] = clean[10] = clean[11] = clean[0];
        qbuf c = qbuf_new(bits, 1, 64);
        quant_rows(types[k], clean, 1, 64, c.words, c.scales, c.biases);
        cr_expect_eq(q.scales[0], c.scales[0]);
        cr_expect_eq(q.biases[0], c.biases[0]);
        qbuf_free(&c);
        qbuf_free(&q);
        check_round_trip(types[k], x, 1, 128);  /* finite elements keep the bound */
    }
}

Test(quant, values_beyond_bf16_range_give_no_nan) {
    /* -FLT_MAX lies below the lowest finite bf16: the bias clamps to it (so the s/2 bound
     * cannot hold there), and s * q may overflow to inf, but nothing becomes NaN. */
    float x[64];
    for (int i = 0; i < 64; i++) x[i] = (i % 2) ? float_of(0x7f7fffff) : float_of(0xff7fffff);
    x[5] = 0.0f;
    mf_qtype types[] = {MF_QTYPE_Q4, MF_QTYPE_Q8};
    for (int k = 0; k < 2; k++) {
        qbuf q = qbuf_new(quant_bits(types[k]), 1, 64);
        quant_rows(types[k], x, 1, 64, q.words, q.scales, q.biases);
        dequant_rows(types[k], q.words, q.scales, q.biases, 1, 64, q.deq);
        cr_expect_eq(q.biases[0], 0xff7f);
        float sc = bf16_to_f32(q.scales[0]);
        cr_expect(isfinite(sc) && sc > 0);
        for (int i = 0; i < 64; i++) cr_expect(!isnan(q.deq[i]), "%d: %g", i, (double)q.deq[i]);
        cr_expect(fabsf(q.deq[5]) <= sc / 2, "0 became %g (s %g)", (double)q.deq[5], (double)sc);
        qbuf_free(&q);
    }
}

/* ---- whole tensors ---- */

Test(quant, tensor_bytes_and_fits) {
    cr_expect_eq(quant_tensor_bytes(MF_QTYPE_F32, 3, 5), 60);
    cr_expect_eq(quant_tensor_bytes(MF_QTYPE_BF16, 3, 5), 30);
    cr_expect_eq(quant_tensor_bytes(MF_QTYPE_Q4, 2, 128), 128 + 2 * 2 * 2 * 2);
    cr_expect_eq(quant_tensor_bytes(MF_QTYPE_Q8, 2, 128), 256 + 2 * 2 * 2 * 2);
    cr_expect_eq(quant_tensor_bytes(MF_QTYPE_Q4, 4096, 4096), 8388608u + 1048576u);
    cr_expect_eq(quant_tensor_bytes(MF_QTYPE_Q8, 4096, 4096), 16777216u + 1048576u);
    cr_expect_eq(quant_tensor_bytes(MF_QTYPE_Q4, 0, 64), 0);
    cr_expect_eq(quant_tensor_bytes(MF_QTYPE_Q4, 2, 100), 0);
    cr_expect_eq(quant_tensor_bytes(MF_QTYPE_F32, -1, 4), 0);
    cr_expect_eq(quant_tensor_bytes(MF_QTYPE_F32, INT64_MAX, INT64_MAX), 0);
    cr_expect(quant_type_fits(MF_QTYPE_F32, 100));
    cr_expect(quant_type_fits(MF_QTYPE_BF16, 7));
    cr_expect(quant_type_fits(MF_QTYPE_Q4, 64));
    cr_expect(quant_type_fits(MF_QTYPE_Q8, 4096));
    cr_expect(!quant_type_fits(MF_QTYPE_Q4, 100));
    cr_expect(!quant_type_fits(MF_QTYPE_Q8, 32));
    cr_expect(!quant_type_fits(MF_QTYPE_Q4, 0));
    cr_expect_eq(quant_bits(MF_QTYPE_F32), 32);
    cr_expect_eq(quant_bits(MF_QTYPE_BF16), 16);
    cr_expect_eq(quant_bits(MF_QTYPE_Q8), 8);
    cr_expect_eq(quant_bits(MF_QTYPE_Q4), 4);
}

Test(quant, encode_decode_round_trip) {
    rng_state = 99;
    const int64_t rows = 5, cols = 192;
    float x[5 * 192], y[5 * 192];
    for (int i = 0; i < rows * cols; i++) x[i] = (float)(rng_normal() * 0.5 + 0.1);
    for (int t = 0; t < MF_QTYPE_COUNT; t++) {
        uint64_t n = quant_tensor_bytes((mf_qtype)t, rows, cols);
        cr_assert(n > 0);
        unsigned char *buf = malloc(n + 1);
        cr_assert(buf);
        quant_encode((mf_qtype)t, x, rows, cols, buf + 1);   /* deliberately misaligned */
        quant_decode((mf_qtype)t, buf + 1, rows, cols, y);
        if (t == MF_QTYPE_F32) {
            cr_expect_eq(memcmp(buf + 1, x, sizeof x), 0);
            cr_expect_eq(memcmp(x, y, sizeof x), 0);
        } else if (t == MF_QTYPE_BF16) {
            for (int i = 0; i < rows * cols; i++) {
                uint16_t h = f32_to_bf16(x[i]), stored;
                memcpy(&stored, buf + 1 + 2 * i, 2);
                cr_expect_eq(stored, h);
                cr_expect_eq(y[i], bf16_to_f32(h));
            }
        } else {
            int bits = quant_bits((mf_qtype)t);
            qbuf q = qbuf_new(bits, rows, cols);
            quant_rows((mf_qtype)t, x, rows, cols, q.words, q.scales, q.biases);
            dequant_rows((mf_qtype)t, q.words, q.scales, q.biases, rows, cols, q.deq);
            size_t wb = (size_t)(rows * cols * bits / 8), sb = (size_t)(rows * cols / 64) * 2;
            cr_assert_eq(wb + 2 * sb, n);
            cr_expect_eq(memcmp(buf + 1, q.words, wb), 0);
            cr_expect_eq(memcmp(buf + 1 + wb, q.scales, sb), 0);
            cr_expect_eq(memcmp(buf + 1 + wb + sb, q.biases, sb), 0);
            cr_expect_eq(memcmp(y, q.deq, sizeof y), 0);
            qbuf_free(&q);
        }
        free(buf);
    }
}

/* ---- names ---- */

Test(quant, qtype_names_parse) {
    const char *names[] = {"f32", "bf16", "q8", "q4"};
    mf_qtype want[] = {MF_QTYPE_F32, MF_QTYPE_BF16, MF_QTYPE_Q8, MF_QTYPE_Q4};
    for (int i = 0; i < 4; i++) {
        mf_qtype t = MF_QTYPE_COUNT;
        cr_expect_eq(mf_qtype_parse(names[i], &t), MF_OK, "%s", names[i]);
        cr_expect_eq(t, want[i]);
        cr_expect_str_eq(mf_qtype_name(want[i]), names[i]);
    }
    const char *bad[] = {"", "F32", "q5", "q4 ", " q4", "f16", "bf", "q", "fp32", "q44"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mf_qtype t = MF_QTYPE_Q4;
        cr_expect_eq(mf_qtype_parse(bad[i], &t), MF_ERR_ARG, "'%s' accepted", bad[i]);
        cr_expect_eq(t, MF_QTYPE_Q4, "'%s' changed the output", bad[i]);
    }
    mf_qtype t;
    cr_expect_eq(mf_qtype_parse(NULL, &t), MF_ERR_ARG);
    cr_expect_eq(mf_qtype_parse("q4", NULL), MF_ERR_ARG);
}
