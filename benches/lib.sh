# Helpers shared by the bench scripts; sourced, not run.

freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# pass_route UPSTREAM_PORT: the passthrough route every harness drives (Host: pass.test),
# with its full middleware and limits high enough never to bite.
pass_route() {
  cat <<YAML
  - name: pass
    match: { host: pass.test }
    upstream: http://127.0.0.1:$1
    rate_limit: { per_second: 1000000, burst: 1000000 }
    circuit_breaker: { consecutive_failures: 1000, open_for: 1s }
YAML
}

# defer_route UPSTREAM_PORT: the deferrable route (Host: defer.test), unbounded for filling.
defer_route() {
  cat <<YAML
  - name: defer
    match: { host: defer.test }
    upstream: http://127.0.0.1:$1
    deferrable: true
    concurrency: 64
    rate_limit: { per_second: 1000000, burst: 1000000 }
    queue: { max_depth: 100000000 }
YAML
}
