#!/usr/bin/env bash
# Fan-out benchmark: one server and N real agents on loopback; times `fleetrun send --wait` of `echo`
# to one node and to all nodes, and reports RSS of the server and an agent.
#   usage: bench/fanout.sh [N_AGENTS] [ROUNDS]      (`--profile dist` build; writes nothing but a temp dir)
n=${1:-20}
rounds=${2:-10}
source "$(dirname "$0")/lib.sh"
start_agents "$n"
echo "idle with $n agents: server RSS $(rss "$server_pid") KiB, one agent RSS $(rss "${pids[1]}") KiB"
one=$("$bin/fleetrun" nodes -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["node_id"])')

run() {  # label, args...
  local label=$1; shift
  local times=()
  for _ in $(seq "$rounds"); do
    local t0 t1
    t0=$(date +%s%N)
    "$bin/fleetrun" send --wait "$@" -- echo hello >/dev/null 2>&1
    t1=$(date +%s%N)
    times+=("$(ms "$t0" "$t1")")
  done
  printf '%s\n' "${times[@]}" | python3 -c "
import sys; v=sorted(float(x) for x in sys.stdin)
print(f'$label: median {v[len(v)//2]:.1f} ms, min {v[0]:.1f} ms, max {v[-1]:.1f} ms over {len(v)} runs')"
}
run "send --wait echo, 1 node" --node "$one"
run "send --wait echo, $n nodes" --targets all --max-concurrency 100%
echo "after the fan-outs: server RSS $(rss "$server_pid") KiB, peak $(hwm "$server_pid") KiB; one agent RSS $(rss "${pids[1]}") KiB"
