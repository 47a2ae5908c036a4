# Shared set-up of the benchmark scripts (sourced): the shipped build (`--profile dist`, or BENCH_PROFILE), a temp dir cleaned on exit, a
# server on a free loopback port with the CLI pointed at it, and helpers to start agents and read RSS.
# The server serves TLS with its own CA; the CLI, curl and the agents trust its ca.pem
# (FLEETRUN_CA_CERT is read by both the CLI and the agent).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fleetrun-target}"
# AGENT_NICE: the agents' nice value (e.g. 19 to give the server the CPU first, as if the nodes were other
# machines; the default 0 has them compete with the server for this machine's cores).
# BENCH_BIN: a directory holding already built fleetrun and fleetrun-agent (e.g. an older build to compare).
if [ -z "${BENCH_BIN:-}" ]; then
  cargo build --profile ${BENCH_PROFILE:-dist} --quiet --bin fleetrun --bin fleetrun-agent
fi
bin="${BENCH_BIN:-$CARGO_TARGET_DIR/${BENCH_PROFILE:-dist}}"
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# No agent asks EC2's instance metadata service at registration (this machine may answer on its
# address, and a bench node is no EC2 instance); the variable, not --no-imds, so an older BENCH_BIN ignores it.
export FLEETRUN_NO_IMDS=true
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export FLEETRUN_SERVER="https://127.0.0.1:$port" FLEETRUN_CONFIG="$work/cli.toml" FLEETRUN_CA_CERT="$work/server/ca.pem"
RUST_LOG=warn "$bin/fleetrun" server --data-dir "$work/server" --listen "127.0.0.1:$port" ${SERVER_ARGS:-} >"$work/server.log" 2>&1 &
server_pid=$!; pids+=("$server_pid")
for _ in $(seq 100); do [ -s "$work/server/admin.token" ] && curl -sf --cacert "$FLEETRUN_CA_CERT" "$FLEETRUN_SERVER/v1/health" >/dev/null && break; sleep 0.1; done
FLEETRUN_TOKEN=$(cat "$work/server/admin.token"); export FLEETRUN_TOKEN

# start_agents N: enrols N agents named bench-1..N and waits until all are Online (AGENT_ARGS: more
# arguments for each agent).
start_agents() {
  local n=$1 code online=0
  code=$("$bin/fleetrun" activation create --limit "$n" -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["code"])')
  for i in $(seq "$n"); do
    RUST_LOG=warn nice -n "${AGENT_NICE:-0}" "$bin/fleetrun-agent" --server "$FLEETRUN_SERVER" --state-dir "$work/agents/$i" \
      --activation-code "$code" --name "bench-$i" --tag bench=yes ${AGENT_ARGS:-} >"$work/agent-$i.log" 2>&1 &
    pids+=("$!")
  done
  for _ in $(seq 1200); do
    online=$("$bin/fleetrun" nodes -o json | python3 -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin) if n["ping_status"]=="Online"))')
    [ "$online" -ge "$n" ] && break; sleep 0.1
  done
  echo "agents online: $online / $n"
}

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
ms() { python3 -c 'import sys; print(f"{(int(sys.argv[2])-int(sys.argv[1]))/1e6:.1f}")' "$1" "$2"; }
