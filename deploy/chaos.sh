#!/usr/bin/env bash
# Seeded chaos run: deploy/chaos.sh [--seed S] [--seconds N] [--rate R] [--partitions P]
# meterd instances as child processes, the embedded Kafka and a private Postgres, continuous
# load with malformed and re-sent events, and a seeded schedule of faults (SIGKILL, join/leave,
# zombie SIGSTOP past the session timeout, Postgres restart, broker down, latency, request
# errors). Prints the seed and the fault timeline; exits non-zero unless every key's total in
# Postgres equals what was produced and every malformed event is a rejected row.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/deploy/install-deps.sh"
"$root/deploy/build.sh" --target meterd meterd_chaos >/dev/null
exec "$root/build/tests/meterd_chaos" "$@"
