#!/usr/bin/env bash
# Sessions over TLS, one server and one agent on loopback (`--profile dist` build):
# - `fleetrun shell NODE -c true` wall time, CLI start included (RUNS runs, median and min);
# - `-c` stdin throughput: MB of zeros piped into `cat >/dev/null` on the node, with the peak RSS of
#   the server and the agent;
# - keystroke-to-echo latency in an interactive shell on a real PTY (bench/pty_driver.py);
# - SHELLS interactive shells open at once on the node: the server's RSS per session.
#   usage: bench/sessions.sh [RUNS] [MB] [KEYS] [SHELLS]      (defaults 20, 1024, 1000, 100)
runs=${1:-20}; mb=${2:-1024}; keys=${3:-1000}; shells=${4:-100}
source "$(dirname "$0")/lib.sh"
# One node serves all the shells at once: raise its stream cap past the default 32.
AGENT_ARGS="--max-streams $((shells + 8))" start_agents 1
node=bench-1
agent_pid=$(pgrep -f -- "--name bench-1" | head -1)

times=()
for _ in $(seq "$runs"); do
  t0=$(date +%s%N); "$bin/fleetrun" shell "$node" -c true; t1=$(date +%s%N)
  times+=("$(ms "$t0" "$t1")")
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "shell -c true, %d runs: median %.1f ms, min %.1f ms, max %.1f ms\n", NR, a[int((NR+1)/2)], a[1], a[NR]}'

s0=$(rss "$server_pid"); a0=$(rss "$agent_pid")
t0=$(date +%s%N)
head -c "${mb}M" /dev/zero | "$bin/fleetrun" shell "$node" -c 'cat >/dev/null'
t1=$(date +%s%N)
python3 -c 'import sys; mb, ns = int(sys.argv[1]), int(sys.argv[2]); print(f"stdin {mb} MiB: {ns/1e9:.2f} s = {mb*1.048576/(ns/1e9):.0f} MB/s")' "$mb" "$((t1 - t0))"
echo "server RSS $((s0 / 1024)) -> peak $(( $(hwm "$server_pid") / 1024 )) MB; agent RSS $((a0 / 1024)) -> peak $(( $(hwm "$agent_pid") / 1024 )) MB"

python3 bench/pty_driver.py keystrokes "$bin/fleetrun" "$node" "$keys"
python3 bench/pty_driver.py shells "$bin/fleetrun" "$node" "$shells" "$server_pid"
