#!/usr/bin/env python3
"""make_tokenizer_refs.py: reference encodings and chat-template renderings for the tokenizer tests.

What it is: the generator of tests/tokenizer/ (see its README.md). For each real tokenizer
(qwen3, deepseek_v3; fetched by tools/fetch-tokenizers.sh) it writes
  OUT/<name>/encode.json  at least 600 strings, generated deterministically from --seed plus
                          ~50 fixed edge cases, with the ids of the Hugging Face `tokenizers`
                          library (add_special_tokens False and True) and the decoded text;
  OUT/<name>/chat.json    ~85 conversations rendered by transformers' apply_chat_template with
                          the tokenizer's own chat template, and the ids of the rendered text;
                          conversations the template refuses are listed under "errors".
With --qwen35-template FILE it also renders the same conversations with that template
(through the qwen3 tokenizer) into OUT/qwen3_5/chat.json.
What it is not: part of the C build. It needs `tokenizers` and `transformers` (the GPU machine
has both; no GPU is used).

    python3 tools/make_tokenizer_refs.py --tok-dir .tok --out tests/tokenizer --seed 1 \\
        --qwen35-template tests/tokenizer/qwen3_5_chat_template.jinja
"""
import argparse
import copy
import json
import os
import random
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

TOKENIZERS = ["qwen3", "deepseek_v3"]
N_RANDOM = 620  # generated strings per tokenizer, on top of the fixed cases

# ---------------------------------------------------------------------------------------------
# Material for the text generator. Lists only (never sets or dict iteration of unknown order),
# so that one seed gives the same strings on every Python 3.
# ---------------------------------------------------------------------------------------------

WORDS = (
    "the quick brown fox jumps over lazy dog and a an of to in is was for on that with as "
    "it by at from this be are or have has had not but what all were when we there can "
    "your which their said if do will each about how up out them then she many some so "
    "these would other into him time two more write go see number no way could people my "
    "than first water been call who oil its now find long down day did get come made may "
    "part tokenizer token model inference expert router streaming memory cache layer "
    "attention weights kernel matrix vector hello world OpenAI GPT Qwen DeepSeek llama "
    "naïve café résumé façade coöperate Zürich São Paulo München Ελλάδα"
).split()

CONTRACTION_SUBJECTS = ["I", "you", "we", "they", "he", "she", "it", "that", "there", "who",
                        "John", "the model", "y'all"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'VE", "'M",
                "'LL", "'D", "n't", "N'T"]
CONTRACTION_WORDS = ["don't", "DON'T", "can't", "CAN'T", "won't", "it's", "IT'S", "I'm", "I'M",
                     "you're", "YOU'RE", "we've", "WE'VE", "they'll", "THEY'LL", "she'd",
                     "SHE'D", "let's", "LET'S", "o'clock", "rock'n'roll", "'tis", "'twas",
                     "ma'am", "y'all'd've", "isn't", "Isn'T", "dON't", "He'S", "shouldn't've"]

SCRIPTS = {
    "latin": ["Ça va très bien", "Ñandú", "Ångström", "Œuvre", "ß straße STRASSE", "Łódź",
              "Dvořák", "İstanbul ıi", "Þórr ðæ", "fiancée", "pingüino", "ÀÉÎÕÜ àéîõü",
              "Đặng Thị Ngọc", "Ærøskøbing", "crème brûlée"],
    "cyrillic": ["Привет, мир!", "съешь же ещё этих мягких французских булок", "Ёлка",
                 "Україна ґанок", "Српски језик", "Қазақ тілі", "ПРОПИСНЫЕ буквы"],
    "greek": ["Καλημέρα κόσμε", "ΑΒΓΔΕ αβγδε", "ἐν ἀρχῇ ἦν ὁ λόγος", "Σίσυφος ς σ",
              "μῆνιν ἄειδε θεὰ"],
    "arabic": ["مرحبا بالعالم", "السَّلَامُ عَلَيْكُمْ", "اللغة العربية ١٢٣٤٥", "كتاب",
               "فارسی: سلام دنیا"],
    "hebrew": ["שלום עולם", "עִבְרִית", "ירושלים 2024", "אבגד"],
    "devanagari": ["नमस्ते दुनिया", "हिन्दी भाषा", "क्षत्रिय", "संस्कृतम् ॐ", "०१२३४५६७८९"],
    "thai": ["สวัสดีชาวโลก", "ภาษาไทย", "กรุงเทพมหานคร", "๑๒๓"],
    "chinese": ["你好，世界！", "机器学习模型推理", "繁體中文與简体中文", "北京市朝阳区", "一二三四五",
                "鬱龘齉", "𠀀𠀁𪚥"],
    "japanese": ["こんにちは世界", "カタカナとひらがな", "東京都渋谷区", "ｶﾀｶﾅ半角", "日本語のテキスト。",
                 "ゔぁゔぃ", "ー〜・"],
    "korean": ["안녕하세요 세계", "한국어 텍스트", "대한민국 서울", "ㄱㄴㄷㄹ ㅏㅑㅓ", "똠방각하"],
    "other": ["Ελληνικά and English mixed", "ქართული ენა", "Հայերեն", "አማርኛ", "ᚠᚢᚦᚨᚱᚲ",
              "ꦗꦮ", "ܐܪܡܝܐ", "Tiếng Việt có dấu", "தமிழ்", "বাংলা", "ગુજરાતી", "ಕನ್ನಡ", "සිංහල",
              "မြန်မာ", "ខ្មែរ", "ᠮᠣᠩᠭᠣᠯ", "ꯃꯤꯇꯩ"],
}
SCRIPT_NAMES = ["latin", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai", "chinese",
                "japanese", "korean", "other"]

EMOJI = ["😀", "😂", "🥲", "🤖", "🔥", "✨", "👍", "👍🏻", "👍🏼", "👍🏽", "👍🏾", "👍🏿",
         "👨‍👩‍👧‍👦", "👩‍👩‍👦", "👨‍👨‍👧‍👧", "👩🏽‍💻", "🧑🏿‍🚀", "👩‍❤️‍💋‍👨", "🧑‍🤝‍🧑",
         "🏳️‍🌈", "🏴‍☠️", "🇺🇸", "🇯🇵", "🇩🇪", "🇨🇳", "🇧🇷", "🇺🇳", "🏴󠁧󠁢󠁳󠁣󠁴󠁿",
         "1️⃣", "#️⃣", "*️⃣", "0️⃣", "❤️", "❤", "☺️", "✌🏽", "🫠", "🪿", "🐈‍⬛", "🧔‍♂️",
         "🙇‍♀️", "💁🏻‍♂️", "©️", "™", "🀄", "🃏", "⌚", "🕰️"]

C_SNIPPETS = [
    "#include <stdio.h>\n\nint main(int argc, char **argv) {\n    printf(\"hello, %s\\n\", argv[0]);\n    return 0;\n}\n",
    "static inline float silu(float x) { return x / (1.0f + expf(-x)); }",
    "for (size_t i = 0; i < n; ++i) {\n\tacc += a[i] * b[i];\n}",
    "#define MAX(a, b) ((a) > (b) ? (a) : (b))\n",
    "typedef struct {\n    uint32_t *ids;\n    size_t len, cap;\n} tok_vec;\n",
    "if (!p) { fprintf(stderr, \"oom\\n\"); abort(); } /* never */",
    "x <<= 2; y >>= 1; z ^= ~w; q = a && b || !c; r = a->b.c[3];",
]
PY_SNIPPETS = [
    "def f(x):\n    return x ** 2  # square\n",
    "class Foo(Bar):\n    def __init__(self, *args, **kwargs):\n        super().__init__(*args, **kwargs)\n",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)\nprint(f\"{x.shape=}\")\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tcontinue\n\tyield i\n",
    "lambda s: s.strip().split('\\n')[::-1]",
    "    @property\n    def name(self) -> str:\n        return self._name\n",
    "with open('data.json', 'rb') as fh:\n    data = json.load(fh)",
]
JSON_SNIPPETS = [
    "{\"name\": \"moeflux\", \"version\": \"0.1.0\", \"tags\": [\"moe\", \"c11\"]}",
    "{\n  \"a\": 1,\n  \"b\": [true, false, null],\n  \"c\": {\"d\": -3.5e-7}\n}",
    "[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"hello\"}]",
    "{\"emoji\": \"\\ud83d\\ude00\", \"esc\": \"tab\\tnewline\\n\"}",
]
OTHER_CODE = [
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "<div class=\"x\"><p>Hello &amp; welcome</p></div>",
    "$ ls -la | grep \"^d\" | wc -l",
    "fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!(\"{:?}\", v); }",
    "\\begin{equation} E = mc^2 \\end{equation}",
    "| col1 | col2 |\n|------|------|\n| a    | b    |",
    "x = a[i][j] + b[k]; // comment",
    "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n-old\n+new",
]

URLS = ["https://example.com/path/to/page?query=1&b=two#frag", "http://localhost:8080/",
        "ftp://ftp.example.org/pub/file.tar.gz", "www.example.co.uk", "user@example.com",
        "https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json",
        "file:///home/user/My%20Documents/a.txt", "mailto:first.last+tag@sub.domain.io",
        "https://例え.jp/パス?q=値", "C:\\Program Files\\app\\bin.exe", "/usr/lib/x86_64-linux-gnu/"]

PUNCT = list("!?.,;:-_()[]{}<>\"'`~@#$%^&*+=|\\/") + ["—", "–", "…", "«", "»", "“", "”", "‘", "’",
                                                     "¿", "¡", "、", "。", "！", "？", "【", "】",
                                                     "·", "•", "§", "¶", "†", "‰", "′", "″"]

WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", " \n", "\n ", "\t\t", "\u00a0",
              "\u3000", "\u2003", "\u2009", "\u200b", "\x0b", "\x0c", "\u2028", "\u0085",
              "\ufeff", " \t \n"]

# NFC/NFD pairs and other combining-mark material (all valid UTF-8)
COMBINING = ["é", "e\u0301", "Å", "A\u030a", "\u212b", "\u2126", "Ω", "ñ", "n\u0303",
             "가", "\u1100\u1161", "\u1100\u1161\u11a8", "각", "ö", "o\u0308", "ǖ", "u\u0308\u0304",
             "ạ̈", "a\u0323\u0308", "a\u0308\u0323", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u0334\u0335\u031c\u0330\u0354L\u0328\u0359\u0326\u0349G\u0335\u0358\u0322O",
             "ﬁ", "Ⅸ", "①", "ｆｕｌｌｗｉｄｔｈ", "\u0915\u094d\u0937", "\u0e01\u0e34\u0e4a",
             "\u05e9\u05c1\u05b8", "\u0644\u0627", "\u200d", "\u200c", "\u200e", "\u200f",
             "\u00ad", "\u034f", "\ufe0f", "\u20dd", "q\u0307\u0323", "\u0301", "\u0301\u0301abc"]

ODD_CHARS = ["\x01", "\x07", "\x1b[31mred\x1b[0m", "\x7f", "\u0080", "\u009f", "\ue000", "\uf8ff",
             "\uffff", "\ufffe", "\ufffd", "\U0010ffff", "\U000e0001", "\U0001f9ff", "\u2060",
             "\U0001d400\U0001d401", "\u0378"]


def special_tokens(name, tokjson):
    """Added/special token strings of a tokenizer.json, the placeholders of DeepSeek thinned."""
    out = []
    for a in tokjson["added_tokens"]:
        c = a["content"]
        m = re.search(r"place▁holder▁no▁(\d+)", c)
        if m and int(m.group(1)) not in (0, 1, 7, 100, 799):
            continue
        out.append(c)
    return out


class Gen:
    """Deterministic random text from a seed."""

    def __init__(self, seed, specials):
        self.r = random.Random(seed)
        self.specials = specials

    def pick(self, xs):
        return xs[self.r.randrange(len(xs))]

    def prose(self):
        r = self.r
        parts = []
        for _ in range(r.randint(1, 4)):
            n = r.randint(2, 14)
            ws = []
            for _ in range(n):
                x = r.random()
                if x < 0.12:
                    ws.append(self.pick(CONTRACTION_WORDS))
                elif x < 0.2:
                    ws.append(self.pick(CONTRACTION_SUBJECTS) + self.pick(CONTRACTIONS))
                else:
                    ws.append(self.pick(WORDS))
            s = " ".join(ws)
            y = r.random()
            if y < 0.15:
                s = s.upper()
            elif y < 0.25:
                s = s.title()
            elif y < 0.7:
                s = s[:1].upper() + s[1:]
            parts.append(s + self.pick([".", ".", "!", "?", "...", ",", ";", " —", ":", ""]))
        return self.pick([" ", " ", "  ", "\n", "\n\n"]).join(parts)

    def script(self):
        name = self.pick(SCRIPT_NAMES)
        k = self.r.randint(1, 3)
        return self.pick([" ", "", "、", "\n", ", "]).join(self.pick(SCRIPTS[name]) for _ in range(k))

    def emoji(self):
        k = self.r.randint(1, 6)
        sep = self.pick(["", "", " ", "\u200d", "!"])
        return sep.join(self.pick(EMOJI) for _ in range(k))

    def code(self):
        r = self.r
        pool = self.pick([C_SNIPPETS, PY_SNIPPETS, JSON_SNIPPETS, OTHER_CODE])
        s = self.pick(pool)
        if r.random() < 0.3:
            s = s + self.pick(["\n", "\n\n"]) + self.pick(pool)
        x = r.random()
        if x < 0.2:
            s = s.replace("\n", "\r\n")
        elif x < 0.35:
            s = s.replace("    ", "\t")
        elif x < 0.45:
            s = "\n".join(("  " * r.randint(1, 6)) + ln for ln in s.split("\n"))
        return s

    def whitespace(self):
        k = self.r.randint(1, 8)
        return "".join(self.pick(WHITESPACE) for _ in range(k))

    def number(self):
        r = self.r
        x = r.random()
        if x < 0.25:
            return str(r.randint(0, 10 ** r.randint(1, 22)))
        if x < 0.35:
            return "-" + str(r.randint(0, 99999))
        if x < 0.5:
            return "%d.%0*d" % (r.randint(0, 9999), r.randint(1, 8), r.randint(0, 10 ** 8 - 1))
        if x < 0.6:
            return "{:,}".format(r.randint(1000, 10 ** 12))
        if x < 0.65:
            return "%d.%de%+d" % (r.randint(1, 9), r.randint(0, 999), r.randint(-30, 30))
        if x < 0.72:
            return "%04d-%02d-%02d %02d:%02d:%02d" % (r.randint(1900, 2100), r.randint(1, 12),
                                                       r.randint(1, 28), r.randint(0, 23),
                                                       r.randint(0, 59), r.randint(0, 59))
        if x < 0.78:
            return "v%d.%d.%d" % (r.randint(0, 20), r.randint(0, 99), r.randint(0, 999))
        if x < 0.84:
            return "0x%X" % r.randint(0, 2 ** 64 - 1)
        if x < 0.9:
            return "+1 (%03d) %03d-%04d" % (r.randint(0, 999), r.randint(0, 999), r.randint(0, 9999))
        if x < 0.95:
            return self.pick(["3.14159", "2.718281828459045", "1,000,000", "1 000 000", "1.000.000,00",
                              "١٢٣٤", "१२३४", "一千二百", "½ ¾ ⅞", "²³¹", "①②③", "１２３４"])
        return "".join(str(r.randint(0, 9)) for _ in range(r.randint(10, 80)))

    def punct(self):
        k = self.r.randint(1, 12)
        return "".join(self.pick(PUNCT) for _ in range(k))

    def url(self):
        return self.pick(URLS)

    def special(self):
        r = self.r
        t = self.pick(self.specials)
        x = r.random()
        if x < 0.15 and len(t) > 3:  # a broken one that must not match
            return self.pick([t[:-1], t[1:], t[:len(t) // 2], t.upper() if t.upper() != t else t + t[-1]])
        if x < 0.3:
            return t + t
        return t

    def combining(self):
        k = self.r.randint(1, 5)
        return self.pick(["", " ", ""]).join(self.pick(COMBINING) for _ in range(k))

    def odd(self):
        return self.pick(ODD_CHARS)

    def long_word(self):
        r = self.r
        x = r.random()
        n = r.randint(120, 260)
        if x < 0.4:
            return "".join(self.pick("abcdefghijklmnopqrstuvwxyz") for _ in range(n))
        if x < 0.55:
            return self.pick("aZ9 -_.=\u4e00é🙂") * n
        if x < 0.7:
            return "".join(self.pick(WORDS) for _ in range(n // 6))
        if x < 0.85:
            return "".join(self.pick("абвгдежзийклмнопрстуфхцчшщъыьэюя") for _ in range(n))
        return "".join(self.pick(SCRIPTS["chinese"]) for _ in range(n // 5))

    KINDS = [("prose", 30), ("script", 16), ("emoji", 7), ("code", 9), ("whitespace", 8),
             ("number", 9), ("punct", 6), ("url", 4), ("special", 8), ("combining", 7), ("odd", 3),
             ("long_word", 2)]

    def fragment(self):
        total = sum(w for _, w in self.KINDS)
        x = self.r.randrange(total)
        for k, w in self.KINDS:
            if x < w:
                return getattr(self, k)()
            x -= w
        raise AssertionError

    def text(self):
        r = self.r
        x = r.random()
        if x < 0.06:  # a single character
            return self.pick([self.pick(EMOJI), self.pick(COMBINING), self.pick(PUNCT),
                              self.pick(WHITESPACE), self.pick("aZ09'"), self.pick(ODD_CHARS),
                              self.pick(SCRIPTS[self.pick(SCRIPT_NAMES)])[:1]])
        if x < 0.3:  # one kind only
            s = self.fragment()
        else:
            n = r.randint(2, 9)
            s = ""
            for _ in range(n):
                s += self.fragment() + self.pick(["", " ", " ", " ", "\n", "", "\t", "  "])
        y = r.random()
        if y < 0.1:
            s = self.whitespace() + s
        elif y < 0.2:
            s = s + self.whitespace()
        elif y < 0.25:
            s = self.whitespace() + s + self.whitespace()
        if len(s) > 2000:
            s = s[:2000]
        return s


def fixed_cases(specials):
    """~50 hand-written edge cases, common to every tokenizer and seed."""
    sp = specials
    cases = [
        "",
        " ",
        "  ",
        "\n",
        "\t",
        "\r\n",
        "a",
        "A",
        "'",
        "'s",
        "Hello world",
        " Hello world",
        "Hello world ",
        "Hello, world! How are you?",
        "I'm sure they'll say it's fine, but we'd've known you're right and I've seen it.",
        "DON'T SHOUT. I'M NOT DEAF. IT'S FINE, WE'VE HEARD, THEY'LL SEE, YOU'D KNOW, WE'RE OK.",
        "don't Don't DON'T dOn'T",
        "The year 2024 has 366 days; 1234567 is a number, so is 3.14159 and 1,000,000.",
        "12345678901234567890123456789012345678901234567890",
        "  leading and trailing spaces  ",
        "\n\n\nthree newlines first",
        "tabs\tand\t\tmore\t\t\ttabs",
        "multiple     spaces      here",
        "line one\r\nline two\r\n\r\nline four",
        "trailing newlines\n\n\n",
        "     ",
        " \n \n ",
        "e\u0301",
        "é",
        "café vs cafe\u0301",
        "\u212b\u2126",
        "한국어 \u1112\u1161\u11ab\u1100\u116e\u11a8\u110b\u1165",
        "你好，世界！こんにちは、世界！안녕하세요!",
        "مرحبا بالعالم שלום עולם",
        "नमस्ते दुनिया สวัสดีชาวโลก",
        "👨‍👩‍👧‍👦 🇺🇸🇯🇵 👍🏽 1️⃣ 🏳️‍🌈",
        "😀😀😀😀😀😀😀😀😀😀",
        "def f(x):\n    return x * 2\n",
        "int main(void) {\n\treturn 0;\n}\r\n",
        "{\"key\": [1, 2, {\"nested\": null}], \"s\": \"\\u00e9\"}",
        "https://example.com/a/b?c=d&e=f#g",
        "!!!???...,,,;;;:::---___",
        "x" * 200,
        "Pneumonoultramicroscopicsilicovolcanoconiosis" * 4,
        "1" * 200,
        " " * 64 + "x",
        "\u200b\u200c\u200d\ufeff",
        "\U0010ffff\ue000\uffff",
        "ﬁ ﬂ ﬀ Ⅻ ① ｆｕｌｌ",
    ]
    # special tokens: alone, embedded, adjacent to whitespace, and near misses
    main = sp[:3] + [t for t in sp[3:] if any(k in t for k in ("User", "Assistant", "think", "tool_call", "calls▁begin"))]
    for t in main[:6]:
        cases.append(t)
        cases.append("hello " + t + " world")
        cases.append(t + "\n" + t)
    if "<|im_start|>" in sp:
        cases.append("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        cases.append("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
                     "What's 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>")
        cases.append("<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>")
        cases.append("<|im_start <|im_end| im_start|> <|IM_START|> <||>")
        cases.append("<|endoftext|><|endoftext|>text<|endoftext|>")
    else:
        cases.append("<｜begin▁of▁sentence｜>You are helpful.<｜User｜>hi<｜Assistant｜>hello<｜end▁of▁sentence｜>")
        cases.append("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
        cases.append("<｜begin▁of▁sentence <｜User｜ <|User|> <｜user｜> ｜>")
        cases.append("<|EOT|> <｜fim▁begin｜>def f():<｜fim▁hole｜>\n<｜fim▁end｜>")
        cases.append("<｜▁pad▁｜><｜▁pad▁｜>x")
    return cases


def make_texts(seed, specials):
    g = Gen(seed, specials)
    texts = fixed_cases(specials)
    seen = set(texts)
    while len(texts) < len(fixed_cases(specials)) + N_RANDOM:
        t = g.text()
        if t in seen:
            continue
        seen.add(t)
        texts.append(t)
    return texts


# ---------------------------------------------------------------------------------------------
# Conversations
# ---------------------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city. Météo actuelle — 天气.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. \"Paris\" or '東京'"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_docs",
        "description": "Full-text search over the docs; returns <= 10 hits & their scores.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string"},
            "filters": {"type": "object", "properties": {
                "lang": {"type": "array", "items": {"type": "string"}},
                "since": {"type": ["string", "null"], "format": "date"}}},
            "top_k": {"type": "number", "default": 5.0}},
            "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "run_python",
        "description": "Run a Python snippet in a sandbox.\nReturns stdout.",
        "parameters": {"type": "object", "properties": {
            "code": {"type": "string"}, "timeout_s": {"type": "number"},
            "dry_run": {"type": "boolean"}},
            "required": ["code"]}}},
]

USER_TEXTS = [
    "Hello!", "What's the weather like in Paris today?", "Explain mixture-of-experts in one paragraph.",
    "你好，请介绍一下你自己。", "Écris un haïku sur l'automne 🍂", "Сколько будет 2+2?",
    "Write a C function that reverses a string.\nKeep it short.",
    "Translate to Japanese: \"I don't know.\"", "¿Qué hora es en Tokio?", "List three prime numbers > 100.",
    "Can you fix this?\n```python\ndef f(x):\n\treturn x +\n```", "مرحبا! كيف حالك؟",
    "  spaces around  ", "Line 1\r\nLine 2\r\n", "Summarize: 👨‍👩‍👧‍👦 family trip to 🇯🇵.",
]
ASSISTANT_TEXTS = [
    "Hi! How can I help you today?", "Mixture-of-experts routes each token to a few expert MLPs.",
    "我是一个AI助手。", "Feuilles rousses —\nle vent les emporte\nvers l'hiver.", "2+2 = 4.",
    "```c\nvoid rev(char *s) {\n    size_t n = strlen(s);\n    for (size_t i = 0; i < n / 2; i++) {\n        char t = s[i]; s[i] = s[n-1-i]; s[n-1-i] = t;\n    }\n}\n```",
    "分かりません。", "Son las 9:41 en Tokio.", "101, 103, 107.", "", "  padded answer \n",
]
THINK_TEXTS = [
    "The user greets me. I should greet back.", "Let me think step by step.\n1. Paris is in France.\n2. I need the weather tool.",
    "计算：2+2=4。", "Hmm — the code has a syntax error on line 2.", "",
]
SYSTEM_TEXTS = ["You are a helpful assistant.", "", "Tu es un assistant serviable. Réponds en français.",
                "You are Qwen.\nAlways answer briefly.", "   ", "你是一个乐于助人的助手。"]


class Conv:
    def __init__(self, seed):
        self.r = random.Random(seed * 7919 + 17)
        self.g = Gen(seed * 104729 + 3, ["<|im_end|>", "<｜User｜>", "<think>", "</tool_call>"])

    def pick(self, xs):
        return xs[self.r.randrange(len(xs))]

    def user(self):
        return self.pick(USER_TEXTS) if self.r.random() < 0.7 else self.g.text()[:400] or "?"

    def asst(self):
        return self.pick(ASSISTANT_TEXTS) if self.r.random() < 0.75 else self.g.prose()

    def think(self):
        return self.pick(THINK_TEXTS)

    def args(self, i):
        r = self.r
        return [
            {"city": self.pick(["Paris", "東京", "São Paulo", "New York"]), "unit": "celsius", "days": r.randint(1, 7)},
            {"query": self.pick(["moe routing", "tokenizer <BPE> & \"merges\"", "日本語 検索"]),
             "filters": {"lang": ["en", "zh"], "since": None}, "top_k": self.pick([3, 2.5, 10.0])},
            {"code": "print('hi')\nfor i in range(3):\n    print(i)", "timeout_s": 1.5, "dry_run": self.pick([True, False])},
        ][i % 3]

    def call(self, i, as_string=False):
        a = self.args(i)
        name = TOOLS[i % 3]["function"]["name"]
        return {"type": "function", "function": {"name": name, "arguments": json.dumps(a, ensure_ascii=False) if as_string else a}}

    def result(self, i):
        return self.pick(['{"temperature": 21.5, "condition": "sunny ☀️"}', "No results.",
                          '{"hits": [{"title": "MoE", "score": 0.93}]}', "0\n1\n2\n", "晴れ、気温18度",
                          "<tool_response>nested</tool_response>", "Error: timeout after 1.5 s"])

    def shapes(self):
        """(label, messages, tools) for every conversation shape; contents from the seed."""
        u, a, t, S = self.user, self.asst, self.think, self.pick
        T2 = TOOLS[:2]
        out = [
            ("user only", [{"role": "user", "content": u()}], None),
            ("system + user", [{"role": "system", "content": S(SYSTEM_TEXTS[:1] + SYSTEM_TEXTS[2:])},
                               {"role": "user", "content": u()}], None),
            ("empty system", [{"role": "system", "content": ""}, {"role": "user", "content": u()}], None),
            ("multi-turn", [{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": u()}, {"role": "assistant", "content": a()},
                            {"role": "user", "content": u()}], None),
            ("three rounds, ends with assistant", [
                {"role": "user", "content": u()}, {"role": "assistant", "content": a()},
                {"role": "user", "content": u()}, {"role": "assistant", "content": a()},
                {"role": "user", "content": u()}, {"role": "assistant", "content": a()}], None),
            ("think tags in the last assistant turn", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "<think>\n" + t() + "\n</think>\n\n" + a()}], None),
            ("think tags in a history turn", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "<think>\n" + t() + "\n</think>\n\n" + a()},
                {"role": "user", "content": u()}], None),
            ("think tags without newlines", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "<think>" + t() + "</think>" + a()}], None),
            ("only a closing think tag", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": t() + "\n</think>\n\n" + a()}], None),
            ("reasoning_content field, last turn", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": a(), "reasoning_content": t()}], None),
            ("reasoning_content in history and last", [
                {"role": "system", "content": S(SYSTEM_TEXTS)},
                {"role": "user", "content": u()},
                {"role": "assistant", "content": a(), "reasoning_content": "old reasoning\n"},
                {"role": "user", "content": u()},
                {"role": "assistant", "content": a(), "reasoning_content": "\n" + t() + "\n"}], None),
            ("reasoning_content None with think tags", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "<think>\nx\n</think>\n" + a(), "reasoning_content": None}], None),
            ("tools, user only", [{"role": "user", "content": u()}], TOOLS),
            ("tools with system", [{"role": "system", "content": S(SYSTEM_TEXTS)},
                                   {"role": "user", "content": u()}], T2),
            ("tool call (dict args), response, answer", [
                {"role": "user", "content": "What's the weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [self.call(0)]},
                {"role": "tool", "content": self.result(0)},
                {"role": "assistant", "content": "It is 21.5 °C and sunny."}], TOOLS),
            ("tool call with text content", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "Let me check that for you.", "tool_calls": [self.call(1)]},
                {"role": "tool", "content": self.result(1)}], TOOLS),
            ("tool call with string arguments", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "", "tool_calls": [self.call(2, as_string=True)]},
                {"role": "tool", "content": self.result(2)}], TOOLS),
            ("parallel tool calls, responses in a row", [
                {"role": "system", "content": "Use tools when needed."},
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "", "tool_calls": [self.call(0), self.call(1), self.call(2)]},
                {"role": "tool", "content": self.result(0)}, {"role": "tool", "content": self.result(1)},
                {"role": "tool", "content": self.result(2)},
                {"role": "assistant", "content": a()}], TOOLS),
            ("multi-step tools with thinking", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "<think>\nneed weather\n</think>\n\n", "tool_calls": [self.call(0)]},
                {"role": "tool", "content": self.result(0)},
                {"role": "assistant", "content": "", "reasoning_content": "now search", "tool_calls": [self.call(1)]},
                {"role": "tool", "content": self.result(1)}], TOOLS),
            ("tool call, content None, dict args", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": None, "tool_calls": [self.call(0)]},
                {"role": "tool", "content": self.result(0)}], TOOLS),
            ("tool call, content None, string args", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": None, "tool_calls": [self.call(0, as_string=True)]},
                {"role": "tool", "content": self.result(0)},
                {"role": "assistant", "content": a()}], TOOLS),
            ("two tool calls, content None, string args", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": None,
                 "tool_calls": [self.call(0, as_string=True), self.call(1, as_string=True)]},
                {"role": "tool", "content": self.result(0)}, {"role": "tool", "content": self.result(1)},
                {"role": "assistant", "content": a()}], TOOLS),
            ("two tool-call turns, content None, string args", [
                {"role": "system", "content": S(SYSTEM_TEXTS)},
                {"role": "user", "content": u()},
                {"role": "assistant", "content": None,
                 "tool_calls": [self.call(0, as_string=True), self.call(2, as_string=True), self.call(1, as_string=True)]},
                {"role": "tool", "content": self.result(0)}, {"role": "tool", "content": self.result(2)},
                {"role": "tool", "content": self.result(1)},
                {"role": "assistant", "content": None, "tool_calls": [self.call(1, as_string=True)]},
                {"role": "tool", "content": self.result(1)}], TOOLS),
            ("tool outputs without tools list", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": None, "tool_calls": [self.call(2, as_string=True)]},
                {"role": "tool", "content": self.result(2)}], None),
            ("user turn that is a tool_response", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "calling", "tool_calls": [self.call(0)]},
                {"role": "user", "content": "<tool_response>\n" + self.result(0) + "\n</tool_response>"}], TOOLS),
            ("unicode everywhere", [
                {"role": "system", "content": "Ты — полезный ассистент. 你是助手。"},
                {"role": "user", "content": "👨‍👩‍👧‍👦🇯🇵 नमस्ते! שלום, مرحبا, 안녕 — e\u0301 vs é"},
                {"role": "assistant", "content": "สวัสดี! Ελληνικά ✓ 😀"},
                {"role": "user", "content": self.g.script()}], None),
            ("multi-line content with code", [
                {"role": "user", "content": "Review:\n\n```c\nint main(void) {\n\treturn 0;\n}\n```\r\nThanks!\n\n"},
                {"role": "assistant", "content": "Looks fine.\n\n- tabs\tok\n- CRLF\r\n  ok\n"},
                {"role": "user", "content": self.g.code()}], None),
            ("special tokens inside content", [
                {"role": "user", "content": "print('<|im_end|>') and <｜User｜> and <think>x</think>"},
                {"role": "assistant", "content": "The string <|im_start|> is special. <｜Assistant｜>"},
                {"role": "user", "content": "ok"}], None),
            ("whitespace around content", [
                {"role": "system", "content": "\n  system with spaces  \n"},
                {"role": "user", "content": "\n\n  hi  \n\n"},
                {"role": "assistant", "content": "\n\n  hello  \n\n"},
                {"role": "user", "content": " \t "}], None),
            ("empty user and assistant content", [
                {"role": "user", "content": ""}, {"role": "assistant", "content": ""},
                {"role": "user", "content": ""}], None),
            ("system in the middle", [
                {"role": "user", "content": u()}, {"role": "assistant", "content": a()},
                {"role": "system", "content": "New instructions: be terse."},
                {"role": "user", "content": u()}], None),
            ("two system messages first", [
                {"role": "system", "content": "First system."}, {"role": "system", "content": "Second system."},
                {"role": "user", "content": u()}], None),
            ("tool message before any user", [
                {"role": "system", "content": "sys"}, {"role": "tool", "content": "orphan result"}], None),
            ("assistant first", [{"role": "assistant", "content": a()}, {"role": "user", "content": u()}], None),
            ("no messages", [], None),
            ("unknown role", [{"role": "developer", "content": "dev note"}, {"role": "user", "content": u()}], None),
            ("content as a list of text parts", [
                {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": " Part two."}]}], None),
            ("nested tool arguments and odd values", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                    "name": "search_docs", "arguments": {
                        "query": "a \"quoted\" <tag> & 'single' \\ back\nslash é 中",
                        "filters": {"lang": [], "since": "2024-01-01", "deep": {"x": [1, 2.0, -0.5, 1e20, True, None]}},
                        "top_k": 0}}}]},
                {"role": "tool", "content": '{"hits": []}'},
                {"role": "assistant", "content": "Nothing found."}], TOOLS),
            ("tool response then user then assistant with think", [
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "", "tool_calls": [self.call(0)]},
                {"role": "tool", "content": self.result(0)},
                {"role": "assistant", "content": "<think>\ngot it\n</think>\n\nDone."},
                {"role": "user", "content": u()},
                {"role": "assistant", "content": "<think>\n" + t() + "\n</think>\n\n" + a()}], TOOLS),
        ]
        # a few random conversations
        for k in range(6):
            msgs = []
            if self.r.random() < 0.5:
                msgs.append({"role": "system", "content": S(SYSTEM_TEXTS)})
            for _ in range(self.r.randint(1, 3)):
                msgs.append({"role": "user", "content": u()})
                x = self.r.random()
                if x < 0.4:
                    msgs.append({"role": "assistant", "content": a()})
                elif x < 0.7:
                    msgs.append({"role": "assistant", "content": "<think>\n" + t() + "\n</think>\n\n" + a()})
            out.append(("random %d" % k, msgs, TOOLS if self.r.random() < 0.3 else None))
        return out


FLAG_COMBOS = [(True, None), (False, None), (True, False), (True, True), (False, True), (False, False)]


def conversations(seed):
    c = Conv(seed)
    out = []
    for i, (label, msgs, tools) in enumerate(c.shapes()):
        combos = [FLAG_COMBOS[i % len(FLAG_COMBOS)]]
        extra = FLAG_COMBOS[c.r.randrange(len(FLAG_COMBOS))]
        if extra not in combos:
            combos.append(extra)
        for agp, think in combos:
            out.append({"label": label, "messages": msgs, "tools": tools,
                        "add_generation_prompt": agp, "enable_thinking": think})
    return out


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def dumps(x):
    return json.dumps(x, ensure_ascii=False, separators=(",", ":"))


def write_json(path, header, lists):
    """header fields, then each list with one element per line (small diffs, easy to grep)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("{\n")
        items = list(header.items())
        for k, v in items:
            f.write("%s: %s,\n" % (dumps(k), dumps(v)))
        for j, (k, xs) in enumerate(lists):
            f.write("%s: [" % dumps(k))
            for i, x in enumerate(xs):
                f.write("\n  " + dumps(x) + ("," if i + 1 < len(xs) else ""))
            f.write("\n]" + ("," if j + 1 < len(lists) else "") + "\n")
        f.write("}\n")
    with open(path, encoding="utf-8") as f:
        json.load(f)  # self-check


def render_all(hf, tok, convs, template=None):
    cases, errors = [], []
    for cv in convs:
        kw = {}
        if cv["enable_thinking"] is not None:
            kw["enable_thinking"] = cv["enable_thinking"]
        if template is not None:
            kw["chat_template"] = template
        rec = {"label": cv["label"], "messages": cv["messages"], "tools": cv["tools"],
               "add_generation_prompt": cv["add_generation_prompt"], "enable_thinking": cv["enable_thinking"]}
        try:
            text = hf.apply_chat_template(copy.deepcopy(cv["messages"]), tools=copy.deepcopy(cv["tools"]),
                                          add_generation_prompt=cv["add_generation_prompt"],
                                          tokenize=False, **kw)
        except Exception as e:  # the template (or transformers) refused: the C renderer must too
            rec["error"] = "%s: %s" % (type(e).__name__, e)
            errors.append(rec)
            continue
        if not isinstance(text, str):
            raise RuntimeError("apply_chat_template returned %r" % type(text))
        rec["text"] = text
        rec["ids"] = tok.encode(text, add_special_tokens=False).ids
        cases.append(rec)
    return cases, errors


def bench(tok, texts_fn, label, mb):
    parts, n = [], 0
    while n < mb * 1_000_000:
        s = texts_fn()
        parts.append(s)
        n += len(s.encode("utf-8"))
    big = "\n".join(parts)
    nbytes = len(big.encode("utf-8"))
    t0 = time.perf_counter()
    enc = tok.encode(big, add_special_tokens=False)
    t1 = time.perf_counter()
    lines = big.split("\n")
    t2 = time.perf_counter()
    tok.encode_batch(lines, add_special_tokens=False)
    t3 = time.perf_counter()
    return {"text": label, "bytes": nbytes, "tokens": len(enc.ids),
            "single_encode_s": round(t1 - t0, 3), "single_encode_MB_per_s": round(nbytes / 1e6 / (t1 - t0), 2),
            "single_encode_tokens_per_s": int(len(enc.ids) / (t1 - t0)),
            "batch_lines": len(lines), "batch_encode_s": round(t3 - t2, 3),
            "batch_encode_MB_per_s": round(nbytes / 1e6 / (t3 - t2), 2), "threads": os.cpu_count()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tok-dir", required=True, help="holds qwen3/ and deepseek_v3/ (tools/fetch-tokenizers.sh)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--qwen35-template", default=None, help="a Qwen3.5 chat template to render too")
    ap.add_argument("--bench-mb", type=float, default=5.0, help="size of the throughput text; 0 skips")
    args = ap.parse_args()

    import tokenizers
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    versions = {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__}
    print("versions:", versions)
    convs = conversations(args.seed)
    summary = {}
    for name in TOKENIZERS:
        d = os.path.join(args.tok_dir, name)
        with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
            tj = json.load(f)
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        specials = special_tokens(name, tj)
        texts = make_texts(args.seed, specials)
        cases = []
        for t in texts:
            ids = tok.encode(t, add_special_tokens=False).ids
            ids_sp = tok.encode(t, add_special_tokens=True).ids
            cases.append({"text": t, "ids": ids, "ids_special": ids_sp,
                          "decoded": tok.decode(ids, skip_special_tokens=False)})
        try:
            hf = AutoTokenizer.from_pretrained(d)
        except Exception as e:  # a class transformers cannot build from this config: the generic one
            print("AutoTokenizer failed for %s (%s: %s); using PreTrainedTokenizerFast" % (name, type(e).__name__, e))
            hf = transformers.PreTrainedTokenizerFast.from_pretrained(d)
        # how transformers' own tokenizer compares (for the report; the refs use `tokenizers`)
        agree, probe, hf_prefix = 0, texts[:200], None
        try:
            for t in probe:
                if hf(t, add_special_tokens=False)["input_ids"] == tok.encode(t, add_special_tokens=False).ids:
                    agree += 1
            hf_prefix = hf("hello", add_special_tokens=True)["input_ids"]
        except Exception as e:
            print("transformers encode failed for %s: %s: %s" % (name, type(e).__name__, e))
        added = [{"id": a["id"], "content": a["content"], "special": a["special"]} for a in tj["added_tokens"]]
        header = {"tokenizer": name, "seed": args.seed, "versions": versions,
                  "post_processor": tj.get("post_processor"),
                  "added_tokens": added,
                  "observed": {
                      "tokenizers_ids_hello_add_special": tok.encode("hello", add_special_tokens=True).ids,
                      "transformers_class": type(hf).__name__,
                      "transformers_ids_hello_add_special": hf_prefix,
                      "tokenizers_ids_hello": tok.encode("hello", add_special_tokens=False).ids,
                      "transformers_agrees_with_tokenizers": "%d/%d" % (agree, len(probe))}}
        write_json(os.path.join(args.out, name, "encode.json"), header, [("cases", cases)])

        chat_cases, chat_errors = render_all(hf, tok, convs)
        cfg = json.load(open(os.path.join(d, "tokenizer_config.json"), encoding="utf-8"))
        write_json(os.path.join(args.out, name, "chat.json"),
                   {"tokenizer": name, "seed": args.seed, "versions": versions,
                    "template": cfg["chat_template"], "bos_token": hf.bos_token, "eos_token": hf.eos_token},
                   [("cases", chat_cases), ("errors", chat_errors)])
        info = {"encode_cases": len(cases), "chat_cases": len(chat_cases), "chat_errors": len(chat_errors),
                "observed": header["observed"]}
        if name == "qwen3" and args.qwen35_template:
            tpl = open(args.qwen35_template, encoding="utf-8").read()
            q_cases, q_errors = render_all(hf, tok, convs, template=tpl)
            write_json(os.path.join(args.out, "qwen3_5", "chat.json"),
                       {"tokenizer": "qwen3_5", "seed": args.seed, "versions": versions,
                        "ids_from": "qwen3 tokenizer.json (Qwen3.5's own vocabulary is not available here)",
                        "template": tpl, "bos_token": hf.bos_token, "eos_token": hf.eos_token},
                       [("cases", q_cases), ("errors", q_errors)])
            info["qwen3_5_chat_cases"] = len(q_cases)
            info["qwen3_5_chat_errors"] = len(q_errors)
        if args.bench_mb > 0:
            g = Gen(args.seed + 1000, specials)
            info["bench"] = [bench(tok, g.text, "mixed generator text", args.bench_mb),
                             bench(tok, g.prose, "English prose", args.bench_mb)]
        summary[name] = info
        print(name, json.dumps(info, ensure_ascii=False, indent=1))
        sys.stdout.flush()
    return summary


if __name__ == "__main__":
    main()
