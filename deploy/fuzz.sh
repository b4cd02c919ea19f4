#!/usr/bin/env bash
# Fuzzes the event parser (structured and CloudEvents binary mode) with libFuzzer under ASan
# and UBSan: deploy/fuzz.sh [--build-only] [SECONDS] (default 60). Seeds: proto/examples; dictionary:
# tests/fuzz/cloudevents.dict. A crash leaves its input in build-fuzz/crashes/ and fails; add
# it (minimised) under proto/examples/invalid/<reason>/ as a regression example.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build_only=0
if [[ "${1:-}" == --build-only ]]; then build_only=1; shift; fi
seconds=${1:-60}
"$root/deploy/install-deps.sh"
build="$root/build-fuzz"
CC=clang CXX=clang++ cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMETERD_FUZZ=ON -DMETERD_BUILD_TESTS=OFF -DMETERD_BUILD_BENCH=OFF >/dev/null
cmake --build "$build" -j"$(nproc)" --target event_parser_fuzz >/dev/null
((build_only)) && { echo "fuzz: built" >&2; exit 0; }
corpus="$build/corpus"
mkdir -p "$corpus" "$build/crashes"
# Structured seeds: mode byte 0 + the example (the corpus grows across runs).
while IFS= read -r -d '' f; do
  { printf '\0'; cat "$f"; } >"$corpus/seed-$(basename "$(dirname "$f")")-$(basename "$f")"
done < <(find "$root/proto/examples" -name '*.json' -print0)
# A binary-mode seed: mode byte 1, ce_* headers, an empty name, then the data.
printf '\001ce_specversion\0001.0\000ce_id\000b-1\000ce_source\000s\000ce_type\000api_calls\000ce_subject\0005f0d2c1e-8a4b-4c3d-9e2f-1a2b3c4d5e6f\000ce_time\0002026-11-26T09:59:00Z\000\000{"quantity":2,"industry":"hs"}' \
  >"$corpus/seed-binary"
cd "$build"
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  ./tests/fuzz/event_parser_fuzz "$corpus" -dict="$root/tests/fuzz/cloudevents.dict" \
  -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$build/crashes/" -print_final_stats=1 2>"$build/fuzz.log" \
  || { echo "fuzz: failure; input in $build/crashes/, log: $build/fuzz.log" >&2; tail -40 "$build/fuzz.log" >&2; exit 1; }
grep -E "stat::number_of_executed_units|stat::peak_rss_mb|cov:" "$build/fuzz.log" | tail -3 >&2
echo "fuzz: ${seconds}s, no crash" >&2
