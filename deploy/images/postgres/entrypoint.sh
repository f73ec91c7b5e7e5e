#!/bin/sh
# First start: initdb with the user and password given (POSTGRES_USER, POSTGRES_PASSWORD_FILE),
# the database POSTGRES_DB, password logins (scram) from other hosts; then exec the server.
# A data folder that is already initialised is used as it is (the password is not reset).
set -eu
: "${PGDATA:=/var/lib/postgresql/data}"
user="${POSTGRES_USER:-postgres}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    file="${POSTGRES_PASSWORD_FILE:-}"
    if [ -z "$file" ] || [ ! -s "$file" ]; then
        echo "error: POSTGRES_PASSWORD_FILE (${file:-unset}) is missing or empty; run deploy/make-secrets.sh" >&2
        exit 1
    fi
    initdb --username="$user" --pwfile="$file" --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA" >/dev/null
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    db="${POSTGRES_DB:-$user}"
    if [ "$db" != postgres ]; then
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
        psql -v ON_ERROR_STOP=1 --username="$user" --dbname=postgres -c "CREATE DATABASE \"$db\"" >/dev/null
        pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    fi
    echo "initialised $PGDATA: user $user, database $db"
fi
if [ "${1:-}" = postgres ]; then
    shift
    exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"
