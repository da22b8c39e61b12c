#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for the ledger tests, bound to loopback only.
# Installs Debian's postgresql package when it is missing. Prints the SQLAlchemy URL
# of a superuser connection to its "postgres" database on stdout; logs go to stderr.
#   export KNOWEDIT_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)
set -euo pipefail
PORT=${KNOWEDIT_PG_PORT:-54329}
ROOT=${KNOWEDIT_PG_ROOT:-/tmp/knowedit-pg}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "installing postgresql (Debian package)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
as_pg() {  # initdb and postgres refuse to run as root
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}
if [ -f "$ROOT/data/postmaster.pid" ] && as_pg "'$bin/pg_ctl' -D '$ROOT/data' status" >/dev/null 2>&1; then
  echo "postgresql already running in $ROOT" >&2
else
  rm -rf "$ROOT"
  mkdir -p "$ROOT"
  [ "$(id -u)" = 0 ] && chown postgres "$ROOT"
  as_pg "'$bin/initdb' -D '$ROOT/data' -A trust -U postgres --no-sync" >/dev/null
  as_pg "'$bin/pg_ctl' -D '$ROOT/data' -l '$ROOT/log' -w -o \"-c listen_addresses=127.0.0.1 -p $PORT -k $ROOT -c fsync=off\" start" >&2
fi
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/postgres"
