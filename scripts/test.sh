#!/usr/bin/env bash
# The whole test suite on a fresh Debian/Ubuntu machine with a Rust toolchain: installs
# nats-server, nats-py, PostgreSQL, Prometheus, skopeo, buildah and tini when missing, starts
# PostgreSQL, then runs fmt, clippy and every test (real nats-server per test, a fresh database
# per test).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_nats
ensure_postgres
ensure_python_nats
ensure_prometheus
ensure_image_tools
export TASKBUS_VENV TASKBUS_REQUIRE_PYTHON=1
prune_target
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
log "nats-server $(nats-server --version | awk '{print $2}'), PostgreSQL at $TASKBUS_TEST_DATABASE_URL"

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
# End-to-end tests run the service binaries as child processes (target/debug/<name>); cargo
# only builds a package's binaries for its own integration tests, so build them all first.
log "cargo build --workspace --bins"
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  log "cargo nextest run"
  cargo nextest run --workspace --no-fail-fast "$@"
else
  log "cargo test"
  cargo test --workspace --no-fail-fast "$@"
fi
