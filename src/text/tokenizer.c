/* tokenizer.c - Hugging Face tokenizer.json byte-level BPE: encoding (added tokens,
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
#include <errno.h>
#include <stdio.h>

#include "text/tok_internal.h"

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
