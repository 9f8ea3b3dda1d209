/* sample_args.h - one draw's settings as the host sampler (text/sampler.h) hands them to a
 * backend that samples on the device (the sample op of backend.h). Not the sampler itself. */
#ifndef MF_BACKEND_SAMPLE_ARGS_H
#define MF_BACKEND_SAMPLE_ARGS_H

#include <stdint.h>

typedef struct mf_sample_args {
    float temperature;        /* <= 0: the largest logit after the penalties */
    float inv_temperature;    /* 1 / temperature, as the host computes it */
    int top_k;                /* 0: off */
    float top_p;              /* 1: off */
    float min_p;              /* 0: off */
    double u;                 /* the draw, uniform in [0, 1) (temperature > 0) */
    /* penalties: logit l of each listed token becomes (l > 0 ? l / repetition : l * repetition)
     * - (presence + frequency * count) */
    float repetition, presence, frequency;
    int n_pen;
    const int32_t *pen_id;    /* host [n_pen] distinct tokens of the penalty window */
    const int32_t *pen_count; /* host [n_pen] how often each occurs in it */
} mf_sample_args;

#endif
