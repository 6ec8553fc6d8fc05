#!/usr/bin/env bash
# The main job on a fresh Debian/Ubuntu machine with a Rust toolchain: installs nats-server and
# PostgreSQL when missing, builds taskbus and runs `taskbus dev` (its own nats-server and
# PostgreSQL, the coordinator, demo agents and a small demo load). Extra arguments go to
# `taskbus dev`, e.g. `scripts/dev.sh --agents 4 --demo-rate 50 --duration 60`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_nats
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  log "installing PostgreSQL (Debian package postgresql)"
  apt_install postgresql
fi
log "building taskbus"
cargo build -q -p taskbus-cli -p taskbus-agent -p taskbus-coordinator
export PATH="$CARGO_TARGET_DIR/debug:$PATH"
log "taskbus dev $* (the binaries are in $CARGO_TARGET_DIR/debug)"
exec taskbus dev "$@"
