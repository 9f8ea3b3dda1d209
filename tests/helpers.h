/* helpers.h - shared test utilities: temporary directories, running the CLI, file copies.
 * Not assertions: tests use Criterion's. */
#ifndef MF_TESTS_HELPERS_H
#define MF_TESTS_HELPERS_H

#include <stddef.h>
#include <stdint.h>

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

#endif
