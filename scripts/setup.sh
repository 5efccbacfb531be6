#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv, idempotently.
# torch is installed first and pinned by constraints.txt so that no dependency can pull a newer
# torch (and its CUDA wheels); torchvision is never needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.motiondial-deps"
want=$(cat constraints.txt requirements.txt requirements-dev.txt | sha1sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "[setup] creating $VENV and installing dependencies (about a minute the first time)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pipq() { "$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2>&1 |
         { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; }
pipq -c constraints.txt "$(grep -E '^torch==' constraints.txt)"
pipq -c constraints.txt -r requirements.txt -r requirements-dev.txt
"$VENV/bin/python" - <<'PY'
import torch, sys
want = open("constraints.txt").read().split("torch==")[1].split()[0]
if not torch.__version__.startswith(want):
    sys.exit(f"[setup] expected torch {want}, got {torch.__version__}")
PY
echo "$want" > "$stamp"
