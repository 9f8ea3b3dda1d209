/* sampler.h - picks the next token from logits: repetition/presence/frequency penalties,
 * temperature, top-k, top-p, min-p (in transformers' order), seeded. Not a tokenizer. */
#ifndef MF_TEXT_SAMPLER_H
#define MF_TEXT_SAMPLER_H

#include <stdint.h>

#include "backend/sample_args.h"
#include "moeflux.h"

typedef struct sampler sampler;

/* NULL when out of memory. params must have passed mf_sampler_params_check. */
sampler *sampler_new(const mf_sampler_params *p, int vocab);
void sampler_free(sampler *s);
/* Chooses a token from logits [vocab] (modified in place), given the tokens so far
 * (penalties look at the last penalty_last_n of them). */
int32_t sampler_sample(sampler *s, float *logits, const int32_t *history, int n_history);

/* sampler_sample in two halves, for a backend that samples on the device: prepare fills a with
 * this draw (the penalty window's tokens and counts, the uniform draw taken from the stream when
 * the temperature is above 0); a's arrays belong to s until the next prepare. finish picks the
 * token from logits [vocab] as sampler_sample does, applying a's penalties unless penalised says
 * the logits already carry them. */
void sampler_prepare(sampler *s, const int32_t *history, int n_history, mf_sample_args *a);
int32_t sampler_finish(sampler *s, float *logits, const mf_sample_args *a, int penalised);
int sampler_vocab(const sampler *s);
/* The sampler inside a public handle. */
sampler *mf_sampler_inner(mf_sampler *s);

#endif
