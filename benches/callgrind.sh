#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind: a figure that does not
# move with the machine's load, for before/after comparisons of the request path (wall-clock
# rates on these shared 2-core machines swing by 10-20% between runs).
#
# Usage: bash benches/callgrind.sh [BINARY]   (default: target/release/spillway, built here)
# Prints one line: requests served and instructions per request (all threads, user space;
# the kernel's share is not counted). The callgrind output stays in the printed directory
# for `callgrind_annotate --inclusive=yes`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || apt-get install -y -q valgrind >/dev/null 2>&1 ||
  { echo "valgrind is required (apt-get install valgrind)" >&2; exit 1; }
command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null 2>&1 ||
  { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }

cargo build -q --release --bin spillway --example fast_upstream
BIN=${1:-$PWD/target/release/spillway}
work=$(mktemp -d "${TMPDIR:-/tmp}/spillway-callgrind.XXXXXX")
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
. benches/lib.sh

UP=$(freeport) PX=$(freeport) AD=$(freeport)
target/release/examples/fast_upstream "127.0.0.1:$UP" >/dev/null &
PIDS+=($!)
cat >"$work/cfg.yaml" <<YAML
listen: 127.0.0.1:$PX
admin: { listen: 127.0.0.1:$AD }
storage: { path: $work/queue.redb }
routes:
$(pass_route "$UP")
YAML
SPILLWAY_LOG=warn valgrind -q --tool=callgrind --callgrind-out-file="$work/callgrind.%p" \
  "$BIN" run --no-watch -c "$work/cfg.yaml" >/dev/null 2>"$work/stderr" &
PIDS+=($!)
for _ in $(seq 150); do
  curl -fsS -o /dev/null "http://127.0.0.1:$AD/ready" 2>/dev/null && break
  sleep 0.2
done
url="http://127.0.0.1:$PX/"
wrk -t1 -c4 -d3s -H 'Host: pass.test' "$url" >/dev/null
PID=$(pgrep -f "callgrind-out-file=$work" | head -1)
# Count only the measured window: zero after the warm-up, dump after the load.
callgrind_control -z "$PID" >/dev/null 2>&1
n=$(wrk -t1 -c4 -d8s -H 'Host: pass.test' "$url" | awk '/requests in/ {print $1}')
callgrind_control -d "$PID" >/dev/null 2>&1
sleep 1
dump=$(ls "$work"/callgrind.*.1 | head -1)
ir=$(awk '/^summary:/ {print $2}' "$dump")
awk -v i="$ir" -v n="$n" -v d="$dump" \
  'BEGIN {printf "%d requests, %.0f instructions per request (%s)\n", n, i / n, d}'
