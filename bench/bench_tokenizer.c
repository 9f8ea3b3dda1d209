/* bench_tokenizer.c - tokenizer speed: load time of each real tokenizer.json and single-threaded
 * encode throughput (MB/s) on ~5 MB of mixed English prose and C/Markdown/Python source. Not a
 * correctness test (tests/test_tokenizer.c).
 *
 * Build (after `make`, which gives build/libmoeflux.a; `make bench` builds it too):
 *   cc -O2 -std=c11 -D_GNU_SOURCE -Iinclude -Isrc -I/usr/include/cjson bench/bench_tokenizer.c \
 *      build/libmoeflux.a -lcjson -lpcre2-8 -lutf8proc -lm -pthread -o build/bench_tokenizer
 * Run: build/bench_tokenizer [TOKENIZERS_DIR] [--mb N]
 *   TOKENIZERS_DIR  holds qwen3/ and deepseek_v3/ (tools/fetch-tokenizers.sh; default build/tokenizers)
 *   --mb N          size of the text (default 5) */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "text/tokenizer.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct text_buf { /* the benchmark text, malloc'd; n bytes of cap */
    char *p;
    size_t n, cap;
} text_buf;

static void put(text_buf *b, const char *s, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p) { fprintf(stderr, "out of memory\n"); exit(1); }
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

/* Appends every .c/.h/.md/.py file under dir (recursively) that is valid UTF-8 text. */
static void add_sources(text_buf *b, const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        struct stat st;
        if (stat(path, &st)) continue;
        if (S_ISDIR(st.st_mode)) { add_sources(b, path); continue; }
        const char *dot = strrchr(e->d_name, '.');
        if (!dot || (strcmp(dot, ".c") && strcmp(dot, ".h") && strcmp(dot, ".md") && strcmp(dot, ".py"))) continue;
        if (st.st_size > (1 << 20)) continue;
        FILE *f = fopen(path, "rb");
        if (!f) continue;
        char *s = malloc((size_t)st.st_size + 1);
        size_t n = s ? fread(s, 1, (size_t)st.st_size, f) : 0;
        fclose(f);
        if (n) put(b, s, n);
        free(s);
    }
    closedir(d);
}

/* Pseudo-English: words drawn from a fixed list with a fixed seed, sentences and paragraphs. */
static void add_prose(text_buf *b, size_t bytes, unsigned seed) {
    static const char *words[] = {
        "the", "of", "and", "to", "in", "is", "was", "that", "for", "it", "with", "as", "on", "be",
        "at", "by", "this", "had", "not", "are", "but", "from", "or", "have", "an", "they", "which",
        "one", "you", "were", "her", "all", "she", "there", "would", "their", "we", "him", "been",
        "has", "when", "who", "will", "more", "no", "if", "out", "so", "said", "what", "up", "its",
        "about", "into", "than", "them", "can", "only", "other", "new", "some", "could", "time",
        "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "our",
        "over", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before",
        "must", "through", "years", "where", "much", "your", "way", "well", "down", "should",
        "because", "each", "just", "those", "people", "Mr.", "how", "too", "little", "state",
        "good", "very", "make", "world", "still", "own", "see", "men", "work", "long", "get",
        "here", "between", "both", "life", "being", "under", "never", "day", "same", "another",
        "know", "while", "last", "might", "us", "great", "old", "year", "off", "come", "since",
        "against", "go", "came", "right", "used", "take", "three", "inference", "experts",
        "tokenizer", "streaming", "memory", "bandwidth", "latency", "throughput", "don't", "it's",
        "we'll", "they're", "I've", "2024", "3.14", "1,000", "e.g.", "(see", "below)"};
    const size_t nw = sizeof words / sizeof *words;
    unsigned x = seed;
    size_t start = b->n;
    int in_sentence = 0;
    while (b->n - start < bytes) {
        x = x * 1103515245u + 12345u;
        const char *w = words[(x >> 8) % nw];
        if (!in_sentence) {
            char cap[32];
            snprintf(cap, sizeof cap, "%s", w);
            if (cap[0] >= 'a' && cap[0] <= 'z') cap[0] = (char)(cap[0] - 32);
            put(b, cap, strlen(cap));
            in_sentence = 1;
        } else {
            put(b, " ", 1);
            put(b, w, strlen(w));
        }
        if ((x >> 20) % 13 == 0) {
            put(b, (x >> 24) % 5 ? ". " : ".\n\n", (x >> 24) % 5 ? 2 : 3);
            in_sentence = 0;
        } else if ((x >> 20) % 17 == 0) {
            put(b, ",", 1);
        }
    }
}

int main(int argc, char **argv) {
    const char *dir = "build/tokenizers";
    double mb = 5.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mb") && i + 1 < argc) mb = atof(argv[++i]);
        else dir = argv[i];
    }
    size_t want = (size_t)(mb * 1e6);
    text_buf src = {0}, text = {0};
    add_sources(&src, "src");
    add_sources(&src, "docs");
    add_sources(&src, "tools");
    add_sources(&src, "tests");
    unsigned seed = 1;
    while (text.n < want) { /* alternate ~64 KB of prose and ~64 KB of source */
        add_prose(&text, 64 * 1024, seed++);
        if (src.n) {
            size_t off = (seed * 65537u) % src.n, n = 64 * 1024;
            while (off > 0 && ((unsigned char)src.p[off] & 0xc0) == 0x80) off--; /* a character start */
            if (off + n > src.n) n = src.n - off;
            while (off + n < src.n && ((unsigned char)src.p[off + n] & 0xc0) == 0x80) n++;
            put(&text, src.p + off, n);
        }
    }
    printf("text: %.2f MB (%.2f MB of sources sampled)\n", (double)text.n / 1e6, (double)src.n / 1e6);
    static const char *names[] = {"qwen3", "deepseek_v3"};
    for (int k = 0; k < 2; k++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, names[k]);
        mf_err err;
        tokenizer *t;
        double t0 = now_s();
        if (tok_load_dir(&t, path, &err)) {
            fprintf(stderr, "%s (run tools/fetch-tokenizers.sh %s)\n", err.msg, dir);
            return 1;
        }
        double t1 = now_s();
        int32_t *ids = NULL;
        size_t n = 0;
        double best = 1e30;
        for (int rep = 0; rep < 3; rep++) { /* the first run also fills the word cache */
            free(ids);
            double a = now_s();
            if (tok_encode(t, text.p, text.n, 1, 0, &ids, &n, &err)) {
                fprintf(stderr, "encode: %s\n", err.msg);
                return 1;
            }
            double e = now_s() - a;
            if (e < best) best = e;
            if (rep == 0) printf("%-12s load %.3f s; first encode %.3f s (%.1f MB/s)\n", names[k], t1 - t0, e,
                                 (double)text.n / 1e6 / e);
        }
        char *back;
        size_t blen;
        double d0 = now_s();
        if (tok_decode(t, ids, n, 0, &back, &blen, &err)) { fprintf(stderr, "decode: %s\n", err.msg); return 1; }
        double d1 = now_s();
        printf("%-12s encode %.1f MB/s, %.0f tokens/s (%zu tokens, %.2f bytes/token); decode %.0f MB/s; round trip %s\n",
               names[k], (double)text.n / 1e6 / best, (double)n / best, n, (double)text.n / (double)n,
               (double)blen / 1e6 / (d1 - d0), blen == text.n && !memcmp(back, text.p, blen) ? "exact" : "differs (NFC)");
        free(back);
        free(ids);
        tok_free(t);
    }
    free(src.p);
    free(text.p);
    return 0;
}
