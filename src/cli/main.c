/* main.c - the moeflux command line: convert, info (more commands arrive with the engine).
 * Not library code: it sees only include/moeflux.h, and it is the only place that exits. */
#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/commands.h"
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
            "  moeflux synth SHAPE OUT [--layers N] [--seed S] [--experts T] [--dense T] [--skew S] [--quiet]\n"
            "      Write a .moeflux file of a built-in shape with seeded random weights\n"
            "      (moeflux synth --help lists the shapes and explains --skew).\n"
            "  moeflux eval MODEL (--tokens 1,2,3 | --tokens-file F) [--logits-out F.npy] [--greedy N]\n"
            "               [--json] [--stats] [--expert-cache-mb N] [--threads N] [--ctx N] [--chunk N]\n"
            "      Run a prompt of token ids: logits of every position as .npy, then N greedy tokens.\n"
            "  moeflux bench MODEL [--prompt-tokens N] [--gen-tokens N] [--warmup-tokens N] [--json] [--host-cache-gb G]\n"
            "      Time prefill and decode on random tokens; expert cache and memory figures.\n"
            "  moeflux run MODEL -p PROMPT [-n N] [--chat] [sampling flags] (moeflux run for the list)\n"
            "      Generate from a prompt, streaming the text; a summary line at the end.\n"
            "  moeflux chat MODEL [sampling flags]\n"
            "      Interactive chat over one session: /reset, /save FILE, /load FILE, /quit.\n"
            "  moeflux tokenize MODEL_OR_TOKENIZER_DIR (TEXT | --text-file F) [--json]\n"
            "  moeflux detokenize MODEL_OR_TOKENIZER_DIR ID...\n"
            "  moeflux template MODEL_OR_TOKENIZER_DIR --messages F.json [--tools F.json]\n"
            "                   [--generation-prompt] [--think | --no-think] [--chat-template-file F]\n"
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

static void synth_usage(FILE *f) {
    fprintf(f,
            "usage: moeflux synth SHAPE OUT [--layers N] [--seed S] [--experts T] [--dense T] [--skew S] [--quiet]\n"
            "  Writes a .moeflux file of a built-in shape filled with random weights from --seed (same\n"
            "  seed and options: same bytes), scaled so activations stay sane.\n"
            "  --layers N   keep the first N layers (with their attention pattern); default all\n"
            "  --seed S     unsigned 64-bit seed; default 0\n"
            "  --experts T  routed experts: q4 (default), q8, bf16, f32\n"
            "  --dense T    embedding, lm_head and other matrices: q8 (default), q4, bf16, f32\n"
            "               (norms, conv1d, A_log, dt_bias are f32, routers bf16, as convert does)\n"
            "  --skew S     expert popularity skew, S >= 0; default 0 = uniform routing. Layer l ranks\n"
            "               its experts by a seeded permutation r (0 = most popular) and scales router\n"
            "               row e by m_e = (1 + r_e)^(-S/4) / sqrt(mean_f (1 + r_f)^(-S/2)); wider logits\n"
            "               win top-k more often, so popularity falls roughly as rank^-1 at S = 1\n"
            "               (256 experts, top-8).\n"
            "  --tokenizer DIR  carry DIR's tokenizer.json, tokenizer_config.json, generation_config.json\n"
            "               and chat_template.jinja, so text commands can use the model\n"
            "  --quiet      no progress bar or summary\n"
            "shapes:\n");
    for (int i = 0; mf_synth_shape_name(i); i++) fprintf(f, "  %s\n", mf_synth_shape_name(i));
}

typedef struct synth_bar {
    bar b;
    uint64_t total;
} synth_bar;

static void synth_progress(void *user, uint64_t done, uint64_t total) {
    synth_bar *sb = user;
    sb->total = total;
    bar_update(&sb->b, done, total);
}

static int parse_u64(const char *s, uint64_t *out) {
    if (!s || *s < '0' || *s > '9') return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end) return -1;
    *out = v;
    return 0;
}

static int cmd_synth(int argc, char **argv) {
    mf_synth_options opt;
    mf_synth_options_init(&opt);
    const char *pos[2] = {NULL, NULL};
    int npos = 0, quiet = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int takes = !strcmp(a, "--layers") || !strcmp(a, "--seed") || !strcmp(a, "--experts") ||
                    !strcmp(a, "--dense") || !strcmp(a, "--skew") || !strcmp(a, "--tokenizer");
        if (takes && !v) {
            fprintf(stderr, "moeflux synth: %s needs a value\n", a);
            return 2;
        }
        uint64_t u;
        char *end;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            synth_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--layers")) {
            if (parse_u64(v, &u) || u < 1 || u > 100000) {
                fprintf(stderr, "moeflux synth: --layers wants a positive layer count, not '%s'\n", v);
                return 2;
            }
            opt.n_layers = (int)u;
        } else if (!strcmp(a, "--seed")) {
            if (parse_u64(v, &opt.seed)) {
                fprintf(stderr, "moeflux synth: --seed wants an unsigned 64-bit integer, not '%s'\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--experts") || !strcmp(a, "--dense")) {
            mf_qtype t;
            if (mf_qtype_parse(v, &t) != MF_OK) {
                fprintf(stderr, "moeflux synth: unknown type '%s' for %s (q4, q8, bf16, f32)\n", v, a);
                return 2;
            }
            if (a[2] == 'e') opt.experts_type = t;
            else opt.dense_type = t;
        } else if (!strcmp(a, "--skew")) {
            errno = 0;
            opt.skew = strtod(v, &end);
            if (errno || end == v || *end || !(opt.skew >= 0) || opt.skew > 1e6) {
                fprintf(stderr, "moeflux synth: --skew wants a number >= 0, not '%s'\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--tokenizer")) {
            opt.tokenizer_dir = v;
        } else if (!strcmp(a, "--quiet") || !strcmp(a, "-q")) {
            quiet = 1;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "moeflux synth: unknown option '%s'\n", a);
            return 2;
        } else if (npos < 2) {
            pos[npos++] = a;
        } else {
            fprintf(stderr, "moeflux synth: unexpected argument '%s'\n", a);
            return 2;
        }
        if (takes) i++;
    }
    if (npos != 2) {
        synth_usage(stderr);
        return 2;
    }
    opt.shape = pos[0];
    opt.out_path = pos[1];
    synth_bar sb = {{!quiet && isatty(2), now_s(), 0}, 0};
    opt.progress = synth_progress;
    opt.progress_user = &sb;
    mf_synthesizer *s = mf_synthesizer_new();
    if (!s) {
        fprintf(stderr, "moeflux synth: out of memory\n");
        return 1;
    }
    mf_status st = mf_synth(s, &opt);
    if (st != MF_OK) {
        if (sb.b.tty && sb.total) fputc('\n', stderr);
        fprintf(stderr, "moeflux synth: %s\n", mf_synthesizer_error(s));
        mf_synthesizer_free(s);
        return 1;
    }
    mf_synthesizer_free(s);
    double el = now_s() - sb.b.start;
    if (!quiet)
        fprintf(stderr, "wrote %s: %.1f MB in %.2f s (%.0f MB/s)\n", opt.out_path, sb.total / 1e6, el,
                el > 0 ? sb.total / el / 1e6 : 0.0);
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
    if (!strcmp(cmd, "synth")) return cmd_synth(argc - 2, argv + 2);
    if (!strcmp(cmd, "eval")) return cmd_eval(argc - 2, argv + 2);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 2, argv + 2);
    if (!strcmp(cmd, "run")) return cmd_run(argc - 2, argv + 2);
    if (!strcmp(cmd, "chat")) return cmd_chat(argc - 2, argv + 2);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc - 2, argv + 2);
    if (!strcmp(cmd, "detokenize")) return cmd_detokenize(argc - 2, argv + 2);
    if (!strcmp(cmd, "template")) return cmd_template(argc - 2, argv + 2);
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
