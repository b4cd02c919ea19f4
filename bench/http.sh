#!/usr/bin/env bash
# HTTP ingest benchmark, one command: bench/http.sh [--json FILE]
# Starts the embedded Kafka, a private Postgres and `meterd run --http-listen 127.0.0.1:PORT`
# (which consumes the topic throughout), gives each of BENCH_ORGS (200) orgs an ingest API key,
# then measures in this one run (bench/http_ingest_bench.cc has the details):
#   (a)  BENCH_EVENTS (200,000) events produced straight to the topic by librdkafka, set up as
#        meterd's own producer (idempotent, acks=all, linger.ms=1), keyed by org: events/s;
#   (b)  the same events as POST /v1/events batches of BENCH_BATCH (100), one org's key per
#        request, from BENCH_BATCH_CLIENTS (32) keep-alive connections: events/s, ratio to (a);
#        (a) and (b) alternate BENCH_ROUNDS (5) times; the median round's ratio is reported;
#   (c0) BENCH_SINGLE_CLIENTS (64) senders straight to Kafka, each awaiting its event's ack, and
#   (c)  single-event requests from as many keep-alive connections: requests/s;
#   (d0) direct and (d) HTTP single events (over 256 keep-alive connections), open loop at half
#        of (c)'s rate: p50/p99/max from when each was due;
#        (c0)/(c) and (d0)/(d) alternate in 5 slices of BENCH_SECONDS (10) s in all;
#        (c0) to (d) run on a second, fresh 8-partition broker with a second meterd (see below);
# and checks that Postgres ends up holding exactly every event Kafka acknowledged (answered 202
# for HTTP), per (org, meter, industry, day). Prints the machine, a table, CPU per process per
# phase and one JSON line; about 1.5 minutes after the build. Knobs for exploring:
# BENCH_LINGER_MS (linger.ms of meterd's producer and the direct ones alike; meterd's default
# is 1), BENCH_HTTP_THREADS (meterd's --http-threads, default 2), BENCH_PARTITIONS (below).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
json_out=""
if [[ "${1:-}" == "--json" ]]; then json_out=${2:?--json needs a file}; fi
events=${BENCH_EVENTS:-200000}
orgs=${BENCH_ORGS:-200}
batch=${BENCH_BATCH:-100}
batch_clients=${BENCH_BATCH_CLIENTS:-32}
single_clients=${BENCH_SINGLE_CLIENTS:-64}
seconds=${BENCH_SECONDS:-10}
rounds=${BENCH_ROUNDS:-5}
linger_ms=${BENCH_LINGER_MS:-}
http_threads=${BENCH_HTTP_THREADS:-}  # meterd's --http-threads (default 2)
# The embedded broker keeps ~5 MiB per partition (older message sets are dropped). meterd reads
# along and the driver waits for it after every phase, so a partition must hold one phase's
# unread share: 200k events (~80 MB) over 200 orgs hashed onto 64 partitions put at most
# 2.5 MiB on one (the driver prints the figure and warns above 4.5).
partitions=${BENCH_PARTITIONS:-64}
# The single-event phases run on a fresh broker with a second meterd, as bench/e2e.sh's latency
# phase: the mock scans a partition's message sets on every fetch, so it slows as its log grows,
# and single events make one message set each. With 8 partitions it keeps at most ~80k of them
# (5 MiB a partition), which bounds that scan; with 64 it would keep every one.
single_partitions=${BENCH_SINGLE_PARTITIONS:-8}
topic=usage-events

"$root/deploy/install-deps.sh"
echo "== building" >&2
"$root/deploy/build.sh" --target meterd http_ingest_bench >/dev/null
meterd="$root/build/daemon/meterd"
bench="$root/build/bench/http_ingest_bench"

echo "== machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)," \
  "load average $(cut -d' ' -f1-3 /proc/loadavg)" >&2

source "$root/deploy/dev-env.sh"
dev_env_init meterd-http-bench
dev_env_postgres
postmaster_pid=$(head -n 1 "$work/pg/data/postmaster.pid")
dev_env_broker brokers "$topic" "$partitions"
broker_pid=$last_pid
dev_env_broker single_brokers "$topic-single" "$single_partitions"
single_broker_pid=$last_pid

echo "== $orgs ingest API keys" >&2
"$bench" orgs --orgs "$orgs" >"$work/orgs.txt"
while read -r org; do
  token=$("$meterd" api-key create --pg "$pg" --org "$org" --scope ingest --label http-bench 2>/dev/null \
    | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
  [[ -n "$token" ]] || { echo "api-key create failed for $org" >&2; exit 1; }
  echo "$org $token"
done <"$work/orgs.txt" >"$work/keys.txt"

# start_meterd BROKERS TOPIC GROUP: a meterd with the API on a free port; sets $last_pid, $port.
# The per-key rate limit is raised out of the way: this measures throughput, not the limiter.
start_meterd() {
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  dev_env_background "$meterd" run --pg "$pg" --brokers "$1" --topic "$2" --group "$3" \
    --kafka-property session.timeout.ms=6000 --billing=false --http-listen "127.0.0.1:$port" \
    --api-rate 1000000 --api-burst 1000000 --summary-json "$work/$3-summary.json" \
    ${linger_ms:+--kafka-property "linger.ms=$linger_ms"} ${http_threads:+--http-threads "$http_threads"} \
    2>"$work/$3.log"
  dev_env_wait_ready "$port" || { echo "meterd ($3) never became ready:" >&2; tail "$work/$3.log" >&2; exit 1; }
}
start_meterd "$brokers" "$topic" http-bench
meterd_pid=$last_pid http_port=$port
start_meterd "$single_brokers" "$topic-single" http-bench-single
single_meterd_pid=$last_pid single_http_port=$port
sleep 1  # Let the consumers settle after their assignments.

status=0
"$bench" run --brokers "$brokers" --topic "$topic" --pg "$pg" --http "127.0.0.1:$http_port" \
  --single_brokers "$single_brokers" --single_topic "$topic-single" \
  --single_http "127.0.0.1:$single_http_port" \
  --single_meterd_pid "$single_meterd_pid" --single_broker_pid "$single_broker_pid" \
  --keys "$work/keys.txt" --events "$events" --batch "$batch" --batch_clients "$batch_clients" \
  --rounds "$rounds" ${linger_ms:+--linger_ms "$linger_ms"} \
  --single_clients "$single_clients" --single_seconds "$seconds" --latency_seconds "$seconds" \
  --meterd_pid "$meterd_pid" --broker_pid "$broker_pid" --postgres_pid "$postmaster_pid" \
  ${json_out:+--json "$json_out"} || status=$?

kill -TERM "$meterd_pid" "$single_meterd_pid"; wait "$meterd_pid" "$single_meterd_pid" || true
for group in http-bench http-bench-single; do
  echo "meterd ($group): $(grep -cE ' (error|warning) ' "$work/$group.log" || true) error/warning" \
    "lines in its log; peak RSS $(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["meterd_peak_rss_bytes"] / 2**20, 1))' \
    "$work/$group-summary.json" 2>/dev/null || echo '?') MiB"
done
exit "$status"
