# Sourced by every bin/ command: create .venv on first use, install lincnn into it, activate it.
# Reinstalls when pyproject.toml changes (its hash is kept in .venv/.lincnn-installed).
set -euo pipefail
LINCNN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LINCNN_VENV="${LINCNN_VENV:-$LINCNN_ROOT/.venv}"
_lincnn_extras="${LINCNN_EXTRAS:-test,distributed}"
if [ ! -x "$LINCNN_VENV/bin/python" ]; then
    echo "lincnn: creating $LINCNN_VENV (first run; installs torch, a few minutes)" >&2
    "${PYTHON:-python3}" -m venv "$LINCNN_VENV"
fi
_lincnn_stamp="$(cat "$LINCNN_ROOT/pyproject.toml" | sha256sum | cut -c1-16)-$_lincnn_extras"
if [ "$(cat "$LINCNN_VENV/.lincnn-installed" 2>/dev/null)" != "$_lincnn_stamp" ]; then
    echo "lincnn: installing lincnn[$_lincnn_extras] into $LINCNN_VENV" >&2
    # torch/torchvision are pinned here only for this machine's local wheels; the package itself
    # asks for lower bounds so users keep their own torch.
    "$LINCNN_VENV/bin/python" -m pip install -q --upgrade pip >&2
    if ! "$LINCNN_VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
        "$LINCNN_VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2 \
            || "$LINCNN_VENV/bin/python" -m pip install -q torch torchvision >&2
    fi
    "$LINCNN_VENV/bin/python" -m pip install -q -e "$LINCNN_ROOT[$_lincnn_extras]" >&2
    echo "$_lincnn_stamp" > "$LINCNN_VENV/.lincnn-installed"
fi
export PATH="$LINCNN_VENV/bin:$PATH"
