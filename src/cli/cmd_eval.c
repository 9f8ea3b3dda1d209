/* cmd_eval.c - `moeflux eval`: runs a token prompt, writes every position's logits as .npy,
 * then greedy steps through the decode path. Not a sampler or a tokenizer. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/commands.h"
#include "moeflux.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int npy_write_f32(const char *path, const float *data, int64_t rows, int64_t cols) {
    char header[256];
    int n = snprintf(header, sizeof header, "{'descr': '<f4', 'fortran_order': False, 'shape': (%lld, %lld), }",
                     (long long)rows, (long long)cols);
    int total = 10 + n + 1;
    int pad = (64 - total % 64) % 64;
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp-XXXXXX", path);
    int fd = mkstemp(tmp);
    if (fd < 0) return -1;
    FILE *f = fdopen(fd, "wb");
    if (!f) {
        close(fd);
        unlink(tmp);
        return -1;
    }
    unsigned short hl = (unsigned short)(n + pad + 1);
    unsigned char pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (unsigned char)(hl & 0xff), (unsigned char)(hl >> 8)};
    int ok = fwrite(pre, 1, 10, f) == 10 && fwrite(header, 1, (size_t)n, f) == (size_t)n;
    for (int i = 0; ok && i < pad; i++) ok = fputc(' ', f) != EOF;
    ok = ok && fputc('\n', f) != EOF;
    ok = ok && fwrite(data, sizeof(float), (size_t)(rows * cols), f) == (size_t)(rows * cols);
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

int parse_mb(const char *s, uint64_t *bytes) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || v < 0) return -1;
    double mult = 1024.0 * 1024.0;
    if (*end == 'k' || *end == 'K') mult = 1024.0, end++;
    else if (*end == 'm' || *end == 'M') end++;
    else if (*end == 'g' || *end == 'G') mult = 1024.0 * 1024.0 * 1024.0, end++;
    if (*end == 'b' || *end == 'B') end++;
    if (*end) return -1;
    *bytes = (uint64_t)(v * mult);
    return 0;
}

int parse_cache_opt(const char *cmd, const char *opt, const char *val, mf_engine_options *eo) {
    int mb = !strcmp(opt, "--expert-cache-mb"), host = !strcmp(opt, "--host-cache-gb"),
        gpu = !strcmp(opt, "--gpu-cache-gb");
    if (!mb && !host && !gpu) return 0;
    if (mb) {
        if (val && !parse_mb(val, &eo->expert_cache_bytes)) return 1;
        fprintf(stderr, "moeflux %s: %s needs a size in MB (e.g. 512, 2g)\n", cmd, opt);
        return -1;
    }
    char *end = NULL;
    errno = 0;
    double gb = val ? strtod(val, &end) : -1;
    if (!val || end == val || *end || errno || !(gb >= 0 && gb < 1e6)) {
        fprintf(stderr, "moeflux %s: %s needs a size in GB (e.g. 24, 0.5), not '%s'\n", cmd, opt, val ? val : "");
        return -1;
    }
    uint64_t bytes = gb > 0 ? (uint64_t)(gb * 1e9) : 1; /* 0 asks for the smallest cache, not the default */
    if (host) eo->expert_cache_bytes = bytes;
    else eo->gpu_cache_bytes = bytes;
    return 1;
}

/* Parses integers separated by commas, spaces, newlines or JSON brackets. */
static int parse_tokens(const char *text, int32_t **out, int *n) {
    int cap = 64, cnt = 0;
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)cap);
    if (!ids) return -1;
    const char *p = text;
    while (*p) {
        if (strchr(" \t\r\n,[]", *p)) {
            p++;
            continue;
        }
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > 0x7fffffff) {
            free(ids);
            return -1;
        }
        if (cnt == cap) {
            cap *= 2;
            int32_t *ni = realloc(ids, sizeof(int32_t) * (size_t)cap);
            if (!ni) {
                free(ids);
                return -1;
            }
            ids = ni;
        }
        ids[cnt++] = (int32_t)v;
        p = end;
    }
    *out = ids;
    *n = cnt;
    return 0;
}

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t r = fread(buf + len, 1, cap - len - 1, f);
        len += r;
        if (r == 0) break;
        if (len + 1 == cap) {
            if (cap > (256u << 20)) {
                free(buf);
                buf = NULL;
                break;
            }
            char *nb = realloc(buf, cap *= 2);
            if (!nb) free(buf);
            buf = nb;
        }
    }
    fclose(f);
    if (buf) buf[len] = '\0';
    return buf;
}

static void usage_eval(void) {
    fprintf(stderr,
            "usage: moeflux eval MODEL (--tokens 1,2,3 | --tokens-file F) [--logits-out F.npy]\n"
            "                   [--greedy N] [--json] [--stats] [--host-cache-gb G] [--threads N]\n"
            "                   [--io-threads N] [--o-direct] [--ctx N] [--chunk N] [--reference]\n"
            "                   [--cuda] [--gpu-cache-gb G]\n");
}

static int print_stats(mf_model *m, double prefill_s, int n_prompt, double decode_s, int n_gen) {
    mf_expert_stats st;
    mf_model_expert_stats(m, &st);
    uint64_t uses = st.hits + st.misses;
    fprintf(stderr,
            "prefill: %d tokens in %.3f s (%.1f tok/s); decode: %d tokens in %.3f s (%.1f tok/s)\n"
            "host expert cache: %llu hits, %llu misses (hit rate %.1f%%), %llu evictions, %.1f MB read in %llu reads "
            "(%.2f GB/s), cache budget %.1f MB, peak %.1f MB\n"
            "peak RSS %.1f MB\n",
            n_prompt, prefill_s, prefill_s > 0 ? n_prompt / prefill_s : 0.0, n_gen, decode_s,
            decode_s > 0 ? n_gen / decode_s : 0.0, (unsigned long long)st.hits,
            (unsigned long long)st.misses, uses ? 100.0 * st.hits / uses : 0.0,
            (unsigned long long)st.evictions, st.bytes_read / 1e6, (unsigned long long)st.reads,
            st.read_seconds > 0 ? st.bytes_read / st.read_seconds / 1e9 : 0.0, st.budget_bytes / 1e6,
            st.peak_bytes / 1e6, peak_rss_bytes() / 1e6);
    if (st.gpu_budget_bytes) {
        uint64_t g = st.gpu_hits + st.gpu_misses;
        fprintf(stderr, "gpu expert cache: %llu hits, %llu misses (hit rate %.1f%%), %llu evictions, %.1f MB uploaded "
                        "(%.2f GB/s), budget %.1f MB, peak %.1f MB\n",
                (unsigned long long)st.gpu_hits, (unsigned long long)st.gpu_misses, g ? 100.0 * st.gpu_hits / g : 0.0,
                (unsigned long long)st.gpu_evictions, st.gpu_bytes_uploaded / 1e6,
                st.gpu_upload_seconds > 0 ? st.gpu_bytes_uploaded / st.gpu_upload_seconds / 1e9 : 0.0,
                st.gpu_budget_bytes / 1e6, st.gpu_peak_bytes / 1e6);
    }
    return 0;
}

int cmd_eval(int argc, char **argv) {
    const char *model = NULL, *tokens_arg = NULL, *tokens_file = NULL, *logits_out = NULL;
    int greedy = 0, json = 0, stats = 0;
    mf_engine_options eo;
    mf_engine_options_init(&eo);
    mf_session_options so;
    mf_session_options_init(&so);
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        int takes = 1, cache;
        if (!strcmp(a, "--tokens")) tokens_arg = val;
        else if (!strcmp(a, "--tokens-file")) tokens_file = val;
        else if (!strcmp(a, "--logits-out")) logits_out = val;
        else if (!strcmp(a, "--greedy")) greedy = val ? atoi(val) : -1;
        else if (!strcmp(a, "--threads")) eo.n_threads = val ? atoi(val) : -1;
        else if (!strcmp(a, "--io-threads")) eo.io_threads = val ? atoi(val) : -1;
        else if (!strcmp(a, "--ctx")) so.max_ctx = val ? atoi(val) : -1;
        else if (!strcmp(a, "--chunk")) so.prefill_chunk = val ? atoi(val) : -1;
        else if ((cache = parse_cache_opt("eval", a, val, &eo)) < 0) return 2;
        else if (!cache) {
            takes = 0;
            if (!strcmp(a, "--json")) json = 1;
            else if (!strcmp(a, "--stats")) stats = 1;
            else if (!strcmp(a, "--o-direct")) eo.o_direct = 1;
            else if (!strcmp(a, "--cuda")) eo.use_cuda = 1;
            else if (!strcmp(a, "--reference")) eo.reference = 1;
            else if (a[0] == '-' && a[1]) {
                fprintf(stderr, "moeflux eval: unknown option '%s'\n", a);
                usage_eval();
                return 2;
            } else if (!model) model = a;
            else {
                fprintf(stderr, "moeflux eval: unexpected argument '%s'\n", a);
                return 2;
            }
        }
        if (takes) {
            if (!val) {
                fprintf(stderr, "moeflux eval: %s needs a value\n", a);
                return 2;
            }
            i++;
        }
    }
    if (!model || (!tokens_arg == !tokens_file) || greedy < 0 || eo.n_threads < 0 || eo.io_threads < 0 ||
        so.max_ctx < 0 || so.prefill_chunk < 0) {
        usage_eval();
        return 2;
    }
    char *text = tokens_arg ? strdup(tokens_arg) : read_text(tokens_file);
    if (!text) {
        fprintf(stderr, "moeflux eval: cannot read %s\n", tokens_file ? tokens_file : "tokens");
        return 1;
    }
    int32_t *prompt = NULL;
    int n_prompt = 0;
    if (parse_tokens(text, &prompt, &n_prompt) || n_prompt == 0) {
        fprintf(stderr, "moeflux eval: %s: expected a list of non-negative token ids\n",
                tokens_file ? tokens_file : "--tokens");
        free(text);
        return 2;
    }
    free(text);
    int rc = 1;
    mf_model *m = NULL;
    mf_session *s = NULL;
    float *logits = NULL, *last = NULL;
    int32_t *gen = NULL;
    if (mf_model_open(model, &m) != MF_OK || mf_model_load(m, &eo) != MF_OK) {
        fprintf(stderr, "moeflux eval: %s\n", mf_model_error(m));
        goto done;
    }
    if (so.max_ctx == 0) so.max_ctx = n_prompt + greedy;
    if (mf_session_new(m, &so, &s) != MF_OK) {
        fprintf(stderr, "moeflux eval: %s\n", mf_session_error(s));
        goto done;
    }
    int V = mf_model_vocab(m);
    logits = malloc(sizeof(float) * (size_t)n_prompt * (size_t)V);
    last = malloc(sizeof(float) * (size_t)V);
    gen = malloc(sizeof(int32_t) * (size_t)(greedy + 1));
    if (!logits || !last || !gen) {
        fprintf(stderr, "moeflux eval: out of memory for %d x %d logits\n", n_prompt, V);
        goto done;
    }
    double t0 = now_s();
    if (mf_session_eval(s, prompt, n_prompt, logits, 1) != MF_OK) {
        fprintf(stderr, "moeflux eval: %s\n", mf_session_error(s));
        goto done;
    }
    double t1 = now_s();
    if (logits_out && npy_write_f32(logits_out, logits, n_prompt, V) != 0) {
        fprintf(stderr, "moeflux eval: cannot write %s: %s\n", logits_out, strerror(errno));
        goto done;
    }
    memcpy(last, logits + (size_t)(n_prompt - 1) * (size_t)V, sizeof(float) * (size_t)V);
    for (int i = 0; i < greedy; i++) {
        int best = 0;
        for (int v = 1; v < V; v++)
            if (last[v] > last[best]) best = v;
        gen[i] = best;
        if (i + 1 < greedy && mf_session_eval(s, &gen[i], 1, last, 0) != MF_OK) {
            fprintf(stderr, "moeflux eval: %s\n", mf_session_error(s));
            goto done;
        }
    }
    double t2 = now_s();
    if (json) {
        printf("{\"prompt_tokens\": %d, \"greedy\": [", n_prompt);
        for (int i = 0; i < greedy; i++) printf("%s%d", i ? ", " : "", gen[i]);
        printf("]}\n");
    } else if (greedy) {
        for (int i = 0; i < greedy; i++) printf("%s%d", i ? " " : "", gen[i]);
        printf("\n");
    }
    if (stats) print_stats(m, t1 - t0, n_prompt, t2 - t1, greedy > 0 ? greedy - 1 : 0);
    rc = 0;
done:
    free(prompt);
    free(logits);
    free(last);
    free(gen);
    mf_session_free(s);
    mf_model_free(m);
    return rc;
}
