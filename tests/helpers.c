/* helpers.c - shared test utilities (see helpers.h), linked into the CPU and the CUDA test
 * binaries. Not a test: its checks fail the test that calls them. */
#include "helpers.h"

#include "format/quant.h"

#include <cJSON.h>
#include <criterion/criterion.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

const char *th_bin(void) {
    const char *b = getenv("MOEFLUX_BIN");
    return b && *b ? b : "build/moeflux";
}

const char *th_fixtures(void) {
    const char *f = getenv("MOEFLUX_FIXTURES");
    return f && *f ? f : "tests/fixtures";
}

char *th_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

char *th_tmpdir(void) {
    const char *base = getenv("TMPDIR");
    char tmpl[4096];
    snprintf(tmpl, sizeof tmpl, "%s/moeflux-test-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpl)) return NULL;
    return strdup(tmpl);
}

void th_rmtree(const char *path) {
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *p = th_join(path, e->d_name);
        struct stat st;
        if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode)) th_rmtree(p);
        else unlink(p);
        free(p);
    }
    closedir(d);
    rmdir(path);
}

static void append(char **buf, size_t *len, const char *data, size_t n) {
    char *nb = realloc(*buf, *len + n + 1);
    if (!nb) return;
    memcpy(nb + *len, data, n);
    *len += n;
    nb[*len] = '\0';
    *buf = nb;
}

int th_run(char *const argv[], char **out, char **err) {
    int po[2], pe[2];
    if (pipe(po) || pipe(pe)) return -2;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, po[1], 1);
    posix_spawn_file_actions_adddup2(&fa, pe[1], 2);
    posix_spawn_file_actions_addclose(&fa, po[0]);
    posix_spawn_file_actions_addclose(&fa, pe[0]);
    pid_t pid;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(po[1]);
    close(pe[1]);
    if (rc != 0) {
        close(po[0]);
        close(pe[0]);
        return -2;
    }
    char *bo = calloc(1, 1), *be = calloc(1, 1);
    size_t lo = 0, le = 0;
    struct pollfd fds[2] = {{po[0], POLLIN, 0}, {pe[0], POLLIN, 0}};
    int open_fds = 2;
    char chunk[65536];
    while (open_fds > 0) {
        if (poll(fds, 2, -1) < 0 && errno != EINTR) break;
        for (int i = 0; i < 2; i++) {
            if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t n = read(fds[i].fd, chunk, sizeof chunk);
            if (n > 0) {
                if (i == 0) append(&bo, &lo, chunk, (size_t)n);
                else append(&be, &le, chunk, (size_t)n);
            } else {
                close(fds[i].fd);
                fds[i].fd = -1;
                open_fds--;
            }
        }
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (out) *out = bo; else free(bo);
    if (err) *err = be; else free(be);
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return -1;
}

void *th_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        if (len) *len = (size_t)n;
    }
    return buf;
}

int th_write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = fwrite(data, 1, len, f);
    return (fclose(f) == 0 && w == len) ? 0 : -1;
}

void th_copy_dir(const char *src, const char *dst) {
    mkdir(dst, 0755);
    DIR *d = opendir(src);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char *s = th_join(src, e->d_name), *t = th_join(dst, e->d_name);
        size_t n;
        void *buf = th_read_file(s, &n);
        if (buf) th_write_file(t, buf, n);
        free(buf);
        free(s);
        free(t);
    }
    closedir(d);
}

float *th_read_npy_f32(const char *path, int64_t *rows, int64_t *cols) {
    size_t n;
    unsigned char *buf = th_read_file(path, &n);
    if (!buf || n < 10 || memcmp(buf, "\x93NUMPY", 6)) {
        free(buf);
        return NULL;
    }
    size_t hl, off;
    if (buf[6] == 1) {
        hl = (size_t)buf[8] | (size_t)buf[9] << 8;
        off = 10;
    } else {
        hl = (size_t)buf[8] | (size_t)buf[9] << 8 | (size_t)buf[10] << 16 | (size_t)buf[11] << 24;
        off = 12;
    }
    if (off + hl > n) {
        free(buf);
        return NULL;
    }
    char *hdr = strndup((char *)buf + off, hl);
    long long a = 0, b = -1;
    char *sh = strstr(hdr, "'shape': (");
    int ok = hdr && strstr(hdr, "'descr': '<f4'") && strstr(hdr, "'fortran_order': False") && sh &&
             sscanf(sh, "'shape': (%lld, %lld)", &a, &b) >= 1;
    free(hdr);
    if (b < 0) {
        b = a;
        a = 1;
    }
    size_t want = (size_t)a * (size_t)b * 4;
    if (!ok || off + hl + want != n) {
        free(buf);
        return NULL;
    }
    float *data = malloc(want ? want : 1);
    if (data) memcpy(data, buf + off + hl, want);
    free(buf);
    *rows = a;
    *cols = b;
    return data;
}

int32_t *th_json_ints(const char *path, const char *field, int *n) {
    char *text = th_read_file(path, NULL);
    if (!text) return NULL;
    cJSON *o = cJSON_Parse(text);
    free(text);
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(o, field);
    int32_t *ids = NULL;
    if (cJSON_IsArray(arr)) {
        *n = cJSON_GetArraySize(arr);
        ids = malloc(sizeof(int32_t) * (size_t)(*n ? *n : 1));
        for (int i = 0; ids && i < *n; i++) ids[i] = (int32_t)cJSON_GetArrayItem(arr, i)->valuedouble;
    }
    cJSON_Delete(o);
    return ids;
}

/* ---- the current test's temporary directory ---- */

char *th_tmp;

void th_tmp_setup(void) {
    th_tmp = th_tmpdir();
    cr_assert(th_tmp);
}

void th_tmp_teardown(void) {
    th_rmtree(th_tmp);
    free(th_tmp);
    th_tmp = NULL;
}

/* ---- engine tests on the fixtures ---- */

void th_ref_load(th_ref *r, const char *fixture) {
    char *dir = th_join(th_fixtures(), fixture);
    char *rj = th_join(dir, "ref.json"), *rl = th_join(dir, "ref_logits.npy");
    r->prompt = th_json_ints(rj, "prompt", &r->n_prompt);
    r->greedy = th_json_ints(rj, "greedy", &r->n_greedy);
    int64_t rows;
    r->logits = th_read_npy_f32(rl, &rows, &r->vocab);
    cr_assert(r->prompt && r->greedy && r->logits, "cannot read the reference of %s", fixture);
    cr_assert_eq(rows, r->n_prompt);
    free(dir);
    free(rj);
    free(rl);
}

void th_ref_free(th_ref *r) {
    free(r->prompt);
    free(r->greedy);
    free(r->logits);
}

char *th_convert(const char *fixture, const char *experts, const char *dense) {
    char *src = th_join(th_fixtures(), fixture), *out = th_join(th_tmp, experts ? "q.moeflux" : "l.moeflux");
    int mlx = strstr(fixture, "mlx") != NULL;
    char *argv[] = {(char *)th_bin(), "convert", src, out, "--quiet", NULL, NULL, NULL, NULL, NULL};
    if (experts) {
        argv[5] = "--experts", argv[6] = (char *)experts, argv[7] = "--dense", argv[8] = (char *)dense;
    } else if (!mlx) {
        argv[5] = "--experts", argv[6] = "bf16", argv[7] = "--dense", argv[8] = "bf16";
    }
    char *err = NULL;
    cr_assert_eq(th_run(argv, NULL, &err), 0, "convert %s: %s", fixture, err);
    free(err);
    free(src);
    return out;
}

mf_model *th_load(const char *path, const mf_engine_options *eo) {
    mf_model *m = NULL;
    cr_assert_eq(mf_model_open(path, &m), MF_OK, "%s", mf_model_error(m));
    cr_assert_eq(mf_model_load(m, eo), MF_OK, "%s", mf_model_error(m));
    return m;
}

mf_session *th_session(mf_model *m, int chunk) {
    mf_session_options so;
    mf_session_options_init(&so);
    so.max_ctx = 64;
    so.prefill_chunk = chunk;
    mf_session *s = NULL;
    cr_assert_eq(mf_session_new(m, &so, &s), MF_OK, "%s", mf_session_error(s));
    return s;
}

float *th_eval_all(mf_session *s, const int32_t *toks, int n, int vocab) {
    float *lg = malloc(sizeof(float) * (size_t)n * (size_t)vocab);
    cr_assert(lg, "out of memory");
    cr_assert_eq(mf_session_eval(s, toks, n, lg, 1), MF_OK, "%s", mf_session_error(s));
    return lg;
}

double th_max_diff(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        cr_assert(isfinite(a[i]) && isfinite(b[i]), "non-finite logit at %lld", (long long)i);
        double d = fabs((double)a[i] - b[i]);
        if (d > m) m = d;
    }
    return m;
}

int th_argmax(const float *v, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

void th_check_greedy(mf_session *s, const th_ref *r, const float *last, int vocab, const char *what) {
    float *lg = malloc(sizeof(float) * (size_t)vocab);
    cr_assert(lg, "out of memory");
    memcpy(lg, last, sizeof(float) * (size_t)vocab);
    for (int i = 0; i < r->n_greedy; i++) {
        int32_t tok = th_argmax(lg, vocab);
        cr_assert_eq(tok, r->greedy[i], "%s: greedy step %d gave %d, transformers %d", what, i, tok, r->greedy[i]);
        cr_assert_eq(mf_session_eval(s, &tok, 1, lg, 0), MF_OK, "%s", mf_session_error(s));
        for (int v = 0; v < vocab; v++) cr_assert(isfinite(lg[v]), "%s: non-finite logit in decode step %d", what, i);
    }
    free(lg);
    mf_session_reset(s);
    int32_t next = -1;
    cr_assert_eq(mf_session_eval_greedy(s, r->prompt, r->n_prompt, &next), MF_OK, "%s", mf_session_error(s));
    for (int i = 0; i < r->n_greedy; i++) {
        cr_assert_eq(next, r->greedy[i], "%s: eval_greedy step %d gave %d, transformers %d", what, i, next,
                     r->greedy[i]);
        int32_t tok = next;
        cr_assert_eq(mf_session_eval_greedy(s, &tok, 1, &next), MF_OK, "%s", mf_session_error(s));
    }
}

void th_check_eval_sample(mf_model *m, const th_ref *r, const mf_sampler_params *p, int n, const char *what) {
    const int V = (int)r->vocab;
    mf_session *s1 = th_session(m, 4), *s2 = th_session(m, 4);
    mf_sampler *a = mf_sampler_new(p, V), *b = mf_sampler_new(p, V);
    int32_t *hist = malloc(sizeof(int32_t) * (size_t)(r->n_prompt + n));
    float *logits = malloc(sizeof(float) * (size_t)V);
    cr_assert(a && b && hist && logits, "out of memory");
    memcpy(hist, r->prompt, sizeof(int32_t) * (size_t)r->n_prompt);
    int n_hist = r->n_prompt;
    int32_t got = -1;
    cr_assert_eq(mf_session_eval_sample(s1, r->prompt, r->n_prompt, a, &got), MF_OK, "%s", mf_session_error(s1));
    cr_assert_eq(mf_session_eval(s2, r->prompt, r->n_prompt, logits, 0), MF_OK, "%s", mf_session_error(s2));
    for (int i = 0; i < n; i++) {
        const int32_t want = mf_sampler_sample(b, logits, hist, n_hist);
        cr_assert_eq(got, want, "%s: step %d: eval_sample picked %d, the sampler %d", what, i, got, want);
        hist[n_hist++] = got;
        if (i + 1 == n) break;
        cr_assert_eq(mf_session_eval_sample(s1, &got, 1, a, &got), MF_OK, "%s", mf_session_error(s1));
        cr_assert_eq(mf_session_eval(s2, &hist[n_hist - 1], 1, logits, 0), MF_OK, "%s", mf_session_error(s2));
    }
    mf_sampler_free(a);
    mf_sampler_free(b);
    mf_session_free(s1);
    mf_session_free(s2);
    free(hist);
    free(logits);
}

void th_check_eval_sample_modes(mf_model *m, const th_ref *r, const char *what) {
    mf_sampler_params p[3];
    for (int i = 0; i < 3; i++) mf_sampler_params_init(&p[i]);
    p[0].temperature = 0.9f;
    p[0].top_k = 20;
    p[0].top_p = 0.9f;
    p[0].min_p = 0.02f;
    p[0].repetition_penalty = 1.3f;
    p[0].frequency_penalty = 0.2f;
    p[0].seed = 5;
    p[1].temperature = 1.2f;
    p[1].seed = 9;
    p[2].presence_penalty = 1.5f;
    p[2].penalty_last_n = 8;
    const char *mode[3] = {"cuts and penalties", "temperature only", "greedy with a penalty"};
    for (int i = 0; i < 3; i++) {
        char w[256];
        snprintf(w, sizeof w, "%s, %s", what, mode[i]);
        th_check_eval_sample(m, r, &p[i], 12, w);
    }
}

/* ---- op tests: random numbers ---- */

static uint64_t rng_s;

void th_rng_seed(uint64_t seed) { rng_s = seed * 0x9e3779b97f4a7c15u + 0x632be59bd9b4e019u; }

uint64_t th_rng_next(void) {
    rng_s ^= rng_s >> 12;
    rng_s ^= rng_s << 25;
    rng_s ^= rng_s >> 27;
    return rng_s * 0x2545f4914f6cdd1du;
}

double th_rng_unif(void) { return (double)(th_rng_next() >> 11) * 0x1.0p-53; }

double th_rng_normal(void) {
    double u1 = 1.0 - th_rng_unif(), u2 = th_rng_unif();
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

void th_fill_normal(float *x, int64_t n, double mean, double sd) {
    for (int64_t i = 0; i < n; i++) x[i] = (float)(mean + sd * th_rng_normal());
}

/* ---- op tests: guarded host buffers ---- */

float *th_buf_alloc(int64_t n) {
    float *p = malloc(sizeof(float) * (size_t)(n + TH_GUARD));
    cr_assert(p, "out of memory");
    for (int64_t i = 0; i < n; i++) p[i] = NAN;
    uint32_t g = TH_GUARD_BITS;
    for (int i = 0; i < TH_GUARD; i++) memcpy(p + n + i, &g, sizeof g);
    return p;
}

float *th_buf_copy(const float *src, int64_t n) {
    float *p = th_buf_alloc(n);
    memcpy(p, src, sizeof(float) * (size_t)n);
    return p;
}

void th_check_written(const float *p, int64_t n, const char *what) {
    for (int64_t i = 0; i < n; i++)
        cr_assert(isfinite(p[i]), "%s: element %lld is %g (not written or not finite)", what, (long long)i,
                  (double)p[i]);
    for (int i = 0; i < TH_GUARD; i++) {
        uint32_t g;
        memcpy(&g, p + n + i, sizeof g);
        cr_assert(g == TH_GUARD_BITS, "%s: guard float %d after the output was overwritten", what, i);
    }
}

/* ---- op tests: routed experts ---- */

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

uint64_t th_expert_layout(mf_expert_layout *lay, const mf_qtype types[3], int64_t H, int64_t I) {
    const int64_t rows[3] = {I, I, H}, cols[3] = {H, H, I};
    uint64_t at = 0;
    lay->inter = I, lay->hidden = H;
    for (int p = 0; p < 3; p++) {
        lay->type[p] = types[p];
        lay->offset[p] = at = align_up(at, 64);
        at += quant_tensor_bytes(types[p], rows[p], cols[p]);
    }
    return align_up(at, 4096);
}

void th_moe_routes(int E, int K, int64_t nt, int32_t *ids, float *w) {
    for (int64_t t = 0; t < nt; t++) {
        float ws = 0;
        for (int j = 0; j < K; j++) {
            int e, dup;
            do {
                e = (int)(th_rng_next() % (uint64_t)E);
                dup = 0;
                for (int k = 0; k < j; k++) dup |= ids[t * K + k] == e;
            } while (dup);
            ids[t * K + j] = e;
            ws += w[t * K + j] = (float)(0.1 + th_rng_unif());
        }
        for (int j = 0; j < K; j++) w[t * K + j] /= ws;
    }
}
