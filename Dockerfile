# preagg-proxy container image.
#
#   docker build -t preagg-proxy .
#   docker run --rm -p 8124:8124 -p 127.0.0.1:8125:8125 \
#       -e PREAGG_UPSTREAM=http://clickhouse:8123 -v preagg-data:/app/data preagg-proxy
#
# Any configuration key (src/config.rs KEYS) can be given as a PREAGG_* variable (-e) or as a flag
# after the image name (arguments are appended to `preagg-proxy serve`); a TOML file works too:
# mount it and pass `--config /path/file.toml`. deploy/compose.yaml runs the proxy with ClickHouse
# and PostgreSQL.
#
# Defaults that differ from the bare binary's, and why:
# - PREAGG_LISTEN=0.0.0.0:8124 and PREAGG_ADMIN_LISTEN=0.0.0.0:8125. The binary listens on loopback
#   by default (127.0.0.1), which inside a container is unreachable from outside: the container's
#   network namespace is the boundary here, and `-p`/`ports:` decides what is exposed. The admin
#   listener serves /admin (job invalidation, warm-up) without a token unless PREAGG_ADMIN_TOKEN is
#   set: publish 8125 only on loopback (as above) or set a token.
# - PREAGG_STORE=sqlite://data/preagg-jobs.db: the embedded job store lives in /app/data, the one
#   directory the unprivileged user may write. Mount a volume there to keep jobs across container
#   restarts, or point PREAGG_STORE at PostgreSQL (required when several proxies share one
#   ClickHouse). A host directory mounted there must be writable by uid 10001 (or gid 0).
# - Rules: the image carries the repository's rules/ in /app/rules, found through the default
#   `rules` (relative to WORKDIR /app). Mount your own over it: -v ./my-rules:/app/rules:ro.
# - PREAGG_UPSTREAM is left at the binary's http://127.0.0.1:8123, which in a container is the
#   container itself, where no ClickHouse runs: set it. /readyz reports the upstream as
#   unreachable until you do.
#
# Stopping: on SIGTERM the proxy drains in-flight requests for up to shutdown_grace (30s), longer
# than Docker's default 10s stop timeout: use `docker stop -t 35` / `stop_grace_period: 35s`, or
# lower PREAGG_SHUTDOWN_GRACE.
#
# Health: HEALTHCHECK runs deploy/healthcheck.sh, which sends GET /healthz to the admin port with
# bash's /dev/tcp. Nothing is installed for it: curl or wget would add a package (and, for curl,
# libcurl and its TLS and protocol libraries) to an image that otherwise has only the binary and
# ca-certificates, to do what a dozen lines of bash, always present in Debian images, already do.
# /healthz is liveness only; /readyz (upstream and job store reachable) is for orchestrators that
# should hold traffic back, e.g. a Kubernetes readinessProbe.
#
# How this file was verified: no Docker engine runs on the machine it was written on, so the image
# has not been built there. deploy/check-image-layout.sh checks it instead, and passed:
# - it makes the build context the way Docker would (only what .dockerignore lets through) and
#   replays the builder stage's WORKDIR/COPY/RUN lines as written (copies keep old modification
#   times, the worst case for the dummy-main layer), with the host's Rust 1.95 on Debian bookworm;
# - the binary is the real one (`--version`; without the `touch` below the replay shipped the dummy
#   main and the check failed, as it should) and needs only libc, libm, libgcc_s and the loader at
#   glibc <= 2.34, all in debian:bookworm-slim;
# - a directory laid out like the runtime stage (its COPY lines, /app/data owned by 10001, the rest
#   root's) runs the ENTRYPOINT from WORKDIR /app as uid/gid 10001 (setpriv) with exactly the ENV
#   below, against the project's test ClickHouse server with a password: /healthz 200, /readyz 200,
#   a query with the client's own credentials answered and seen upstream (a wrong password refused
#   by ClickHouse), the SQLite store created in /app/data and nothing written elsewhere, the
#   HEALTHCHECK command exiting 0 (and 1 once the proxy is gone), exit 0 on SIGTERM.
# Not covered: apt-get, groupadd/useradd (mirrored, not run; the useradd line was tried against a
# copy of /etc) and the base images themselves.

ARG RUST_VERSION=1.95

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build

# Dependencies first, against dummy sources, so that this slow layer is rebuilt only when
# Cargo.toml, Cargo.lock or benches/ change, not on every source edit. A manifest whose declared
# target files are missing does not load: the [[bench]] files come in as they are (small, rarely
# changed, and not compiled by `cargo build`); if Cargo.toml ever declares [[test]], [[example]] or
# [[bin]] paths, copy or fake those here too (deploy/check-image-layout.sh fails until then).
COPY Cargo.toml Cargo.lock ./
COPY benches benches
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The project itself. migrations/ is read at compile time (sqlx::migrate!). COPY keeps the files'
# modification times, which may be older than the dummy build above: touching the crate roots
# makes Cargo rebuild the crate instead of taking the dummy's output as fresh.
COPY src src
COPY migrations migrations
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked

# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

LABEL org.opencontainers.image.title="preagg-proxy" \
      org.opencontainers.image.description="Transparent ClickHouse HTTP proxy serving experiment exposure subqueries from preaggregated windows" \
      org.opencontainers.image.licenses="MIT"

# ca-certificates for TLS to an https:// upstream or PostgreSQL that trusts the system store
# (the binary also carries webpki roots); nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid, so volume ownership is predictable and runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 preagg \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin preagg

WORKDIR /app
# Rules stay root-owned (read-only to the proxy); data/ is the only writable directory. Group 0
# may write too, for platforms that run images under an arbitrary uid with gid 0.
COPY rules/ /app/rules/
RUN install -d -o 10001 -g 0 -m 0770 /app/data
COPY --from=builder /build/target/release/preagg-proxy /usr/local/bin/preagg-proxy
COPY deploy/healthcheck.sh /usr/local/bin/preagg-healthcheck

ENV PREAGG_LISTEN=0.0.0.0:8124 \
    PREAGG_ADMIN_LISTEN=0.0.0.0:8125 \
    PREAGG_STORE=sqlite://data/preagg-jobs.db

USER 10001:10001
EXPOSE 8124 8125
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["bash", "/usr/local/bin/preagg-healthcheck"]
ENTRYPOINT ["preagg-proxy", "serve"]
