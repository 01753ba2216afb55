#!/usr/bin/env bash
# Bootstrap .venv-peers: Celery and taskiq for the benchmarks, apart from Tether's own .venv,
# and Redis, their broker.
#
# Uses the Python that .venv was made from (so every system in a benchmark runs on the same
# interpreter) and installs benchmarks/requirements-peers.txt. Does nothing when the stamp is
# newer than the requirements. Run by the benchmarks themselves; `make bench` needs nothing
# installed by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PEERS_VENV:-.venv-peers}
REQS=benchmarks/requirements-peers.txt
STAMP="$VENV/.bootstrapped"

# The peers' broker. Installed through apt where we can (Debian, as root); the benchmarks start
# it on loopback without persistence when it is not running, or skip the peers, saying why.
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bootstrap-peers: installing redis-server from apt" >&2
    apt-get install -y -q redis-server >&2 \
        || { apt-get update -q >&2 && apt-get install -y -q redis-server >&2; } \
        || echo "bootstrap-peers: could not install redis-server" >&2
fi

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$REQS" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap-peers: .venv is missing: run scripts/bootstrap.sh (or make) first" >&2
    exit 1
fi
PYTHON=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
echo "bootstrap-peers: using $PYTHON ($("$PYTHON" -V 2>&1)) for $VENV" >&2
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q -r "$REQS" >&2
touch "$STAMP"
