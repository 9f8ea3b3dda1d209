/* tokenizer.h - byte-level BPE tokenizers loaded from Hugging Face tokenizer.json: normalizer,
 * pre-tokenizer, BPE merges by rank, added/special tokens, post-processor, ByteLevel decoding,
 * and an incremental decoder. Not chat templates (text/chat.h) and not sampling. */
#ifndef MF_TEXT_TOKENIZER_H
#define MF_TEXT_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/err.h"

typedef struct tokenizer tokenizer;

/* Builds a tokenizer from the text of tokenizer.json and, optionally, tokenizer_config.json
 * (config_json may be NULL: it supplies add_bos_token/add_eos_token and the special token
 * names). `what` names the source in error messages. The config's add_bos_token/add_eos_token
 * count only when tokenizer.json's post_processor adds no token itself (so DeepSeek-V3 gets its
 * BOS from the config; tokenizers alone, and transformers 5, give none). */
mf_status tok_load(tokenizer **out, const char *tokenizer_json, size_t len, const char *config_json,
                   const char *what, mf_err *err);
/* Reads DIR/tokenizer.json and DIR/tokenizer_config.json (optional). */
mf_status tok_load_dir(tokenizer **out, const char *dir, mf_err *err);
void tok_free(tokenizer *t);

/* Encodes UTF-8 text. parse_special: added tokens written in the text are matched as tokens
 * (as transformers does by default); add_special: apply the post-processor (BOS/EOS) as
 * tokenizers' encode(add_special_tokens=True) does. *ids is malloc'd. With parse_special=0
 * every added token, special or not, is plain text. Text that is not valid UTF-8 is refused
 * (MF_ERR_ARG). Safe to call from several threads on one tokenizer. */
mf_status tok_encode(const tokenizer *t, const char *text, size_t len, int parse_special,
                     int add_special, int32_t **ids, size_t *n, mf_err *err);
/* Decodes ids to UTF-8 (invalid byte sequences become U+FFFD as tokenizers does);
 * skip_special drops special tokens. *text is malloc'd and NUL-terminated. */
mf_status tok_decode(const tokenizer *t, const int32_t *ids, size_t n, int skip_special, char **text,
                     size_t *len, mf_err *err);

int32_t tok_vocab_size(const tokenizer *t);        /* highest id + 1, added tokens included */
const char *tok_token_text(const tokenizer *t, int32_t id); /* the token's string, or NULL */
int32_t tok_token_id(const tokenizer *t, const char *token);  /* -1 when unknown */
int tok_is_special(const tokenizer *t, int32_t id);

/* Incremental decoding for streaming: bytes are released only as whole UTF-8 characters. */
typedef struct tok_stream {
    const tokenizer *t;
    int skip_special;
    unsigned char pending[8];
    int n_pending;
    int n_tokens; /* tokens pushed so far (without a decoder, tokens are joined by spaces) */
} tok_stream;
void tok_stream_init(tok_stream *s, const tokenizer *t, int skip_special);
/* Appends the text of id; writes complete characters to out (at most cap bytes, cap >= 64 is
 * always enough for one token's bytes plus 4 pending ones... callers give >= 1024) and returns
 * how many bytes it wrote. Unknown ids (and special ones when skipping) add nothing; invalid
 * UTF-8 comes out as U+FFFD exactly as tok_decode of the whole sequence gives it. */
size_t tok_stream_push(tok_stream *s, int32_t id, char *out, size_t cap);
/* Emits what is left (an incomplete character becomes U+FFFD). */
size_t tok_stream_flush(tok_stream *s, char *out, size_t cap);

#endif
