#!/usr/bin/env bash
# The test command: installs dependencies, builds, runs every test (unit, Postgres,
# end-to-end with the embedded Kafka; each test starts its own private Postgres), then the
# in-process tests under ASan+UBSan and TSan, then a bounded fuzz run of the event parser.
# METERD_FUZZ_SECONDS (60) bounds the fuzzing.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/deploy/install-deps.sh"
"$root/deploy/build.sh"
cd "$root/build"
# The instrumented trees (ASan, TSan, fuzzer) build at the lowest CPU priority while the tests
# below run: the end-to-end tests mostly wait on rebalances and flushes, so the compiler gets
# the idle CPU and the tests keep theirs. Saves the sanitizer build time from the CI wall.
setsid nice -n 19 bash -c '"$1/deploy/sanitize.sh" --build-only asan tsan && "$1/deploy/fuzz.sh" --build-only' \
  _ "$root" >"$root/build/instrumented-build.log" 2>&1 &
instrumented=$!
trap 'kill -- -"$instrumented" 2>/dev/null || true' EXIT
# Unit and Postgres tests in parallel; whole-process tests one at a time (they time rebalances).
ctest --output-on-failure -j"$(nproc)" -L 'unit|postgres'
ctest --output-on-failure -L integration
wait "$instrumented" || { echo "test: instrumented builds failed:" >&2; tail -40 "$root/build/instrumented-build.log" >&2; exit 1; }
"$root/deploy/sanitize.sh" asan tsan
"$root/deploy/fuzz.sh" "${METERD_FUZZ_SECONDS:-60}"
