#!/usr/bin/env bash
# Runs every fuzz target for a bounded time; exits non-zero if any target crashes.
# Usage: fuzz/run.sh [seconds-per-target]   (default 60). Needs nightly and cargo-fuzz.
set -u
secs="${1:-60}"
cd "$(dirname "$0")"
targets=(config job_record retry_after target)
cargo +nightly fuzz build || exit 2
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    echo "== $t: ${secs}s"
    if ! cargo +nightly fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1; then
        failed+=("$t")
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "no crashes"
