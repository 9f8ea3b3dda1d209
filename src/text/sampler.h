/* sampler.h - picks the next token from logits: repetition/presence/frequency penalties,
 * temperature, top-k, top-p, min-p (in transformers' order), seeded. Not a tokenizer. */
#ifndef MF_TEXT_SAMPLER_H
#define MF_TEXT_SAMPLER_H

#include <stdint.h>

#include "moeflux.h"

typedef struct sampler sampler;

/* NULL when out of memory. params must have passed mf_sampler_params_check. */
sampler *sampler_new(const mf_sampler_params *p, int vocab);
void sampler_free(sampler *s);
/* Chooses a token from logits [vocab] (modified in place), given the tokens so far
 * (penalties look at the last penalty_last_n of them). */
int32_t sampler_sample(sampler *s, float *logits, const int32_t *history, int n_history);

#endif
