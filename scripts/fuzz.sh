#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz + libFuzzer, nightly: the offload parsing and the
# WireGuard UAPI request parser) for SECONDS each (default 30, enough for CI) and exits non-zero
# if any target crashes, panics, times out on an input (> 10 s) or runs out of memory. Crash
# inputs land in fuzz/artifacts/<target>/; replay one with
# `cd fuzz && cargo +nightly fuzz run <target> artifacts/<target>/<file>`.
#   scripts/fuzz.sh 30
set -uo pipefail
secs="${1:-30}"
case "$secs" in
    ''|*[!0-9]*) echo "usage: $0 SECONDS" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../fuzz" || exit 1
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzzing needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 2
fi
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked || exit 2
fi
cargo +nightly fuzz build || exit 2

targets=(offload_segment offload_coalesce uapi_request path_message)
failed=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="artifacts/$t/last-run.log"
    echo "=== $t for ${secs}s"
    if cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units)' "$log" || true
    else
        echo "!!! $t failed; the end of $log:"
        tail -n 40 "$log"
        failed+=("$t")
    fi
done
if [ "${#failed[@]}" -ne 0 ]; then
    echo "crashed: ${failed[*]}"
    exit 1
fi
echo "ok: ${targets[*]} ran ${secs}s each without a crash"
