# Sourced by deploy/demo.sh and bench/e2e.sh (needs $root and $meterd): a work directory,
# a private Postgres and embedded brokers, all stopped and removed when the script exits.

# dev_env_init PREFIX: creates $work and installs the cleanup.
dev_env_init() {
  work=$(mktemp -d "/tmp/$1-XXXXXX")
  chmod 755 "$work"  # The private Postgres runs as user postgres when we are root.
  dev_env_pids=()
  trap dev_env_cleanup EXIT
}

dev_env_cleanup() {
  for pid in "${dev_env_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$root/deploy/dev-postgres.sh" stop "$work/pg" || true
  rm -rf "$work"
}

# dev_env_background CMD...: runs CMD in the background, stopped at exit; its pid in $last_pid.
dev_env_background() {
  "$@" &
  last_pid=$!
  dev_env_pids+=("$last_pid")
}

# dev_env_postgres: starts the private Postgres and migrates it; its URL in $pg.
dev_env_postgres() {
  pg=$("$root/deploy/dev-postgres.sh" start "$work/pg")
  "$meterd" migrate --pg "$pg" 2>&1 | sed 's/^/   /' >&2
}

# dev_env_broker VAR TOPIC PARTITIONS: starts an embedded Kafka; its address in $VAR.
dev_env_broker() {
  local address_file="$work/broker-$2.addr"
  dev_env_background "$meterd" dev-broker --topic "$2" --partitions "$3" \
    >"$address_file" 2>>"$work/broker.log"
  for _ in $(seq 100); do [[ -s "$address_file" ]] && break; sleep 0.1; done
  [[ -s "$address_file" ]] || { echo "dev-broker did not start; see $work/broker.log" >&2; exit 1; }
  printf -v "$1" '%s' "$(head -n 1 "$address_file")"
}

# dev_env_wait_for_totals LOADGEN_JSON SECONDS: polls until SUM(quantity) in $pg equals what
# loadgen reported producing; sets $done_at (epoch seconds) and returns 0, or returns 1 after
# SECONDS with $done_at set to the give-up time.
dev_env_wait_for_totals() {
  local expected stored tries=$(($2 * 10))
  expected=$(python3 -c 'import json,sys; print(sum(json.load(open(sys.argv[1]))["quantity_by_meter"].values()))' "$1")
  for _ in $(seq "$tries"); do
    stored=$(psql "$pg" -qAt -c "SELECT coalesce(sum(quantity), 0) FROM shared.api_usage_meters")
    if [[ "$stored" == "$expected" ]]; then done_at=$(date +%s.%N); return 0; fi
    sleep 0.1
  done
  done_at=$(date +%s.%N)
  return 1
}

# dev_env_totals_exact EXPECTED_CSV PG_URL: prints true when every (org, meter, industry, day)
# total in Postgres equals loadgen's --expected-out CSV, false otherwise. Rows are summed per
# key: until the compactor folds them, a key's flushed deltas are rows of their own.
dev_env_totals_exact() {
  python3 - "$1" "$2" <<'PY'
import csv, subprocess, sys
want = {}
for r in csv.DictReader(open(sys.argv[1])):
    want[(r["org_id"], r["meter"], r["industry"], r["usage_date"])] = int(r["quantity"])
out = subprocess.run(["psql", sys.argv[2], "-qAtF", "\t", "-c", "SELECT org_id, meter, industry, usage_date, sum(quantity) FROM shared.api_usage_meters GROUP BY 1, 2, 3, 4"], capture_output=True, text=True, check=True).stdout
got = {tuple(l.split("\t")[:4]): int(l.split("\t")[4]) for l in out.splitlines()}
print("true" if got == want else "false")
PY
}

# dev_env_wait_ready PORT: returns 0 once meterd's /readyz on 127.0.0.1:PORT answers 200
# (partitions assigned, no failed flush), 1 after 30 s.
dev_env_wait_ready() {
  python3 - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(300):
    try:
        if urllib.request.urlopen("http://127.0.0.1:%s/readyz" % sys.argv[1], timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.1)
sys.exit(1)
PY
}
