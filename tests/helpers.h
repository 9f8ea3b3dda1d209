/* helpers.h - shared test utilities: temporary directories, running the CLI, file copies, the
 * fixtures' references and engine sessions, random numbers and guarded buffers for op tests.
 * Not assertion macros: tests use Criterion's (the helpers that check fail the calling test). */
#ifndef MF_TESTS_HELPERS_H
#define MF_TESTS_HELPERS_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "moeflux.h"

/* Path of the moeflux CLI ($MOEFLUX_BIN, else build/moeflux). */
const char *th_bin(void);
/* Path of tests/fixtures ($MOEFLUX_FIXTURES, else tests/fixtures). */
const char *th_fixtures(void);
/* Creates a fresh temporary directory; returns a malloc'd path. */
char *th_tmpdir(void);
/* Removes a directory tree (rm -rf). */
void th_rmtree(const char *path);
/* Runs argv[0] with argv (NULL-terminated), capturing stdout and stderr into malloc'd
 * strings (may be NULL); returns the exit status, or -1 when it died from a signal. */
int th_run(char *const argv[], char **out, char **err);
/* Copies every file of a directory (not recursive) into another (created). */
void th_copy_dir(const char *src, const char *dst);
/* Reads a whole file; returns malloc'd bytes and sets *len; NULL on failure. */
void *th_read_file(const char *path, size_t *len);
/* Writes bytes to a file, replacing it; returns 0 on success. */
int th_write_file(const char *path, const void *data, size_t len);
/* Joins a directory and a name into a malloc'd path. */
char *th_join(const char *dir, const char *name);

/* Reads a little-endian float32 .npy of 1 or 2 dims (C order); returns malloc'd data and the
 * shape (rows = 1 for 1 dim); NULL when the file is not such an array. */
float *th_read_npy_f32(const char *path, int64_t *rows, int64_t *cols);
/* Reads an int array field of a JSON file (e.g. ref.json "prompt"); returns malloc'd ids. */
int32_t *th_json_ints(const char *path, const char *field, int *n);

/* ---- the current test's temporary directory (a suite's .init and .fini) ---- */

extern char *th_tmp;     /* made by th_tmp_setup, removed by th_tmp_teardown */
void th_tmp_setup(void);
void th_tmp_teardown(void);

/* ---- engine tests on the fixtures ---- */

/* A fixture's transformers reference (ref.json, ref_logits.npy). */
typedef struct th_ref {
    int32_t *prompt, *greedy;
    int n_prompt, n_greedy;
    float *logits; /* [n_prompt][vocab] */
    int64_t vocab;
} th_ref;

void th_ref_load(th_ref *r, const char *fixture);
void th_ref_free(th_ref *r);
/* Converts a fixture with the CLI into th_tmp; returns the malloc'd path. experts NULL: lossless
 * (bf16 everywhere; MLX files keep their bits) into l.moeflux; else the given expert and dense
 * types into q.moeflux. */
char *th_convert(const char *fixture, const char *experts, const char *dense);
/* Opens and loads a model with these options. */
mf_model *th_load(const char *path, const mf_engine_options *eo);
/* A session of 64 positions that prefills `chunk` tokens at a time. */
mf_session *th_session(mf_model *m, int chunk);
/* Evaluates n tokens; returns the malloc'd logits of every position [n][vocab]. */
float *th_eval_all(mf_session *s, const int32_t *toks, int n, int vocab);
/* max |a[i] - b[i]|, both finite everywhere. */
double th_max_diff(const float *a, const float *b, int64_t n);
/* Index of the largest of v[0 .. n - 1], the lowest on ties. */
int th_argmax(const float *v, int n);
/* The reference's greedy continuation from s, which has just evaluated r's prompt with last
 * [vocab] the logits of its last position: through decode steps (the argmax of each step's
 * logits, which must be finite), then again from a reset session through mf_session_eval_greedy
 * (the backend picks; no logits come back). what names the case in messages. */
void th_check_greedy(mf_session *s, const th_ref *r, const float *last, int vocab, const char *what);

/* Generates n tokens after r's prompt twice with twin samplers of params p, in two fresh
 * sessions of m: through mf_session_eval_sample, and through mf_session_eval +
 * mf_sampler_sample with the session's tokens as the history; asserts the same tokens. */
void th_check_eval_sample(mf_model *m, const th_ref *r, const mf_sampler_params *p, int n, const char *what);
/* th_check_eval_sample over 12 tokens with each of: temperature, top-k, top-p, min-p and
 * penalties together; temperature alone; greedy with a presence penalty. */
void th_check_eval_sample_modes(mf_model *m, const th_ref *r, const char *what);

/* ---- op tests: random numbers (xorshift64*, a fixed seed per case) ---- */

void th_rng_seed(uint64_t seed);
uint64_t th_rng_next(void);
double th_rng_unif(void); /* [0, 1) */
double th_rng_normal(void);
/* x[i] = mean + sd * a standard normal, i < n. */
void th_fill_normal(float *x, int64_t n, double mean, double sd);

/* ---- op tests: host buffers of n floats then TH_GUARD guard floats (a NaN with its own payload) ---- */

#define TH_GUARD 64
#define TH_GUARD_BITS 0x7fc0beefu

/* n NaNs then the guard (malloc'd). */
float *th_buf_alloc(int64_t n);
/* A copy of src[0 .. n - 1] then the guard. */
float *th_buf_copy(const float *src, int64_t n);
/* Every one of the n values written (finite), and the guard after them untouched. */
void th_check_written(const float *p, int64_t n, const char *what);

/* ---- op tests: routed experts ---- */

/* Lays out an expert blob of types (gate, up, down) as docs/format.md says: gate [I][H], up
 * [I][H], down [H][I], each part at a 64-aligned offset; returns the blob's stride (a multiple
 * of 4096). */
uint64_t th_expert_layout(mf_expert_layout *lay, const mf_qtype types[3], int64_t H, int64_t I);
/* Random routes: K distinct experts of E per token, positive weights summing to 1; ids, w
 * [nt][K]. */
void th_moe_routes(int E, int K, int64_t nt, int32_t *ids, float *w);

#endif
