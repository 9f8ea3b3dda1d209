/* model.c - the public mf_model handle: an opened .moeflux file and its description.
 * Not the forward pass (a later part of src/model) and not the expert cache. */
#include <cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "core/err.h"
#include "format/mfpack.h"
#include "format/quant.h"
#include "model/hparams.h"

struct mf_model {
    mf_err err;
    mfpack_file file;
    int open;
    char *info;
};

mf_status mf_model_open(const char *path, mf_model **out) {
    mf_model *m = calloc(1, sizeof *m);
    *out = m;
    if (!m) return MF_ERR_NOMEM;
    m->file.fd = -1;
    mf_status st = mfpack_open(&m->file, path, &m->err);
    m->open = st == MF_OK;
    return st;
}

const char *mf_model_error(const mf_model *m) { return m ? m->err.msg : "out of memory"; }

void mf_model_free(mf_model *m) {
    if (!m) return;
    if (m->open) mfpack_close(&m->file);
    free(m->info);
    free(m);
}

const char *mf_model_info_json(mf_model *m) {
    if (!m || !m->open) return NULL;
    if (m->info) return m->info;
    const mfpack_layout *L = &m->file.L;
    const mf_hparams *hp = &L->hp;
    char *hj = hparams_to_json(hp);
    cJSON *o = cJSON_Parse(hj);
    free(hj);
    if (!o) return NULL;
    cJSON_AddStringToObject(o, "path", m->file.path);
    uint64_t expert_bytes = 0, expert_stride = 0;
    const char *expert_type = "none";
    if (L->n_expert_layers > 0) {
        const mfpack_expert_layer *E = &L->expert_layers[0];
        expert_bytes = mfpack_expert_payload(E);
        expert_stride = E->stride;
        expert_type = mf_qtype_name(E->parts[0].type);
    }
    cJSON_AddNumberToObject(o, "n_moe_layers", L->n_expert_layers);
    cJSON_AddNumberToObject(o, "expert_bytes", (double)expert_bytes);
    cJSON_AddNumberToObject(o, "expert_stride", (double)expert_stride);
    cJSON_AddStringToObject(o, "experts_type", expert_type);
    uint64_t payload = 0;
    int counts[MF_QTYPE_COUNT] = {0};
    for (int i = 0; i < L->n_tensors; i++) {
        payload += L->tensors[i].bytes;
        counts[L->tensors[i].type]++;
    }
    cJSON_AddNumberToObject(o, "n_dense_tensors", L->n_tensors);
    cJSON *dt = cJSON_AddObjectToObject(o, "dense_types");
    for (int t = 0; t < MF_QTYPE_COUNT; t++)
        if (counts[t]) cJSON_AddNumberToObject(dt, mf_qtype_name((mf_qtype)t), counts[t]);
    cJSON_AddNumberToObject(o, "dense_bytes", (double)payload);
    cJSON_AddNumberToObject(o, "experts_bytes", (double)L->experts_bytes);
    cJSON_AddNumberToObject(o, "file_bytes", (double)L->file_bytes);
    if (L->extra_json) {
        cJSON *src = cJSON_Parse(L->extra_json);
        if (src) cJSON_AddItemToObject(o, "source", src);
    }
    m->info = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return m->info;
}
