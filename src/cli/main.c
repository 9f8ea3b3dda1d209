/* main.c - the moeflux command line: convert, info (more commands arrive with the engine).
 * Not library code: it sees only include/moeflux.h, and it is the only place that exits. */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "moeflux.h"

static void usage(FILE *f) {
    fprintf(f,
            "moeflux %s - streaming-experts MoE inference\n"
            "\n"
            "usage:\n"
            "  moeflux convert SRC_DIR OUT [--experts q4|q8|bf16|f32] [--dense q4|q8|bf16|f32] [--quiet]\n"
            "      Pack a Hugging Face or MLX checkpoint directory into one .moeflux file.\n"
            "      Defaults: experts q4, other matrices q8; MLX-quantized tensors are kept as they are\n"
            "      unless a type is given.\n"
            "  moeflux info MODEL [--json]\n"
            "      Describe a .moeflux file.\n"
            "  moeflux help | --help,  moeflux version | --version\n",
            MF_VERSION_STRING);
}

typedef struct bar {
    int tty;
    double start, last;
} bar;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void bar_update(void *user, uint64_t done, uint64_t total) {
    bar *b = user;
    double t = now_s();
    if (!b->tty || (done < total && t - b->last < 0.1)) return;
    b->last = t;
    double frac = total ? (double)done / (double)total : 1.0;
    int width = 30, fill = (int)(frac * width);
    char cells[64];
    for (int i = 0; i < width; i++) cells[i] = i < fill ? '#' : '.';
    cells[width] = '\0';
    double el = t - b->start, rate = el > 0 ? (double)done / el : 0;
    fprintf(stderr, "\r[%s] %5.1f%%  %.2f / %.2f GB  %.0f MB/s ", cells, 100.0 * frac, done / 1e9,
            total / 1e9, rate / 1e6);
    if (done >= total) fputc('\n', stderr);
    fflush(stderr);
}

static int cmd_convert(int argc, char **argv) {
    mf_convert_options opt;
    mf_convert_options_init(&opt);
    const char *pos[2] = {NULL, NULL};
    int npos = 0, quiet = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--experts") || !strcmp(a, "--dense")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "moeflux convert: %s needs a type (q4, q8, bf16, f32)\n", a);
                return 2;
            }
            mf_qtype t;
            if (mf_qtype_parse(argv[i + 1], &t) != MF_OK) {
                fprintf(stderr, "moeflux convert: unknown type '%s' for %s (q4, q8, bf16, f32)\n",
                        argv[i + 1], a);
                return 2;
            }
            if (a[2] == 'e') {
                opt.experts_type = t;
                opt.experts_set = 1;
            } else {
                opt.dense_type = t;
                opt.dense_set = 1;
            }
            i++;
        } else if (!strcmp(a, "--quiet") || !strcmp(a, "-q")) {
            quiet = 1;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "moeflux convert: unknown option '%s'\n", a);
            return 2;
        } else if (npos < 2) {
            pos[npos++] = a;
        } else {
            fprintf(stderr, "moeflux convert: unexpected argument '%s'\n", a);
            return 2;
        }
    }
    if (npos != 2) {
        fprintf(stderr, "usage: moeflux convert SRC_DIR OUT [--experts T] [--dense T]\n");
        return 2;
    }
    opt.src_dir = pos[0];
    opt.out_path = pos[1];
    bar b = {!quiet && isatty(2), now_s(), 0};
    opt.progress = bar_update;
    opt.progress_user = &b;
    mf_converter *c = mf_converter_new();
    if (!c) {
        fprintf(stderr, "moeflux convert: out of memory\n");
        return 1;
    }
    mf_status st = mf_convert(c, &opt);
    if (st != MF_OK) {
        if (b.tty) fputc('\n', stderr);
        fprintf(stderr, "moeflux convert: %s\n", mf_converter_error(c));
        mf_converter_free(c);
        return 1;
    }
    mf_converter_free(c);
    if (!quiet) fprintf(stderr, "wrote %s in %.1f s\n", opt.out_path, now_s() - b.start);
    return 0;
}

static void print_human(const cJSON *o) {
    const char *keys[] = {"path", "arch", "model_type", "n_layers", "hidden_size", "vocab_size",
                          "n_heads", "n_kv_heads", "head_dim", "n_experts", "n_experts_per_tok",
                          "moe_intermediate_size", "shared_expert_intermediate_size",
                          "experts_type", "expert_bytes", "dense_bytes", "experts_bytes", "file_bytes"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, keys[i]);
        if (cJSON_IsString(it)) printf("%-34s %s\n", keys[i], it->valuestring);
        else if (cJSON_IsNumber(it)) printf("%-34s %.0f\n", keys[i], it->valuedouble);
    }
    const cJSON *lt = cJSON_GetObjectItemCaseSensitive(o, "layer_types");
    if (cJSON_IsArray(lt)) {
        int full = 0, n = cJSON_GetArraySize(lt);
        const cJSON *e;
        cJSON_ArrayForEach(e, lt) full += !strcmp(cJSON_GetStringValue(e), "full_attention");
        printf("%-34s %d full attention, %d linear attention\n", "layers", full, n - full);
    }
}

static int cmd_info(int argc, char **argv) {
    const char *path = NULL;
    int json = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--json")) json = 1;
        else if (argv[i][0] == '-' && argv[i][1]) {
            fprintf(stderr, "moeflux info: unknown option '%s'\n", argv[i]);
            return 2;
        } else if (!path) path = argv[i];
        else {
            fprintf(stderr, "moeflux info: unexpected argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "usage: moeflux info MODEL [--json]\n");
        return 2;
    }
    mf_model *m = NULL;
    if (mf_model_open(path, &m) != MF_OK) {
        fprintf(stderr, "moeflux info: %s\n", mf_model_error(m));
        mf_model_free(m);
        return 1;
    }
    const char *info = mf_model_info_json(m);
    if (!info) {
        fprintf(stderr, "moeflux info: out of memory\n");
        mf_model_free(m);
        return 1;
    }
    if (json) {
        printf("%s\n", info);
    } else {
        cJSON *o = cJSON_Parse(info);
        print_human(o);
        cJSON_Delete(o);
    }
    mf_model_free(m);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "convert")) return cmd_convert(argc - 2, argv + 2);
    if (!strcmp(cmd, "info")) return cmd_info(argc - 2, argv + 2);
    if (!strcmp(cmd, "help") || !strcmp(cmd, "--help") || !strcmp(cmd, "-h")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("moeflux %s\n", MF_VERSION_STRING);
        return 0;
    }
    fprintf(stderr, "moeflux: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
