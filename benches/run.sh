#!/usr/bin/env bash
# On-demand benchmark (never part of `cargo test`): passthrough throughput direct vs through
# spillway, durable deferred accepts with and without group commit beside the disk's own fsync
# rate, and the drain rate of the stored jobs to a fast upstream, all measured in one run.
# Usage: bash benches/run.sh [seconds-per-run]   (needs wrk: apt-get install wrk)
#   BENCH_MILLION=1  also fills the queue to a million jobs and reports spillway's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
DUR=${1:-10}
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)"; exit 1; }
command -v curl >/dev/null || { echo "curl is not installed"; exit 1; }
cargo build --release --bin spillway --example fast_upstream >/dev/null

# The queue file lives where spillway's would by default: on the disk under the checkout.
work=$(mktemp -d "$PWD/target/bench.XXXXXX")
cleanup() { kill "${UP_PID:-}" "${SW_PID:-}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

./target/release/examples/fast_upstream 127.0.0.1:18080 >/dev/null &
UP_PID=$!
cat >"$work/bench.yaml" <<YAML
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
storage: { path: $work/queue.redb }
routes:
$(pass_route 18080)
$(defer_route 18080)
YAML
start_spillway() { # extra env assignments...
  rm -f "$work/queue.redb" "$work/out"
  env SPILLWAY_LOG=warn "$@" ./target/release/spillway run --no-watch -c "$work/bench.yaml" >"$work/out" 2>"$work/err" &
  SW_PID=$!
  for _ in $(seq 100); do grep -q '"name":"admin"' "$work/out" 2>/dev/null && break; sleep 0.1; done
  PROXY=$(grep '"name":"proxy"' "$work/out" | sed 's/.*"addr":"\([^"]*\)".*/\1/')
  ADMIN=$(grep '"name":"admin"' "$work/out" | sed 's/.*"addr":"\([^"]*\)".*/\1/')
  # Delivery is paused while accepts are measured, so accepting is measured alone.
  curl -fsS -X POST "http://$ADMIN/routes/defer/pause" >/dev/null
  sleep 0.5
}
depth() {
  curl -fsS "http://$ADMIN/routes" | python3 -c 'import json,sys
r=[x for x in json.load(sys.stdin)["routes"] if x["name"]=="defer"][0]
print(r["depth"]["total"])'
}
now() { date +%s.%N; }

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
ratio() { awk -v a="$(cat "$work/$1.rps")" -v b="$(cat "$work/$2.rps")" 'BEGIN {printf "%.2f", a/b}'; }

cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Host"] = "defer.test"
wrk.headers["Content-Type"] = "application/octet-stream"
LUA

echo "machine: $(nproc) cores, $(uname -r); ${DUR}s per run, 50 connections, wrk on the same machine"
# The disk's own rate of small synchronous writes, in the directory the queue file uses.
t0=$(date +%s.%N)
dd if=/dev/zero of="$work/fsync.probe" bs=4k count=2000 oflag=dsync 2>/dev/null
fsync_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b-a}')
rm -f "$work/fsync.probe"
echo "disk: 2000 synchronous 4 KiB writes in ${fsync_s}s = $(awk -v s="$fsync_s" 'BEGIN {printf "%.0f", 2000/s}') fsyncs/s" | tee "$work/fsync.txt"

start_spillway
run direct http://127.0.0.1:18080/
run spillway-passthrough -H "Host: pass.test" "http://$PROXY/"
run spillway-deferred-accept -s "$work/post.lua" "http://$PROXY/v1/events"
stored=$(depth)
echo "jobs stored: $stored; queue file: $(du -h "$work/queue.redb" | cut -f1)"
t0=$(now)
curl -fsS -X POST "http://$ADMIN/routes/defer/resume" >/dev/null
deadline=$(( $(date +%s) + 600 ))
while [ "$(depth)" != 0 ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
t1=$(now)
left=$(depth)
awk -v n="$stored" -v l="$left" -v a="$t0" -v b="$t1" 'BEGIN {printf "drain to the fast upstream: %d jobs in %.1fs = %.0f jobs/s (%d left)\n", n-l, b-a, (n-l)/(b-a), l}'
echo "spillway peak RSS after the runs above: $(awk '/VmHWM/ {print $2, $3}' /proc/$SW_PID/status)"
kill "$SW_PID"; wait "$SW_PID" 2>/dev/null || true

start_spillway SPILLWAY_MAX_BATCH=1
run deferred-one-commit-each -s "$work/post.lua" "http://$PROXY/v1/events"
kill "$SW_PID"; wait "$SW_PID" 2>/dev/null || true

echo "group commit / one commit per request: $(ratio spillway-deferred-accept deferred-one-commit-each)x"
echo "passthrough / direct throughput ratio: $(ratio spillway-passthrough direct)"
echo "deferred accept / direct throughput ratio: $(ratio spillway-deferred-accept direct)"

if [ "${BENCH_MILLION:-0}" = 1 ]; then
  start_spillway
  t0=$(date +%s)
  while [ "$(depth)" -lt 1000000 ] && [ $(( $(date +%s) - t0 )) -lt 900 ]; do
    wrk -t2 -c50 -d10s -s "$work/post.lua" "http://$PROXY/v1/events" >/dev/null
  done
  echo "million: $(depth) jobs on disk ($(du -h "$work/queue.redb" | cut -f1)); spillway peak RSS $(awk '/VmHWM/ {print $2, $3}' /proc/$SW_PID/status), now $(awk '/VmRSS/ {print $2, $3}' /proc/$SW_PID/status)"
  kill "$SW_PID"; wait "$SW_PID" 2>/dev/null || true
fi
