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
