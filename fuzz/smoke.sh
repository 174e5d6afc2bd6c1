#!/usr/bin/env bash
# Fuzz smoke run, as CI does it: builds the cargo-fuzz targets once, then runs each for a bounded time
# from its seed corpus (two at a time, one per core), and fails if any target crashes, i.e. a property
# it checks does not hold or the code under test panics or hangs.
#
#   fuzz/smoke.sh [SECONDS_PER_TARGET]     default 15, or $FUZZ_SECONDS
#   FUZZ_HTTP=1 fuzz/smoke.sh              also http_chunked (builds burncloud-runtime: minutes more)
#
# Stable Rust: no sanitizer (-s none), which needs no nightly flags. New corpus entries go to a scratch
# directory, not to corpus/; crash inputs are written to fuzz/artifacts/<target>/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-${FUZZ_SECONDS:-15}}
jobs=${FUZZ_JOBS:-2}

targets=(sse_decoder stream_convert request_convert response_convert image_header)
features=()
if [ "${FUZZ_HTTP:-0}" = 1 ]; then
  targets+=(http_chunked)
  features=(--features http)
fi

command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cargo fuzz build -s none "${features[@]}"
bin_dir=target/x86_64-unknown-linux-gnu/release

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

run_one() {
  local t=$1 dict=()
  case $t in sse_decoder | stream_convert | request_convert | response_convert) dict=(-dict=dict/protocols.dict) ;; esac
  mkdir -p "$scratch/$t" "artifacts/$t"
  # -timeout: an input running longer than 10 s counts as a crash (a hang); -rss_limit_mb likewise.
  if "$bin_dir/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" "${dict[@]}" "$scratch/$t" "corpus/$t" >"$scratch/$t.log" 2>&1; then
    printf 'fuzz %-16s ok   %s\n' "$t" "$(grep -E '^stat::number_of_executed_units' "$scratch/$t.log" | awk '{print $2 " runs"}')"
  else
    printf 'fuzz %-16s FAILED\n' "$t"
    tail -n 80 "$scratch/$t.log"
    return 1
  fi
}

pids=() names=() failed=()
for t in "${targets[@]}"; do
  run_one "$t" &
  pids+=($!) names+=("$t")
  if [ ${#pids[@]} -ge "$jobs" ]; then
    wait "${pids[0]}" || failed+=("${names[0]}")
    pids=("${pids[@]:1}") names=("${names[@]:1}")
  fi
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || failed+=("${names[$i]}")
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets crashed: ${failed[*]} (inputs under fuzz/artifacts/; reproduce with: cargo fuzz run -s none TARGET fuzz/artifacts/TARGET/FILE)" >&2
  exit 1
fi
echo "fuzz smoke: ${#targets[@]} targets, ${secs}s each, no crash"
