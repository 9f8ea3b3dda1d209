/* err.h - the library's error record: a status plus a formatted message.
 * Not a logger: functions fill an mf_err and return its status; handles keep one. */
#ifndef MF_CORE_ERR_H
#define MF_CORE_ERR_H

#include "moeflux.h"

typedef struct mf_err {
    mf_status status;
    char msg[1024];
} mf_err;

void err_clear(mf_err *e);
/* Sets e (if not NULL) to st and the printf-style message; returns st. */
mf_status err_set(mf_err *e, mf_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Prepends "prefix: " to the existing message (for context like a file name); returns e->status. */
mf_status err_wrap(mf_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
