# PostgreSQL 15 from Debian's packages, for machines that cannot pull
# postgres:15-bookworm (no image registry). It keeps the interface of the
# official image that docker/compose.yml relies on: POSTGRES_PASSWORD,
# POSTGRES_USER, POSTGRES_DB, /docker-entrypoint-initdb.d/*.sql|*.sh, PGDATA,
# `postgres -c key=value ...` as the command, and a server that accepts TCP
# connections only once initialisation is complete.
#
#   docker build -f docker/local/postgres.Dockerfile \
#       --build-arg BASE_IMAGE=pgrelay-base:bookworm -t pgrelay-postgres:15 docker/local
#
# BASE_IMAGE is a Debian bookworm root (scripts/e2e-docker.sh makes one with
# debootstrap). If that root already has postgresql-15 (installed with chroot
# when containers cannot reach the Debian mirror), nothing is downloaded here.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ENV PG_MAJOR=15 \
    PGDATA=/var/lib/postgresql/data \
    PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

RUN set -eux; \
    if [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then \
        mkdir -p /etc/postgresql-common/createcluster.d; \
        echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/no-main-cluster.conf; \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    mkdir -p /var/run/postgresql "$PGDATA" /docker-entrypoint-initdb.d; \
    chown -R postgres:postgres /var/run/postgresql /var/lib/postgresql; \
    chmod 2777 /var/run/postgresql; \
    chmod 700 "$PGDATA"

COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

VOLUME /var/lib/postgresql/data
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
