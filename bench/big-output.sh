#!/usr/bin/env bash
# Large-output benchmark: one server, one agent; a command writes SIZE bytes to stdout. Reports the
# throughput (send to Success) and the peak RSS growth of the server and the agent, then reads the
# output back through the API and checks its length.
#   usage: bench/big-output.sh [SIZE_BYTES]        (default 1 GiB; `--profile dist` build)
size=${1:-1073741824}
source "$(dirname "$0")/lib.sh"
start_agents 1
agent_pid=${pids[1]}
s0=$(rss "$server_pid"); a0=$(rss "$agent_pid")
t0=$(date +%s%N)
id=$("$bin/fleetrun" send --targets all --wait -o json -- "yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c $size" | python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["command_id"]); assert c["status"]=="Success", c["status"]')
t1=$(date +%s%N)
secs=$(python3 -c "print(($t1-$t0)/1e9)")
echo "output of $size bytes: $(python3 -c "print(f'{$secs:.2f} s, {$size/$secs/1e6:.0f} MB/s')")"
echo "server RSS: start ${s0} KiB, peak $(hwm "$server_pid") KiB; agent RSS: start ${a0} KiB, peak $(hwm "$agent_pid") KiB"
node=$("$bin/fleetrun" nodes -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["node_id"])')
t0=$(date +%s%N)
got=$("$bin/fleetrun" output "$id" "$node" | wc -c)
t1=$(date +%s%N)
echo "read back $got bytes in $(python3 -c "print(f'{($t1-$t0)/1e9:.2f} s')"); server peak RSS now $(hwm "$server_pid") KiB"
[ "$got" -eq "$size" ] || { echo "length mismatch" >&2; exit 1; }
