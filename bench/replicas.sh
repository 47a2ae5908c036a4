#!/usr/bin/env bash
# Replicas benchmark: three `fleetrun server` replicas on one PostgreSQL database with a
# nats-server between them, N real agents spread over the three; then one server on its own
# with as many agents, in the same run, for comparison.
#   1. `send --wait -- echo hello` to all agents, sent to replica A (ROUNDS times);
#   2. takeover: a fan-out to the agents of B and C sent to A, A killed (-9) once it has
#      started: time from the kill to a replica taking the command over, and to its end;
#   3. the same fan-out as 1 on one server (SQLite, the default) with N agents.
# Plain HTTP between the processes (every replica would otherwise need the same certificate).
#   usage: bench/replicas.sh [N_AGENTS] [ROUNDS]
# Needs nats-server (apt-get install nats-server) and a PostgreSQL reachable at PG_URL
# (default postgres://postgres@127.0.0.1:5432, trust auth); BENCH_BIN / BENCH_PROFILE as lib.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000}
rounds=${2:-3}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fleetrun-target}"
if [ -z "${BENCH_BIN:-}" ]; then
  cargo build --profile ${BENCH_PROFILE:-dist} --quiet --bin fleetrun --bin fleetrun-agent
fi
bin="${BENCH_BIN:-$CARGO_TARGET_DIR/${BENCH_PROFILE:-dist}}"
pg=${PG_URL:-postgres://postgres@127.0.0.1:5432}
nats_bin=$(command -v nats-server || echo /usr/sbin/nats-server)
[ -x "$nats_bin" ] || { echo "needs nats-server: apt-get install nats-server" >&2; exit 1; }
db="fleetrun_bench_replicas_$$"
psql "$pg/postgres" -qc "CREATE DATABASE $db" >/dev/null
work=$(mktemp -d)
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true
  psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
export FLEETRUN_NO_IMDS=true FLEETRUN_CONFIG="$work/cli.toml"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ms() { python3 -c 'import sys; print(f"{(int(sys.argv[2])-int(sys.argv[1]))/1e6:.1f}")' "$1" "$2"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
now() { date +%s%N; }

nats_port=$(free_port)
"$nats_bin" -a 127.0.0.1 -p "$nats_port" >"$work/nats.log" 2>&1 &
pids+=("$!")

declare -A url pid
# serve NAME [ARGS...]: a server on a free port; waits for /v1/health.
serve() {
  local name=$1 port; shift
  port=$(free_port)
  RUST_LOG=info "$bin/fleetrun" server --insecure-http --data-dir "$work/$name" \
    --listen "127.0.0.1:$port" "$@" >"$work/$name.log" 2>&1 &
  pid[$name]=$!; pids+=("$!"); url[$name]="http://127.0.0.1:$port"
  for _ in $(seq 200); do curl -sf "${url[$name]}/v1/health" >/dev/null && return; sleep 0.05; done
  echo "server $name did not start:" >&2; tail "$work/$name.log" >&2; exit 1
}

# agents FROM TO CODE SERVER TAG: agents bench-FROM..TO on SERVER, tagged rep=TAG.
agents() {
  for i in $(seq "$1" "$2"); do
    RUST_LOG=warn nice -n "${AGENT_NICE:-0}" "$bin/fleetrun-agent" --server "$4" --insecure-http \
      --state-dir "$work/agents/$i" --activation-code "$3" --name "bench-$i" --tag "rep=$5" \
      >"$work/agent-$i.log" 2>&1 &
    pids+=("$!")
  done
}

wait_online() {  # N
  local online=0
  for _ in $(seq 1200); do
    online=$("$bin/fleetrun" nodes -o json | python3 -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin) if n["ping_status"]=="Online"))')
    [ "$online" -ge "$1" ] && break; sleep 0.1
  done
  echo "agents online: $online / $1"
}

fanout() {  # LABEL: ROUNDS of send --wait echo to all, through FLEETRUN_SERVER
  local times=()
  for _ in $(seq "$rounds"); do
    local t0 t1
    t0=$(now)
    "$bin/fleetrun" send --wait --targets all --max-concurrency 100% -- echo hello >/dev/null 2>>"$work/sends.log"
    t1=$(now)
    times+=("$(ms "$t0" "$t1")")
  done
  printf '%s\n' "${times[@]}" | python3 -c "
import sys; v=sorted(float(x) for x in sys.stdin)
print(f'$1: median {v[len(v)//2]:.1f} ms, min {v[0]:.1f} ms, max {v[-1]:.1f} ms over {len(v)} runs')"
}

# --- three replicas
shared=(--database "$pg/$db" --nats-url "nats://127.0.0.1:$nats_port" --replica-lease "${LEASE:-6s}")
serve a "${shared[@]}"
export FLEETRUN_SERVER=${url[a]} FLEETRUN_TOKEN
FLEETRUN_TOKEN=$(cat "$work/a/admin.token")
serve b "${shared[@]}"
serve c "${shared[@]}"
code=$("$bin/fleetrun" activation create --limit "$n" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["code"])')
third=$((n / 3))
agents 1 "$third" "$code" "${url[a]}" a
agents $((third + 1)) $((2 * third)) "$code" "${url[b]}" b
agents $((2 * third + 1)) "$n" "$code" "${url[c]}" c
wait_online "$n"
echo "idle: RSS A $(rss "${pid[a]}") KiB, B $(rss "${pid[b]}") KiB, C $(rss "${pid[c]}") KiB"
fanout "3 replicas, send --wait echo to $n agents (a third on each), sent to A"

# Takeover: the agents of B and C run a short sleep, one at a time per slot.
id=$("$bin/fleetrun" send --targets tag:rep=b,c --max-concurrency 10% -- sleep 0.2)
for _ in $(seq 200); do
  started=$("$bin/fleetrun" command "$id" -o json 2>/dev/null | python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["completed_count"])' 2>/dev/null || echo 0)
  [ "$started" -ge 1 ] && break; sleep 0.05
done
kill -9 "${pid[a]}"; t_kill=$(now)
export FLEETRUN_SERVER=${url[b]}
t_take=""
for _ in $(seq 4000); do
  if grep -q "taking over dispatch" "$work/b.log" "$work/c.log"; then t_take=$(now); break; fi
  sleep 0.005
done
[ -n "$t_take" ] || { echo "no replica took the command over" >&2; exit 1; }
for _ in $(seq 1200); do
  st=$("$bin/fleetrun" command "$id" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  case $st in Success|Failed|TimedOut|Cancelled) break ;; esac; sleep 0.05
done
t_end=$(now)
summary=$("$bin/fleetrun" command "$id" -o json | python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["status"], c["completed_count"], "of", c["target_count"], "errors", c["error_count"])')
echo "takeover after kill -9 of the owner (lease ${LEASE:-6s}): taken over after $(ms "$t_kill" "$t_take") ms, ended after $(ms "$t_kill" "$t_end") ms: $summary"

# --- one server on its own, as many agents
kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=()
rm -rf "$work/agents"
serve one
export FLEETRUN_SERVER=${url[one]}
FLEETRUN_TOKEN=$(cat "$work/one/admin.token")
code=$("$bin/fleetrun" activation create --limit "$n" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["code"])')
agents 1 "$n" "$code" "${url[one]}" one
wait_online "$n"
echo "idle: RSS one server $(rss "${pid[one]}") KiB"
fanout "1 server (SQLite), send --wait echo to $n agents"
