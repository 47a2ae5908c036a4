#!/usr/bin/env bash
# Fan-out benchmark: one server and N real agents on loopback; times `fleetrun send --wait` of `echo`
# to one node and to all nodes, and reports RSS of the server and an agent.
#   usage: bench/fanout.sh [N_AGENTS] [ROUNDS]      (release build; writes nothing but a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20}
rounds=${2:-10}
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
code=$("$bin/fleetrun" activation create --limit "$n" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["code"])')
for i in $(seq "$n"); do
  RUST_LOG=warn "$bin/fleetrun-agent" --server "$FLEETRUN_SERVER" --state-dir "$work/agents/$i" \
    --activation-code "$code" --name "bench-$i" --tag bench=yes >"$work/agent-$i.log" 2>&1 &
  pids+=("$!")
done
for _ in $(seq 600); do
  online=$("$bin/fleetrun" nodes -o json | python3 -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin) if n["ping_status"]=="Online"))')
  [ "$online" -ge "$n" ] && break; sleep 0.1
done
echo "agents online: $online / $n"
one=$("$bin/fleetrun" nodes -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["node_id"])')

ms() { python3 -c 'import sys; print(f"{(int(sys.argv[2])-int(sys.argv[1]))/1e6:.1f}")' "$1" "$2"; }
run() {  # label, args...
  local label=$1; shift
  local times=()
  for _ in $(seq "$rounds"); do
    local t0=$(date +%s%N)
    "$bin/fleetrun" send --wait "$@" -- echo hello >/dev/null
    local t1=$(date +%s%N)
    times+=("$(ms "$t0" "$t1")")
  done
  printf '%s\n' "${times[@]}" | sort -n | python3 -c "
import sys; v=[float(x) for x in sys.stdin]; v.sort()
print(f'$label: median {v[len(v)//2]:.1f} ms, min {v[0]:.1f} ms, max {v[-1]:.1f} ms over {len(v)} runs')"
}
run "send --wait echo, 1 node" --node "$one"
run "send --wait echo, $n nodes" --targets all --max-concurrency 100%
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
echo "server RSS: $(rss "$server_pid") KiB; one agent RSS: $(rss "${pids[1]}") KiB"
