#!/usr/bin/env bash
# Where a copy's time goes: `perf record -a -g` (cpu-clock, so it works without hardware counters,
# e.g. in a VM) of one `fleetrun cp` of SIZE bytes up to one local agent, then of one back down.
#   usage: bench/cp-profile.sh [SIZE_BYTES] [OUT_PREFIX]   (default 1 GiB, /tmp/cp; needs perf)
# Then: perf report -i OUT_PREFIX-up.data --no-children --sort dso,sym --comm tokio-rt-worker,fleetrun,fleetrun-agent
size=${1:-1073741824}
out=${2:-/tmp/cp}
source "$(dirname "$0")/lib.sh"
start_agents 1
node=$("$bin/fleetrun" nodes -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["node_id"])')
head -c "$size" /dev/urandom >"$work/src.bin"
sync
rec() { perf record -a -g -F 999 -e cpu-clock -o "$1" -- "${@:2}" >/dev/null 2>>"$work/perf.log"; }
t0=$(date +%s%N)
rec "$out-up.data" "$bin/fleetrun" cp "$work/src.bin" "$node:$work/up.bin"
t1=$(date +%s%N)
mkdir -p "$work/down"
rec "$out-down.data" "$bin/fleetrun" cp "$node:$work/up.bin" "$work/down/down.bin"
t2=$(date +%s%N)
cmp -s "$work/src.bin" "$work/down/down.bin" || { echo "down: the file differs" >&2; exit 1; }
echo "up $(ms "$t0" "$t1") ms, down $(ms "$t1" "$t2") ms (under perf); profiles in $out-up.data, $out-down.data"
