#!/usr/bin/env bash
# Builds preagg-proxy (release) with profile-guided optimisation, into target/pgo/release/:
#
#     scripts/build-pgo.sh
#
# The plain release build lays out the binary without knowing which code a request runs; a
# request then touches more distinct code than fits the CPU's first-level instruction cache
# (bench/instructions.sh with BENCH_CACHE_SIM=1). Here rustc first builds an instrumented binary
# (target/pgo-generate), that binary serves a training load, and rustc builds again with the
# counts it recorded: hot paths inlined and laid out together, cold ones (start-up, errors) moved
# aside. The behaviour is the same program's; only the machine code's arrangement differs.
#
# The training (each proxy stopped with SIGTERM, which is when the counts are written):
# - pass-through against a static upstream (nginx answering `1\n`, as in bench/load.sh) with wrk,
#   in modes rewrite (the prefilter dismisses the query), off, and off without the access log, at
#   1 and 16 connections; and over HTTPS (a self-signed certificate) at 1 connection;
# - unless PGO_TRAIN_CLICKHOUSE=0: the rewrite path, the demo's experiment query against the
#   chdb-backed test ClickHouse with 100 thousand generated events (a build, then warm rewritten
#   answers). It needs Python; scripts/python-env.sh installs chdb-core in .venv.
#
# Installs llvm-tools (rustup), nginx, wrk and openssl (apt) when missing. Two release builds and
# the training take about 20 minutes on 2 cores. Environment:
#   PGO_TRAIN_SECONDS (4)        seconds of each pass-through training load
#   PGO_TRAIN_CLICKHOUSE (1)     0 leaves the rewrite path out of the training (it is then laid out
#                                as cold code: still correct, a little slower to plan and rewrite)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../bench/lib.sh"

seconds=${PGO_TRAIN_SECONDS:-4}
train_clickhouse=${PGO_TRAIN_CLICKHOUSE:-1}
target="$repo/target"
profiles="$target/pgo-profiles"

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    say "Installing llvm-tools (rustup), for llvm-profdata"
    rustup component add llvm-tools
fi
[ -x "$profdata" ] || die "no llvm-profdata at $profdata"

say "Building the instrumented binary (release, target/pgo-generate)"
rm -rf "$profiles" && mkdir -p "$profiles/raw"
(cd "$repo" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$profiles/raw" CARGO_TARGET_DIR="$target/pgo-generate" \
    cargo build --release --locked --quiet --bin preagg-proxy)
rm -f "$profiles/raw"/* # counts that instrumented build scripts wrote while compiling

fresh_work pgo-train
BENCH_PROXY_BIN="$target/pgo-generate/release/preagg-proxy" prerequisites
query="$bench/queries/passthrough.sql"

say "Training: pass-through against the static upstream"
static_port=$(free_port)
start_static "$static_port"
self_signed_cert
rewrite_port=$(free_port) off_port=$(free_port) quiet_port=$(free_port) tls_port=$(free_port)
start_proxy rewrite "$rewrite_port" "http://127.0.0.1:$static_port" rewrite
start_proxy off "$off_port" "http://127.0.0.1:$static_port" off
start_proxy quiet "$quiet_port" "http://127.0.0.1:$static_port" off --log-filter warn
start_proxy tls "$tls_port" "http://127.0.0.1:$static_port" off \
    --tls-cert-file "$work/tls/cert.pem" --tls-key-file "$work/tls/key.pem"
for port in "$rewrite_port" "$off_port" "$quiet_port"; do
    for connections in 1 16; do
        run_wrk "$connections" "$seconds" "http://127.0.0.1:$port/" "$query" 10s >&2
    done
done
run_wrk 1 "$seconds" "https://127.0.0.1:$tls_port/" "$query" 10s >&2

if [ "$train_clickhouse" != 0 ]; then
    say "Training: the rewrite path against the chdb-backed ClickHouse"
    experiment="$repo/scripts/demo/experiment.sql"
    start_clickhouse 100000
    clickhouse_proxy_port=$(free_port)
    start_proxy clickhouse "$clickhouse_proxy_port" "http://127.0.0.1:$CLICKHOUSE_PORT" rewrite
    wait_rewritten "http://127.0.0.1:$clickhouse_proxy_port" "$experiment"
    run_wrk 2 "$seconds" "http://127.0.0.1:$clickhouse_proxy_port/" "$experiment" 30s >&2
fi

say "Stopping the trained proxies (they write their counts on exit)"
cleanup
compgen -G "$profiles/raw/*.profraw" >/dev/null || die "the training wrote no profile to $profiles/raw"
"$profdata" merge -o "$profiles/merged.profdata" "$profiles/raw"/*.profraw

say "Building the optimised binary (release, target/pgo)"
(cd "$repo" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$profiles/merged.profdata" CARGO_TARGET_DIR="$target/pgo" \
    cargo build --release --locked --quiet --bin preagg-proxy)
"$target/pgo/release/preagg-proxy" --version >&2
echo "$target/pgo/release/preagg-proxy"
