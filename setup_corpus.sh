#!/usr/bin/env bash
# Install the builtin prose corpus (best effort, never fatal): Debian's python3.X-doc, whose GNU info file is the
# whole Python documentation as plain English text (~14M characters, ~3.8M SmolLM2 tokens; PSF licence).
# data.py's builtin:prose reads /usr/share/info/python3.X.info.gz when present, and otherwise falls back to the
# pydoc_data topic help that ships with every CPython (~0.15M tokens). builtin:code needs nothing installed.
# No corpus text is ever stored in this repository.
set -u
PY="${PYTHON:-python}"
if ls /usr/share/info/python3.*.info* >/dev/null 2>&1; then
    echo "setup_corpus: Python documentation already installed: $(ls /usr/share/info/python3.*.info* | head -1)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_corpus: no apt-get here; builtin:prose will use pydoc_data (smaller)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "setup_corpus: not root and no passwordless sudo; builtin:prose will use pydoc_data (smaller)"
        exit 0
    fi
fi
VER="$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || echo 3)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || true
for pkg in "python${VER}-doc" python3-doc; do
    if $SUDO apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1; then
        echo "setup_corpus: installed $pkg"
        break
    fi
done
if ls /usr/share/info/python3.*.info* >/dev/null 2>&1; then
    echo "setup_corpus: builtin:prose = $(ls /usr/share/info/python3.*.info* | tail -1)"
else
    echo "setup_corpus: could not install the Python documentation; builtin:prose will use pydoc_data (smaller)"
fi
exit 0
