/* tokenizer.c - Hugging Face tokenizer.json byte-level BPE: loading, encoding (added tokens,
 * normalizers, Split/ByteLevel/Digits pre-tokenizers, BPE by merge rank), post-processing, decoding.
 * Not chat templates, not Unigram/WordPiece models, not offsets; truncation and padding are ignored.
 *
 * Equality with `tokenizers` (Rust, 0.23) rests on these choices, each checked against it:
 * - Regexes run on PCRE2 (UTF + UCP), rewritten from Oniguruma's reading: \s is Unicode
 *   White_Space (PCRE2 adds U+180E), and \p{..} of a general category also holds the code points
 *   of Unicode 15.0-16.0 (Oniguruma has 16.0 tables, PCRE2 10.42 has 14.0).
 * - Each pre-tokenizer step sees one piece at a time as its whole subject (lookahead such as
 *   (?!\S) stops at the piece's end), as PreTokenizedString::split does.
 * - Added tokens are found leftmost-longest (aho-corasick LeftmostLongest): normalized=false ones
 *   on the raw text, then normalized=true ones on each normalized piece; lstrip, rstrip and
 *   single_word as AddedVocabulary does. Their ids are the ones AddedVocabulary::add_tokens gives
 *   (the vocab's id for a content already there, else the next free one), not the file's "id".
 * - tok_encode(parse_special=0) treats every added token, special or not, as plain text.
 * - Input must be valid UTF-8 (a Rust &str): anything else is refused with MF_ERR_ARG.
 * - add_special: the tokenizer.json post_processor (TemplateProcessing "single", Bert/Roberta,
 *   Sequence; ByteLevel adds nothing), as tokenizers and transformers 5 apply it.
 *   tokenizer_config.json's add_bos_token/add_eos_token are not applied on top: transformers 5.17
 *   does not either (DeepSeek-V3's config says add_bos_token, yet neither adds a BOS; its chat
 *   template writes the BOS itself).
 * - Decoding maps each token through the ByteLevel table (a token with a character outside it is
 *   taken as its raw UTF-8, as tokenizers does), drops unknown ids, and replaces invalid UTF-8 the
 *   way Rust's String::from_utf8_lossy does: one U+FFFD per maximal invalid subsequence. With no
 *   decoder, tokens are joined by spaces.
 * Not supported (refused naming the field): BPE dropout and byte_fallback, other model,
 * normalizer, pre-tokenizer, post-processor and decoder types.
 * Thread safety: a loaded tokenizer may be used from several threads; its word cache has a lock. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "text/tokenizer.h"

#include <cJSON.h>
#include <errno.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#define TOK_MAX_ID (1 << 24)  /* ids at or above this are refused as malformed */
#define TOK_MAX_STEPS 16      /* pre-tokenizer steps after flattening Sequences */
#define TOK_MAX_NORMS 16

/* ---- growable buffers ---- */

typedef struct bbuf { /* bytes, malloc'd; n used of cap */
    char *p;
    size_t n, cap;
} bbuf;

static int bbuf_reserve(bbuf *b, size_t extra) {
    if (b->n + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int bbuf_put(bbuf *b, const void *s, size_t n) {
    if (bbuf_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

typedef struct ivec { /* int32 values, malloc'd; n used of cap */
    int32_t *p;
    size_t n, cap;
} ivec;

static int ivec_reserve(ivec *v, size_t extra) {
    if (v->n + extra <= v->cap) return 0;
    size_t cap = v->cap ? v->cap : 64;
    while (cap < v->n + extra) cap *= 2;
    int32_t *p = realloc(v->p, cap * sizeof *p);
    if (!p) return -1;
    v->p = p;
    v->cap = cap;
    return 0;
}

static int ivec_push(ivec *v, int32_t x) {
    if (ivec_reserve(v, 1)) return -1;
    v->p[v->n++] = x;
    return 0;
}

static uint64_t hash_bytes(const void *s, size_t n) {
    const unsigned char *p = s;
    uint64_t h = 0xcbf29ce484222325ull ^ n;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static uint32_t pow2_at_least(size_t n) {
    uint32_t c = 16;
    while (c < n) c *= 2;
    return c;
}

/* ---- string -> int32 map over a shared string pool ---- */

typedef struct smap_ent {
    uint32_t off, len; /* the key: pool bytes [off, off+len) */
    int32_t val;
} smap_ent;

typedef struct smap {
    int32_t *slot;  /* (cap) entry index, -1 = empty; cap a power of two, >= 2 x entries */
    smap_ent *ent;  /* (n) entries */
    uint32_t cap, n;
} smap;

static int smap_init(smap *m, size_t n_max) {
    m->cap = pow2_at_least(2 * n_max + 1);
    m->n = 0;
    m->slot = malloc(m->cap * sizeof *m->slot);
    m->ent = malloc((n_max + 1) * sizeof *m->ent);
    if (!m->slot || !m->ent) return -1;
    memset(m->slot, 0xff, m->cap * sizeof *m->slot);
    return 0;
}

static void smap_free(smap *m) {
    free(m->slot);
    free(m->ent);
}

/* Returns the slot holding key s (or the empty slot where it would go). */
static uint32_t smap_find(const smap *m, const char *pool, const char *s, size_t n) {
    uint32_t i = (uint32_t)hash_bytes(s, n) & (m->cap - 1);
    for (;;) {
        int32_t e = m->slot[i];
        if (e < 0) return i;
        const smap_ent *x = &m->ent[e];
        if (x->len == n && memcmp(pool + x->off, s, n) == 0) return i;
        i = (i + 1) & (m->cap - 1);
    }
}

static int32_t smap_get(const smap *m, const char *pool, const char *s, size_t n) {
    if (!m->slot) return -1;
    int32_t e = m->slot[smap_find(m, pool, s, n)];
    return e < 0 ? -1 : m->ent[e].val;
}

/* Inserts or overwrites (the last duplicate wins, as a Rust HashMap built from JSON does).
 * The caller guarantees room (n_max given to smap_init). */
static void smap_set(smap *m, const char *pool, uint32_t off, uint32_t len, int32_t val) {
    uint32_t i = smap_find(m, pool, pool + off, len);
    if (m->slot[i] >= 0) {
        m->ent[m->slot[i]].val = val;
        return;
    }
    m->ent[m->n] = (smap_ent){off, len, val};
    m->slot[i] = (int32_t)m->n++;
}

/* ---- (left id, right id) -> (rank, merged id) ---- */

typedef struct mmap {
    uint64_t *key;   /* (cap) left << 32 | right */
    int32_t *rank;   /* (cap) -1 = empty slot */
    int32_t *merged; /* (cap) */
    uint32_t cap;
} mmap;

static uint32_t mmap_slot(const mmap *m, uint64_t k) {
    uint32_t i = (uint32_t)((k * 0x9e3779b97f4a7c15ull) >> 32) & (m->cap - 1);
    while (m->rank[i] >= 0 && m->key[i] != k) i = (i + 1) & (m->cap - 1);
    return i;
}

static int mmap_get(const mmap *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged) {
    if (!m->cap) return 0;
    uint32_t i = mmap_slot(m, (uint64_t)(uint32_t)a << 32 | (uint32_t)b);
    if (m->rank[i] < 0) return 0;
    *rank = m->rank[i];
    *merged = m->merged[i];
    return 1;
}

/* ---- UTF-8 ---- */

/* Length of the valid UTF-8 character at s (n bytes available), 0 when invalid. */
static size_t utf8_valid_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    unsigned lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) len = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else return 0;
    if (n < len || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if ((s[i] & 0xc0) != 0x80) return 0;
    return len;
}

/* Offset of the first invalid byte, or n when s is valid UTF-8. */
static size_t utf8_check(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        size_t l = utf8_valid_len(p + i, n - i);
        if (!l) return i;
        i += l;
    }
    return n;
}

/* Decodes the (valid) character at s; sets *len. */
static int32_t utf8_decode(const char *s, size_t *len) {
    const unsigned char *p = (const unsigned char *)s;
    if (p[0] < 0x80) { *len = 1; return p[0]; }
    if (p[0] < 0xe0) { *len = 2; return (p[0] & 0x1f) << 6 | (p[1] & 0x3f); }
    if (p[0] < 0xf0) {
        *len = 3;
        return (p[0] & 0x0f) << 12 | (p[1] & 0x3f) << 6 | (p[2] & 0x3f);
    }
    *len = 4;
    return (p[0] & 0x07) << 18 | (p[1] & 0x3f) << 12 | (p[2] & 0x3f) << 6 | (p[3] & 0x3f);
}

static size_t utf8_char_len(unsigned char c) {
    return c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
}

/* tokenizers' Oniguruma has Unicode 16.0 tables, PCRE2 10.42 has 14.0 and utf8proc 15.0. These
 * are the code points Unicode 15.0, 15.1 and 16.0 assigned, with their general category (from
 * the 16.0 UCD; the one category change, U+1171E Mn -> Mc, keeps it a mark): each \p{..} of a
 * general category gains them, and ucd_category() knows them. */
typedef struct ucd_range {
    int32_t first, last;
    char cat[3];
} ucd_range;
static const ucd_range ucd_new[] = {
    {0x897, 0x897, "Mn"}, {0xCF3, 0xCF3, "Mc"}, {0xECE, 0xECE, "Mn"}, {0x1B4E, 0x1B4F, "Po"},
    {0x1B7F, 0x1B7F, "Po"}, {0x1C89, 0x1C89, "Lu"}, {0x1C8A, 0x1C8A, "Ll"}, {0x2427, 0x2429, "So"},
    {0x2FFC, 0x2FFF, "So"}, {0x31E4, 0x31E5, "So"}, {0x31EF, 0x31EF, "So"}, {0xA7CB, 0xA7CC, "Lu"},
    {0xA7CD, 0xA7CD, "Ll"}, {0xA7DA, 0xA7DA, "Lu"}, {0xA7DB, 0xA7DB, "Ll"}, {0xA7DC, 0xA7DC, "Lu"},
    {0x105C0, 0x105F3, "Lo"}, {0x10D40, 0x10D49, "Nd"}, {0x10D4A, 0x10D4D, "Lo"},
    {0x10D4E, 0x10D4E, "Lm"}, {0x10D4F, 0x10D4F, "Lo"}, {0x10D50, 0x10D65, "Lu"},
    {0x10D69, 0x10D6D, "Mn"}, {0x10D6E, 0x10D6E, "Pd"}, {0x10D6F, 0x10D6F, "Lm"},
    {0x10D70, 0x10D85, "Ll"}, {0x10D8E, 0x10D8F, "Sm"}, {0x10EC2, 0x10EC4, "Lo"},
    {0x10EFC, 0x10EFF, "Mn"}, {0x1123F, 0x11240, "Lo"}, {0x11241, 0x11241, "Mn"},
    {0x11380, 0x11389, "Lo"}, {0x1138B, 0x1138B, "Lo"}, {0x1138E, 0x1138E, "Lo"},
    {0x11390, 0x113B5, "Lo"}, {0x113B7, 0x113B7, "Lo"}, {0x113B8, 0x113BA, "Mc"},
    {0x113BB, 0x113C0, "Mn"}, {0x113C2, 0x113C2, "Mc"}, {0x113C5, 0x113C5, "Mc"},
    {0x113C7, 0x113CA, "Mc"}, {0x113CC, 0x113CD, "Mc"}, {0x113CE, 0x113CE, "Mn"},
    {0x113CF, 0x113CF, "Mc"}, {0x113D0, 0x113D0, "Mn"}, {0x113D1, 0x113D1, "Lo"},
    {0x113D2, 0x113D2, "Mn"}, {0x113D3, 0x113D3, "Lo"}, {0x113D4, 0x113D5, "Po"},
    {0x113D7, 0x113D8, "Po"}, {0x113E1, 0x113E2, "Mn"}, {0x116D0, 0x116E3, "Nd"},
    {0x1171E, 0x1171E, "Mc"}, {0x11B00, 0x11B09, "Po"}, {0x11BC0, 0x11BE0, "Lo"},
    {0x11BE1, 0x11BE1, "Po"}, {0x11BF0, 0x11BF9, "Nd"}, {0x11F00, 0x11F01, "Mn"},
    {0x11F02, 0x11F02, "Lo"}, {0x11F03, 0x11F03, "Mc"}, {0x11F04, 0x11F10, "Lo"},
    {0x11F12, 0x11F33, "Lo"}, {0x11F34, 0x11F35, "Mc"}, {0x11F36, 0x11F3A, "Mn"},
    {0x11F3E, 0x11F3F, "Mc"}, {0x11F40, 0x11F40, "Mn"}, {0x11F41, 0x11F41, "Mc"},
    {0x11F42, 0x11F42, "Mn"}, {0x11F43, 0x11F4F, "Po"}, {0x11F50, 0x11F59, "Nd"},
    {0x11F5A, 0x11F5A, "Mn"}, {0x1342F, 0x1342F, "Lo"}, {0x13439, 0x1343F, "Cf"},
    {0x13440, 0x13440, "Mn"}, {0x13441, 0x13446, "Lo"}, {0x13447, 0x13455, "Mn"},
    {0x13460, 0x143FA, "Lo"}, {0x16100, 0x1611D, "Lo"}, {0x1611E, 0x16129, "Mn"},
    {0x1612A, 0x1612C, "Mc"}, {0x1612D, 0x1612F, "Mn"}, {0x16130, 0x16139, "Nd"},
    {0x16D40, 0x16D42, "Lm"}, {0x16D43, 0x16D6A, "Lo"}, {0x16D6B, 0x16D6C, "Lm"},
    {0x16D6D, 0x16D6F, "Po"}, {0x16D70, 0x16D79, "Nd"}, {0x18CFF, 0x18CFF, "Lo"},
    {0x1B132, 0x1B132, "Lo"}, {0x1B155, 0x1B155, "Lo"}, {0x1CC00, 0x1CCEF, "So"},
    {0x1CCF0, 0x1CCF9, "Nd"}, {0x1CD00, 0x1CEB3, "So"}, {0x1D2C0, 0x1D2D3, "No"},
    {0x1DF25, 0x1DF2A, "Ll"}, {0x1E030, 0x1E06D, "Lm"}, {0x1E08F, 0x1E08F, "Mn"},
    {0x1E4D0, 0x1E4EA, "Lo"}, {0x1E4EB, 0x1E4EB, "Lm"}, {0x1E4EC, 0x1E4EF, "Mn"},
    {0x1E4F0, 0x1E4F9, "Nd"}, {0x1E5D0, 0x1E5ED, "Lo"}, {0x1E5EE, 0x1E5EF, "Mn"},
    {0x1E5F0, 0x1E5F0, "Lo"}, {0x1E5F1, 0x1E5FA, "Nd"}, {0x1E5FF, 0x1E5FF, "Po"},
    {0x1F6DC, 0x1F6DC, "So"}, {0x1F774, 0x1F776, "So"}, {0x1F77B, 0x1F77F, "So"},
    {0x1F7D9, 0x1F7D9, "So"}, {0x1F8B2, 0x1F8BB, "So"}, {0x1F8C0, 0x1F8C1, "So"},
    {0x1FA75, 0x1FA77, "So"}, {0x1FA87, 0x1FA89, "So"}, {0x1FA8F, 0x1FA8F, "So"},
    {0x1FAAD, 0x1FAAF, "So"}, {0x1FABB, 0x1FABF, "So"}, {0x1FAC6, 0x1FAC6, "So"},
    {0x1FACE, 0x1FACF, "So"}, {0x1FADA, 0x1FADC, "So"}, {0x1FADF, 0x1FADF, "So"},
    {0x1FAE8, 0x1FAE9, "So"}, {0x1FAF7, 0x1FAF8, "So"}, {0x1FBCB, 0x1FBEF, "So"},
    {0x2B739, 0x2B739, "Lo"}, {0x2EBF0, 0x2EE5D, "Lo"}, {0x31350, 0x323AF, "Lo"}
};

/* General category of c under Unicode 16.0. */
static utf8proc_category_t ucd_category(int32_t c) {
    utf8proc_category_t k = utf8proc_category(c);
    if (k != UTF8PROC_CATEGORY_CN) return k;
    static const char names[] = "CnLuLlLtLmLoMnMcMeNdNlNoPcPdPsPePiPfPoSmScSkSoZsZlZpCcCfCsCo";
    for (size_t i = 0; i < sizeof ucd_new / sizeof *ucd_new; i++)
        if (c >= ucd_new[i].first && c <= ucd_new[i].last)
            return (utf8proc_category_t)((strstr(names, ucd_new[i].cat) - names) / 2);
    return k;
}

/* Unicode White_Space (what \s means to Oniguruma and Rust's regex). */
static int is_white_space(int32_t c) {
    return (c >= 9 && c <= 13) || c == 0x20 || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
           c == 0x205f || c == 0x3000;
}

/* Rust's \w: alphabetic, marks, decimal digits, connector punctuation (approximated by
 * categories L*, M*, Nd, Nl, Pc). */
static int is_word_char(int32_t c) {
    utf8proc_category_t k = ucd_category(c);
    return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_ME) || k == UTF8PROC_CATEGORY_ND ||
           k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_PC;
}

/* Rust's char::is_numeric: general category Nd, Nl or No. */
static int is_numeric(int32_t c) {
    utf8proc_category_t k = ucd_category(c);
    return k == UTF8PROC_CATEGORY_ND || k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_NO;
}

/* Lossy UTF-8 repair, incremental: bytes go in, whole characters (or U+FFFD for each maximal
 * invalid subsequence, as String::from_utf8_lossy) come out. pend holds an incomplete but so
 * far valid character. Output goes to out[*w..cap); characters that do not fit are dropped. */
typedef struct lossy {
    unsigned char *pend; /* (4) view of the caller's pending bytes */
    int *n_pend;
    char *out;
    size_t cap, *w;
} lossy;

static void lossy_emit(lossy *z, const void *s, size_t n) {
    if (!n || *z->w + n > z->cap) return;
    memcpy(z->out + *z->w, s, n);
    *z->w += n;
}

static void lossy_feed(lossy *z, const unsigned char *s, size_t n) {
    static const unsigned char repl[3] = {0xef, 0xbf, 0xbd};
    for (size_t i = 0; i < n; i++) {
        unsigned b = s[i];
        if (*z->n_pend) {
            unsigned c0 = z->pend[0], lo = 0x80, hi = 0xbf;
            if (*z->n_pend == 1) {
                if (c0 == 0xe0) lo = 0xa0;
                if (c0 == 0xed) hi = 0x9f;
                if (c0 == 0xf0) lo = 0x90;
                if (c0 == 0xf4) hi = 0x8f;
            }
            if (b >= lo && b <= hi) {
                z->pend[(*z->n_pend)++] = (unsigned char)b;
                if ((size_t)*z->n_pend == utf8_char_len(z->pend[0])) {
                    lossy_emit(z, z->pend, (size_t)*z->n_pend);
                    *z->n_pend = 0;
                }
                continue;
            }
            lossy_emit(z, repl, 3); /* the pending prefix was a maximal invalid subsequence */
            *z->n_pend = 0;
        }
        if (b < 0x80) {
            char c = (char)b;
            lossy_emit(z, &c, 1);
        } else if (b >= 0xc2 && b <= 0xf4) {
            z->pend[0] = (unsigned char)b;
            *z->n_pend = 1;
        } else {
            lossy_emit(z, repl, 3);
        }
    }
}

static void lossy_finish(lossy *z) {
    static const unsigned char repl[3] = {0xef, 0xbf, 0xbd};
    if (*z->n_pend) lossy_emit(z, repl, 3);
    *z->n_pend = 0;
}

/* ---- the GPT-2 byte <-> unicode table ---- */

typedef struct byte_table {
    char enc[256][2];       /* UTF-8 of the character standing for each byte */
    unsigned char len[256]; /* 1 or 2 */
    int16_t dec[324];       /* code point (< 324) -> byte, -1 when not in the table */
} byte_table;

static void byte_table_init(byte_table *bt) {
    int cp[256], n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
        cp[b] = printable ? b : 256 + n++;
    }
    for (int i = 0; i < 324; i++) bt->dec[i] = -1;
    for (int b = 0; b < 256; b++) {
        bt->len[b] = (unsigned char)utf8proc_encode_char(cp[b], (utf8proc_uint8_t *)bt->enc[b]);
        bt->dec[cp[b]] = (int16_t)b;
    }
}

/* ---- the tokenizer ---- */

typedef enum norm_kind { NORM_NFC, NORM_NFD, NORM_NFKC, NORM_NFKD } norm_kind;

typedef enum pre_kind { PRE_SPLIT, PRE_BYTELEVEL, PRE_DIGITS } pre_kind;

typedef enum split_beh {
    SPLIT_ISOLATED,
    SPLIT_REMOVED,
    SPLIT_MERGED_PREV,
    SPLIT_MERGED_NEXT,
    SPLIT_CONTIGUOUS
} split_beh;

typedef struct pre_step {
    pre_kind kind;
    split_beh beh;        /* Split; Digits uses Isolated or Contiguous; ByteLevel Isolated */
    int invert;
    pcre2_code *re;       /* owned; Split {Regex}, ByteLevel with use_regex; NULL otherwise */
    int jit;              /* re was JIT-compiled */
    char *lit;            /* owned; Split {String}; lit_len bytes */
    size_t lit_len;
    int add_prefix_space; /* ByteLevel */
} pre_step;

typedef struct added_tok {
    int32_t id;
    uint32_t off, len; /* content: pool bytes */
    uint32_t noff, nlen; /* content after the normalizer (normalized tokens) */
    unsigned char special, lstrip, rstrip, normalized, single_word;
} added_tok;

typedef struct trie_node {
    int32_t child, sibling; /* node indexes, -1 = none */
    int32_t tok;            /* index into added[], -1 = no token ends here */
    unsigned char byte;
} trie_node;

typedef struct trie {
    int32_t root[256]; /* first byte -> node, -1 = none */
    trie_node *node;   /* (n) malloc'd */
    size_t n, cap;
    int n_tok;
} trie;

#define CACHE_SLOTS (1u << 16)
#define CACHE_MAX_ENT (CACHE_SLOTS / 2)
#define CACHE_MAX_WORD 64
#define CACHE_KEY_POOL (CACHE_MAX_ENT * 16)
#define CACHE_ID_POOL (CACHE_MAX_ENT * 6)

typedef struct cache_ent {
    uint64_t h;
    uint32_t key_off, ids_off;
    uint16_t key_len, n_ids;
} cache_ent;

/* word (ByteLevel-mapped pre-token) -> BPE ids; cleared when full; guarded by mu. One calloc. */
typedef struct bpe_cache {
    pthread_mutex_t mu;
    uint32_t n_ent, keys_len, ids_len;
    uint32_t slot[CACHE_SLOTS];     /* entry index + 1, 0 = empty */
    cache_ent ent[CACHE_MAX_ENT];
    char keys[CACHE_KEY_POOL];      /* key bytes of the entries */
    int32_t ids[CACHE_ID_POOL];     /* ids of the entries */
} bpe_cache;

struct tokenizer {
    bbuf pool;          /* every string: vocab keys, added contents, decoded bytes; NUL after each */
    int32_t n_ids;      /* highest id + 1 */
    uint32_t *id_off;   /* (n_ids) token text = pool + id_off[id], UINT32_MAX when the id is unused */
    uint32_t *dec_off;  /* (n_ids) decoded bytes of the token: pool + dec_off, dec_len[id] long */
    uint32_t *dec_len;  /* (n_ids) */
    unsigned char *special; /* (n_ids) 1 for special added tokens */

    smap vocab;         /* model vocab: string -> id */
    mmap merges;
    int32_t unk_id;     /* -1 without unk_token */
    int fuse_unk, ignore_merges;
    char *cont_prefix, *end_suffix; /* owned, NULL when absent or empty */

    added_tok *added;   /* (n_added) */
    int n_added;
    smap added_map;     /* content -> index into added */
    trie raw_trie, norm_trie; /* normalized=false / normalized=true added tokens */

    norm_kind norm[TOK_MAX_NORMS];
    int n_norm;
    pre_step pre[TOK_MAX_STEPS];
    int n_pre;

    ivec post_pre, post_post; /* ids the post-processor puts before / after the sequence */
    int decoder_bytelevel;    /* 1: ByteLevel decoder; 0: no decoder (tokens joined by " ") */

    byte_table bt;
    bpe_cache *cache;   /* mutable through a const tokenizer: encode is logically const */
};

/* ---- loading helpers ---- */

static int pool_add(tokenizer *t, const char *s, size_t n, uint32_t *off) {
    if (t->pool.n + n + 1 > UINT32_MAX - 1) return -1;
    *off = (uint32_t)t->pool.n;
    if (bbuf_put(&t->pool, s, n) || bbuf_put(&t->pool, "", 1)) return -1;
    return 0;
}

static const char *json_type(const cJSON *j) {
    const cJSON *ty = cJSON_GetObjectItemCaseSensitive(j, "type");
    return cJSON_IsString(ty) ? ty->valuestring : NULL;
}

static int json_bool(const cJSON *j, const char *name, int dflt) {
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(j, name);
    if (cJSON_IsBool(b)) return cJSON_IsTrue(b);
    return dflt;
}

/* Writes, as class ranges, the code points of ucd_new in the category named (L, Lu, L&, ...). */
static int ucd_new_ranges(const char *name, size_t len, bbuf *out) {
    if (len < 1 || len > 2) return 0;
    for (size_t i = 0; i < sizeof ucd_new / sizeof *ucd_new; i++) {
        const char *c = ucd_new[i].cat;
        int hit = len == 1 ? c[0] == name[0]
                           : (name[1] == '&' ? c[0] == 'L' && strchr("ult", c[1]) : !memcmp(c, name, 2));
        if (!hit) continue;
        char r[40];
        int k = snprintf(r, sizeof r, "\\x{%X}-\\x{%X}", (unsigned)ucd_new[i].first, (unsigned)ucd_new[i].last);
        if (bbuf_put(out, r, (size_t)k)) return -1;
    }
    return 0;
}

/* Rewrites an Oniguruma pattern for PCRE2: \s, \S and \h (hex digit in Oniguruma) become
 * explicit classes, \p{X} of a general category gains the code points of ucd_new. Returns 0, or -1 with why set for constructs PCRE2 would read otherwise. */
#define WS_BODY "\\t-\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"
static int regex_translate(const char *s, size_t n, bbuf *out, const char **why) {
    int in_class = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '\\' && i + 1 < n && (s[i + 1] == 'p' || s[i + 1] == 'P')) {
            int neg = s[i + 1] == 'P';
            size_t a = i + 2, e = a + 1; /* the name: s[a, e) */
            int braced = a < n && s[a] == '{';
            if (braced) {
                const char *close = memchr(s + a, '}', n - a);
                if (!close) { *why = "unterminated \\p{"; return -1; }
                a++;
                e = (size_t)(close - s);
                if (a < e && s[a] == '^') neg = !neg, a++;
            }
            if (e > n) { *why = "truncated \\p"; return -1; }
            bbuf extra = {0};
            if (ucd_new_ranges(s + a, e - a, &extra)) { free(extra.p); return -1; }
            size_t end = braced ? e + 1 : e;
            if (extra.n && neg && in_class) {
                free(extra.p);
                *why = "a negated Unicode property inside a character class";
                return -1;
            }
            int r = 0;
            if (!extra.n || in_class) {
                r = bbuf_put(out, s + i, end - i) || bbuf_put(out, extra.p, extra.n);
            } else {
                r = bbuf_put(out, neg ? "[^" : "[", neg ? 2 : 1) || bbuf_put(out, "\\p{", 3) ||
                    bbuf_put(out, s + a, e - a) || bbuf_put(out, "}", 1) || bbuf_put(out, extra.p, extra.n) ||
                    bbuf_put(out, "]", 1);
            }
            free(extra.p);
            if (r) return -1;
            i = end - 1;
            continue;
        }
        if (c == '\\' && i + 1 < n) {
            char d = s[++i];
            const char *rep = NULL;
            if (d == 's') rep = in_class ? WS_BODY : "[" WS_BODY "]";
            else if (d == 'S') {
                if (in_class) { *why = "\\S inside a character class"; return -1; }
                rep = "[^" WS_BODY "]";
            } else if (d == 'h') rep = in_class ? "0-9a-fA-F" : "[0-9a-fA-F]";
            else if (d == 'H') {
                if (in_class) { *why = "\\H inside a character class"; return -1; }
                rep = "[^0-9a-fA-F]";
            } else if (d == 'Q') { *why = "\\Q...\\E quoting"; return -1; }
            if (rep) {
                if (bbuf_put(out, rep, strlen(rep))) return -1;
            } else if (bbuf_put(out, s + i - 1, 2)) return -1;
            continue;
        }
        if (in_class) {
            if (c == '[' && i + 1 < n && s[i + 1] == ':') { /* POSIX [:name:] */
                const char *e = NULL;
                for (size_t k = i + 2; k + 1 < n; k++)
                    if (s[k] == ':' && s[k + 1] == ']') { e = s + k + 2; break; }
                if (!e) { *why = "unterminated [:class:]"; return -1; }
                if (bbuf_put(out, s + i, (size_t)(e - (s + i)))) return -1;
                i = (size_t)(e - s) - 1;
                continue;
            }
            if (c == '[') { *why = "nested character class"; return -1; }
            if (c == '&' && i + 1 < n && s[i + 1] == '&') { *why = "class intersection &&"; return -1; }
            if (c == ']') in_class = 0;
        } else if (c == '[') {
            in_class = 1;
            if (bbuf_put(out, "[", 1)) return -1;
            if (i + 1 < n && s[i + 1] == '^') { if (bbuf_put(out, "^", 1)) return -1; i++; }
            if (i + 1 < n && s[i + 1] == ']') { if (bbuf_put(out, "\\]", 2)) return -1; i++; }
            continue;
        }
        if (bbuf_put(out, &c, 1)) return -1;
    }
    return 0;
}

static mf_status regex_compile(pre_step *ps, const char *pat, size_t n, const char *what,
                               const char *field, mf_err *err) {
    bbuf tr = {0};
    const char *why = NULL;
    if (regex_translate(pat, n, &tr, &why)) {
        free(tr.p);
        if (!why) return err_set(err, MF_ERR_NOMEM, "%s: out of memory", what);
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: %s: regex uses %s: %.*s", what, field, why,
                       (int)(n > 200 ? 200 : n), pat);
    }
    int ec;
    PCRE2_SIZE eo;
    ps->re = pcre2_compile((PCRE2_SPTR)tr.p, tr.n, PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &ec, &eo,
                           NULL);
    free(tr.p);
    if (!ps->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof msg);
        return err_set(err, MF_ERR_FORMAT, "%s: %s: bad regex (%s): %.*s", what, field, (char *)msg,
                       (int)(n > 200 ? 200 : n), pat);
    }
    ps->jit = pcre2_jit_compile(ps->re, PCRE2_JIT_COMPLETE) == 0;
    return MF_OK;
}

static const char GPT2_RE[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static mf_status load_pretok(tokenizer *t, const cJSON *j, const char *what, mf_err *err) {
    if (!j || cJSON_IsNull(j)) return MF_OK;
    const char *ty = json_type(j);
    if (!ty) return err_set(err, MF_ERR_FORMAT, "%s: pre_tokenizer without a \"type\"", what);
    if (!strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "pretokenizers");
        if (!cJSON_IsArray(list))
            return err_set(err, MF_ERR_FORMAT, "%s: pre_tokenizer Sequence without \"pretokenizers\"", what);
        const cJSON *e;
        cJSON_ArrayForEach(e, list) {
            mf_status st = load_pretok(t, e, what, err);
            if (st) return st;
        }
        return MF_OK;
    }
    if (t->n_pre == TOK_MAX_STEPS)
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: more than %d pre-tokenizers", what, TOK_MAX_STEPS);
    pre_step *ps = &t->pre[t->n_pre];
    memset(ps, 0, sizeof *ps);
    if (!strcmp(ty, "Split")) {
        ps->kind = PRE_SPLIT;
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(j, "pattern");
        const cJSON *rx = cJSON_GetObjectItemCaseSensitive(pat, "Regex");
        const cJSON *str = cJSON_GetObjectItemCaseSensitive(pat, "String");
        const cJSON *beh = cJSON_GetObjectItemCaseSensitive(j, "behavior");
        static const char *names[] = {"Isolated", "Removed", "MergedWithPrevious", "MergedWithNext",
                                      "Contiguous"};
        int b = -1;
        for (int k = 0; k < 5 && cJSON_IsString(beh); k++)
            if (!strcmp(beh->valuestring, names[k])) b = k;
        if (b < 0)
            return err_set(err, cJSON_IsString(beh) ? MF_ERR_UNSUPPORTED : MF_ERR_FORMAT,
                           "%s: pre_tokenizer Split: behavior %s", what,
                           cJSON_IsString(beh) ? beh->valuestring : "missing");
        ps->beh = (split_beh)b;
        ps->invert = json_bool(j, "invert", 0);
        if (cJSON_IsString(rx)) {
            mf_status st = regex_compile(ps, rx->valuestring, strlen(rx->valuestring), what,
                                         "pre_tokenizer Split pattern", err);
            if (st) return st;
        } else if (cJSON_IsString(str)) {
            ps->lit_len = strlen(str->valuestring);
            ps->lit = malloc(ps->lit_len + 1);
            if (!ps->lit) return err_set(err, MF_ERR_NOMEM, "%s: out of memory", what);
            memcpy(ps->lit, str->valuestring, ps->lit_len + 1);
        } else {
            return err_set(err, MF_ERR_FORMAT, "%s: pre_tokenizer Split: pattern is neither {\"Regex\"} nor {\"String\"}", what);
        }
    } else if (!strcmp(ty, "ByteLevel")) {
        ps->kind = PRE_BYTELEVEL;
        ps->beh = SPLIT_ISOLATED;
        ps->add_prefix_space = json_bool(j, "add_prefix_space", 1);
        if (json_bool(j, "use_regex", 1)) {
            mf_status st = regex_compile(ps, GPT2_RE, strlen(GPT2_RE), what, "ByteLevel regex", err);
            if (st) return st;
        }
    } else if (!strcmp(ty, "Digits")) {
        ps->kind = PRE_DIGITS;
        ps->beh = json_bool(j, "individual_digits", 0) ? SPLIT_ISOLATED : SPLIT_CONTIGUOUS;
    } else {
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: pre_tokenizer type %s is not supported", what, ty);
    }
    t->n_pre++;
    return MF_OK;
}

static mf_status load_normalizer(tokenizer *t, const cJSON *j, const char *what, mf_err *err) {
    if (!j || cJSON_IsNull(j)) return MF_OK;
    const char *ty = json_type(j);
    if (!ty) return err_set(err, MF_ERR_FORMAT, "%s: normalizer without a \"type\"", what);
    if (!strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "normalizers");
        if (!cJSON_IsArray(list))
            return err_set(err, MF_ERR_FORMAT, "%s: normalizer Sequence without \"normalizers\"", what);
        const cJSON *e;
        cJSON_ArrayForEach(e, list) {
            mf_status st = load_normalizer(t, e, what, err);
            if (st) return st;
        }
        return MF_OK;
    }
    static const char *names[] = {"NFC", "NFD", "NFKC", "NFKD"};
    for (int k = 0; k < 4; k++) {
        if (strcmp(ty, names[k])) continue;
        if (t->n_norm == TOK_MAX_NORMS)
            return err_set(err, MF_ERR_UNSUPPORTED, "%s: more than %d normalizers", what, TOK_MAX_NORMS);
        t->norm[t->n_norm++] = (norm_kind)k;
        return MF_OK;
    }
    return err_set(err, MF_ERR_UNSUPPORTED, "%s: normalizer type %s is not supported", what, ty);
}

/* Applies the normalizers to s; returns a malloc'd NUL-terminated result (or NULL with *same set
 * when nothing can change). */
static char *normalize(const tokenizer *t, const char *s, size_t n, size_t *out_len, int *same) {
    char *cur = NULL;
    size_t cur_n = n;
    *same = 1;
    for (int k = 0; k < t->n_norm; k++) {
        const char *in = cur ? cur : s;
        unsigned char limit = t->norm[k] == NORM_NFC ? 0xcc : 0x80; /* below U+0300 / ASCII: no change */
        size_t i = 0;
        while (i < cur_n && (unsigned char)in[i] < limit) i++;
        if (i == cur_n) continue;
        int opt = UTF8PROC_STABLE;
        switch (t->norm[k]) {
        case NORM_NFC: opt |= UTF8PROC_COMPOSE; break;
        case NORM_NFD: opt |= UTF8PROC_DECOMPOSE; break;
        case NORM_NFKC: opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
        case NORM_NFKD: opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
        }
        utf8proc_uint8_t *o = NULL;
        utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)in, (utf8proc_ssize_t)cur_n, &o,
                                          (utf8proc_option_t)opt);
        free(cur);
        if (r < 0) return NULL; /* input is validated, so only out of memory */
        cur = (char *)o;
        cur_n = (size_t)r;
        *same = 0;
    }
    *out_len = cur_n;
    return cur;
}

static mf_status load_post(tokenizer *t, const cJSON *j, const char *what, mf_err *err) {
    if (!j || cJSON_IsNull(j)) return MF_OK;
    const char *ty = json_type(j);
    if (!ty) return err_set(err, MF_ERR_FORMAT, "%s: post_processor without a \"type\"", what);
    if (!strcmp(ty, "ByteLevel")) return MF_OK; /* offsets only */
    if (!strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "processors");
        if (!cJSON_IsArray(list))
            return err_set(err, MF_ERR_FORMAT, "%s: post_processor Sequence without \"processors\"", what);
        const cJSON *e;
        cJSON_ArrayForEach(e, list) { /* each later processor wraps what the earlier ones made */
            mf_status st = load_post(t, e, what, err);
            if (st) return st;
        }
        return MF_OK;
    }
    ivec pre = {0}, post = {0};
    int bad = 0, seen_a = 0;
    if (!strcmp(ty, "TemplateProcessing")) {
        const cJSON *single = cJSON_GetObjectItemCaseSensitive(j, "single");
        const cJSON *sp = cJSON_GetObjectItemCaseSensitive(j, "special_tokens");
        if (!cJSON_IsArray(single))
            return err_set(err, MF_ERR_FORMAT, "%s: post_processor TemplateProcessing without \"single\"", what);
        const cJSON *it;
        cJSON_ArrayForEach(it, single) {
            const cJSON *tok = cJSON_GetObjectItemCaseSensitive(it, "SpecialToken");
            const cJSON *seq = cJSON_GetObjectItemCaseSensitive(it, "Sequence");
            if (seq) { seen_a = 1; continue; }
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(tok, "id");
            const cJSON *def = cJSON_IsString(name) ? cJSON_GetObjectItemCaseSensitive(sp, name->valuestring) : NULL;
            const cJSON *ids = cJSON_GetObjectItemCaseSensitive(def, "ids");
            if (!cJSON_IsArray(ids)) {
                free(pre.p);
                free(post.p);
                return err_set(err, MF_ERR_FORMAT, "%s: post_processor TemplateProcessing: special token %s has no \"ids\" in special_tokens",
                               what, cJSON_IsString(name) ? name->valuestring : "(unnamed)");
            }
            const cJSON *id;
            cJSON_ArrayForEach(id, ids) {
                if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= TOK_MAX_ID) bad = 1;
                else if (ivec_push(seen_a ? &post : &pre, (int32_t)id->valuedouble)) bad = 2;
            }
        }
    } else if (!strcmp(ty, "BertProcessing") || !strcmp(ty, "RobertaProcessing")) {
        const cJSON *cls = cJSON_GetObjectItemCaseSensitive(j, "cls");
        const cJSON *sep = cJSON_GetObjectItemCaseSensitive(j, "sep");
        const cJSON *c1 = cJSON_GetArrayItem(cls, 1), *s1 = cJSON_GetArrayItem(sep, 1);
        if (!cJSON_IsNumber(c1) || !cJSON_IsNumber(s1))
            return err_set(err, MF_ERR_FORMAT, "%s: post_processor %s: cls/sep must be [token, id]", what, ty);
        if (ivec_push(&pre, (int32_t)c1->valuedouble) || ivec_push(&post, (int32_t)s1->valuedouble)) bad = 2;
    } else {
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: post_processor type %s is not supported", what, ty);
    }
    /* wrap: new pre + old pre ... old post + new post */
    if (!bad && (ivec_reserve(&pre, t->post_pre.n) || ivec_reserve(&post, t->post_post.n))) bad = 2;
    if (!bad) {
        if (t->post_pre.n) memcpy(pre.p + pre.n, t->post_pre.p, t->post_pre.n * sizeof *pre.p);
        pre.n += t->post_pre.n;
        if (post.n) memmove(post.p + t->post_post.n, post.p, post.n * sizeof *post.p);
        if (t->post_post.n) memcpy(post.p, t->post_post.p, t->post_post.n * sizeof *post.p);
        post.n += t->post_post.n;
        free(t->post_pre.p);
        free(t->post_post.p);
        t->post_pre = pre;
        t->post_post = post;
        return MF_OK;
    }
    free(pre.p);
    free(post.p);
    if (bad == 2) return err_set(err, MF_ERR_NOMEM, "%s: out of memory", what);
    return err_set(err, MF_ERR_FORMAT, "%s: post_processor %s: a special token id is not a valid id", what, ty);
}

static mf_status load_decoder(tokenizer *t, const cJSON *j, const char *what, mf_err *err) {
    if (!j || cJSON_IsNull(j)) return MF_OK;
    const char *ty = json_type(j);
    if (!ty) return err_set(err, MF_ERR_FORMAT, "%s: decoder without a \"type\"", what);
    if (!strcmp(ty, "ByteLevel")) {
        t->decoder_bytelevel = 1;
        return MF_OK;
    }
    if (!strcmp(ty, "Sequence")) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "decoders");
        if (cJSON_IsArray(list) && cJSON_GetArraySize(list) == 1)
            return load_decoder(t, cJSON_GetArrayItem(list, 0), what, err);
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: decoder Sequence is supported only with one ByteLevel decoder", what);
    }
    return err_set(err, MF_ERR_UNSUPPORTED, "%s: decoder type %s is not supported", what, ty);
}

static mf_status oom(mf_err *err, const char *what) {
    return err_set(err, MF_ERR_NOMEM, "%s: out of memory", what);
}

static mf_status load_bpe(tokenizer *t, const cJSON *model, const char *what, mf_err *err) {
    if (!cJSON_IsObject(model)) return err_set(err, MF_ERR_FORMAT, "%s: no \"model\" object", what);
    const char *ty = json_type(model);
    if (ty && strcmp(ty, "BPE"))
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: model type %s is not supported (only BPE)", what, ty);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    if (!cJSON_IsObject(vocab)) return err_set(err, MF_ERR_FORMAT, "%s: model.vocab missing or not an object", what);
    if (!cJSON_IsArray(merges)) return err_set(err, MF_ERR_FORMAT, "%s: model.merges missing or not an array", what);
    const cJSON *drop = cJSON_GetObjectItemCaseSensitive(model, "dropout");
    if (cJSON_IsNumber(drop) && drop->valuedouble > 0)
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: model.dropout %g (random BPE) is not supported", what, drop->valuedouble);
    t->fuse_unk = json_bool(model, "fuse_unk", 0);
    if (json_bool(model, "byte_fallback", 0))
        return err_set(err, MF_ERR_UNSUPPORTED, "%s: model.byte_fallback (<0xXX> tokens) is not supported", what);
    t->ignore_merges = json_bool(model, "ignore_merges", 0);
    const cJSON *cp = cJSON_GetObjectItemCaseSensitive(model, "continuing_subword_prefix");
    const cJSON *es = cJSON_GetObjectItemCaseSensitive(model, "end_of_word_suffix");
    if (cJSON_IsString(cp) && cp->valuestring[0] && !(t->cont_prefix = strdup(cp->valuestring))) return oom(err, what);
    if (cJSON_IsString(es) && es->valuestring[0] && !(t->end_suffix = strdup(es->valuestring))) return oom(err, what);

    int n_vocab = cJSON_GetArraySize(vocab);
    if (smap_init(&t->vocab, (size_t)n_vocab)) return oom(err, what);
    const cJSON *e;
    int32_t max_id = -1;
    cJSON_ArrayForEach(e, vocab) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble >= TOK_MAX_ID || e->valuedouble != (int32_t)e->valuedouble)
            return err_set(err, MF_ERR_FORMAT, "%s: model.vocab[\"%.100s\"] is not a valid id", what, e->string);
        uint32_t off;
        if (pool_add(t, e->string, strlen(e->string), &off)) return oom(err, what);
        smap_set(&t->vocab, t->pool.p, off, (uint32_t)strlen(e->string), (int32_t)e->valuedouble);
        if ((int32_t)e->valuedouble > max_id) max_id = (int32_t)e->valuedouble;
    }
    t->n_ids = max_id + 1;

    const cJSON *unk = cJSON_GetObjectItemCaseSensitive(model, "unk_token");
    t->unk_id = -1;
    if (cJSON_IsString(unk)) {
        t->unk_id = smap_get(&t->vocab, t->pool.p, unk->valuestring, strlen(unk->valuestring));
        if (t->unk_id < 0)
            return err_set(err, MF_ERR_FORMAT, "%s: model.unk_token \"%.100s\" is not in the vocab", what, unk->valuestring);
    }

    size_t n_merges = (size_t)cJSON_GetArraySize(merges);
    t->merges.cap = pow2_at_least(2 * n_merges + 1);
    t->merges.key = malloc(t->merges.cap * sizeof *t->merges.key);
    t->merges.rank = malloc(t->merges.cap * sizeof *t->merges.rank);
    t->merges.merged = malloc(t->merges.cap * sizeof *t->merges.merged);
    if (!t->merges.key || !t->merges.rank || !t->merges.merged) return oom(err, what);
    memset(t->merges.rank, 0xff, t->merges.cap * sizeof *t->merges.rank);
    size_t plen = t->cont_prefix ? strlen(t->cont_prefix) : 0;
    bbuf joined = {0};
    int32_t rank = 0;
    size_t idx = 0;
    cJSON_ArrayForEach(e, merges) {
        const char *a, *b;
        size_t la, lb;
        char *sp = NULL;
        if (cJSON_IsString(e)) { /* "a b": exactly one space; "#version" lines are skipped */
            if (!strncmp(e->valuestring, "#version", 8)) { idx++; continue; }
            sp = strchr(e->valuestring, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                free(joined.p);
                return err_set(err, MF_ERR_FORMAT, "%s: model.merges[%zu] \"%.100s\" is not \"a b\"", what, idx, e->valuestring);
            }
            a = e->valuestring;
            la = (size_t)(sp - a);
            b = sp + 1;
            lb = strlen(b);
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(e, 0)) && cJSON_IsString(cJSON_GetArrayItem(e, 1))) {
            a = cJSON_GetArrayItem(e, 0)->valuestring;
            b = cJSON_GetArrayItem(e, 1)->valuestring;
            la = strlen(a);
            lb = strlen(b);
        } else {
            free(joined.p);
            return err_set(err, MF_ERR_FORMAT, "%s: model.merges[%zu] is neither \"a b\" nor [a, b]", what, idx);
        }
        int32_t ia = smap_get(&t->vocab, t->pool.p, a, la), ib = smap_get(&t->vocab, t->pool.p, b, lb);
        joined.n = 0;
        size_t skip = plen <= lb ? plen : lb;
        if (bbuf_put(&joined, a, la) || bbuf_put(&joined, b + skip, lb - skip)) {
            free(joined.p);
            return oom(err, what);
        }
        int32_t im = smap_get(&t->vocab, t->pool.p, joined.p, joined.n);
        if (ia < 0 || ib < 0 || im < 0) {
            const char *miss = ia < 0 ? a : ib < 0 ? b : joined.p;
            int ml = (int)(ia < 0 ? la : ib < 0 ? lb : joined.n);
            free(joined.p);
            return err_set(err, MF_ERR_FORMAT, "%s: model.merges[%zu]: token \"%.*s\" is not in the vocab", what, idx,
                           ml > 100 ? 100 : ml, miss);
        }
        uint32_t s = mmap_slot(&t->merges, (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib);
        t->merges.key[s] = (uint64_t)(uint32_t)ia << 32 | (uint32_t)ib;
        t->merges.rank[s] = rank++; /* a repeated pair keeps its last rank, as the HashMap does */
        t->merges.merged[s] = im;
        idx++;
    }
    free(joined.p);
    return MF_OK;
}

static int trie_add(trie *tr, const char *s, size_t n, int32_t tok) {
    if (!n) return 0;
    int32_t *link = &tr->root[(unsigned char)s[0]];
    int32_t nd = -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)s[i];
        if (i > 0) link = &tr->node[nd].child;
        int32_t c = *link;
        while (c >= 0 && tr->node[c].byte != b) c = tr->node[c].sibling;
        if (c < 0) {
            if (tr->n == tr->cap) {
                size_t cap = tr->cap ? tr->cap * 2 : 256;
                trie_node *p = realloc(tr->node, cap * sizeof *p);
                if (!p) return -1;
                tr->node = p;
                tr->cap = cap;
                if (i > 0) link = &tr->node[nd].child; /* the array moved */
            }
            c = (int32_t)tr->n++;
            tr->node[c] = (trie_node){-1, *link, -1, b};
            *link = c;
        }
        nd = c;
    }
    tr->node[nd].tok = tok;
    tr->n_tok++;
    return 0;
}

static mf_status load_added(tokenizer *t, const cJSON *list, const char *what, mf_err *err) {
    for (int k = 0; k < 256; k++) t->raw_trie.root[k] = t->norm_trie.root[k] = -1;
    if (!list || cJSON_IsNull(list)) return smap_init(&t->added_map, 0) ? oom(err, what) : MF_OK;
    if (!cJSON_IsArray(list)) return err_set(err, MF_ERR_FORMAT, "%s: added_tokens is not an array", what);
    int n = cJSON_GetArraySize(list);
    t->added = calloc((size_t)n + 1, sizeof *t->added);
    if (!t->added || smap_init(&t->added_map, (size_t)n)) return oom(err, what);
    const cJSON *e;
    int i = 0;
    int32_t max_added = -1, n_vocab = (int32_t)t->vocab.n;
    int k = 0;
    cJSON_ArrayForEach(e, list) { /* ids as AddedVocabulary::add_tokens gives them; "id" is only checked */
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble >= TOK_MAX_ID || !cJSON_IsString(content))
            return err_set(err, MF_ERR_FORMAT, "%s: added_tokens[%d] needs a valid \"id\" and a \"content\" string", what, k);
        k++;
        size_t len = strlen(content->valuestring);
        int32_t dup = smap_get(&t->added_map, t->pool.p, content->valuestring, len);
        if (!len || dup >= 0) { /* ignored; a special duplicate still makes the content special */
            if (dup >= 0 && json_bool(e, "special", 0)) t->added[dup].special = 1;
            continue;
        }
        added_tok *a = &t->added[i];
        a->id = smap_get(&t->vocab, t->pool.p, content->valuestring, len);
        if (a->id < 0) a->id = max_added < 0 ? n_vocab : max_added >= n_vocab ? max_added + 1 : n_vocab;
        if (a->id >= TOK_MAX_ID) return err_set(err, MF_ERR_FORMAT, "%s: too many added_tokens", what);
        if (a->id > max_added) max_added = a->id;
        if (pool_add(t, content->valuestring, len, &a->off)) return oom(err, what);
        a->len = (uint32_t)len;
        a->special = (unsigned char)json_bool(e, "special", 0);
        a->lstrip = (unsigned char)json_bool(e, "lstrip", 0);
        a->rstrip = (unsigned char)json_bool(e, "rstrip", 0);
        a->single_word = (unsigned char)json_bool(e, "single_word", 0);
        a->normalized = (unsigned char)json_bool(e, "normalized", !a->special);
        a->noff = a->off;
        a->nlen = a->len;
        if (a->normalized && t->n_norm) { /* matched against normalized text: normalize it too */
            int same;
            size_t nl = 0;
            char *ns = normalize(t, content->valuestring, len, &nl, &same);
            if (!same) {
                if (!ns || pool_add(t, ns, nl, &a->noff)) { free(ns); return oom(err, what); }
                a->nlen = (uint32_t)nl;
            }
            free(ns);
        }
        smap_set(&t->added_map, t->pool.p, a->off, a->len, i);
        if (a->id >= t->n_ids) t->n_ids = a->id + 1;
        i++;
    }
    t->n_added = i;
    for (i = 0; i < t->n_added; i++) {
        added_tok *a = &t->added[i];
        int r = a->normalized ? trie_add(&t->norm_trie, t->pool.p + a->noff, a->nlen, i)
                              : trie_add(&t->raw_trie, t->pool.p + a->off, a->len, i);
        if (r) return oom(err, what);
    }
    return MF_OK;
}

/* The token's string in the pool (added tokens first, as AddedVocabulary::simple_id_to_token). */
static mf_status build_id_tables(tokenizer *t, const char *what, mf_err *err) {
    size_t n = (size_t)t->n_ids;
    t->id_off = malloc((n + 1) * sizeof *t->id_off);
    t->dec_off = malloc((n + 1) * sizeof *t->dec_off);
    t->dec_len = calloc(n + 1, sizeof *t->dec_len);
    t->special = calloc(n + 1, 1);
    if (!t->id_off || !t->dec_off || !t->dec_len || !t->special) return oom(err, what);
    memset(t->id_off, 0xff, (n + 1) * sizeof *t->id_off);
    for (uint32_t k = 0; k < t->vocab.n; k++) t->id_off[t->vocab.ent[k].val] = t->vocab.ent[k].off;
    for (int k = 0; k < t->n_added; k++) {
        t->id_off[t->added[k].id] = t->added[k].off;
        t->special[t->added[k].id] = t->added[k].special;
    }
    bbuf tmp = {0};
    for (size_t id = 0; id < n; id++) {
        t->dec_off[id] = t->id_off[id];
        if (t->id_off[id] == UINT32_MAX) continue;
        const char *s = t->pool.p + t->id_off[id];
        size_t len = strlen(s);
        t->dec_len[id] = (uint32_t)len;
        if (!t->decoder_bytelevel) continue;
        tmp.n = 0;
        int all = 1;
        for (size_t i = 0; i < len;) {
            size_t cl;
            int32_t c = utf8_decode(s + i, &cl);
            i += cl;
            if (c >= 324 || t->bt.dec[c] < 0) { all = 0; break; }
            char b = (char)t->bt.dec[c];
            if (bbuf_put(&tmp, &b, 1)) { free(tmp.p); return oom(err, what); }
        }
        if (!all) continue; /* a character outside the table: the token's raw UTF-8 */
        uint32_t off;
        if (pool_add(t, tmp.p, tmp.n, &off)) { free(tmp.p); return oom(err, what); }
        t->dec_off[id] = off;
        t->dec_len[id] = (uint32_t)tmp.n;
    }
    free(tmp.p);
    return MF_OK;
}

/* tokenizer_config.json: BOS/EOS only when the post-processor adds nothing itself. */
static mf_status load_config(tokenizer *t, const char *config_json, const char *what, mf_err *err) {
    cJSON *cfg = cJSON_Parse(config_json);
    if (!cfg || !cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return err_set(err, MF_ERR_FORMAT, "%s: tokenizer_config.json is not a JSON object", what);
    }
    mf_status st = MF_OK;
    /* The flags are read and their tokens checked, but only a tokenizer.json post_processor adds
     * tokens (see the top of this file). */
    if (!t->post_pre.n && !t->post_post.n) {
        static const char *flags[2] = {"add_bos_token", "add_eos_token"};
        static const char *names[2] = {"bos_token", "eos_token"};
        for (int k = 0; k < 2 && !st; k++) {
            if (!json_bool(cfg, flags[k], 0)) continue;
            const cJSON *tok = cJSON_GetObjectItemCaseSensitive(cfg, names[k]);
            if (cJSON_IsObject(tok)) tok = cJSON_GetObjectItemCaseSensitive(tok, "content");
            int32_t id = cJSON_IsString(tok) ? tok_token_id(t, tok->valuestring) : -1;
            if (id < 0) {
                st = err_set(err, MF_ERR_FORMAT, "%s: tokenizer_config.json: %s is true but %s is %s", what,
                             flags[k], names[k], cJSON_IsString(tok) ? "not a known token" : "missing");
            }
        }
    }
    cJSON_Delete(cfg);
    return st;
}

void tok_free(tokenizer *t) {
    if (!t) return;
    free(t->pool.p);
    free(t->id_off);
    free(t->dec_off);
    free(t->dec_len);
    free(t->special);
    smap_free(&t->vocab);
    free(t->merges.key);
    free(t->merges.rank);
    free(t->merges.merged);
    free(t->cont_prefix);
    free(t->end_suffix);
    free(t->added);
    smap_free(&t->added_map);
    free(t->raw_trie.node);
    free(t->norm_trie.node);
    for (int k = 0; k < t->n_pre; k++) {
        pcre2_code_free(t->pre[k].re);
        free(t->pre[k].lit);
    }
    free(t->post_pre.p);
    free(t->post_post.p);
    if (t->cache) pthread_mutex_destroy(&t->cache->mu);
    free(t->cache);
    free(t);
}

mf_status tok_load(tokenizer **out, const char *tokenizer_json, size_t len, const char *config_json,
                   const char *what, mf_err *err) {
    if (!what) what = "tokenizer.json";
    if (!out || !tokenizer_json) return err_set(err, MF_ERR_ARG, "%s: tok_load: NULL argument", what);
    *out = NULL;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(tokenizer_json, len, &end, 0);
    if (!root) {
        size_t at = end && end >= tokenizer_json ? (size_t)(end - tokenizer_json) : 0;
        return err_set(err, MF_ERR_FORMAT, "%s: malformed JSON near byte %zu", what, at);
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return err_set(err, MF_ERR_FORMAT, "%s: not a JSON object", what);
    }
    tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        cJSON_Delete(root);
        return oom(err, what);
    }
    byte_table_init(&t->bt);
    for (int k = 0; k < 256; k++) t->raw_trie.root[k] = t->norm_trie.root[k] = -1;
    mf_status st = load_bpe(t, cJSON_GetObjectItemCaseSensitive(root, "model"), what, err);
    if (!st) st = load_normalizer(t, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), what, err);
    if (!st) st = load_added(t, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"), what, err);
    if (!st) st = load_pretok(t, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), what, err);
    if (!st) st = load_post(t, cJSON_GetObjectItemCaseSensitive(root, "post_processor"), what, err);
    if (!st) st = load_decoder(t, cJSON_GetObjectItemCaseSensitive(root, "decoder"), what, err);
    cJSON_Delete(root);
    if (!st) st = build_id_tables(t, what, err);
    if (!st && config_json) st = load_config(t, config_json, what, err);
    if (!st) {
        if (!(t->cache = calloc(1, sizeof *t->cache))) st = oom(err, what);
        else pthread_mutex_init(&t->cache->mu, NULL);
    }
    if (st) {
        tok_free(t);
        return st;
    }
    *out = t;
    return MF_OK;
}

static char *read_all(const char *path, size_t *len, int *missing) {
    *missing = 0;
    FILE *f = fopen(path, "rb");
    if (!f) {
        *missing = errno == ENOENT;
        return NULL;
    }
    bbuf b = {0};
    char chunk[65536];
    size_t r;
    while ((r = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (bbuf_put(&b, chunk, r)) { fclose(f); free(b.p); return NULL; }
    int bad = ferror(f);
    fclose(f);
    if (bad || bbuf_put(&b, "", 1)) { free(b.p); return NULL; }
    *len = b.n - 1;
    return b.p ? b.p : NULL;
}

mf_status tok_load_dir(tokenizer **out, const char *dir, mf_err *err) {
    if (!out || !dir) return err_set(err, MF_ERR_ARG, "tok_load_dir: NULL argument");
    char path[4096], cpath[4096];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    snprintf(cpath, sizeof cpath, "%s/tokenizer_config.json", dir);
    size_t len = 0, clen = 0;
    int missing;
    char *json = read_all(path, &len, &missing);
    if (!json) return err_set(err, MF_ERR_IO, "%s: %s", path, missing ? "no such file" : "cannot read");
    char *cfg = read_all(cpath, &clen, &missing);
    if (!cfg && !missing) {
        free(json);
        return err_set(err, MF_ERR_IO, "%s: cannot read", cpath);
    }
    mf_status st = tok_load(out, json, len, cfg, path, err);
    free(json);
    free(cfg);
    return st;
}

/* ---- encoding ---- */

typedef struct bpe_sym {
    int32_t id, prev, next; /* prev/next: symbol indexes, -1 = none */
    int32_t len;            /* bytes covered; 0 = merged away */
} bpe_sym;

typedef struct bpe_merge {
    int32_t rank, pos, merged;
} bpe_merge;

typedef struct enc_ctx {
    const tokenizer *t;
    ivec *out;                        /* ids produced (the caller's) */
    bbuf pre[TOK_MAX_STEPS];          /* per ByteLevel step: the piece with its prefix space */
    bbuf map[TOK_MAX_STEPS];          /* per ByteLevel step: the byte-mapped piece */
    pcre2_match_data *md[TOK_MAX_STEPS]; /* per regex step */
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit_stack;       /* made on the first JIT stack overflow */
    bpe_sym *sym;                     /* (sym_cap) BPE scratch */
    bpe_merge *heap;                  /* (heap_cap) */
    size_t sym_cap, heap_cap;
    bbuf word;                        /* one character with prefix/suffix for vocab look-up */
    mf_status st;
    mf_err *err;
} enc_ctx;

static void enc_fail(enc_ctx *c, mf_status st, const char *msg) {
    if (c->st) return;
    c->st = err_set(c->err, st, "tokenizer: %s", msg);
}

static int cache_get(const tokenizer *t, uint64_t h, const char *w, size_t n, ivec *out) {
    bpe_cache *c = t->cache;
    int hit = 0;
    pthread_mutex_lock(&c->mu);
    for (uint32_t i = (uint32_t)h & (CACHE_SLOTS - 1);; i = (i + 1) & (CACHE_SLOTS - 1)) {
        uint32_t e = c->slot[i];
        if (!e) break;
        const cache_ent *x = &c->ent[e - 1];
        if (x->h == h && x->key_len == n && !memcmp(c->keys + x->key_off, w, n)) {
            if (!ivec_reserve(out, x->n_ids)) {
                memcpy(out->p + out->n, c->ids + x->ids_off, x->n_ids * sizeof *out->p);
                out->n += x->n_ids;
                hit = 1;
            }
            break;
        }
    }
    pthread_mutex_unlock(&c->mu);
    return hit;
}

static void cache_put(const tokenizer *t, uint64_t h, const char *w, size_t n, const int32_t *ids, size_t k) {
    bpe_cache *c = t->cache;
    pthread_mutex_lock(&c->mu);
    if (c->n_ent == CACHE_MAX_ENT || c->keys_len + n > CACHE_KEY_POOL || c->ids_len + k > CACHE_ID_POOL) {
        memset(c->slot, 0, CACHE_SLOTS * sizeof *c->slot); /* full: start again */
        c->n_ent = c->keys_len = c->ids_len = 0;
    }
    uint32_t i = (uint32_t)h & (CACHE_SLOTS - 1);
    for (;; i = (i + 1) & (CACHE_SLOTS - 1)) {
        uint32_t e = c->slot[i];
        if (!e) break;
        const cache_ent *x = &c->ent[e - 1];
        if (x->h == h && x->key_len == n && !memcmp(c->keys + x->key_off, w, n)) { /* raced */
            pthread_mutex_unlock(&c->mu);
            return;
        }
    }
    cache_ent *x = &c->ent[c->n_ent];
    *x = (cache_ent){h, c->keys_len, c->ids_len, (uint16_t)n, (uint16_t)k};
    memcpy(c->keys + c->keys_len, w, n);
    memcpy(c->ids + c->ids_len, ids, k * sizeof *ids);
    c->keys_len += (uint32_t)n;
    c->ids_len += (uint32_t)k;
    c->slot[i] = ++c->n_ent;
    pthread_mutex_unlock(&c->mu);
}

static int heap_less(const bpe_merge *a, const bpe_merge *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(bpe_merge *h, size_t *n, bpe_merge m) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&m, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = m;
}

static bpe_merge heap_pop(bpe_merge *h, size_t *n) {
    bpe_merge top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1;
        if (l >= *n) break;
        if (l + 1 < *n && heap_less(&h[l + 1], &h[l])) l++;
        if (!heap_less(&h[l], &last)) break;
        h[i] = h[l];
        i = l;
    }
    if (*n) h[i] = last;
    return top;
}

/* Looks up one character of a word (with continuing_subword_prefix / end_of_word_suffix). */
static int32_t bpe_char_id(enc_ctx *c, const char *s, size_t n, int first, int last) {
    const tokenizer *t = c->t;
    if ((first || !t->cont_prefix) && (!last || !t->end_suffix)) return smap_get(&t->vocab, t->pool.p, s, n);
    c->word.n = 0;
    if ((!first && t->cont_prefix && bbuf_put(&c->word, t->cont_prefix, strlen(t->cont_prefix))) ||
        bbuf_put(&c->word, s, n) || (last && t->end_suffix && bbuf_put(&c->word, t->end_suffix, strlen(t->end_suffix)))) {
        enc_fail(c, MF_ERR_NOMEM, "out of memory");
        return -1;
    }
    return smap_get(&t->vocab, t->pool.p, c->word.p, c->word.n);
}

/* BPE of one pre-token (tokenizers' BPE::merge_word + Word::merge_all). */
static void bpe_word(enc_ctx *c, const char *w, size_t n) {
    const tokenizer *t = c->t;
    if (t->ignore_merges) {
        int32_t id = smap_get(&t->vocab, t->pool.p, w, n);
        if (id >= 0) {
            if (ivec_push(c->out, id)) enc_fail(c, MF_ERR_NOMEM, "out of memory");
            return;
        }
    }
    uint64_t h = 0;
    if (n <= CACHE_MAX_WORD) {
        h = hash_bytes(w, n);
        if (cache_get(t, h, w, n, c->out)) return;
    }
    if (n + 1 > c->sym_cap) {
        size_t cap = n + 64;
        bpe_sym *s = realloc(c->sym, cap * sizeof *s);
        bpe_merge *hp = realloc(c->heap, 2 * cap * sizeof *hp);
        if (s) c->sym = s;
        if (hp) c->heap = hp;
        if (!s || !hp) { enc_fail(c, MF_ERR_NOMEM, "out of memory"); return; }
        c->sym_cap = cap;
        c->heap_cap = 2 * cap;
    }
    bpe_sym *sym = c->sym;
    int32_t ns = 0, unk = -1, unk_len = 0;
    for (size_t i = 0; i < n;) {
        size_t cl = utf8_char_len((unsigned char)w[i]);
        int32_t id = bpe_char_id(c, w + i, cl, i == 0, i + cl == n);
        if (c->st) return;
        if (id >= 0) {
            if (unk >= 0) { sym[ns++] = (bpe_sym){unk, 0, 0, unk_len}; unk = -1; }
            sym[ns++] = (bpe_sym){id, 0, 0, (int32_t)cl};
        } else if (t->unk_id >= 0) {
            if (unk >= 0 && t->fuse_unk) unk_len += (int32_t)cl;
            else {
                if (unk >= 0) sym[ns++] = (bpe_sym){unk, 0, 0, unk_len};
                unk = t->unk_id;
                unk_len = (int32_t)cl;
            }
        } /* else: dropped, as tokenizers does */
        i += cl;
    }
    if (unk >= 0) sym[ns++] = (bpe_sym){unk, 0, 0, unk_len};
    for (int32_t i = 0; i < ns; i++) {
        sym[i].prev = i - 1;
        sym[i].next = i + 1 < ns ? i + 1 : -1;
    }
    bpe_merge *heap = c->heap;
    size_t nh = 0;
    for (int32_t i = 0; i + 1 < ns; i++) {
        int32_t r, m;
        if (mmap_get(&t->merges, sym[i].id, sym[i + 1].id, &r, &m)) heap_push(heap, &nh, (bpe_merge){r, i, m});
    }
    while (nh) {
        bpe_merge top = heap_pop(heap, &nh);
        bpe_sym *cur = &sym[top.pos];
        if (cur->len == 0 || cur->next < 0) continue;
        int32_t nx = cur->next;
        int32_t r, m;
        if (!mmap_get(&t->merges, cur->id, sym[nx].id, &r, &m) || m != top.merged) continue; /* stale */
        cur->id = top.merged;
        cur->len += sym[nx].len;
        cur->next = sym[nx].next;
        sym[nx].len = 0;
        if (cur->next >= 0) sym[cur->next].prev = top.pos;
        if (nh + 2 > c->heap_cap) continue; /* cannot happen: pushes <= pops + 2 per step, heap is 2 x symbols */
        if (cur->prev >= 0 && mmap_get(&t->merges, sym[cur->prev].id, cur->id, &r, &m))
            heap_push(heap, &nh, (bpe_merge){r, cur->prev, m});
        if (cur->next >= 0 && mmap_get(&t->merges, cur->id, sym[cur->next].id, &r, &m))
            heap_push(heap, &nh, (bpe_merge){r, top.pos, m});
    }
    size_t start = c->out->n;
    if (ivec_reserve(c->out, (size_t)ns)) { enc_fail(c, MF_ERR_NOMEM, "out of memory"); return; }
    for (int32_t i = 0; i < ns; i++)
        if (sym[i].len) c->out->p[c->out->n++] = sym[i].id;
    if (n <= CACHE_MAX_WORD) cache_put(t, h, w, n, c->out->p + start, c->out->n - start);
}

static void pretok_run(enc_ctx *c, int step, const char *p, size_t n);

/* Receives a step's matches in order and applies the split behavior, handing each resulting
 * non-empty piece to the next step as soon as it is final. */
typedef struct span_sink {
    enc_ctx *c;
    int step;
    const char *p; /* the subject */
    split_beh beh;
    int invert;
    int have, raw; /* a pending piece [s, e) and the match flag of the span that made it last */
    size_t s, e;
} span_sink;

static void bytelevel_map_run(enc_ctx *c, int step, const char *p, size_t n) {
    bbuf *m = &c->map[step];
    m->n = 0;
    if (bbuf_reserve(m, 2 * n)) { enc_fail(c, MF_ERR_NOMEM, "out of memory"); return; }
    const byte_table *bt = &c->t->bt;
    char *o = m->p;
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)p[i];
        *o++ = bt->enc[b][0];
        if (bt->len[b] == 2) *o++ = bt->enc[b][1];
    }
    m->n = (size_t)(o - m->p);
    pretok_run(c, step + 1, m->p, m->n);
}

static void sink_emit(span_sink *k, size_t s, size_t e) {
    if (e <= s) return;
    if (k->c->t->pre[k->step].kind == PRE_BYTELEVEL) bytelevel_map_run(k->c, k->step, k->p + s, e - s);
    else pretok_run(k->c, k->step + 1, k->p + s, e - s);
}

static void sink_push(span_sink *k, size_t s, size_t e, int m) {
    if (k->invert) m = !m;
    switch (k->beh) {
    case SPLIT_ISOLATED: sink_emit(k, s, e); return;
    case SPLIT_REMOVED:
        if (!m) sink_emit(k, s, e);
        return;
    case SPLIT_CONTIGUOUS:
        if (k->have && m == k->raw) k->e = e;
        else {
            if (k->have) sink_emit(k, k->s, k->e);
            k->have = 1, k->s = s, k->e = e;
        }
        break;
    case SPLIT_MERGED_PREV:
        if (k->have && m && !k->raw) k->e = e;
        else {
            if (k->have) sink_emit(k, k->s, k->e);
            k->have = 1, k->s = s, k->e = e;
        }
        break;
    case SPLIT_MERGED_NEXT:
        if (k->have && k->raw && !m) k->e = e;
        else {
            if (k->have) sink_emit(k, k->s, k->e);
            k->have = 1, k->s = s, k->e = e;
        }
        break;
    }
    k->raw = m;
}

static void sink_finish(span_sink *k) {
    if (k->have) sink_emit(k, k->s, k->e);
    k->have = 0;
}

/* Regex matches over the piece, as onig's find_iter + Pattern::find_matches. */
static void split_regex(enc_ctx *c, span_sink *k, const pre_step *ps, const char *p, size_t n) {
    if (!c->md[k->step]) {
        c->md[k->step] = pcre2_match_data_create_from_pattern(ps->re, NULL);
        if (!c->md[k->step]) { enc_fail(c, MF_ERR_NOMEM, "out of memory"); return; }
    }
    pcre2_match_data *md = c->md[k->step];
    size_t prev = 0, pos = 0, last_end = 0;
    int have_last = 0;
    while (pos <= n && !c->st) {
        int rc = ps->jit ? pcre2_jit_match(ps->re, (PCRE2_SPTR)p, n, pos, 0, md, c->mctx)
                         : pcre2_match(ps->re, (PCRE2_SPTR)p, n, pos, PCRE2_NO_UTF_CHECK, md, c->mctx);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !c->jit_stack) {
            c->jit_stack = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, NULL);
            if (!c->jit_stack) { enc_fail(c, MF_ERR_NOMEM, "out of memory"); return; }
            pcre2_jit_stack_assign(c->mctx, NULL, c->jit_stack);
            continue;
        }
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            char buf[300];
            pcre2_get_error_message(rc, msg, sizeof msg);
            snprintf(buf, sizeof buf, "pre-tokenizer regex failed: %s", (char *)msg);
            enc_fail(c, MF_ERR_INTERNAL, buf);
            return;
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t s = ov[0], e = ov[1];
        if (s == e && have_last && last_end == e) { /* no empty match right after a match */
            if (pos >= n) break;
            pos += utf8_char_len((unsigned char)p[pos]);
            continue;
        }
        pos = last_end = e;
        have_last = 1;
        if (prev != s) sink_push(k, prev, s, 0);
        sink_push(k, s, e, 1);
        prev = e;
    }
    if (prev != n) sink_push(k, prev, n, 0);
}

static void pretok_run(enc_ctx *c, int step, const char *p, size_t n) {
    if (c->st || n == 0) return;
    const tokenizer *t = c->t;
    if (step == t->n_pre) {
        bpe_word(c, p, n);
        return;
    }
    const pre_step *ps = &t->pre[step];
    if (ps->kind == PRE_BYTELEVEL && ps->add_prefix_space && p[0] != ' ') {
        bbuf *b = &c->pre[step];
        b->n = 0;
        if (bbuf_put(b, " ", 1) || bbuf_put(b, p, n)) { enc_fail(c, MF_ERR_NOMEM, "out of memory"); return; }
        p = b->p;
        n = b->n;
    }
    span_sink k = {c, step, p, ps->beh, ps->invert, 0, 0, 0, 0};
    if (ps->kind == PRE_BYTELEVEL && !ps->re) {
        bytelevel_map_run(c, step, p, n);
        return;
    }
    if (ps->re) {
        split_regex(c, &k, ps, p, n);
    } else if (ps->kind == PRE_SPLIT) { /* literal: non-overlapping, left to right */
        size_t prev = 0;
        if (ps->lit_len) {
            const char *q = p;
            while ((q = memmem(q, n - (size_t)(q - p), ps->lit, ps->lit_len))) {
                size_t s = (size_t)(q - p);
                if (prev != s) sink_push(&k, prev, s, 0);
                sink_push(&k, s, s + ps->lit_len, 1);
                prev = s + ps->lit_len;
                q = p + prev;
            }
        }
        if (prev != n) sink_push(&k, prev, n, 0);
    } else { /* Digits: each numeric character is a match */
        size_t prev = 0;
        for (size_t i = 0; i < n;) {
            size_t cl;
            int32_t ch = utf8_decode(p + i, &cl);
            if (is_numeric(ch)) {
                if (prev < i) sink_push(&k, prev, i, 0);
                sink_push(&k, i, i + cl, 1);
                prev = i + cl;
            }
            i += cl;
        }
        if (prev < n) sink_push(&k, prev, n, 0);
    }
    sink_finish(&k);
}

/* Text between added tokens: normalized, split on normalized added tokens, pre-tokenized. */
static void encode_text(enc_ctx *c, const char *s, size_t n, int parse_special);

typedef void (*seg_fn)(enc_ctx *c, const char *s, size_t n, int parse_special);

/* Splits on added tokens as AddedVocabulary::split_with_indices: the text between matches goes
 * to text_fn, each match's id to the output. */
static void split_added(enc_ctx *c, const trie *tr, const char *s, size_t n, seg_fn text_fn) {
    const tokenizer *t = c->t;
    size_t start_off = 0, i = 0;
    while (i < n && !c->st) {
        int32_t nd = tr->root[(unsigned char)s[i]];
        if (nd < 0) { i++; continue; }
        int best = -1;
        size_t end = 0, j = i + 1;
        for (;;) {
            if (tr->node[nd].tok >= 0) best = tr->node[nd].tok, end = j;
            if (j >= n) break;
            int32_t ch = tr->node[nd].child;
            while (ch >= 0 && tr->node[ch].byte != (unsigned char)s[j]) ch = tr->node[ch].sibling;
            if (ch < 0) break;
            nd = ch;
            j++;
        }
        if (best < 0) { i++; continue; }
        const added_tok *a = &t->added[best];
        size_t start = i, stop = end;
        i = end; /* the search goes on after the match, taken or not */
        if (a->single_word) { /* no word character may touch it on either side */
            size_t cl;
            int left_ok = 1, right_ok = 1;
            if (start > 0) {
                size_t q = start - 1;
                while (q > 0 && ((unsigned char)s[q] & 0xc0) == 0x80) q--;
                left_ok = !is_word_char(utf8_decode(s + q, &cl));
            }
            if (stop < n) right_ok = !is_word_char(utf8_decode(s + stop, &cl));
            if (!left_ok || !right_ok) continue;
        }
        if (a->lstrip) { /* take the white space before it, but not what a previous match took */
            size_t q = start;
            while (q > 0) {
                size_t b = q - 1, cl;
                while (b > 0 && ((unsigned char)s[b] & 0xc0) == 0x80) b--;
                if (!is_white_space(utf8_decode(s + b, &cl))) break;
                q = b;
            }
            start = q > start_off ? q : start_off;
        }
        if (a->rstrip) {
            size_t cl;
            while (stop < n && is_white_space(utf8_decode(s + stop, &cl))) stop += cl;
        }
        if (start_off < start) text_fn(c, s + start_off, start - start_off, 1);
        if (ivec_push(c->out, a->id)) enc_fail(c, MF_ERR_NOMEM, "out of memory");
        start_off = stop;
    }
    if (start_off < n && !c->st) text_fn(c, s + start_off, n - start_off, 1);
}

static void pretok_segment(enc_ctx *c, const char *s, size_t n, int parse_special) {
    (void)parse_special;
    pretok_run(c, 0, s, n);
}

static void encode_text(enc_ctx *c, const char *s, size_t n, int parse_special) {
    if (!n || c->st) return;
    int same;
    size_t nn = n;
    char *ns = normalize(c->t, s, n, &nn, &same);
    if (!same && !ns) { enc_fail(c, MF_ERR_NOMEM, "out of memory"); return; }
    const char *p = same ? s : ns;
    if (!same) n = nn;
    if (parse_special && c->t->norm_trie.n_tok) split_added(c, &c->t->norm_trie, p, n, pretok_segment);
    else pretok_run(c, 0, p, n);
    free(ns);
}

mf_status tok_encode(const tokenizer *t, const char *text, size_t len, int parse_special,
                     int add_special, int32_t **ids, size_t *n, mf_err *err) {
    if (!t || !ids || !n || (!text && len)) return err_set(err, MF_ERR_ARG, "tok_encode: NULL argument");
    *ids = NULL;
    *n = 0;
    size_t bad = utf8_check(text, len);
    if (bad != len)
        return err_set(err, MF_ERR_ARG, "tok_encode: text is not valid UTF-8 (byte %zu: 0x%02x)", bad,
                       (unsigned char)text[bad]);
    ivec out = {0};
    enc_ctx c = {0};
    c.t = t;
    c.out = &out;
    c.err = err;
    c.mctx = pcre2_match_context_create(NULL);
    if (!c.mctx || ivec_reserve(&out, len / 3 + 8)) enc_fail(&c, MF_ERR_NOMEM, "out of memory");
    if (!c.st && add_special && ivec_reserve(&out, t->post_pre.n + t->post_post.n) == 0) {
        if (t->post_pre.n) memcpy(out.p, t->post_pre.p, t->post_pre.n * sizeof *out.p);
        out.n = t->post_pre.n;
    }
    if (!c.st) {
        if (parse_special && t->raw_trie.n_tok) split_added(&c, &t->raw_trie, text, len, encode_text);
        else encode_text(&c, text, len, parse_special);
    }
    if (!c.st && add_special) {
        for (size_t k = 0; k < t->post_post.n; k++)
            if (ivec_push(&out, t->post_post.p[k])) enc_fail(&c, MF_ERR_NOMEM, "out of memory");
    }
    for (int k = 0; k < TOK_MAX_STEPS; k++) {
        free(c.pre[k].p);
        free(c.map[k].p);
        pcre2_match_data_free(c.md[k]);
    }
    pcre2_match_context_free(c.mctx);
    pcre2_jit_stack_free(c.jit_stack);
    free(c.sym);
    free(c.heap);
    free(c.word.p);
    if (c.st) {
        free(out.p);
        return c.st;
    }
    if (!out.p) out.p = malloc(sizeof *out.p); /* a valid pointer even for no ids */
    if (!out.p) return err_set(err, MF_ERR_NOMEM, "tokenizer: out of memory");
    *ids = out.p;
    *n = out.n;
    return MF_OK;
}

/* ---- decoding ---- */

/* The bytes one id decodes to; 0 when it is dropped (unknown id, or special when skipping). */
static int tok_piece(const tokenizer *t, int32_t id, int skip_special, const char **p, size_t *n) {
    if (id < 0 || id >= t->n_ids || t->id_off[id] == UINT32_MAX) return 0;
    if (skip_special && t->special[id]) return 0;
    *p = t->pool.p + t->dec_off[id];
    *n = t->dec_len[id];
    return 1;
}

mf_status tok_decode(const tokenizer *t, const int32_t *ids, size_t n, int skip_special, char **text,
                     size_t *len, mf_err *err) {
    if (!t || !text || (!ids && n)) return err_set(err, MF_ERR_ARG, "tok_decode: NULL argument");
    *text = NULL;
    size_t total = 1, kept = 0;
    for (size_t i = 0; i < n; i++) {
        const char *p;
        size_t l;
        if (tok_piece(t, ids[i], skip_special, &p, &l)) total += 3 * l + 1, kept++; /* U+FFFD: 3 per byte at most */
    }
    char *out = malloc(total);
    if (!out) return err_set(err, MF_ERR_NOMEM, "tok_decode: out of memory");
    unsigned char pend[4];
    int n_pend = 0;
    size_t w = 0;
    lossy z = {pend, &n_pend, out, total - 1, &w};
    kept = 0;
    for (size_t i = 0; i < n; i++) {
        const char *p;
        size_t l;
        if (!tok_piece(t, ids[i], skip_special, &p, &l)) continue;
        if (!t->decoder_bytelevel && kept++) lossy_feed(&z, (const unsigned char *)" ", 1);
        lossy_feed(&z, (const unsigned char *)p, l);
    }
    lossy_finish(&z);
    out[w] = '\0';
    *text = out;
    if (len) *len = w;
    return MF_OK;
}

void tok_stream_init(tok_stream *s, const tokenizer *t, int skip_special) {
    memset(s, 0, sizeof *s);
    s->t = t;
    s->skip_special = skip_special;
}

size_t tok_stream_push(tok_stream *s, int32_t id, char *out, size_t cap) {
    const char *p;
    size_t l, w = 0;
    if (!s || !s->t || !tok_piece(s->t, id, s->skip_special, &p, &l)) return 0;
    lossy z = {s->pending, &s->n_pending, out, cap, &w};
    if (!s->t->decoder_bytelevel && s->n_tokens) lossy_feed(&z, (const unsigned char *)" ", 1);
    s->n_tokens++;
    lossy_feed(&z, (const unsigned char *)p, l);
    return w;
}

size_t tok_stream_flush(tok_stream *s, char *out, size_t cap) {
    size_t w = 0;
    if (!s) return 0;
    lossy z = {s->pending, &s->n_pending, out, cap, &w};
    lossy_finish(&z);
    return w;
}

/* ---- look-ups ---- */

int32_t tok_vocab_size(const tokenizer *t) { return t ? t->n_ids : 0; }

const char *tok_token_text(const tokenizer *t, int32_t id) {
    if (!t || id < 0 || id >= t->n_ids || t->id_off[id] == UINT32_MAX) return NULL;
    return t->pool.p + t->id_off[id];
}

int32_t tok_token_id(const tokenizer *t, const char *token) {
    if (!t || !token) return -1;
    size_t n = strlen(token);
    int32_t a = smap_get(&t->added_map, t->pool.p, token, n);
    if (a >= 0) return t->added[a].id;
    return smap_get(&t->vocab, t->pool.p, token, n);
}

int tok_is_special(const tokenizer *t, int32_t id) {
    return t && id >= 0 && id < t->n_ids && t->special[id];
}
