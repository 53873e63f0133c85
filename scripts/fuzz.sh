#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS_PER_TARGET (default 600: the hardening bar),
# one after another, each on a scratch copy of its committed seeds (fuzz/corpus/<target>) so the
# inputs libFuzzer adds are never committed. Stops at the first crash or hang (-timeout) and names
# it; the input is kept under fuzz/artifacts/<target>/ and belongs in tests/fuzz_regressions/.
# No sanitizer (-s none): the code is safe Rust, so panics are what is hunted and ASan would only
# halve the executions; debug assertions (-a) turn integer overflow into a crash.
set -euo pipefail
seconds="${1:-600}"
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup run nightly rustc --version >/dev/null || { echo "fuzz: needs the nightly toolchain" >&2; exit 2; }
flags=(-s none -a)
cargo +nightly fuzz build "${flags[@]}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo +nightly fuzz list); do
    mkdir -p "$scratch/$target"
    cp corpus/"$target"/* "$scratch/$target/"
    log="$scratch/$target.log"
    if ! cargo +nightly fuzz run "${flags[@]}" "$target" "$scratch/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz: $target FAILED (crash or hang); input under fuzz/artifacts/$target/" >&2
        exit 1
    fi
    # libFuzzer ends with "Done N runs in S second(s)".
    done_line="$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1)"
    read -r _ runs _ _ secs _ <<<"$done_line"
    echo "fuzz: $target: $runs executions in $secs s, no crash"
done
