/* chat.h - chat templates of the supported model families, recognised from the model's own
 * Jinja template and rendered byte for byte as transformers' apply_chat_template renders it.
 * Not a Jinja interpreter: each family's template is written out in C. */
#ifndef MF_TEXT_CHAT_H
#define MF_TEXT_CHAT_H

#include "core/err.h"

typedef enum chat_kind {
    CHAT_UNKNOWN = 0,
    CHAT_QWEN3,        /* Qwen3 ChatML with <think>, tools, tool calls and responses */
    CHAT_QWEN3_5,      /* Qwen3.5 / Qwen3.6 */
    CHAT_DEEPSEEK_V3
} chat_kind;

const char *chat_kind_name(chat_kind k);
/* Recognises a template text (the chat_template of tokenizer_config.json). */
chat_kind chat_detect(const char *template_text);

typedef struct chat_options {
    int add_generation_prompt;
    int enable_thinking;       /* -1: the template's default; 0 or 1: as passed to apply_chat_template */
    const char *bos_token;     /* from tokenizer_config.json, for templates that print it */
    const char *eos_token;
} chat_options;

/* Renders messages (a JSON array of {role, content, tool_calls?, reasoning_content?, ...}) and
 * tools (a JSON array, or NULL) exactly as the family's template does. *out is malloc'd.
 * Malformed JSON or a message the template would reject is refused naming the message index. */
mf_status chat_render(chat_kind kind, const char *messages_json, const char *tools_json,
                      const chat_options *opt, char **out, mf_err *err);

#endif
