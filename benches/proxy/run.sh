#!/usr/bin/env bash
# Head-to-head: nginx, HAProxy and tower-ha's reverse_proxy example as
# round-robin reverse proxies over the same three loopback backends, one
# worker each, loaded by wrk, with a plain hyper proxy (examples/
# hyper_proxy.rs: hyper-util's pooled client, no tower-ha) as the baseline
# of the HTTP stack. Prints requests per second and p99 latency, then the
# same with one backend killed mid-run (errors seen by the client), and
# each proxy's CPU time (user and system, its every process) per response
# served: on a machine shared with wrk and the backends a proxy may not
# use a whole core, and then its requests per second depend on what the
# others get, while its CPU time per response is its own cost.
#
#   benches/proxy/run.sh [seconds per run, default 10] [rounds, default 4]
#
# On a busy machine requests per second move by several per cent between
# runs. For a figure free of that noise,
#
#   benches/proxy/run.sh --instructions [seconds, default 10]
#
# counts instead the user-space instructions each proxy (nginx, tower-ha,
# tower-ha without its three per-request timers as "untimed", plain hyper) runs per
# request, under valgrind's callgrind; the kernel's share (system calls,
# TCP) is not in it.
#
# For what an idle client connection costs each proxy,
#
#   benches/proxy/run.sh --memory [connections, default 1000]
#
# prints each proxy's resident memory before and once that many client
# connections have made one request each and stay open, and the difference
# per connection (python3 holds the connections).
#
# Every round runs the four proxies, each in a different position of the
# order, so that drift of the shared machine does not favour one of them;
# the summary gives each proxy's median over the rounds.
#
# Installs nginx, haproxy and wrk from the distribution's packages when
# missing. Everything listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail
cd "$(dirname "$0")/../.."

MODE=load
if [ "${1:-}" = --instructions ]; then MODE=instructions; shift; fi
if [ "${1:-}" = --memory ]; then MODE=memory; shift; CONNECTIONS_HELD=${1:-1000}; fi
DURATION=${1:-10}
ROUNDS=${2:-4}
CONNECTIONS=32
BACKEND_PORTS=(18101 18102 18103)
NGINX_PORT=18080
HAPROXY_PORT=18081
TOWER_PORT=18082
HYPER_PORT=18083

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need haproxy || ! need wrk || { [ $MODE = instructions ] && ! need valgrind; }; then
    SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nginx-light haproxy wrk valgrind >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

cargo build --release --example reverse_proxy --example hyper_proxy --features hyper-client -q
# Where cargo put them: under CARGO_TARGET_DIR when it is set.
EXAMPLES=${CARGO_TARGET_DIR:-target}/release/examples

WORK=$(mktemp -d)
# The process under valgrind, while it runs (the others have pid files,
# removed as each is stopped).
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for f in "$WORK"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
    for f in "$WORK"/*/nginx.pid; do [ -f "$f" ] && kill_nginx "$(dirname "$f")" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() { # port [tries of 50 ms, default 100]
    for _ in $(seq 1 "${2:-100}"); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "port $1 did not open" >&2
    exit 1
}

# A backend: its own nginx master with one worker answering 200 with a small
# body, so that one backend can be killed alone.
start_backend() {
    local port=$1 dir="$WORK/backend-$1"
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
daemon on;
pid $dir/nginx.pid;
error_log $dir/error.log crit;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$port reuseport;
        location / { return 200 "backend $port\n"; }
    }
}
CONF
    "$NGINX" -p "$dir" -c "$dir/nginx.conf"
    wait_port "$port"
}

# SIGKILLs an nginx master and its workers (they share its process group):
# connections die mid-flight. Reads the pid file now, once nginx is up.
kill_nginx() {
    local pid pgid
    pid=$(cat "$1/nginx.pid")
    # SIGKILLed nginx leaves its pid file: remove it, so that the cleanup
    # never signals a process that has reused the pid.
    rm -f "$1/nginx.pid"
    pgid=$(ps -o pgid= -p "$pid" | tr -d ' ')
    # Its own group when it runs as a daemon; not otherwise (under
    # valgrind, in this script's group): then it alone.
    if [ "$pgid" = "$pid" ]; then
        kill -9 -- "-$pgid"
    elif [ -n "$pgid" ]; then
        kill -9 "$pid"
    fi
}

kill_backend() { kill_nginx "$WORK/backend-$1"; }

start_backends() { for p in "${BACKEND_PORTS[@]}"; do start_backend "$p"; done; }

# nginx as the proxy; with an argument, that many extra directives (such as
# `daemon off; master_process off;`) in place of `daemon on;`.
nginx_proxy_conf() {
    local dir="$WORK/nginx-proxy"
    mkdir -p "$dir"
    {
        echo "worker_processes 1; ${1:-daemon on;} pid $dir/nginx.pid; error_log $dir/error.log crit;"
        echo "events { worker_connections 4096; }"
        echo "http { access_log off; keepalive_requests 1000000;"
        echo "  upstream backends {"
        for p in "${BACKEND_PORTS[@]}"; do echo "    server 127.0.0.1:$p;"; done
        # Backend connections reused without a cap, as the Rust proxies'
        # pools do (nginx's default closes each after 1,000 requests).
        echo "    keepalive 64; keepalive_requests 1000000;"
        echo "  }"
        echo "  server { listen 127.0.0.1:$NGINX_PORT;"
        echo "    location / { proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection \"\";"
        # The forwarded headers tower-ha's HttpBackend sets.
        echo "      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;"
        echo "      proxy_set_header X-Forwarded-Proto \$scheme; proxy_set_header X-Forwarded-Host \$host; }"
        echo "  }"
        echo "}"
    } >"$dir/nginx.conf"
}

start_nginx() {
    nginx_proxy_conf
    "$NGINX" -p "$WORK/nginx-proxy" -c "$WORK/nginx-proxy/nginx.conf"
    wait_port "$NGINX_PORT"
}

start_haproxy() {
    local dir="$WORK/haproxy"
    mkdir -p "$dir"
    {
        echo "global"
        echo "  nbthread 1"
        echo "  maxconn 4096"
        echo "defaults"
        echo "  mode http"
        echo "  timeout connect 1s"
        echo "  timeout client 30s"
        echo "  timeout server 30s"
        echo "  retries 3"
        echo "  option redispatch"
        echo "  retry-on conn-failure empty-response response-timeout"
        echo "  http-reuse always"
        echo "frontend f"
        echo "  bind 127.0.0.1:$HAPROXY_PORT"
        # The forwarded headers tower-ha's HttpBackend sets.
        echo "  option forwardfor"
        echo "  http-request set-header X-Forwarded-Proto http"
        echo "  http-request set-header X-Forwarded-Host %[req.hdr(host)]"
        echo "  default_backend b"
        echo "backend b"
        echo "  balance roundrobin"
        # Health as tower-ha's reverse_proxy keeps it: a TCP connect probe
        # every 500 ms (rise 2, fall 3, both proxies' defaults) and a
        # backend taken out after 5 connection errors in a row.
        echo "  default-server check inter 500ms observe layer4 error-limit 5 on-error mark-down"
        for p in "${BACKEND_PORTS[@]}"; do echo "  server s$p 127.0.0.1:$p"; done
    } >"$dir/haproxy.cfg"
    "$HAPROXY" -D -p "$WORK/haproxy.pid" -f "$dir/haproxy.cfg"
    wait_port "$HAPROXY_PORT"
}

# The two Rust proxies' command lines.
URLS=()
for p in "${BACKEND_PORTS[@]}"; do URLS+=("http://127.0.0.1:$p"); done
TOWER_BASE=("$EXAMPLES/reverse_proxy" --listen "127.0.0.1:$TOWER_PORT" --workers 1
    --strategy round-robin)
TOWER=("${TOWER_BASE[@]}" "${URLS[@]}")
# The same without its timers (hyper's header read timeout, the failover
# layer's per-try timeout and deadline), for the instruction counts.
TOWER_UNTIMED=("${TOWER_BASE[@]}" --header-read-timeout 0 --per-try-timeout 0 --deadline 0
    "${URLS[@]}")
HYPER=("$EXAMPLES/hyper_proxy" --listen "127.0.0.1:$HYPER_PORT" "${URLS[@]}")

# Starts a command in the background: name, port, command.
start_rust() {
    local name=$1 port=$2
    shift 2
    "$@" >"$WORK/$name.log" 2>&1 &
    echo $! >"$WORK/$name.pid"
    disown
    wait_port "$port"
}

start_tower() { start_rust tower "$TOWER_PORT" "${TOWER[@]}"; }
start_hyper() { start_rust hyper "$HYPER_PORT" "${HYPER[@]}"; }

stop() {
    case $1 in
    nginx-proxy) kill_nginx "$WORK/nginx-proxy" ;;
    *) kill -9 "$(cat "$WORK/$1.pid")" && rm -f "$WORK/$1.pid" ;;
    esac
}

# Runs wrk; prints "rps p99-in-ms errors", where rps counts successful
# responses only (wrk's own figure counts a 502 as a request served).
load() {
    local port=$1 out
    out=$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$port/" 2>&1)
    local rps p99 errors non2xx socket requests
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    p99=$(awk '$1 == "99%" {v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
        print (u == "us" ? v / 1000 : (u == "s" ? v * 1000 : v))}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    # "  Socket errors: connect 1, read 12, write 3, timeout 4": the sum of
    # the counts. wrk counts none of them among its completed requests.
    socket=$(awk '/Socket errors/ {for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) s += $i; print s + 0}' <<<"$out")
    errors=$(( ${non2xx:-0} + ${socket:-0} ))
    served=$(( ${requests:-0} - ${non2xx:-0} ))
    rps=$(awk -v r="$rps" -v n="$requests" -v s="$served" 'BEGIN {print (n > 0 ? r * s / n : 0)}')
    echo "$rps $p99 $errors $served"
}

# The processes of a proxy (its name as `stop` takes it): nginx's master
# and its worker, or the one process of the others.
proxy_pids() {
    local pid
    case $1 in
    nginx-proxy) pid=$(cat "$WORK/nginx-proxy/nginx.pid") ;;
    haproxy) pid=$(cat "$WORK/haproxy.pid") ;;
    *) pid=$(cat "$WORK/$1.pid") ;;
    esac
    echo "$pid" $(pgrep -P "$pid" || true)
}

# CPU time (user and system, in clock ticks) the processes have used.
cpu_ticks() {
    local total=0 p stat fields
    for p in "$@"; do
        # The fields after the command's name, which is in parentheses.
        stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        read -r -a fields <<<"${stat##*) }"
        total=$(( total + fields[11] + fields[12] ))
    done
    echo "$total"
}
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))

# Microseconds of the proxy's CPU time per response, from two readings of
# cpu_ticks around a run that served `responses`.
cpu_per_response() { # ticks-before ticks-after responses
    awk -v a="$1" -v b="$2" -v n="$3" -v t="$TICK_US" 'BEGIN {printf "%.1f", (n > 0 ? (b - a) * t / n : 0)}'
}

# Runs a proxy (the command after name and port) under callgrind and prints
# its user-space instructions per request over a wrk run.
instructions() {
    local name=$1 port=$2 out="$WORK/callgrind.$1"
    shift 2
    valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$port" 600
    wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$port/" >/dev/null 2>&1 # warm up
    callgrind_control -z "$pid" >/dev/null 2>&1
    local requests
    requests=$(wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "http://127.0.0.1:$port/" |
        awk '/requests in/ {print $1}')
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    # Reaped: the cleanup must not signal a process that reuses its pid.
    PIDS=()
    rm -f "$WORK/nginx-proxy/nginx.pid"
    awk -v n="$requests" -v name="$name" '/^summary:/ {printf "%-10s %12d %10d\n", name, n, $2 / n}' "$out.1"
}

# Opens CONNECTIONS client connections to a port, each sending one request
# and reading its answer, then holding the connection open, idle; prints
# "held" once all are, and holds them until killed.
hold_script() {
    cat >"$WORK/hold.py" <<'PY'
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        more = s.recv(4096)
        if not more:
            sys.exit("closed before its answer")
        got += more
    head, _, body = got.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        more = s.recv(4096)
        if not more:
            sys.exit("closed in the middle of its answer")
        body += more
    if not head.startswith(b"HTTP/1.1 200"):
        sys.exit("not answered 200: %r" % head[:40])
    held.append(s)
print("held", flush=True)
time.sleep(3600)
PY
}

# Resident memory of the processes, in KiB.
rss_kib() {
    local total=0 p kib
    for p in "$@"; do
        kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
        total=$(( total + ${kib:-0} ))
    done
    echo "$total"
}

# Resident memory a proxy takes for each idle client connection: its RSS
# before and once CONNECTIONS_HELD connections have made a request each
# and stay open.
memory() { # name port starter pidname
    local name=$1 port=$2 pids before after holder
    start_backends
    $3
    wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$port/" >/dev/null 2>&1 # warm up
    sleep 1
    pids=$(proxy_pids "$4")
    # shellcheck disable=SC2086 # a list of pids
    before=$(rss_kib $pids)
    python3 "$WORK/hold.py" "$port" "$CONNECTIONS_HELD" >"$WORK/hold.out" &
    holder=$!
    PIDS+=("$holder")
    for _ in $(seq 1 600); do
        grep -q held "$WORK/hold.out" 2>/dev/null && break
        sleep 0.1
    done
    grep -q held "$WORK/hold.out" || { echo "$name: the connections were not all served" >&2; exit 1; }
    sleep 1
    # shellcheck disable=SC2086
    after=$(rss_kib $pids)
    kill "$holder"
    wait "$holder" 2>/dev/null || true
    PIDS=()
    printf '%-10s %12d %12d %14.1f\n' "$name" "$before" "$after" \
        "$(awk -v a="$before" -v b="$after" -v n="$CONNECTIONS_HELD" 'BEGIN {print (b - a) / n}')"
    stop "$4"
    for p in "${BACKEND_PORTS[@]}"; do kill_backend "$p"; done
    sleep 0.5
}

# Each proxy: its name, port, starter and the name `stop` takes.
PROXIES=("nginx $NGINX_PORT start_nginx nginx-proxy"
    "haproxy $HAPROXY_PORT start_haproxy haproxy"
    "tower-ha $TOWER_PORT start_tower tower"
    "hyper $HYPER_PORT start_hyper hyper")

if [ $MODE = memory ]; then
    # Each proxy needs a descriptor per client connection and more for its
    # backends; tower-ha caps itself at half the limit unless told.
    NEEDED=$(( 2 * CONNECTIONS_HELD + 256 ))
    [ "$(ulimit -n)" -ge "$NEEDED" ] || ulimit -n "$NEEDED" 2>/dev/null || {
        echo "--memory $CONNECTIONS_HELD needs an open-file limit of $NEEDED (ulimit -n)" >&2
        exit 1
    }
    TOWER=("${TOWER_BASE[@]}" --max-connections "$NEEDED" "${URLS[@]}")
    hold_script
    printf '%-10s %12s %12s %14s\n' proxy "RSS before" "RSS after" "KiB/connection"
    for proxy in "${PROXIES[@]}"; do
        # shellcheck disable=SC2086 # the entry is four words
        memory $proxy
    done
    exit 0
fi

if [ $MODE = instructions ]; then
    start_backends
    printf '%-10s %12s %10s\n' proxy requests "instr/req"
    nginx_proxy_conf "daemon off; master_process off;"
    instructions nginx "$NGINX_PORT" "$NGINX" -p "$WORK/nginx-proxy" -c "$WORK/nginx-proxy/nginx.conf"
    instructions tower-ha "$TOWER_PORT" "${TOWER[@]}"
    instructions untimed "$TOWER_PORT" "${TOWER_UNTIMED[@]}"
    instructions hyper "$HYPER_PORT" "${HYPER[@]}"
    exit 0
fi

RESULTS="$WORK/results"
row() { # round proxy scenario rps p99 errors cpu
    printf '%-6s %-10s %-16s %12s %10s %14s %12s\n' "$1" "$2" "$3" "$4" "$5 ms" "$6" "$7 us"
    echo "$2|$3|$4|$5|$6|$7" >>"$RESULTS"
}

printf '%-6s %-10s %-16s %12s %10s %14s %12s\n' round proxy scenario "req/s" p99 "client errors" "CPU/resp"
run() {
    local round=$1 name=$2 port=$3 starter=$4 pidname=$5
    start_backends
    $starter
    wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$port/" >/dev/null 2>&1 # warm up
    local pids before
    pids=$(proxy_pids "$pidname")
    # shellcheck disable=SC2086 # a list of pids
    before=$(cpu_ticks $pids)
    read -r rps p99 errors responses <<<"$(load "$port")"
    # shellcheck disable=SC2086
    row "$round" "$name" steady "$rps" "$p99" "$errors" \
        "$(cpu_per_response "$before" "$(cpu_ticks $pids)" "$responses")"
    # One backend killed a third of the way into the run.
    ( sleep "$(awk "BEGIN {print $DURATION / 3}")"; kill_backend "${BACKEND_PORTS[1]}" ) &
    local killer=$!
    # shellcheck disable=SC2086
    before=$(cpu_ticks $pids)
    read -r rps p99 errors responses <<<"$(load "$port")"
    wait "$killer"
    if (exec 3<>"/dev/tcp/127.0.0.1/${BACKEND_PORTS[1]}") 2>/dev/null; then
        echo "the killed backend still accepts connections" >&2
        exit 1
    fi
    # shellcheck disable=SC2086
    row "$round" "$name" "backend killed" "$rps" "$p99" "$errors" \
        "$(cpu_per_response "$before" "$(cpu_ticks $pids)" "$responses")"
    stop "$pidname"
    for p in "${BACKEND_PORTS[0]}" "${BACKEND_PORTS[2]}"; do kill_backend "$p"; done
    sleep 0.5
}

for round in $(seq 1 "$ROUNDS"); do
    for i in 0 1 2 3; do
        # shellcheck disable=SC2086 # the entry is four words
        run "$round" ${PROXIES[$(( (i + round - 1) % 4 ))]}
    done
done

echo
echo "median of $ROUNDS round(s); ratios against nginx's median"
printf '%-10s %-16s %12s %8s %10s %14s %12s %8s\n' proxy scenario "req/s" "ratio" p99 "errors (sum)" "CPU/resp" "ratio"
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'; }
for scenario in steady "backend killed"; do
    base=$(awk -F'|' -v s="$scenario" '$1 == "nginx" && $2 == s {print $3}' "$RESULTS" | median)
    base_cpu=$(awk -F'|' -v s="$scenario" '$1 == "nginx" && $2 == s {print $6}' "$RESULTS" | median)
    for name in nginx haproxy tower-ha hyper; do
        pick() { awk -F'|' -v n="$name" -v s="$scenario" -v c="$1" '$1 == n && $2 == s {print $c}' "$RESULTS"; }
        rps=$(pick 3 | median)
        p99=$(pick 4 | median)
        errors=$(pick 5 | awk '{t += $1} END {print t}')
        cpu=$(pick 6 | median)
        printf '%-10s %-16s %12.0f %7.2fx %7.2f ms %14s %9.1f us %7.2fx\n' "$name" "$scenario" "$rps" \
            "$(awk -v a="$rps" -v b="$base" 'BEGIN {print a / b}')" "$p99" "$errors" \
            "$cpu" "$(awk -v a="$cpu" -v b="$base_cpu" 'BEGIN {print (b > 0 ? a / b : 0)}')"
    done
done
