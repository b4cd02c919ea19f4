#!/usr/bin/env bash
# Cardinality curve, one command: bench/curve.sh [--out FILE.tsv] [--png FILE.png]
# Sweeps orgs (CURVE_ORGS, "1000 10000 100000 1000000") x topic partitions (CURVE_PARTITIONS,
# "8 64") x meterd shards (CURVE_SHARDS, "1 2"). Per point, on a fresh embedded Kafka and a fresh
# database of one private Postgres, it produces the point's events (loadgen), then measures in
# that same run:
#   raw:    a plain librdkafka consumer reading and discarding the topic (e2e_bench raw)
#   meterd: `meterd run --shards S` until Postgres totals equal what was produced, then every
#           (org, meter, industry, day) total is compared exactly (a mismatch fails the point)
# and records one row: meterd's steady events/s (events counted, sampled from its /metrics.json
# every 20 ms, between 10 % and 90 % of the point's events) and its events/s to exact totals in
# Postgres (e2e.sh's b/a: from partition assignment, including the wait for the last flush), each
# as a ratio to raw; flushes and rows/events per flush, flush duration p50/p99 (interpolated in
# meterd's flush-duration histogram buckets, idle ticks taken out), CPU shares of Postgres (all
# processes of the private cluster), meterd and the broker over meterd's run, meterd peak RSS
# (VmHWM) and RSS per distinct key, and event -> visible p50/p99 (e2e_bench latency:
# CURVE_LATENCY_RATE (20,000) events/s over the point's orgs plus a probe every 100 ms, on
# another fresh broker, meterd with the point's shards). The latency probe takes ~15-25 s
# per point, so by default it runs only at partitions=8/shards=2 (CURVE_LATENCY_AT: "P/S ...",
# "all" or "" for none); 8 partitions because on 64 the embedded broker itself slows a steady
# stream (see bench/README.md, "Latency").
# The embedded broker keeps ~5 MiB per partition, ~16,500 loadgen events (~330 bytes each with
# key and record overhead): events per point are capped at partitions x CURVE_MAX_PER_PARTITION
# (15,000), e.g. 120,000 at 8 partitions, and the cap is printed.
# Output: a TSV (bench/curve-results.tsv, or --out FILE), a markdown table on stdout, and
# bench/curve.png via bench/curve.gp (gnuplot; install-deps.sh installs Debian's gnuplot-nox).
# Knobs: CURVE_EVENTS (1,000,000 before the cap), CURVE_METERD_FLAGS (extra `meterd run` flags,
# e.g. "--flush-interval 2s"), CURVE_LATENCY_SECONDS (10), CURVE_TIMEOUT (300 s per point),
# CURVE_BUILD (1; 0 skips install-deps and the build). Default sweep: ~10-15 min on 2 cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/bench/curve-results.tsv"
png="$root/bench/curve.png"
while (($#)); do
  case "$1" in
    --out) out=${2:?--out needs a file}; shift 2 ;;
    --png) png=${2:?--png needs a file}; shift 2 ;;
    *) echo "usage: bench/curve.sh [--out FILE.tsv] [--png FILE.png]" >&2; exit 2 ;;
  esac
done
read -r -a orgs_list <<<"${CURVE_ORGS:-1000 10000 100000 1000000}"
read -r -a partitions_list <<<"${CURVE_PARTITIONS:-8 64}"
read -r -a shards_list <<<"${CURVE_SHARDS:-1 2}"
read -r -a meterd_flags <<<"${CURVE_METERD_FLAGS:-}"
events_wanted=${CURVE_EVENTS:-1000000}
max_per_partition=${CURVE_MAX_PER_PARTITION:-15000}
latency_at=${CURVE_LATENCY_AT-8/2}
latency_seconds=${CURVE_LATENCY_SECONDS:-10}
latency_rate=${CURVE_LATENCY_RATE:-20000}
point_timeout=${CURVE_TIMEOUT:-300}
topic=usage-events
cores=$(nproc)
ticks=$(getconf CLK_TCK)

if [[ "${CURVE_BUILD:-1}" != 0 ]]; then
  "$root/deploy/install-deps.sh" gnuplot-nox
  echo "== building" >&2
  "$root/deploy/build.sh" --target meterd e2e_bench >/dev/null
fi
meterd="$root/build/daemon/meterd"
e2e="$root/build/bench/e2e_bench"

source "$root/deploy/dev-env.sh"
dev_env_init meterd-curve
# Interrupted: exit, so dev-env's EXIT trap stops meterd, brokers and Postgres (after the
# command running in the foreground, at most ~30 s, returns; Ctrl-C stops that one too).
trap 'exit 130' INT
trap 'exit 143' TERM
dev_env_postgres
base_pg=$pg

# cpu_ticks PID...: utime+stime of these processes (0 for one that is gone).
cpu_ticks() {
  local total=0 pid fields
  for pid in "$@"; do
    fields=$(cut -d')' -f2- "/proc/$pid/stat" 2>/dev/null) || continue
    read -r -a f <<<"$fields"
    total=$((total + f[11] + f[12]))  # Fields 14 and 15 of /proc/PID/stat.
  done
  echo "$total"
}

# pg_cpu_ticks: CPU of the whole private cluster: the postmaster, its live children, and (its
# cutime+cstime) every child it has reaped, so backends that come and go are counted too.
pg_cpu_ticks() {
  local postmaster total pid fields
  postmaster=$(head -n 1 "$work/pg/data/postmaster.pid")
  fields=$(cut -d')' -f2- "/proc/$postmaster/stat")
  read -r -a f <<<"$fields"
  total=$((f[11] + f[12] + f[13] + f[14]))
  for pid in $(ps -o pid= --ppid "$postmaster"); do
    total=$((total + $(cpu_ticks "$pid")))
  done
  echo "$total"
}

# sample_progress PORT EVENTS FILE: appends "unix_time counted flushed" from meterd's
# /metrics.json every 20 ms until it has flushed EVENTS (or is gone for 5 s).
sample_progress() {
  exec python3 - "$@" <<'PY'
import json, sys, time, urllib.request
port, events, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
gone_since = None
with open(path, "a", buffering=1) as out:
    while True:
        try:
            m = json.load(urllib.request.urlopen("http://127.0.0.1:%s/metrics.json" % port, timeout=1))
            gone_since = None
            out.write("%.4f %d %d\n" % (time.time(), m["meterd_events_total"], m["meterd_flushed_events_total"]))
            if m["meterd_flushed_events_total"] >= events:
                break
        except Exception:
            gone_since = gone_since or time.time()
            if time.time() - gone_since > 5:
                break
        time.sleep(0.02)
PY
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# stop PID: SIGTERM and wait (no error if it is gone already); then off the cleanup's list, so
# the exit trap never signals a reused pid.
stop() {
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  local kept=() pid
  for pid in "${dev_env_pids[@]}"; do [[ "$pid" == "$1" ]] || kept+=("$pid"); done
  dev_env_pids=("${kept[@]}")
}

columns=(orgs partitions shards events distinct_keys raw_eps steady_eps steady_ratio exact_eps
  exact_ratio flushes rows_per_flush events_per_flush flush_p50_ms flush_p99_ms flush_mean_ms
  pg_cpu_share meterd_cpu_share broker_cpu_share peak_rss_mib bytes_per_key visible_p50_ms
  visible_p99_ms exact)
mkdir -p "$(dirname "$out")"
(IFS=$'\t'; echo "${columns[*]}") >"$out"

model=$(sed -n 's/^model name\s*:\s*//p' /proc/cpuinfo | head -n 1)
echo "== cardinality curve on $model ($cores cores): orgs {${orgs_list[*]}} x partitions" \
  "{${partitions_list[*]}} x shards {${shards_list[*]}}; results in $out" >&2

point=0
failed=0
for partitions in "${partitions_list[@]}"; do
  events=$events_wanted
  cap=$((partitions * max_per_partition))
  if ((events > cap)); then
    echo "== $partitions partitions: events per point capped at $cap (broker keeps ~5 MiB per" \
      "partition; CURVE_EVENTS=$events_wanted)" >&2
    events=$cap
  fi
  for orgs in "${orgs_list[@]}"; do
    for shards in "${shards_list[@]}"; do
      point=$((point + 1))
      dir="$work/point-$point"
      mkdir -p "$dir"
      echo "== point $point: $orgs orgs, $partitions partitions, $shards shards, $events events" >&2

      # A fresh database (a fresh broker below) per point: totals start at zero.
      db="curve_$point"
      psql "$base_pg" -qc "CREATE DATABASE $db" >/dev/null
      pg=${base_pg%/*}/$db
      "$meterd" migrate --pg "$pg" >/dev/null 2>&1

      dev_env_broker brokers "$topic-$point" "$partitions"
      broker_pid=$last_pid
      "$meterd" loadgen --brokers "$brokers" --topic "$topic-$point" --events "$events" \
        --orgs "$orgs" --expected-out "$dir/expected.csv" >"$dir/loadgen.json"

      timeout 300 "$e2e" raw --brokers "$brokers" --topic "$topic-$point" --events "$events" \
        >"$dir/raw.json" 2>"$dir/raw.log" \
        || { echo "raw consumer did not read all $events events; see $dir/raw.log" >&2; exit 1; }

      http_port=$(free_port)
      start=$(date +%s.%N)
      pg_before=$(pg_cpu_ticks)
      broker_before=$(cpu_ticks "$broker_pid")
      dev_env_background "$meterd" run --pg "$pg" --brokers "$brokers" --topic "$topic-$point" \
        --group curve --shards "$shards" --kafka-property session.timeout.ms=6000 --billing=false \
        --http-listen "127.0.0.1:$http_port" --summary-json "$dir/meterd-summary.json" \
        "${meterd_flags[@]}" 2>"$dir/meterd.log"
      meterd_pid=$last_pid
      : >"$dir/progress.txt"
      dev_env_background sample_progress "$http_port" "$events" "$dir/progress.txt"
      sampler_pid=$last_pid
      reached=true
      dev_env_wait_for_totals "$dir/loadgen.json" "$point_timeout" || reached=false
      # Sampled before meterd stops: its CPU and peak RSS, Postgres's and the broker's CPU.
      meterd_ticks=$(cpu_ticks "$meterd_pid")
      hwm_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$meterd_pid/status" 2>/dev/null || echo 0)
      pg_ticks=$(($(pg_cpu_ticks) - pg_before))
      broker_ticks=$(($(cpu_ticks "$broker_pid") - broker_before))
      stop "$sampler_pid"
      stop "$meterd_pid"
      # The latency phase below shares this database: fold what the stopped meterd left in the
      # usage delta log first, so it measures steady state, not the fold of that backlog
      # (which on 2 shared vCPUs starves the broker and delays probes by seconds).
      psql "$pg" -qAt -c "SELECT * FROM shared.fold_usage_deltas()" >/dev/null
      if [[ "$reached" == true ]]; then
        exact=$([[ $(dev_env_totals_exact "$dir/expected.csv" "$pg") == true ]] && echo yes || echo no)
      else
        echo "   meterd did not reach the expected totals within ${point_timeout}s; see" \
          "$dir/meterd.log" >&2
        tail -n 5 "$dir/meterd.log" >&2
        exact=no
      fi
      [[ "$exact" == yes ]] || failed=$((failed + 1))
      stop "$broker_pid"

      # Event -> visible latency, on a fresh broker, for the points CURVE_LATENCY_AT names.
      echo '{}' >"$dir/latency.json"
      if [[ "$latency_at" == all || " $latency_at " == *" $partitions/$shards "* ]]; then
        echo "   latency: $latency_rate events/s over $orgs orgs + probes, ${latency_seconds}s" >&2
        dev_env_broker brokers "latency-$point" "$partitions"
        latency_broker_pid=$last_pid
        http_port=$(free_port)
        dev_env_background "$meterd" run --pg "$pg" --brokers "$brokers" \
          --topic "latency-$point" --group latency --shards "$shards" \
          --kafka-property session.timeout.ms=6000 --billing=false \
          --http-listen "127.0.0.1:$http_port" "${meterd_flags[@]}" 2>"$dir/meterd-latency.log"
        latency_pid=$last_pid
        if dev_env_wait_ready "$http_port"; then
          sleep 2  # Let the new instance settle after its assignment.
          "$e2e" latency --brokers "$brokers" --topic "latency-$point" --pg "$pg" \
            --seconds "$latency_seconds" --rate "$latency_rate" --orgs "$orgs" \
            >"$dir/latency.json" 2>"$dir/latency.log" \
            || echo "   some latency probes never became visible; see $dir/latency.log" >&2
        else
          echo "   meterd (latency) never became ready; see $dir/meterd-latency.log" >&2
        fi
        stop "$latency_pid"
        stop "$latency_broker_pid"
      fi
      psql "$base_pg" -qc "DROP DATABASE $db" >/dev/null

      python3 - "$dir" "$out" "$orgs" "$partitions" "$shards" "$events" "$start" "$done_at" \
        "$meterd_ticks" "$pg_ticks" "$broker_ticks" "$ticks" "$cores" "$hwm_kib" "$exact" \
        "$reached" <<'PY'
import json, sys
(d, out, orgs, partitions, shards, events, start, done_at, meterd_t, pg_t, broker_t, ticks,
 cores, hwm_kib, exact, reached) = sys.argv[1:]
events, start, done_at, ticks, cores = int(events), float(start), float(done_at), int(ticks), int(cores)
load = lambda n: json.load(open(f"{d}/{n}.json"))
gen, raw, lat = load("loadgen"), load("raw"), load("latency")
m = load("meterd-summary")
first = m["meterd_first_assignment_unix_ms"] / 1000
exact_eps = events / (done_at - first) if reached == "true" else 0.0
# Steady: the slope of events counted between the samples where 10 % and 90 % of the point's
# events had been counted (no startup, no wait for the last flush). When those are too close
# for the 20 ms sampling (a tiny point), from assignment to the last event counted instead.
samples = [tuple(map(float, l.split())) for l in open(f"{d}/progress.txt") if l.strip()]
if m["meterd_events_total"] >= events:
    samples.append((m["meterd_last_counted_unix_ms"] / 1000, events, 0))
samples.sort()
a = next((s for s in samples if s[1] >= 0.1 * events), None)
b = next((s for s in samples if s[1] >= 0.9 * events), None)
if a and b and b[0] - a[0] >= 0.1:
    steady_eps = (b[1] - a[1]) / (b[0] - a[0])
elif m["meterd_events_total"] >= events:
    steady_eps = events / (m["meterd_last_counted_unix_ms"] / 1000 - first)
else:
    steady_eps = 0.0
flushes = m["meterd_flushes_total"]

def quantile(h, q):
    # As Prometheus' histogram_quantile: linear within the bucket holding the q-th observation.
    total = h["count"]
    if total == 0:
        return float("nan")
    rank, lo, below = q * total, 0.0, 0
    for b in h["buckets"]:
        if b["count"] >= rank:
            if b["le"] == "+Inf":
                return lo  # Beyond the last bound: report the bound (a lower limit).
            hi = float(b["le"])
            inside = b["count"] - below
            return lo + (hi - lo) * ((rank - below) / inside if inside else 1)
        lo, below = float(b["le"]), b["count"]
    return lo

h = m["meterd_flush_duration_seconds"]
# The histogram also observes the timer's idle ticks (nothing to write, microseconds): take
# them out of its first bucket, so the quantiles are of flushes that wrote rows.
idle = h["count"] - flushes
h = {"count": flushes, "sum": h["sum"],
     "buckets": [{"le": b["le"], "count": max(0, b["count"] - idle)} for b in h["buckets"]]}
wall = done_at - start
row = {
    "orgs": orgs, "partitions": partitions, "shards": shards, "events": events,
    "distinct_keys": gen["distinct_keys"],
    "raw_eps": "%.0f" % raw["events_per_second"],
    "steady_eps": "%.0f" % steady_eps,
    "steady_ratio": "%.3f" % (steady_eps / raw["events_per_second"]),
    "exact_eps": "%.0f" % exact_eps,
    "exact_ratio": "%.3f" % (exact_eps / raw["events_per_second"]),
    "flushes": flushes,
    "rows_per_flush": "%.0f" % (m["meterd_flushed_rows_total"] / max(flushes, 1)),
    "events_per_flush": "%.0f" % (m["meterd_flushed_events_total"] / max(flushes, 1)),
    "flush_p50_ms": "%.0f" % (1000 * quantile(h, 0.5)),
    "flush_p99_ms": "%.0f" % (1000 * quantile(h, 0.99)),
    "flush_mean_ms": "%.0f" % (1000 * h["sum"] / max(h["count"], 1)),
    "pg_cpu_share": "%.3f" % (int(pg_t) / ticks / (wall * cores)),
    "meterd_cpu_share": "%.3f" % (int(meterd_t) / ticks / (wall * cores)),
    "broker_cpu_share": "%.3f" % (int(broker_t) / ticks / (wall * cores)),
    "peak_rss_mib": "%.1f" % (int(hwm_kib) / 1024),
    "bytes_per_key": "%.0f" % (int(hwm_kib) * 1024 / max(gen["distinct_keys"], 1)),
    "visible_p50_ms": "%.0f" % lat["p50_ms"] if "p50_ms" in lat else "-",
    "visible_p99_ms": "%.0f" % lat["p99_ms"] if "p99_ms" in lat else "-",
    "exact": exact,
}
with open(out) as f:
    columns = f.readline().rstrip("\n").split("\t")
with open(out, "a") as f:
    f.write("\t".join(str(row[c]) for c in columns) + "\n")
print("   steady ratio %s, to exact totals %s; %s flushes of %s rows; exact: %s"
      % (row["steady_ratio"], row["exact_ratio"], flushes, row["rows_per_flush"], exact),
      file=sys.stderr)
PY
    done
  done
done

# The markdown table.
python3 - "$out" "$model" "$cores" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print()
print("meterd cardinality curve on %s (%s cores); ratios are against a raw librdkafka consumer"
      " of the same topic in the same run" % (sys.argv[2], sys.argv[3]))
print()
head = ["orgs", "parts", "shards", "events", "keys", "raw ev/s", "steady ev/s", "steady ratio",
        "to exact totals ev/s", "ratio", "flushes", "rows/flush", "events/flush", "flush p50/p99 ms",
        "PG CPU", "meterd CPU", "broker CPU", "peak RSS MiB", "B/key", "visible p50/p99 ms", "exact"]
print("| " + " | ".join(head) + " |")
print("|" + "---:|" * (len(head) - 1) + ":---:|")
pct = lambda v: "%.0f %%" % (100 * float(v))
for r in rows:
    print("| " + " | ".join([
        r["orgs"], r["partitions"], r["shards"], r["events"], r["distinct_keys"], r["raw_eps"],
        r["steady_eps"], "**%s**" % r["steady_ratio"], r["exact_eps"], r["exact_ratio"], r["flushes"],
        r["rows_per_flush"], r["events_per_flush"], "%s / %s" % (r["flush_p50_ms"], r["flush_p99_ms"]),
        pct(r["pg_cpu_share"]), pct(r["meterd_cpu_share"]), pct(r["broker_cpu_share"]),
        r["peak_rss_mib"], r["bytes_per_key"],
        "%s / %s" % (r["visible_p50_ms"], r["visible_p99_ms"]), r["exact"]]) + " |")
PY

combos=""
for partitions in "${partitions_list[@]}"; do
  for shards in "${shards_list[@]}"; do combos+="$partitions/$shards "; done
done
combos=${combos% }
if command -v gnuplot >/dev/null; then
  gnuplot -e "results='$out'; png='$png'; combos='$combos'" "$root/bench/curve.gp"
  echo "plot written to $png" >&2
else
  echo "gnuplot not found: skipping $png (install the Debian package gnuplot-nox, then run" \
    "gnuplot -e \"results='$out'; png='$png'; combos='$combos'\" bench/curve.gp)" >&2
fi
echo "results: $out" >&2
if ((failed)); then echo "$failed point(s) FAILED: totals not exact (column exact = no)" >&2; exit 1; fi
