#!/usr/bin/env bash
# The GPU dispatcher's cost per task, without a GPU (docs/BENCHMARKS.md, "GPU dispatcher"):
# `taskbus dev --gpus GPUS` (declared GPUs, local backend) on a private nats-server and a fresh
# database, TASKS tasks of kind `sleep` with payload.args ["0"] published at once, timed until
# the coordinator has recorded them all.
#
#   scripts/gpu-bench.sh [TASKS] [GPUS]        # default 2000 8
#
# Needs: a release build (cargo build --release -p taskbus-cli), nats-server on PATH, python3
# with nats-py, psql, and TASKBUS_BENCH_ADMIN_URL (default
# postgres://taskbus:taskbus@127.0.0.1:5432/postgres), a role that may create databases.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-2000}"
G="${2:-8}"
BIN="${TASKBUS_BIN:-${CARGO_TARGET_DIR:-target}/release/taskbus}"
ADMIN="${TASKBUS_BENCH_ADMIN_URL:-postgres://taskbus:taskbus@127.0.0.1:5432/postgres}"
PORT=$((20000 + RANDOM % 20000))
work="$(mktemp -d)"
db="gpubench_$RANDOM$RANDOM"
url="${ADMIN%/*}/$db?sslmode=disable"
cleanup() {
  [ -n "${dev:-}" ] && kill -TERM "$dev" 2>/dev/null && wait "$dev" 2>/dev/null || true
  [ -n "${nats:-}" ] && kill "$nats" 2>/dev/null || true
  psql -q "$ADMIN" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
nats-server -js -sd "$work/js" -p "$PORT" >"$work/nats.log" 2>&1 &
nats=$!
psql -q "$ADMIN" -c "CREATE DATABASE $db" >/dev/null
"$BIN" dev --nats-url "nats://127.0.0.1:$PORT" --database-url "$url" --agents 0 \
  --demo-rate 0 --gpus "$G" >"$work/dev.log" 2>&1 &
dev=$!
until grep -q "taskbus dev is up" "$work/dev.log"; do
  kill -0 "$dev" 2>/dev/null || { cat "$work/dev.log"; exit 1; }
  sleep 0.2
done
t0=$(python3 - "$N" "$PORT" <<'PY'
import asyncio, json, sys, time
import nats
async def main():
    n, port = int(sys.argv[1]), sys.argv[2]
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    js = nc.jetstream()
    t0 = time.time()
    body = lambda i: json.dumps({"kind": "sleep", "id": f"b{i}", "payload": {"args": ["0"]}}).encode()
    for i in range(0, n, 200):
        await asyncio.gather(*[js.publish("taskbus.submit.gpu", body(j)) for j in range(i, min(n, i + 200))])
    await nc.close()
    print(t0)
asyncio.run(main())
PY
)
done_sql="SELECT count(*) FROM coordinator.tasks WHERE status IN ('succeeded', 'failed', 'dead')"
while [ "$(psql -qtA "$url" -c "$done_sql")" -lt "$N" ]; do sleep 0.05; done
t1=$(date +%s.%N)
python3 -c "print(f'$N tasks on $G GPUs: all recorded after {$t1 - $t0:.2f} s, {$N / ($t1 - $t0):.0f} tasks/s')"
psql -qtA "$url" -c "SELECT status, count(*) FROM coordinator.tasks GROUP BY 1"
