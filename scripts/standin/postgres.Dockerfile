# A stand-in for postgres:15, made by scripts/image only when that image cannot
# be pulled: Debian's PostgreSQL 15 on the locally made Debian base. It keeps
# the official image's interface that examples/django uses: the user postgres
# with uid and gid 999, PGDATA, the POSTGRES_USER, POSTGRES_PASSWORD and
# POSTGRES_DB variables read on the first start (postgres-entrypoint.sh), port
# 5432, and `postgres` as the command.
ARG DEBIAN_IMAGE=kubelock-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}

# The user first, with the official image's ids; no "main" cluster at install:
# the entrypoint makes the one the container uses, in PGDATA.
# hadolint ignore=DL3008
RUN groupadd --system --gid 999 postgres \
    && useradd --system --uid 999 --gid 999 --home-dir /var/lib/postgresql \
        --shell /bin/bash postgres \
    && mkdir -p /etc/postgresql-common/createcluster.d \
    && echo "create_main_cluster = false" \
        > /etc/postgresql-common/createcluster.d/no-main-cluster.conf \
    && apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/run/postgresql /var/lib/postgresql/data \
    && chown -R postgres:postgres /var/run/postgresql /var/lib/postgresql \
    && chmod 3777 /var/run/postgresql

COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER 999:999
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["postgres-entrypoint.sh"]
CMD ["postgres"]
