#!/usr/bin/env bash
# History over a million invocations on PostgreSQL (issue 14): one server on a database of a
# PostgreSQL server (PG_ADMIN: psql connection flags, default `-h 127.0.0.1 -U postgres`; the database
# fleetrun_history is dropped and made again), one real send to one real agent, then that command,
# its invocation and its node copied into COMMANDS commands of NODES invocations each (SQL
# generate_series); then times, ROUNDS each, with curl: the first page of history
# (GET /v1/commands?limit=50), a page deep in it (?before=), and one command's NODES invocations.
#   usage: bench/pg-history.sh [COMMANDS] [NODES] [ROUNDS]   (default 1000 1000 20: 1M invocations)
commands=${1:-1000}
nodes=${2:-1000}
rounds=${3:-20}
admin=${PG_ADMIN:--h 127.0.0.1 -U postgres}
db=fleetrun_history
host_port=$(psql $admin -d postgres -At -c "SELECT inet_server_addr() || ':' || inet_server_port()")
user=$(psql $admin -d postgres -At -c "SELECT current_user")
psql $admin -d postgres -q -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" 2>/dev/null
SERVER_ARGS="--database postgres://$user@${host_port%/*}/$db"
export SERVER_ARGS
source "$(dirname "$0")/lib.sh"
start_agents 1
"$bin/fleetrun" send --wait --targets all -- echo hello >/dev/null
sql() { psql $admin -d "$db" -q -At -v ON_ERROR_STOP=1 -c "$1"; }
t0=$(date +%s%N)
sql "CREATE TEMP TABLE fake_nodes AS
       SELECT format('mi-%s', lpad(to_hex(g), 17, '0')) AS node_id, 'h-' || g AS name, g AS seq
       FROM generate_series(1, $nodes) g;
     INSERT INTO nodes SELECT (jsonb_populate_record(NULL::nodes, to_jsonb(n)
         || jsonb_build_object('node_id', f.node_id, 'name', f.name))).*
       FROM nodes n, fake_nodes f WHERE n.name = 'bench-1';
     CREATE TEMP TABLE fake_commands AS
       SELECT md5(g::text)::uuid::text AS command_id, g FROM generate_series(1, $commands) g;
     INSERT INTO commands SELECT (jsonb_populate_record(NULL::commands, to_jsonb(c)
         || jsonb_build_object('command_id', f.command_id, 'requested_at', c.requested_at - f.g * 1000,
                               'target_count', $nodes, 'completed_count', $nodes,
                               'idempotency_key', NULL, 'idempotency_principal', NULL,
                               'idempotency_hash', NULL))).*
       FROM commands c, fake_commands f;
     INSERT INTO invocations SELECT (jsonb_populate_record(NULL::invocations, to_jsonb(i)
         || jsonb_build_object('command_id', c.command_id, 'node_id', n.node_id, 'node_name', n.name,
                               'seq', n.seq))).*
       FROM invocations i, fake_commands c, fake_nodes n;
     ANALYZE"
t1=$(date +%s%N)
echo "rows: $(sql 'SELECT count(*) FROM commands') commands, $(sql 'SELECT count(*) FROM invocations') invocations (made in $(ms "$t0" "$t1") ms)"
one=$(sql "SELECT command_id FROM commands ORDER BY requested_at LIMIT 1 OFFSET $((commands / 2))")
deep=$(sql "SELECT command_id FROM commands ORDER BY requested_at LIMIT 1 OFFSET $((commands / 3))")

time_get() {  # label, path: the time from the TLS connection being up to the last byte of the answer
  local times=()
  for _ in $(seq "$rounds"); do
    times+=("$(curl -sf -o /dev/null -w '%{time_appconnect} %{time_total}' --cacert "$FLEETRUN_CA_CERT" \
      -H "Authorization: Bearer $FLEETRUN_TOKEN" "$FLEETRUN_SERVER$2")")
  done
  printf '%s\n' "${times[@]}" | python3 -c "
import sys; v=sorted((float(b) - float(a)) * 1000 for a, b in (l.split() for l in sys.stdin))
print(f'$1: median {v[len(v)//2]:.1f} ms, p90 {v[int(len(v)*0.9)]:.1f} ms, max {v[-1]:.1f} ms over {len(v)} requests (after the TLS handshake)')"
}
time_get "history, first page of 50" "/v1/commands?limit=50"
time_get "history, a page of 50 deep in it" "/v1/commands?limit=50&before=$deep"
time_get "the invocations of one command ($nodes)" "/v1/commands/$one/invocations"
echo "server RSS $(rss "$server_pid") KiB"
