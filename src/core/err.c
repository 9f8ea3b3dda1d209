/* err.c - status names and the mf_err record.
 * Not a logger: nothing here prints. */
#include "core/err.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *mf_status_name(mf_status st) {
    switch (st) {
    case MF_OK: return "ok";
    case MF_ERR_ARG: return "bad argument";
    case MF_ERR_IO: return "i/o error";
    case MF_ERR_FORMAT: return "bad format";
    case MF_ERR_UNSUPPORTED: return "unsupported";
    case MF_ERR_NOMEM: return "out of memory";
    case MF_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

void err_clear(mf_err *e) {
    if (!e) return;
    e->status = MF_OK;
    e->msg[0] = '\0';
}

mf_status err_set(mf_err *e, mf_status st, const char *fmt, ...) {
    if (!e) return st;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->status = st;
    return st;
}

mf_status err_wrap(mf_err *e, const char *fmt, ...) {
    if (!e) return MF_ERR_INTERNAL;
    char prefix[512], old[sizeof e->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, e->msg, sizeof old);
    size_t n = strlen(prefix);
    if (n > sizeof e->msg - 3) n = sizeof e->msg - 3;
    memcpy(e->msg, prefix, n);
    memcpy(e->msg + n, ": ", 2);
    size_t room = sizeof e->msg - n - 3, m = strnlen(old, room);
    memcpy(e->msg + n + 2, old, m);
    e->msg[n + 2 + m] = '\0';
    return e->status;
}
