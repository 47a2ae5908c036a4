#!/usr/bin/env bash
# Port-forward throughput: one server (TLS), one agent, one `fleetrun port-forward` to a TCP server
# on the node's side (socat). Moves SIZE bytes from the node to the client (download), then SIZE
# bytes from the client to the node (upload), each over one TCP connection, and reports MB/s and
# the peak RSS growth of the server and the agent. Needs socat.
#   usage: bench/forward.sh [SIZE_BYTES]        (default 1 GiB; `--profile dist` build)
size=${1:-1073741824}
source "$(dirname "$0")/lib.sh"
command -v socat >/dev/null || { echo "bench/forward.sh needs socat" >&2; exit 1; }
start_agents 1
agent_pid=${pids[1]}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
node_port=$(free_port)
"$bin/fleetrun" port-forward bench-1 "0:$node_port" -o json >"$work/forward.json" 2>"$work/forward.log" &
fwd_pid=$!; pids+=("$fwd_pid")
for _ in $(seq 100); do [ -s "$work/forward.json" ] && break; sleep 0.1; done
local_port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bound"].rsplit(":",1)[1])' "$work/forward.json")
s0=$(rss "$server_pid"); a0=$(rss "$agent_pid")

# mbps START_NS END_NS: MB/s of $size bytes.
mbps() { python3 -c "import sys; s=(int(sys.argv[2])-int(sys.argv[1]))/1e9; print(f'{s:.2f} s, {$size/s/1e6:.0f} MB/s')" "$1" "$2"; }

# Download: the node's side sends, the client counts.
head -c "$size" /dev/zero | socat -u - "TCP-LISTEN:$node_port,bind=127.0.0.1,reuseaddr" &
sender=$!
for _ in $(seq 100); do ss -ltn | grep -q ":$node_port " && break; sleep 0.05; done
t0=$(date +%s%N)
got=$(socat -u "TCP:127.0.0.1:$local_port" - | wc -c)
t1=$(date +%s%N)
wait "$sender" || true
echo "download of $got bytes: $(mbps "$t0" "$t1")"
[ "$got" -eq "$size" ] || { echo "download length mismatch: $got" >&2; exit 1; }

# Upload: the client sends, the node's side counts.
socat -u "TCP-LISTEN:$node_port,bind=127.0.0.1,reuseaddr" - | wc -c >"$work/upload.count" &
receiver=$!
for _ in $(seq 100); do ss -ltn | grep -q ":$node_port " && break; sleep 0.05; done
t0=$(date +%s%N)
head -c "$size" /dev/zero | socat -u - "TCP:127.0.0.1:$local_port"
wait "$receiver"
t1=$(date +%s%N)
got=$(cat "$work/upload.count")
echo "upload of $got bytes: $(mbps "$t0" "$t1")"
[ "$got" -eq "$size" ] || { echo "upload length mismatch: $got" >&2; exit 1; }

echo "server RSS: start ${s0} KiB, peak $(hwm "$server_pid") KiB; agent RSS: start ${a0} KiB, peak $(hwm "$agent_pid") KiB"
kill -INT "$fwd_pid"; wait "$fwd_pid" || true
