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
_lincnn_stamp="$(sha256sum < "$LINCNN_ROOT/pyproject.toml" | cut -c1-16)-$_lincnn_extras"
_lincnn_pip() {
    # pip's output is shown only when it fails, without its warnings about the folders of this
    # machine's local package mirrors that lack a package.
    local log
    log="$(mktemp)"
    if "$LINCNN_VENV/bin/python" -m pip "$@" > "$log" 2>&1; then
        rm -f "$log"
    else
        grep -v "^WARNING: Location '.*' is ignored" "$log" >&2 || true
        rm -f "$log"
        return 1
    fi
}
if [ "$(cat "$LINCNN_VENV/.lincnn-installed" 2>/dev/null)" != "$_lincnn_stamp" ]; then
    echo "lincnn: installing lincnn[$_lincnn_extras] into $LINCNN_VENV" >&2
    # torch/torchvision are pinned here only for this machine's local wheels; the package itself
    # asks for lower bounds so users keep their own torch.
    _lincnn_pip install -q --upgrade pip
    if ! "$LINCNN_VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
        _lincnn_pip install -q "torch==2.14.1" "torchvision==0.29.1" || _lincnn_pip install -q torch torchvision
    fi
    _lincnn_pip install -q -e "$LINCNN_ROOT[$_lincnn_extras]"
    echo "$_lincnn_stamp" > "$LINCNN_VENV/.lincnn-installed"
fi
export PATH="$LINCNN_VENV/bin:$PATH"
