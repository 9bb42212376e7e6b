#!/usr/bin/env bash
# Entry point of docker/local/postgres.Dockerfile: the subset of the official
# postgres image's entry point that docker/compose.yml uses.
#
# On an empty PGDATA: initdb (password from POSTGRES_PASSWORD, scram-sha-256
# over TCP), create POSTGRES_DB, run /docker-entrypoint-initdb.d/*.sql and *.sh
# against it with a temporary server that listens on the Unix socket only (so a
# TCP health check never passes before initialisation is done), then start
# the real server with the container's command, as the postgres user.
set -Eeuo pipefail

if [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi

if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "error: the database is uninitialized and POSTGRES_PASSWORD is not set" >&2
        exit 1
    fi
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    printf '\nhost all all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
    printf "\nlisten_addresses = '*'\n" >> "$PGDATA/postgresql.conf"

    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    export PGUSER="$user"
    if [ "$db" != postgres ]; then
        psql -X -q -v ON_ERROR_STOP=1 -d postgres --set db="$db" <<<'CREATE DATABASE :"db"'
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
            *.sql) echo "init: running $f"; psql -X -q -v ON_ERROR_STOP=1 -d "$db" -f "$f" ;;
            *.sh) echo "init: sourcing $f"; . "$f" ;;
            *) [ -e "$f" ] && echo "init: ignoring $f" ;;
        esac
    done
    unset PGUSER
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "init: PostgreSQL init process complete; ready for start up."
fi

exec "$@"
