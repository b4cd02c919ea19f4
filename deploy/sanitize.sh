#!/usr/bin/env bash
# The in-process tests under sanitizers: deploy/sanitize.sh [--build-only] [asan|tsan]...
# (default: both). --build-only builds the instrumented trees and runs nothing (deploy/test.sh
# builds them at low priority while the end-to-end tests run, then calls this again to test).
#   asan: AddressSanitizer + UndefinedBehaviorSanitizer over every unit test (parser, counters,
#         dedup window, meter registry, metrics, backoff, flusher, shards on the fake source), the
#         billing and usage-tracking suites, and the HTTP API end to end (meterd itself built
#         with ASan: async sessions, shutdown with requests waiting for Kafka, hostile clients),
#         the HTTP client and fake Stripe, the Stripe export (kill -9 of meterd stripe-export),
#         then the 3-minute chaos profile (seed 1, every fault kind) with meterd itself built
#         with ASan+UBSan: kills, rebalances, zombies, Postgres and broker outages under load.
#         Leak detection is off for the chaos run only: an instance that never got an
#         assignment leaves its Kafka handle to the process exit on purpose (librdkafka 2.0.2
#         bug 4312); the unit tests run with it on.
#   tsan: ThreadSanitizer over the multi-threaded ones (shards, flusher and rebalance on the
#         fake partition source; the metrics registry; the meter registry's readers; the
#         overage worker's thread against a real Postgres; the Stripe exporter's senders).
# Each builds its own tree (build-asan, build-tsan) and fails on the first report.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/deploy/install-deps.sh"
build_only=0
if [[ "${1:-}" == --build-only ]]; then build_only=1; shift; fi
kinds=("$@")
((${#kinds[@]})) || kinds=(asan tsan)
asan_tests=(event_parser_test robustness_test binary_mode_test counters_test dedup_window_test meter_registry_test
            metrics_test backoff_test flusher_test consumer_fake_test billing_test usage_tracking_test
            http_api_test fake_stripe_test stripe_export_test)
tsan_tests=(consumer_fake_test flusher_test metrics_test meter_registry_test billing_test
            stripe_export_test)
for kind in "${kinds[@]}"; do
  case "$kind" in
    asan) option=-DMETERD_ASAN=ON; tests=("${asan_tests[@]}" meterd meterd_chaos) ;;
    tsan) option=-DMETERD_TSAN=ON; tests=("${tsan_tests[@]}") ;;
    *) echo "sanitize: unknown kind '$kind' (asan or tsan)" >&2; exit 2 ;;
  esac
  build="$root/build-$kind"
  echo "== $kind: building ${tests[*]}" >&2
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$option" \
    -DMETERD_BUILD_BENCH=OFF >/dev/null
  cmake --build "$build" -j"$(nproc)" --target "${tests[@]}" >/dev/null
  ((build_only)) && continue
  for t in "${tests[@]}"; do
    [[ "$t" == meterd || "$t" == meterd_chaos ]] && continue
    filter=()
    # The billing suite under TSan: the tests that run the overage worker's thread.
    [[ "$kind" == tsan && "$t" == billing_test ]] && filter=(--gtest_filter='*OverageWorker*:*OneOrgThatCannotBeInvoiced*')
    # The exporter's senders in this process (the meterd binary is not built under TSan).
    [[ "$kind" == tsan && "$t" == stripe_export_test ]] && filter=(--gtest_filter='-*KillNine*:*RunExports*')
    echo "== $kind: $t" >&2
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
      TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
      "$build/tests/$t" --gtest_brief=1 "${filter[@]}" || { echo "sanitize: $kind: $t failed" >&2; exit 1; }
  done
  if [[ "$kind" == asan ]]; then
    echo "== asan: chaos, seed 1, 180 s" >&2
    ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
      "$build/tests/meterd_chaos" --seed 1 --seconds 180 --rate 1000 \
      || { echo "sanitize: asan: chaos failed" >&2; exit 1; }
  fi
done
((build_only)) && { echo "sanitize: ${kinds[*]}: built" >&2; exit 0; }
echo "sanitize: ${kinds[*]}: clean" >&2
