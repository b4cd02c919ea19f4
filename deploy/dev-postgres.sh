#!/usr/bin/env bash
# A private PostgreSQL 15 for the demo, tests and benchmarks: its own data directory, a random
# port on 127.0.0.1, trust auth. Never touches a system cluster.
#   dev-postgres.sh start DIR   → initdb if needed, start, print the connection URL on stdout
#   dev-postgres.sh stop DIR    (fast shutdown)
#   dev-postgres.sh crash DIR   (immediate shutdown: no checkpoint, crash recovery on start)
# DEV_PG_TIMEZONE sets the server's `timezone` (e.g. America/New_York): the billing tests run
# under non-UTC server zones to prove billing never depends on it.
# As root, the server runs as the `postgres` user (initdb refuses root).
set -euo pipefail

cmd=${1:?usage: dev-postgres.sh start|stop|crash DIR}
dir=${2:?usage: dev-postgres.sh start|stop|crash DIR}
bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[[ -x "$bindir/pg_ctl" ]] || { echo "dev-postgres: PostgreSQL server binaries not found; run deploy/install-deps.sh" >&2; exit 1; }

as_owner=()
if [[ $(id -u) -eq 0 ]]; then as_owner=(runuser -u postgres --); fi

case "$cmd" in
  start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ $(id -u) -eq 0 ]]; then
      chown postgres:postgres "$dir"
      runuser -u postgres -- test -w "$dir" \
        || { echo "dev-postgres: user postgres cannot reach $dir (check its parent directories' permissions)" >&2; exit 1; }
    fi
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
      "${as_owner[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
        || { echo "dev-postgres: initdb failed, see $dir/initdb.log" >&2; exit 1; }
    fi
    if [[ -f "$dir/port" ]]; then port=$(cat "$dir/port"); else port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'); fi
    tz_option=""
    if [[ -n "${DEV_PG_TIMEZONE:-}" ]]; then
      [[ "$DEV_PG_TIMEZONE" =~ ^[A-Za-z0-9_/+-]+$ ]] || { echo "dev-postgres: bad DEV_PG_TIMEZONE" >&2; exit 2; }
      tz_option=" -c timezone=$DEV_PG_TIMEZONE"
    fi
    # fsync off: this cluster is disposable; meterd's guarantees are tested against its
    # transactions, not against power loss.
    "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
      -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200 -c shared_buffers=256MB$tz_option" >/dev/null \
      || { echo "dev-postgres: server did not start, see $dir/server.log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    "${as_owner[@]}" "$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -qAt -c "CREATE DATABASE meterd" postgres >/dev/null 2>&1 || true
    echo "postgresql://postgres@127.0.0.1:$port/meterd"
    ;;
  stop|crash)
    [[ -f "$dir/data/PG_VERSION" ]] || exit 0
    mode=fast
    [[ "$cmd" == crash ]] && mode=immediate
    "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -m "$mode" -w stop >/dev/null 2>&1 || true
    ;;
  *) echo "usage: dev-postgres.sh start|stop|crash DIR" >&2; exit 2 ;;
esac
