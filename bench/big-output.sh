#!/usr/bin/env bash
# Large-output benchmark: one server, one agent; a command writes SIZE bytes to stdout. Reports the
# throughput (send to Success) and the peak RSS growth of the server and the agent, then reads the
# output back through the API and checks its length.
#   usage: bench/big-output.sh [SIZE_BYTES]        (default 1 GiB; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-1073741824}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fleetrun-target}"
cargo build --release --quiet --bin fleetrun --bin fleetrun-agent
bin="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export FLEETRUN_SERVER="http://127.0.0.1:$port" FLEETRUN_CONFIG="$work/cli.toml"
RUST_LOG=warn "$bin/fleetrun" server --data-dir "$work/server" --listen "127.0.0.1:$port" >"$work/server.log" 2>&1 &
server_pid=$!; pids+=("$server_pid")
for _ in $(seq 100); do [ -s "$work/server/admin.token" ] && curl -sf "$FLEETRUN_SERVER/v1/health" >/dev/null && break; sleep 0.1; done
export FLEETRUN_TOKEN=$(cat "$work/server/admin.token")
code=$("$bin/fleetrun" activation create -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["code"])')
RUST_LOG=warn "$bin/fleetrun-agent" --server "$FLEETRUN_SERVER" --state-dir "$work/agent" --activation-code "$code" --name big >"$work/agent.log" 2>&1 &
agent_pid=$!; pids+=("$agent_pid")
for _ in $(seq 100); do "$bin/fleetrun" nodes -o json | grep -q '"Online"' && break; sleep 0.1; done

hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
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
