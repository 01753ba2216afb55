#!/usr/bin/env bash
# Bootstrap .venv with a Python that has per-interpreter GILs (3.13 or newer).
#
# Looks, in order, for: $TETHER_PYTHON; python3.14 / python3.13 on PATH (a pyenv shim that
# fails to run does not count); pyenv's versions folder; /usr/bin/python3.13 (Debian 13's apt
# package), installing it through apt when this is Debian with python3.13 available and we are
# root. Stops with a message naming what it tried when nothing fits.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
STAMP="$VENV/.bootstrapped"

usable() {  # usable PYTHON -> exit 0 when PYTHON runs and is >= 3.13 with _interpreters
    [ -n "$1" ] && "$1" -c 'import sys, _interpreters; sys.exit(sys.version_info < (3, 13))' \
        >/dev/null 2>&1
}

tried=()
find_python() {
    local cand
    for cand in "${TETHER_PYTHON:-}" python3.14 python3.13; do
        [ -n "$cand" ] || continue
        tried+=("$cand")
        if usable "$cand"; then command -v "$cand" || echo "$cand"; return 0; fi
    done
    local root
    root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    for cand in $(ls -d "$root"/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -rV); do
        tried+=("$cand")
        if usable "$cand"; then echo "$cand"; return 0; fi
    done
    for cand in /usr/bin/python3.14 /usr/bin/python3.13 /usr/local/bin/python3.13; do
        tried+=("$cand")
        if usable "$cand"; then echo "$cand"; return 0; fi
    done
    return 1
}

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && usable "$VENV/bin/python"; then
    exit 0
fi

if ! PYTHON=$(find_python); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        && apt-cache policy python3.13 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        echo "bootstrap: installing python3.13 from apt" >&2
        apt-get install -y -q python3.13 python3.13-venv >&2
        PYTHON=$(find_python) || true
    fi
fi
if [ -z "${PYTHON:-}" ]; then
    cat >&2 <<MSG
bootstrap: Tether needs Python 3.13 or newer (per-interpreter GIL); none was found.
  tried: ${tried[*]}
  get one with:  pyenv install 3.13   (then re-run)
            or:  apt-get install python3.13 python3.13-venv   (Debian 13)
            or:  TETHER_PYTHON=/path/to/python3.13 make ...
MSG
    exit 1
fi

echo "bootstrap: using $PYTHON ($("$PYTHON" -V 2>&1))" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
# --group needs pip >= 25.1, which the upgrade above brings.
"$VENV/bin/python" -m pip install -q -e . --group test --group lint >&2
touch "$STAMP"
