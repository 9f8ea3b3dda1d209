/* commands.h - the moeflux subcommands implemented outside main.c.
 * Not library code: commands see only include/moeflux.h. */
#ifndef MF_CLI_COMMANDS_H
#define MF_CLI_COMMANDS_H

#include <stddef.h>
#include <stdint.h>

#include "moeflux.h"

/* argv holds the arguments after the command name; returns the process exit code. */
int cmd_eval(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_detokenize(int argc, char **argv);
int cmd_template(int argc, char **argv);
int cmd_run(int argc, char **argv);
int cmd_chat(int argc, char **argv);

/* Reads a whole file (NUL-terminated, malloc'd); NULL on failure. */
char *cli_read_file(const char *path, size_t *len);

/* The process's peak resident set (VmHWM), 0 when unknown. */
uint64_t peak_rss_bytes(void);

/* Writes float32 [rows][cols] as a .npy file through a temporary name; 0 on success. */
int npy_write_f32(const char *path, const float *data, int64_t rows, int64_t cols);
/* Parses a size with an optional unit suffix (k, m, g; binary) as megabytes when bare. */
int parse_mb(const char *s, uint64_t *bytes);
/* The cache size options every engine command takes: --expert-cache-mb N and --host-cache-gb G
 * (host RAM expert cache), --gpu-cache-gb G (GPU expert cache; 0 = as small as can be). Returns
 * 0 when opt is none of them, 1 when val was taken into eo, -1 (after a message naming the
 * option) when val is missing or not a size. */
int parse_cache_opt(const char *cmd, const char *opt, const char *val, mf_engine_options *eo);

#endif
