#!/usr/bin/env bash
# The demo: installs dependencies, builds, starts the embedded Kafka and a private Postgres,
# produces generated usage events, runs meterd on them, and prints the billing result.
#   DEMO_EVENTS (default 1000000), DEMO_ORGS (500), DEMO_PARTITIONS (128) tune it.
# Each org gets a subscription (basic, pro or enterprise by a hash of its id) for the month the
# events fall in, and a Stripe customer; after ingestion the month is closed, the invoices are
# summarised per plan, their usage is exported to a local fake Stripe (meterd dev-stripe), and
# one signed webhook (invoice.paid) makes the round trip back into meterd.
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
-- What the customer.created webhooks would have filled in.
INSERT INTO shared.stripe_customers (org_id, stripe_customer_id)
SELECT org_id, 'cus_demo' || left(replace(org_id::text, '-', ''), 14) FROM shared.organizations;
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

echo "== exporting the invoiced usage to Stripe (a local fake: meterd dev-stripe, meterd stripe-export)" >&2
dev_env_background "$meterd" dev-stripe >"$work/stripe.addr" 2>>"$work/stripe.log"
for _ in $(seq 100); do [[ -s "$work/stripe.addr" ]] && break; sleep 0.1; done
stripe=$(head -n 1 "$work/stripe.addr")
export_start=$(date +%s.%N)
METERD_STRIPE_SECRET_KEY=sk_test_meterd_fake "$meterd" stripe-export --pg "$pg" \
  --stripe-api-base "$stripe" --stripe-export-senders 8 >"$work/export.json" 2>>"$work/meterd.log"
export_s=$(python3 -c "import sys; print('%.2f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$export_start" "$(date +%s.%N)")
curl -sf "$stripe/__fake/meter_events" >"$work/stripe-events.json"

echo "== one webhook round trip: the fake Stripe signs invoice.paid, meterd verifies and applies it" >&2
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dev_env_background "$meterd" run --pg "$pg" --brokers "$brokers" --topic "$topic" --group demo \
  --billing=false --http-listen "127.0.0.1:$port" \
  --stripe-webhook-secret whsec_meterd_fake_0123456789 2>>"$work/meterd-webhook.log"
webhook_pid=$last_pid
psql "$pg" -qAt -F ' ' -c "SELECT i.invoice_id, i.org_id, c.stripe_customer_id, i.total_micros / 10000, i.status
  FROM shared.invoices i JOIN shared.stripe_customers c USING (org_id) ORDER BY i.invoice_id LIMIT 1" \
  >"$work/paid-invoice.txt"
read -r invoice_id invoice_org customer cents before <"$work/paid-invoice.txt"
cat >"$work/invoice-paid.json" <<JSON
{"id":"evt_demo_invoice_paid","object":"event","type":"invoice.paid","api_version":"2024-06-20","created":$(date +%s),"livemode":false,"data":{"object":{"id":"in_demo_$invoice_id","object":"invoice","customer":"$customer","status":"paid","amount_paid":$cents,"currency":"usd","metadata":{"meterd_invoice_id":"$invoice_id","org_id":"$invoice_org"}}}}
JSON
to=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "http://127.0.0.1:$port/v1/stripe/webhook")
for _ in $(seq 100); do  # Until meterd's HTTP endpoint is up.
  curl -s -X POST --data-binary @"$work/invoice-paid.json" "$stripe/__fake/webhook?to=$to" >"$work/webhook.json" || true
  grep -q '"status":200' "$work/webhook.json" && break
  sleep 0.1
done
after=$(psql "$pg" -qAt -c "SELECT status FROM shared.invoices WHERE invoice_id = $invoice_id")
kill -TERM "$webhook_pid"; wait "$webhook_pid" || true
printf '%s %s %s %s %s\n' "$invoice_id" "$before" "$after" "$export_s" "$stripe" >"$work/roundtrip.txt"

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
stored_rows = {tuple(r[:4]): int(r[4]) for r in q("SELECT org_id::text, meter, industry, usage_date::text, sum(quantity) FROM shared.api_usage_meters GROUP BY 1, 2, 3, 4")}
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
exported = json.load(open(f"{work}/export.json"))
at_stripe = json.load(open(f"{work}/stripe-events.json"))
owed = {r[0]: (r[1], r[2]) for r in q("SELECT identifier, stripe_customer_id, value::text FROM shared.stripe_outbox WHERE kind = 'meter_event'")}
got = {}
for e in at_stripe:
    got.setdefault(e["identifier"], []).append((e["payload"]["stripe_customer_id"], e["payload"]["value"]))
export_ok = set(got) == set(owed) and all(v == [owed[k]] for k, v in got.items()) and exported["pending"] == 0
invoice_id, before, after, export_s, stripe_url = open(f"{work}/roundtrip.txt").read().split()
webhook = json.load(open(f"{work}/webhook.json"))
print()
print("Stripe export (meterd stripe-export to a fake Stripe at %s): %d meter events sent in %s s, %d at Stripe, each identifier once: %s" % (stripe_url, exported["sent"], export_s, len(at_stripe), "yes" if export_ok else "NO"))
by_meter = {}
for r in q("SELECT event_name, count(*), sum(value) FROM shared.stripe_outbox GROUP BY 1 ORDER BY 1"):
    print("  %-14s %6s events, value %12s" % (r[0], r[1], r[2]))
print("webhook round trip: invoice.paid signed by the fake Stripe -> meterd answered %s %s; invoice %s: %s -> %s" % (webhook["status"], webhook["body"].strip(), invoice_id, before, after))
roundtrip_ok = webhook["status"] == 200 and after == "paid"
kpis = dict(q("SELECT metric, value FROM shared.billing_metrics WHERE segment = 'all' AND metric_date = (SELECT max(metric_date) FROM shared.billing_metrics) AND metric IN ('mrr', 'arr', 'arpa', 'overage_share', 'active_customers')"))
if kpis:
    print("revenue KPIs (shared.billing_metrics, filled by close-period): MRR %s, ARR %s, ARPA %s, %s active customers, overage share %.1f%%" % (dollars(float(kpis["mrr"])), dollars(float(kpis["arr"])), dollars(float(kpis["arpa"])), kpis["active_customers"], 100 * float(kpis["overage_share"])))
print()
print("RESULT: %s" % ("totals match exactly, export and webhook round trip exact" if ok and keys_ok and export_ok and roundtrip_ok and sum(rejected.values()) == gen["malformed"] else "MISMATCH"))
sys.exit(0 if ok and keys_ok and export_ok and roundtrip_ok else 1)
PY
