#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 and that database `test` exists.
# Starts the local cluster if it is installed but down. Fails (never skips) when there is none.
set -euo pipefail

host=127.0.0.1
port=5432

ready() { pg_isready -q -h "$host" -p "$port" 2>/dev/null; }

if ! command -v pg_isready >/dev/null 2>&1; then
    echo "ensure-postgres: PostgreSQL client tools are not installed; the tests need a PostgreSQL server on $host:$port" >&2
    exit 1
fi

if ! ready; then
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        echo "ensure-postgres: starting PostgreSQL $version" >&2
        pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
    fi
    for _ in $(seq 1 60); do ready && break; sleep 0.5; done
fi
ready || { echo "ensure-postgres: no PostgreSQL server answers on $host:$port" >&2; exit 1; }

exists=$(psql -h "$host" -p "$port" -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'")
if [ "$exists" != "1" ]; then
    psql -h "$host" -p "$port" -U postgres -d postgres -qc "CREATE DATABASE test" >&2
fi
