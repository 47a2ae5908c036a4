#!/usr/bin/env bash
# Reconnect-storm benchmark: N agents connected, the server is killed (-9) and started again on the
# same data dir and port; reports how long until every agent is Online again, how many handshakes
# were shed with 503, and the server's RSS.
#   usage: bench/storm.sh [N_AGENTS] [MAX_HANDSHAKES]
n=${1:-1000}
max_handshakes=${2:-128}
SERVER_ARGS="--max-handshakes $max_handshakes"
source "$(dirname "$0")/lib.sh"
start_agents "$n"
kill -9 "$server_pid"; wait "$server_pid" 2>/dev/null || true
t0=$(date +%s%N)
RUST_LOG=warn,fleetrun_server::fleet::channel=debug "$bin/fleetrun" server --data-dir "$work/server" --listen "127.0.0.1:$port" $SERVER_ARGS >"$work/server2.log" 2>&1 &
server_pid=$!; pids[0]=$server_pid
online=0
for _ in $(seq 1200); do
  online=$("$bin/fleetrun" nodes -o json 2>/dev/null | python3 -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin) if n["ping_status"]=="Online"))' 2>/dev/null || echo 0)
  [ "$online" -ge "$n" ] && break; sleep 0.1
done
t1=$(date +%s%N)
shed=$(cat "$work"/agent-*.log | grep -ci "503\|retry-after" || true)
echo "after a server restart: $online / $n agents Online again in $(ms "$t0" "$t1") ms; $shed agent log lines about 503/Retry-After; server RSS $(rss "$server_pid") KiB, still running: $(kill -0 "$server_pid" 2>/dev/null && echo yes || echo no)"
