/* tok_internal.h - what the tokenizer's loader (tokenizer_load.c) and its encoder and decoder
 * (tokenizer.c) share: growable buffers, hash maps over the string pool, UTF-8 and Unicode
 * category helpers, the byte-level table and the tokenizer struct itself. Not an interface:
 * callers see text/tokenizer.h. */
#ifndef MF_TEXT_TOK_INTERNAL_H
#define MF_TEXT_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "text/tokenizer.h"

#define TOK_MAX_ID (1 << 24)  /* ids at or above this are refused as malformed */
#define TOK_MAX_STEPS 16      /* pre-tokenizer steps after flattening Sequences */
#define TOK_MAX_NORMS 16

/* ---- growable buffers ---- */

typedef struct bbuf { /* bytes, malloc'd; n used of cap */
    char *p;
    size_t n, cap;
} bbuf;

static inline int bbuf_reserve(bbuf *b, size_t extra) {
    if (b->n + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->n + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int bbuf_put(bbuf *b, const void *s, size_t n) {
    if (bbuf_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

typedef struct ivec { /* int32 values, malloc'd; n used of cap */
    int32_t *p;
    size_t n, cap;
} ivec;

static inline int ivec_reserve(ivec *v, size_t extra) {
    if (v->n + extra <= v->cap) return 0;
    size_t cap = v->cap ? v->cap : 64;
    while (cap < v->n + extra) cap *= 2;
    int32_t *p = realloc(v->p, cap * sizeof *p);
    if (!p) return -1;
    v->p = p;
    v->cap = cap;
    return 0;
}

static inline int ivec_push(ivec *v, int32_t x) {
    if (ivec_reserve(v, 1)) return -1;
    v->p[v->n++] = x;
    return 0;
}

static inline uint64_t hash_bytes(const void *s, size_t n) {
    const unsigned char *p = s;
    uint64_t h = 0xcbf29ce484222325ull ^ n;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h ^ (h >> 29);
}

static inline uint32_t pow2_at_least(size_t n) {
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

static inline int smap_init(smap *m, size_t n_max) {
    m->cap = pow2_at_least(2 * n_max + 1);
    m->n = 0;
    m->slot = malloc(m->cap * sizeof *m->slot);
    m->ent = malloc((n_max + 1) * sizeof *m->ent);
    if (!m->slot || !m->ent) return -1;
    memset(m->slot, 0xff, m->cap * sizeof *m->slot);
    return 0;
}

static inline void smap_free(smap *m) {
    free(m->slot);
    free(m->ent);
}

/* Returns the slot holding key s (or the empty slot where it would go). */
static inline uint32_t smap_find(const smap *m, const char *pool, const char *s, size_t n) {
    uint32_t i = (uint32_t)hash_bytes(s, n) & (m->cap - 1);
    for (;;) {
        int32_t e = m->slot[i];
        if (e < 0) return i;
        const smap_ent *x = &m->ent[e];
        if (x->len == n && memcmp(pool + x->off, s, n) == 0) return i;
        i = (i + 1) & (m->cap - 1);
    }
}

static inline int32_t smap_get(const smap *m, const char *pool, const char *s, size_t n) {
    if (!m->slot) return -1;
    int32_t e = m->slot[smap_find(m, pool, s, n)];
    return e < 0 ? -1 : m->ent[e].val;
}

/* Inserts or overwrites (the last duplicate wins, as a Rust HashMap built from JSON does).
 * The caller guarantees room (n_max given to smap_init). */
static inline void smap_set(smap *m, const char *pool, uint32_t off, uint32_t len, int32_t val) {
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

static inline uint32_t mmap_slot(const mmap *m, uint64_t k) {
    uint32_t i = (uint32_t)((k * 0x9e3779b97f4a7c15ull) >> 32) & (m->cap - 1);
    while (m->rank[i] >= 0 && m->key[i] != k) i = (i + 1) & (m->cap - 1);
    return i;
}

static inline int mmap_get(const mmap *m, int32_t a, int32_t b, int32_t *rank, int32_t *merged) {
    if (!m->cap) return 0;
    uint32_t i = mmap_slot(m, (uint64_t)(uint32_t)a << 32 | (uint32_t)b);
    if (m->rank[i] < 0) return 0;
    *rank = m->rank[i];
    *merged = m->merged[i];
    return 1;
}

/* ---- UTF-8 ---- */

/* Length of the valid UTF-8 character at s (n bytes available), 0 when invalid. */
static inline size_t utf8_valid_len(const unsigned char *s, size_t n) {
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
static inline size_t utf8_check(const char *s, size_t n) {
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
static inline int32_t utf8_decode(const char *s, size_t *len) {
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

static inline size_t utf8_char_len(unsigned char c) {
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
static inline utf8proc_category_t ucd_category(int32_t c) {
    utf8proc_category_t k = utf8proc_category(c);
    if (k != UTF8PROC_CATEGORY_CN) return k;
    static const char names[] = "CnLuLlLtLmLoMnMcMeNdNlNoPcPdPsPePiPfPoSmScSkSoZsZlZpCcCfCsCo";
    for (size_t i = 0; i < sizeof ucd_new / sizeof *ucd_new; i++)
        if (c >= ucd_new[i].first && c <= ucd_new[i].last)
            return (utf8proc_category_t)((strstr(names, ucd_new[i].cat) - names) / 2);
    return k;
}

/* Unicode White_Space (what \s means to Oniguruma and Rust's regex). */
static inline int is_white_space(int32_t c) {
    return (c >= 9 && c <= 13) || c == 0x20 || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f ||
           c == 0x205f || c == 0x3000;
}

/* Rust's \w: alphabetic, marks, decimal digits, connector punctuation (approximated by
 * categories L*, M*, Nd, Nl, Pc). */
static inline int is_word_char(int32_t c) {
    utf8proc_category_t k = ucd_category(c);
    return (k >= UTF8PROC_CATEGORY_LU && k <= UTF8PROC_CATEGORY_ME) || k == UTF8PROC_CATEGORY_ND ||
           k == UTF8PROC_CATEGORY_NL || k == UTF8PROC_CATEGORY_PC;
}

/* Rust's char::is_numeric: general category Nd, Nl or No. */
static inline int is_numeric(int32_t c) {
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

static inline void lossy_emit(lossy *z, const void *s, size_t n) {
    if (!n || *z->w + n > z->cap) return;
    memcpy(z->out + *z->w, s, n);
    *z->w += n;
}

static inline void lossy_feed(lossy *z, const unsigned char *s, size_t n) {
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

static inline void lossy_finish(lossy *z) {
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

static inline void byte_table_init(byte_table *bt) {
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

/* Applies the normalizers to s; returns a malloc'd NUL-terminated result (or NULL with *same set
 * when nothing can change). */
static inline char *normalize(const tokenizer *t, const char *s, size_t n, size_t *out_len, int *same) {
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

#endif
