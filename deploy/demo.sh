#!/usr/bin/env bash
# The demo: installs dependencies, builds, starts the embedded Kafka and a private Postgres,
# produces generated usage events, runs meterd on them, and prints the billing result.
#   DEMO_EVENTS (default 1000000), DEMO_ORGS (500), DEMO_PARTITIONS (128) tune it.
# Each org gets a subscription (basic, pro or enterprise by a hash of its id) for the month the
# events fall in; after ingestion the month is closed and the invoices are summarised per plan.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
events=${DEMO_EVENTS:-1000000}
orgs=${DEMO_ORGS:-500}
partitions=${DEMO_PARTITIONS:-128}
topic=usage-events

"$root/deploy/install-deps.sh"
echo "== building meterd" >&2
"$root/deploy/build.sh" --target meterd >/dev/null
meterd="$root/build/daemon/meterd"

source "$root/deploy/dev-env.sh"
dev_env_init meterd-demo
echo "== starting a private Postgres and the embedded Kafka (${partitions} partitions)" >&2
dev_env_postgres
dev_env_broker brokers "$topic" "$partitions"

echo "== producing ${events} events for ${orgs} organizations" >&2
"$meterd" loadgen --brokers "$brokers" --topic "$topic" --events "$events" --orgs "$orgs" \
  --malformed-share 0.001 --expected-out "$work/expected.csv" >"$work/loadgen.json"

echo "== subscribing the ${orgs} organizations to basic, pro or enterprise" >&2
python3 - "$work/expected.csv" >"$work/orgs.sql" <<'PY'
import csv, sys
orgs = {}
for row in csv.DictReader(open(sys.argv[1])):
    orgs[row["org_id"]] = row["industry"]
print("INSERT INTO shared.organizations (org_id, name, industry) VALUES")
print(",\n".join("('%s', 'Demo org %s', '%s')" % (o, o[:8], i) for o, i in sorted(orgs.items())) + ";")
PY
cat >>"$work/orgs.sql" <<'SQL'
INSERT INTO shared.subscriptions (org_id, plan_id, current_period_start, current_period_end)
SELECT org_id, (ARRAY['basic', 'basic', 'pro', 'enterprise'])[1 + abs(hashtext(org_id::text)) % 4],
       date_trunc('month', now() - interval '3 days'),
       date_trunc('month', now() - interval '3 days') + interval '1 month'
FROM shared.organizations;
SQL
psql "$pg" -q -v ON_ERROR_STOP=1 -f "$work/orgs.sql"
period_end=$(psql "$pg" -qAt -c "SELECT to_char(date_trunc('month', now() - interval '3 days') + interval '1 month', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')")

echo "== running meterd until Postgres holds every event" >&2
start=$(date +%s.%N)
dev_env_background "$meterd" run --pg "$pg" --brokers "$brokers" --topic "$topic" --group demo \
  --kafka-property session.timeout.ms=6000 --stats-interval 5s \
  --summary-json "$work/meterd-summary.json" 2>"$work/meterd.log"
meterd_pid=$last_pid

# On a timeout the comparison below prints MISMATCH and the demo fails.
dev_env_wait_for_totals "$work/loadgen.json" 120 || true
kill -TERM "$meterd_pid"
wait "$meterd_pid" || { echo "meterd exited with an error; log:" >&2; tail -20 "$work/meterd.log" >&2; exit 1; }

echo "== closing the billing period ending ${period_end} (meterd close-period)" >&2
alerts=$(psql "$pg" -qAt -c "SELECT count(*) FROM shared.usage_alerts")
# The demo invoices this month now instead of waiting for it to end: --allow-future says so
# (a real cron closes what has ended, and meterd refuses a future --as-of without it).
"$meterd" close-period --pg "$pg" --as-of "$period_end" --allow-future >"$work/close.json" 2>>"$work/meterd.log"

python3 - "$work" "$pg" "$start" "$start" "$done_at" "$events" "$alerts" <<'PY'
import csv, json, re, subprocess, sys
work, pg, start, first, done, events = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
def q(sql):
    out = subprocess.run(["psql", pg, "-qAtF", "\t", "-c", sql], check=True, capture_output=True, text=True).stdout
    return [line.split("\t") for line in out.splitlines() if line]
gen = json.load(open(f"{work}/loadgen.json"))
stored = {m: int(s) for m, s in q("SELECT meter, sum(quantity) FROM shared.api_usage_meters GROUP BY 1")}
rejected = {r: int(c) for r, c in q("SELECT reason, count(*) FROM shared.rejected_events GROUP BY 1")}
expected_rows = {}
with open(f"{work}/expected.csv") as f:
    for row in csv.DictReader(f):
        expected_rows[(row["org_id"], row["meter"], row["industry"], row["usage_date"])] = int(row["quantity"])
stored_rows = {tuple(r[:4]): int(r[4]) for r in q("SELECT org_id::text, meter, industry, usage_date::text, quantity FROM shared.api_usage_meters")}
# meterd's own numbers: its metrics registry, written as JSON when it stopped (--summary-json).
metrics = json.load(open(f"{work}/meterd-summary.json"))
# Ingest time runs from the first partition assignment (the group join is not meterd's speed).
if metrics.get("meterd_first_assignment_unix_ms"):
    first = metrics["meterd_first_assignment_unix_ms"] / 1000
print()
print("meterd demo: %d events, %d organizations, %d distinct (org, meter, industry, day) keys" % (events, len(set(k[0] for k in expected_rows)), len(expected_rows)))
print()
print("%-14s %15s %15s  %s" % ("meter", "produced", "in Postgres", ""))
ok = True
for m in sorted(set(gen["quantity_by_meter"]) | set(stored)):
    e, s = gen["quantity_by_meter"].get(m, 0), stored.get(m, 0)
    ok &= e == s
    print("%-14s %15d %15d  %s" % (m, e, s, "match" if e == s else "MISMATCH"))
keys_ok = expected_rows == stored_rows
print()
print("per-key totals (org, meter, industry, day): %s" % ("all %d match exactly" % len(expected_rows) if keys_ok else "MISMATCH"))
print("malformed events produced %d, in shared.rejected_events %d (%s)" % (gen["malformed"], sum(rejected.values()), ", ".join("%s %d" % kv for kv in sorted(rejected.items()))))
ingest = done - first
print()
print("ingest: %.2f s from partition assignment to exact totals = %.0f events/s (wall %.2f s incl. group join)" % (ingest, events / ingest if ingest > 0 else 0, done - start))
print("flushes: %d wrote %d events as %d rows; largest %d events as %d rows" % (metrics["meterd_flushes_total"], metrics["meterd_flushed_events_total"], metrics["meterd_flushed_rows_total"], metrics["meterd_largest_flush_events"], metrics["meterd_largest_flush_rows"]))
print("meterd peak RSS: %.1f MiB; duplicates dropped: %d" % (metrics["meterd_peak_rss_bytes"] / 2**20, metrics["meterd_duplicate_events_total"]))
close = json.load(open(f"{work}/close.json"))
def dollars(micros):
    return "${:,.2f}".format(micros / 1e6)
print()
print("invoices for the period (meterd close-period): %d; quota alerts raised while ingesting: %s" % (close["invoices_created"], sys.argv[7]))
print("%-11s %9s %15s %15s %15s" % ("plan", "invoices", "base fees", "usage charges", "total"))
for plan in ("basic", "pro", "enterprise"):
    p = close["by_plan"].get(plan)
    if p:
        print("%-11s %9d %15s %15s %15s" % (plan, p["invoices"], dollars(p["base_micros"]), dollars(p["usage_micros"] + p["adjustment_micros"]), dollars(p["total_micros"])))
print()
print("RESULT: %s" % ("totals match exactly" if ok and keys_ok and sum(rejected.values()) == gen["malformed"] else "MISMATCH"))
sys.exit(0 if ok and keys_ok else 1)
PY
