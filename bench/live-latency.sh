#!/usr/bin/env bash
# Live-output latency: one server, one agent; a command prints a nanosecond timestamp every 10 ms
# (N lines), a follower (`fleetrun output --follow`, started before the first line) stamps each
# line as it arrives. Latency = arrival - printed time (one clock: everything runs on this machine).
#   usage: bench/live-latency.sh [LINES]        (default 500; `--profile dist` build)
lines=${1:-500}
source "$(dirname "$0")/lib.sh"
start_agents 1
node=$("$bin/fleetrun" nodes -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["node_id"])')
# The script waits for a go file, so the follower is attached before the first line.
go="$work/go"
id=$("$bin/fleetrun" send --node "$node" -o json -- \
  "while [ ! -e $go ]; do sleep 0.01; done; for i in \$(seq $lines); do date +%s%N; sleep 0.01; done" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["command_id"])')
"$bin/fleetrun" output "$id" "$node" --follow | python3 -c '
import sys, time
lat = []
for line in sys.stdin.buffer:
    now = time.time_ns()
    try:
        lat.append((now - int(line)) / 1e6)
    except ValueError:
        pass
lat.sort()
pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
print(f"live output, {len(lat)} lines: p50 {pick(0.5):.2f} ms, p99 {pick(0.99):.2f} ms, max {lat[-1]:.2f} ms")
' &
follower=$!
sleep 0.5  # lets the follower attach, so no line is read back from storage (which would inflate it)
touch "$go"
wait "$follower"
