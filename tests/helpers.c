/* helpers.c - shared test utilities (see helpers.h).
 * Not a test: holds no assertions. */
#include "helpers.h"

#include <cJSON.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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
