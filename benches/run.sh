#!/usr/bin/env bash
# On-demand benchmark (never part of `cargo test`): passthrough throughput direct vs through
# spillway, and durable deferred accepts, measured side by side in one run with wrk.
# Usage: bash benches/run.sh [seconds-per-run]   (needs wrk: apt-get install wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)"; exit 1; }
cargo build --release --bin spillway --example fast_upstream >/dev/null

work=$(mktemp -d)
cleanup() { kill "${UP_PID:-}" "${SW_PID:-}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

./target/release/examples/fast_upstream 127.0.0.1:18080 >/dev/null &
UP_PID=$!
cat >"$work/bench.yaml" <<YAML
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
storage: { path: $work/queue.redb }
routes:
  - name: pass
    match: { host: pass.test }
    upstream: http://127.0.0.1:18080
    rate_limit: { per_second: 1000000, burst: 1000000 }
    circuit_breaker: { consecutive_failures: 1000, open_for: 1s }
  - name: defer
    match: { host: defer.test }
    upstream: http://127.0.0.1:18080
    deferrable: true
    rate_limit: { per_second: 1, burst: 1 }   # delivery throttled: accepting is measured alone
    queue: { max_depth: 100000000 }
YAML
start_spillway() { # extra env assignments...
  rm -f "$work/queue.redb" "$work/out"
  env SPILLWAY_LOG=warn "$@" ./target/release/spillway run -c "$work/bench.yaml" >"$work/out" 2>"$work/err" &
  SW_PID=$!
  for _ in $(seq 100); do grep -q '"name":"proxy"' "$work/out" 2>/dev/null && break; sleep 0.1; done
  PROXY=$(grep '"name":"proxy"' "$work/out" | sed 's/.*"addr":"\([^"]*\)".*/\1/')
  sleep 0.5
}
start_spillway

run() { # label, wrk args...
  local label=$1; shift
  local out; out=$(wrk -t2 -c50 -d"${DUR}s" --latency "$@")
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  local non2xx; non2xx=$(awk '/Non-2xx/ {print $5}' <<<"$out")
  printf '%-28s %12s req/s   p50 %-9s p99 %-9s non-2xx %s\n' "$label" "$rps" "$p50" "$p99" "${non2xx:-0}"
  echo "$rps" >"$work/$label.rps"
}

cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Host"] = "defer.test"
wrk.headers["Content-Type"] = "application/octet-stream"
LUA

echo "machine: $(nproc) cores, $(uname -r); ${DUR}s per run, 50 connections, wrk on the same machine"
run direct http://127.0.0.1:18080/
run spillway-passthrough -H "Host: pass.test" "http://$PROXY/"
run spillway-deferred-accept -s "$work/post.lua" "http://$PROXY/v1/events"
echo "spillway peak RSS after the runs above: $(awk '/VmHWM/ {print $2, $3}' /proc/$SW_PID/status); queue file: $(du -h "$work/queue.redb" | cut -f1)"
kill "$SW_PID"; wait "$SW_PID" 2>/dev/null || true
start_spillway SPILLWAY_MAX_BATCH=1
run deferred-one-commit-each -s "$work/post.lua" "http://$PROXY/v1/events"
gc=$(awk -v a="$(cat "$work/spillway-deferred-accept.rps")" -v b="$(cat "$work/deferred-one-commit-each.rps")" 'BEGIN {printf "%.1f", a/b}')
echo "group commit / one commit per request: ${gc}x"
ratio=$(awk -v a="$(cat "$work/spillway-passthrough.rps")" -v b="$(cat "$work/direct.rps")" 'BEGIN {printf "%.2f", a/b}')
echo "passthrough / direct throughput ratio: $ratio"
