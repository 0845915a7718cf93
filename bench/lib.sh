# Shared pieces of bench/load.sh and bench/endurance.sh (sourced, not run): prerequisites, free
# ports, starting and stopping the static upstream, the nginx hop, preagg-proxy and the chdb-backed
# ClickHouse, and running wrk. Every process started here is stopped by its own pid on exit.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bench="$repo/bench"
pids=()

say() { printf '\n== %s\n' "$*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }

cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# apt_install PACKAGE...: installs Debian packages (as root, or with sudo).
apt_install() {
    say "Installing $* (apt-get)"
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# Installs nginx, wrk and openssl from Debian when missing, and builds the proxy (release), unless
# BENCH_PROXY_BIN names a preagg-proxy binary to measure instead (a build that is not a git
# revision, such as this tree with another allocator).
prerequisites() {
    local missing=()
    command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v openssl >/dev/null || missing+=(openssl)
    [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
    if [ -n "${BENCH_PROXY_BIN:-}" ]; then
        [ -x "$BENCH_PROXY_BIN" ] || die "BENCH_PROXY_BIN is not an executable: $BENCH_PROXY_BIN"
        PROXY_BIN=$(realpath "$BENCH_PROXY_BIN")
        return
    fi
    say "Building preagg-proxy (release)"
    (cd "$repo" && cargo build --release --locked --quiet)
    PROXY_BIN="$repo/target/release/preagg-proxy"
}

# build_revision REV: builds preagg-proxy (release) as of git revision REV in .work/baseline-REV
# (once) and prints the binary's path.
build_revision() {
    local dir="$repo/.work/baseline-$1"
    if [ ! -x "$dir/target/release/preagg-proxy" ]; then
        say "Building preagg-proxy at $1 (release, once)"
        rm -rf "$dir" && mkdir -p "$dir/src"
        git -C "$repo" archive "$1" | tar -x -C "$dir/src"
        (cd "$dir/src" && CARGO_TARGET_DIR="$dir/target" cargo build --release --locked --quiet --bin preagg-proxy) >&2
    fi
    echo "$dir/target/release/preagg-proxy"
}

# preagg_header URL FILE: the X-Preagg header of one answer to FILE's query.
preagg_header() {
    curl -sS -o /dev/null -D - --data-binary @"$2" "$1/" | tr -d '\r' | sed -n 's/^x-preagg: //Ip'
}

# wait_rewritten URL FILE: sends FILE's query to the preagg-proxy at URL until it is answered
# rewritten (its windows built in the background); fails after 5 minutes.
wait_rewritten() {
    local header="" i
    for i in $(seq 1 600); do
        header=$(preagg_header "$1" "$2")
        [[ "$header" == rewritten* ]] && return 0
        sleep 0.5
    done
    die "the query of $2 is not rewritten: $header"
}

# CPU time used by everything on the machine over one second, in percent of all cores.
cpu_busy() {
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); d = y[2] - x[2];
        busy = 0; if (d > 0) busy = 100 * (y[1] - x[1]) / d; printf "%d\n", busy }'
}

# Waits for a quiet machine before a measurement: no other benchmark (cargo bench --bench e2e)
# running, and at most BENCH_QUIET_PERCENT (10) % of the CPU busy (our idle servers included).
# Gives up after BENCH_QUIET_WAIT (900) seconds: fails if the benchmark still runs, else goes on
# and records how busy the machine was (BUSY) so that the report can flag it.
quiet_machine() {
    local waited=0 limit=${BENCH_QUIET_WAIT:-900} threshold=${BENCH_QUIET_PERCENT:-10}
    while :; do
        BUSY=$(cpu_busy)
        if ! pgrep -f 'e2e-[0-9a-f]' >/dev/null && [ "$BUSY" -le "$threshold" ]; then
            return 0
        fi
        if [ "$waited" -ge "$limit" ]; then
            pgrep -f 'e2e-[0-9a-f]' >/dev/null && die "another benchmark (cargo bench --bench e2e) is still running"
            echo "bench: the machine is ${BUSY}% busy after waiting ${limit}s; measuring anyway (flagged)" >&2
            return 0
        fi
        [ "$waited" -gt 0 ] || echo "bench: waiting for a quiet machine (${BUSY}% busy)..." >&2
        sleep 4
        waited=$((waited + 5))
    done
}

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Waits until something accepts connections on 127.0.0.1:$1.
wait_port() {
    local i
    for i in $(seq 1 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "nothing listens on port $1"
}

# Fills the @NAME@ placeholders of a template: render TEMPLATE OUT NAME=VALUE...
render() {
    local template=$1 out=$2 expr=() pair
    shift 2
    for pair in "$@"; do expr+=(-e "s|@${pair%%=*}@|${pair#*=}|g"); done
    sed "${expr[@]}" "$template" >"$out"
    ! grep -q '@[A-Z_]*@' "$out" || die "unfilled placeholder in $out"
}

# Threads preagg-proxy's runtime uses (tokio: one worker per core); nginx gets as many workers.
WORKERS=$(nproc)

# fresh_work NAME: sets $work to an emptied .work/bench-NAME, with tmp/ for nginx.
fresh_work() {
    work="$repo/.work/bench-$1"
    rm -rf "$work" && mkdir -p "$work/tmp"
}

# start_static PORT: nginx answering `1\n` with ClickHouse's headers.
start_static() {
    mkdir -p "$work/tmp"
    render "$bench/nginx/static.conf.in" "$work/static.conf" WORKERS="$WORKERS" WORK="$work" PORT="$1"
    "$NGINX" -e "$work/static.error.log" -c "$work/static.conf" -p "$work" 2>>"$work/static.error.log" &
    pids+=($!)
    wait_port "$1"
}

# self_signed_cert: $work/tls/cert.pem, a self-signed certificate for localhost (P-256), and its
# key, key.pem (PKCS#8), for the HTTPS hops.
self_signed_cert() {
    mkdir -p "$work/tls"
    [ -s "$work/tls/cert.pem" ] && return 0
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost -keyout "$work/tls/key.pem" -out "$work/tls/cert.pem" 2>/dev/null ||
        die "openssl cannot make a certificate"
}

# render_hop WORKERS HOP_STATIC_PORT HOP_CLICKHOUSE_PORT STATIC_PORT CLICKHOUSE_PORT HOP_LOGGED_PORT
# [HOP_TLS_PORT]: writes $work/hop.conf, the nginx reverse proxy (HOP_LOGGED_PORT: the static hop
# with an access log; HOP_TLS_PORT: the same over HTTPS).
render_hop() {
    mkdir -p "$work/tmp"
    self_signed_cert
    render "$bench/nginx/hop.conf.in" "$work/hop.conf" WORKERS="$1" WORK="$work" HOP_STATIC_PORT="$2" \
        HOP_CLICKHOUSE_PORT="$3" STATIC_PORT="$4" CLICKHOUSE_PORT="$5" HOP_LOGGED_PORT="$6" \
        HOP_TLS_PORT="${7:-$(free_port)}"
}

# start_hop HOP_STATIC_PORT HOP_CLICKHOUSE_PORT STATIC_PORT CLICKHOUSE_PORT [HOP_LOGGED_PORT
# [HOP_TLS_PORT]]: the nginx reverse proxy with as many workers as preagg-proxy has.
start_hop() {
    render_hop "$WORKERS" "$1" "$2" "$3" "$4" "${5:-$(free_port)}" "${6:-$(free_port)}"
    "$NGINX" -e "$work/hop.error.log" -c "$work/hop.conf" -p "$work" 2>>"$work/hop.error.log" &
    pids+=($!)
    wait_port "$1"
}

# start_proxy NAME PORT UPSTREAM MODE [FLAG...]: preagg-proxy (release) on its defaults otherwise:
# SQLite job store, text logs at info (one access line per request) to a file. Waits for the
# engine unless the mode is off. Sets PROXY_PID_<NAME>.
start_proxy() {
    local name=$1 port=$2 upstream=$3 mode=$4 dir="$work/proxy-$1" admin
    shift 4
    admin=$(free_port)
    rm -rf "$dir" && mkdir -p "$dir"
    (cd "$dir" && exec "$PROXY_BIN" serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --upstream "$upstream" --mode "$mode" --rules "$repo/rules" --store "sqlite://$dir/jobs.db" "$@") \
        >"$dir/proxy.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    printf -v "PROXY_PID_$name" '%s' "$pid"
    wait_port "$port"
    if [ "$mode" != off ]; then
        local i
        for i in $(seq 1 600); do
            grep -q 'engine ready' "$dir/proxy.log" && return 0
            kill -0 "$pid" 2>/dev/null || { cat "$dir/proxy.log" >&2; die "preagg-proxy $name exited"; }
            sleep 0.1
        done
        cat "$dir/proxy.log" >&2
        die "preagg-proxy $name: engine not ready"
    fi
}

# start_clickhouse EVENTS (sets CLICKHOUSE_PORT and CLICKHOUSE_PID): the chdb-backed ClickHouse with generated PostHog data (28 days from
# 2026-10-01, seed 42, as scripts/demo.sh), kept in .work/bench-data/events-N and reused.
# Sets CLICKHOUSE_PORT.
start_clickhouse() {
    local events=$1 python dir
    python=$("$repo/scripts/python-env.sh")
    dir="$repo/.work/bench-data/events-$events"
    local fresh=0
    [ -e "$dir/generated" ] || { fresh=1; rm -rf "$dir"; mkdir -p "$dir"; }
    rm -f "$dir/port"
    "$python" "$repo/tests/chdb_server/server.py" --data-dir "$dir/data" --port-file "$dir/port" \
        >"$work/clickhouse.log" 2>&1 &
    pids+=($!)
    CLICKHOUSE_PID=$!
    local i
    for i in $(seq 1 600); do [ -s "$dir/port" ] && break; sleep 0.1; done
    [ -s "$dir/port" ] || { cat "$work/clickhouse.log" >&2; die "the chdb server did not start"; }
    CLICKHOUSE_PORT=$(cat "$dir/port")
    if [ "$fresh" = 1 ]; then
        say "Generating $events PostHog events (once; kept in $dir)"
        "$python" "$repo/tests/data/generate.py" --url "http://127.0.0.1:$CLICKHOUSE_PORT" --events "$events" \
            --seed 42 --start 2026-10-01 --days 28 >/dev/null
        touch "$dir/generated"
    fi
}

# rss_kb PID and fds PID: from /proc.
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }

# run_wrk CONNECTIONS SECONDS URL BODY_FILE TIMEOUT [count-preagg]: prints wrk's RESULT line.
WRK_THREADS=${BENCH_WRK_THREADS:-1}
run_wrk() {
    local connections=$1 seconds=$2 url=$3 body=$4 timeout=$5 count=${6:-0} threads=$WRK_THREADS
    [ "$threads" -le "$connections" ] || threads=$connections
    local out
    out=$(WRK_BODY_FILE="$body" WRK_COUNT_PREAGG="$count" wrk -t "$threads" -c "$connections" -d "${seconds}s" \
        --timeout "$timeout" -s "$bench/wrk/post.lua" "$url" 2>&1) || { echo "$out" >&2; die "wrk failed"; }
    grep '^RESULT ' <<<"$out" || { echo "$out" >&2; die "wrk printed no RESULT line"; }
}

# cpu_ticks PID: CPU time (user + system, in clock ticks) used so far by process PID and its
# children (an nginx master's workers).
cpu_ticks() {
    local total=0 pid
    for pid in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# field NAME LINE: a key=value field of a RESULT line.
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<" $2"; }

machine_facts() {
    printf -- '- machine: %s, %s cores (nproc), %s MB RAM, %s\n' \
        "$(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo | head -1)" "$(nproc)" \
        "$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)" "$(uname -sr)"
    local build
    build="commit $(git -C "$repo" describe --always --dirty)"
    [ -z "${BENCH_PROXY_BIN:-}" ] || build="BENCH_PROXY_BIN=$BENCH_PROXY_BIN, tree at $build"
    printf -- '- %s; %s; preagg-proxy %s (release, %s)\n' "$("$NGINX" -v 2>&1)" \
        "$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)" "$("$PROXY_BIN" --version 2>/dev/null | awk '{ print $NF }')" \
        "$build"
}
