#!/usr/bin/env bash
# File copy benchmark: `fleetrun cp` of SIZE bytes to one node and back from it (checksums compared),
# then to and from N nodes at once (aggregate MB/s); reports the peak RSS growth of the server and of one agent.
#   usage: bench/cp.sh [SIZE_BYTES] [NODES]      (default 1 GiB and 20; `--profile dist` build,
#                                                  BENCH_PROFILE=release for a quicker build)
size=${1:-1073741824}
nodes=${2:-20}
source "$(dirname "$0")/lib.sh"
start_agents "$nodes"
agent_pid=${pids[1]}
node=$("$bin/fleetrun" nodes -o json | python3 -c 'import json,sys; print(sorted(n["node_id"] for n in json.load(sys.stdin))[0])')
# The agents all run here, so the file lands on this disk: the one node's target is its own.
head -c "$size" /dev/urandom >"$work/src.bin"
sum=$(sha256sum "$work/src.bin" | cut -d' ' -f1)
s0=$(rss "$server_pid"); a0=$(rss "$agent_pid")
mbps() { python3 -c "import sys; b,t0,t1=map(int,sys.argv[1:]); print(f'{(t1-t0)/1e9:.2f} s, {b/((t1-t0)/1e9)/1e6:.0f} MB/s')" "$@"; }

t0=$(date +%s%N)
"$bin/fleetrun" cp "$work/src.bin" "$node:$work/up.bin" >/dev/null
t1=$(date +%s%N)
echo "cp up $size bytes to one node: $(mbps "$size" "$t0" "$t1")"
[ "$(sha256sum "$work/up.bin" | cut -d' ' -f1)" = "$sum" ] || { echo "up: checksum mismatch" >&2; exit 1; }

mkdir -p "$work/down"
t0=$(date +%s%N)
"$bin/fleetrun" cp "$node:$work/up.bin" "$work/down/down.bin" >/dev/null
t1=$(date +%s%N)
echo "cp down $size bytes from one node: $(mbps "$size" "$t0" "$t1")"
[ "$(sha256sum "$work/down/down.bin" | cut -d' ' -f1)" = "$sum" ] || { echo "down: checksum mismatch" >&2; exit 1; }
rm -f "$work/up.bin" "$work/down/down.bin"

# N nodes at once: one `cp` per node in parallel, SIZE/N bytes each, each to a path of its own (the
# agents share this machine's disk; a target expression would give them all one path).
per=$((size / nodes))
head -c "$per" "$work/src.bin" >"$work/part.bin"
mapfile -t ids < <("$bin/fleetrun" nodes -o json | python3 -c 'import json,sys; [print(n["node_id"]) for n in json.load(sys.stdin)]')
# Only the copies are waited on: `jobs -p` would also name the server and the agents (lib.sh starts
# them in the background), so waiting on all jobs never ended and nothing was printed.
wait_cps() { local rc=0 p; for p in "$@"; do wait "$p" || rc=1; done; return $rc; }
cps=()
t0=$(date +%s%N)
for id in "${ids[@]}"; do
  "$bin/fleetrun" cp "$work/part.bin" "$id:$work/many-$id.bin" >/dev/null &
  cps+=("$!")
done
wait_cps "${cps[@]}" || { echo "a copy up to one of ${#ids[@]} nodes failed" >&2; exit 1; }
t1=$(date +%s%N)
echo "cp up to ${#ids[@]} nodes at once, $per bytes each: $(mbps "$((per * ${#ids[@]}))" "$t0" "$t1") aggregate"
psum=$(sha256sum "$work/part.bin" | cut -d' ' -f1)
for id in "${ids[@]}"; do
  [ "$(sha256sum "$work/many-$id.bin" | cut -d' ' -f1)" = "$psum" ] || { echo "up to $id: checksum mismatch" >&2; exit 1; }
done

# And back from each at once, into a directory per node.
cps=()
t0=$(date +%s%N)
for id in "${ids[@]}"; do
  mkdir -p "$work/back/$id"
  "$bin/fleetrun" cp "$id:$work/many-$id.bin" "$work/back/$id/" >/dev/null &
  cps+=("$!")
done
wait_cps "${cps[@]}" || { echo "a copy from one of ${#ids[@]} nodes failed" >&2; exit 1; }
t1=$(date +%s%N)
echo "cp down from ${#ids[@]} nodes at once, $per bytes each: $(mbps "$((per * ${#ids[@]}))" "$t0" "$t1") aggregate"
for id in "${ids[@]}"; do
  [ "$(sha256sum "$work/back/$id/many-$id.bin" | cut -d' ' -f1)" = "$psum" ] || { echo "down from $id: checksum mismatch" >&2; exit 1; }
done
echo "server RSS: start ${s0} KiB, peak $(hwm "$server_pid") KiB; agent RSS: start ${a0} KiB, peak $(hwm "$agent_pid") KiB"
