/* synth.h - built-in model shapes (real Qwen MoE sizes and tiny test ones) and the layout a
 * random-weight .moeflux file of that shape gets. Not the converter: no checkpoint is read. */
#ifndef MF_FORMAT_SYNTH_H
#define MF_FORMAT_SYNTH_H

#include <stdint.h>

#include "core/err.h"
#include "format/mfpack.h"
#include "model/hparams.h"

/* Number of built-in shapes, and the i-th one's name (NULL when i is out of range). */
int synth_shape_count(void);
const char *synth_shape_name(int i);

/* Every hyperparameter of shape `name`, cut to the first n_layers layers (0: all of them).
 * An unknown name is refused with a message listing the known ones; n_layers beyond the
 * shape's count is refused. */
mf_status synth_hparams(const char *name, int n_layers, mf_hparams *hp, mf_err *err);

/* The layout (tensor names, shapes, storage types, offsets; manifest "source" left empty) that
 * `moeflux synth` writes for hp: the same tensors, in the same order and types, as converting a
 * bf16 Hugging Face checkpoint of that shape with --experts experts --dense dense.
 * L is initialised here; free it with mfpack_layout_free. Nothing is written. */
mf_status synth_layout(const mf_hparams *hp, mf_qtype experts, mf_qtype dense, mfpack_layout *L,
                       mf_err *err);

/* The router row multipliers of one MoE layer (see the formula in synth.c): out[e] for each of
 * n_experts experts; all 1 when skew is 0. */
void synth_router_scales(uint64_t seed, int layer, int n_experts, double skew, float *out);

#endif
