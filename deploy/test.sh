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
# Unit and Postgres tests in parallel; whole-process tests one at a time (they time rebalances).
ctest --output-on-failure -j"$(nproc)" -L 'unit|postgres'
ctest --output-on-failure -L integration
"$root/deploy/sanitize.sh" asan tsan
"$root/deploy/fuzz.sh" "${METERD_FUZZ_SECONDS:-60}"
