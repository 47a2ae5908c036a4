#!/usr/bin/env bash
# Soak benchmark: N real agents on loopback under a mixed load for a fixed time, with faults:
#   - a send of `echo` to all nodes every SEND_EVERY s (`fleetrun send`, timed until it answers),
#   - FOLLOWERS `fleetrun output --follow` of a long-running command,
#   - CLIENTS API clients (persistent HTTPS connections) doing reads and malformed POSTs (timed),
#   - kill -9 of KILL agents a third of the way in (started again 5 s later),
#   - kill -9 of the server half way in, started again at once on the same data dir and port.
# Then it stops the load, lets the commands drain, checks that no run was lost or ran twice (every
# script appends "command node" to one file), idles IDLE s and reports:
#   send and malformed-POST latency p50/p99, invocations offered vs done per second, 5xx count,
#   lost / duplicated runs, server RSS start / peak / end-idle.
#   usage: bench/soak.sh [N_AGENTS] [DURATION_S]   env: CLIENTS FOLLOWERS KILL SEND_EVERY IDLE CLIENT_PAUSE
#   (CLIENT_PAUSE: seconds each API client waits between requests, default 0.1; 0 = back to back;
#   BIG_POST_BYTES: when set, every other malformed POST is a valid JSON send of that size, refused 400)
#   (`--profile dist` build unless BENCH_PROFILE; loopback only; stops by itself)
n=${1:-200}
duration=${2:-300}
SERVER_ARGS="--rate-limit 0 ${SERVER_ARGS:-}"
source "$(dirname "$0")/lib.sh"
start_agents "$n"
echo "${pids[@]:1}" >"$work/agent.pids"
echo "$server_pid" >"$work/server.pid"
# The server restarted by the driver is not in lib.sh's list: kill it on exit too.
trap 'exec 2>/dev/null; kill "$(cat "$work/server.pid")" || true; cleanup' EXIT
echo "load: $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min) before the soak; $(nproc) cores"

BIN="$bin" WORK="$work" PORT="$port" N="$n" DURATION="$duration" SERVER_ARGS="$SERVER_ARGS" \
  CLIENTS="${CLIENTS:-50}" FOLLOWERS="${FOLLOWERS:-3}" KILL="${KILL:-10}" SEND_EVERY="${SEND_EVERY:-2}" \
  IDLE="${IDLE:-30}" CLIENT_PAUSE="${CLIENT_PAUSE:-0.1}" BIG_POST_BYTES="${BIG_POST_BYTES:-0}" python3 - <<'EOF'
import http.client, json, os, re, signal, ssl, subprocess, sys, threading, time

B, W, PORT, N = os.environ["BIN"], os.environ["WORK"], int(os.environ["PORT"]), int(os.environ["N"])
DUR, CLIENTS, FOLLOWERS = float(os.environ["DURATION"]), int(os.environ["CLIENTS"]), int(os.environ["FOLLOWERS"])
KILL, EVERY, IDLE = int(os.environ["KILL"]), float(os.environ["SEND_EVERY"]), float(os.environ["IDLE"])
PAUSE = float(os.environ["CLIENT_PAUSE"])
BIG = int(os.environ["BIG_POST_BYTES"])
BIG_BODY = json.dumps({"targets": "all", "commands": ["x" * BIG]}).encode() if BIG else b""
TOKEN, CA = os.environ["FLEETRUN_TOKEN"], os.environ["FLEETRUN_CA_CERT"]
RAN = f"{W}/ran.log"
lock = threading.Lock()
stats = {"send_ms": [], "send_spans": [], "send_fail": 0, "bad_post_ms": [], "read_ms": [], "5xx": 0, "conn_err": 0,
         "follow_restarts": 0, "peak_rss": 0}
sent = []  # command ids accepted
stop = threading.Event()
t_start = time.time()
procs = []

def server_pid():
    return int(open(f"{W}/server.pid").read())

def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0

def cpu_secs(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0

def ctx():
    c = ssl.create_default_context(cafile=CA)
    return c

def request(conn, method, path, body=None):
    h = {"Authorization": f"Bearer {TOKEN}"}
    if body is not None:
        h["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=h)
    r = conn.getresponse()
    data = r.read()
    return r.status, data

def api(method, path, body=None, timeout=30):
    conn = http.client.HTTPSConnection("127.0.0.1", PORT, context=ctx(), timeout=timeout)
    try:
        return request(conn, method, path, body)
    finally:
        conn.close()

def client(i):
    conn = None
    k = 0
    while not stop.is_set():
        k += 1
        if conn is None:
            conn = http.client.HTTPSConnection("127.0.0.1", PORT, context=ctx(), timeout=30)
        kind = k % 4
        try:
            t0 = time.perf_counter()
            if kind == 0:
                bad = BIG_BODY if BIG and k % 8 == 0 else b'{"targets": "all", "commands": '
                st, _ = request(conn, "POST", "/v1/commands", bad)
            elif kind == 1:
                st, _ = request(conn, "GET", "/v1/commands?limit=20")
            elif kind == 2:
                st, _ = request(conn, "GET", "/v1/nodes")
            else:
                st, _ = request(conn, "GET", "/v1/whoami")
            ms = (time.perf_counter() - t0) * 1000
            with lock:
                (stats["bad_post_ms"] if kind == 0 else stats["read_ms"]).append(ms)
                if st >= 500:
                    stats["5xx"] += 1
        except Exception:
            with lock:
                stats["conn_err"] += 1
            conn = None
            time.sleep(0.2)
        if PAUSE:
            time.sleep(PAUSE)

def send_one():
    t0 = time.perf_counter()
    script = f'echo "$FLEETRUN_COMMAND_ID $FLEETRUN_NODE_ID" >> {RAN}'
    p = subprocess.run([f"{B}/fleetrun", "send", "--targets", "all", "--max-concurrency", "100%",
                        "--", script], capture_output=True, text=True, timeout=120)
    ms = (time.perf_counter() - t0) * 1000
    with lock:
        if p.returncode == 0 and p.stdout.strip():
            stats["send_ms"].append(ms)
            stats["send_spans"].append((t0, time.perf_counter(), ms))
            sent.append(p.stdout.strip().split()[0])
        else:
            stats["send_fail"] += 1

def sender():
    nxt = time.time()
    while not stop.is_set():
        threading.Thread(target=send_one, daemon=True).start()
        nxt += EVERY
        stop.wait(max(0, nxt - time.time()))

def follower(cmd, node):
    while not stop.is_set():
        p = subprocess.Popen([f"{B}/fleetrun", "output", "-f", cmd, node], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        procs.append(p)
        while p.poll() is None and not stop.is_set():
            time.sleep(0.2)
        if p.poll() is None:
            p.terminate()
            return
        with lock:
            stats["follow_restarts"] += 1
        stop.wait(1)

def sampler():
    while not stop.is_set():
        with lock:
            stats["peak_rss"] = max(stats["peak_rss"], rss_kib(server_pid()))
        stop.wait(0.5)

def start_server(log):
    args = [f"{B}/fleetrun", "server", "--data-dir", f"{W}/server", "--listen", f"127.0.0.1:{PORT}"] \
        + os.environ["SERVER_ARGS"].split()
    p = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})
    open(f"{W}/server.pid", "w").write(str(p.pid))
    return p

def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")

nodes = json.loads(api("GET", "/v1/nodes")[1])
node_ids = sorted(x["node_id"] for x in nodes)
agent_pids = [int(x) for x in open(f"{W}/agent.pids").read().split()]
rss_start = rss_kib(server_pid())
threading.Thread(target=sampler, daemon=True).start()

# The followed command: one line a second on the first FOLLOWERS nodes (never killed).
fnodes = node_ids[:max(FOLLOWERS, 1)]
body = json.dumps({"node_ids": fnodes, "commands": [f"for i in $(seq {int(DUR)}); do echo line $i; sleep 1; done"],
                   "execution_timeout_secs": int(DUR) + 120})
st, data = api("POST", "/v1/commands", body.encode())
long_cmd = json.loads(data)["command_id"] if st < 300 else None
for i in range(FOLLOWERS):
    if long_cmd:
        threading.Thread(target=follower, args=(long_cmd, fnodes[i % len(fnodes)]), daemon=True).start()
for i in range(CLIENTS):
    threading.Thread(target=client, args=(i,), daemon=True).start()
threading.Thread(target=sender, daemon=True).start()

# Faults, on schedule.
victims = list(range(N - min(KILL, max(N - FOLLOWERS, 0)), N))  # the last agents (bench-N...)
stop.wait(DUR / 3)
for i in victims:
    os.kill(agent_pids[i], signal.SIGKILL)
stop.wait(5)
for i in victims:
    a = subprocess.Popen(["nice", "-n", os.environ.get("AGENT_NICE", "0"), f"{B}/fleetrun-agent", "--server", f"https://127.0.0.1:{PORT}", "--state-dir",
                          f"{W}/agents/{i + 1}"], stdout=open(f"{W}/agent-{i + 1}.restart.log", "w"),
                         stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})
    procs.append(a)
print(f"  t={time.time() - t_start:.0f}s killed -9 and restarted {len(victims)} agents", flush=True)
stop.wait(max(0, t_start + DUR / 2 - time.time()))
t_down = time.perf_counter()
os.kill(server_pid(), signal.SIGKILL)
time.sleep(0.2)
server = start_server(f"{W}/server2.log")
t_restart = time.time()
# Until the restarted server answers, a send can only wait (the CLI retries it with its idempotency
# key): sends overlapping that window measure the restart, not the write path, and are shown apart.
for _ in range(600):
    try:
        if api("GET", "/v1/health")[0] == 200:
            break
    except Exception:
        pass
    time.sleep(0.01)
t_up = time.perf_counter()
print(f"  t={time.time() - t_start:.0f}s killed -9 and restarted the server", flush=True)
stop.wait(max(0, t_start + DUR - time.time()))
stop.set()
load_secs = time.time() - t_start
cpu2 = cpu_secs(server_pid()) / max(time.time() - t_restart, 1)
done_in_load = sum(1 for _ in open(RAN)) if os.path.exists(RAN) else 0
with lock:
    accepted = list(sent)

# Drain: every accepted command must end (bounded).
deadline = time.time() + 120
pending = set(accepted)
missing = set()
while pending and time.time() < deadline:
    for c in list(pending):
        try:
            st, data = api("GET", f"/v1/commands/{c}")
        except Exception:
            continue
        if st == 404:
            missing.add(c); pending.discard(c)
        elif st == 200 and json.loads(data)["status"] not in ("Pending", "InProgress", "Cancelling"):
            pending.discard(c)
    if pending:
        time.sleep(1)

ran = {}
for line in open(RAN) if os.path.exists(RAN) else []:
    parts = line.split()
    if len(parts) == 2:
        ran[tuple(parts)] = ran.get(tuple(parts), 0) + 1
dups = sum(1 for v in ran.values() if v > 1)
statuses, success_no_run = {}, 0
for c in accepted:
    if c in missing:
        continue
    st, data = api("GET", f"/v1/commands/{c}/invocations")
    for inv in json.loads(data) if st == 200 else []:
        s = inv["status"]
        statuses[s] = statuses.get(s, 0) + 1
        if s == "Success" and (c, inv["node_id"]) not in ran:
            success_no_run += 1
db_bytes = sum(os.path.getsize(f"{W}/server/{f}") for f in ("fleetrun.db", "fleetrun.db-wal")
               if os.path.exists(f"{W}/server/{f}"))
stop_t = time.time()
time.sleep(IDLE)
rss_idle = rss_kib(server_pid())

for p in procs:
    if p.poll() is None:
        p.kill()
s = stats
print(f"soak: {N} agents, {load_secs:.0f} s, {CLIENTS} API clients, {FOLLOWERS} followers, send every {EVERY:g} s, "
      f"{len(victims)} agents and the server killed -9")
print(f"send (fleetrun send, until accepted): p50 {pct(s['send_ms'], .5):.0f} ms, p99 {pct(s['send_ms'], .99):.0f} ms, "
      f"max {pct(s['send_ms'], 1):.0f} ms over {len(s['send_ms'])} sends ({s['send_fail']} failed, e.g. while the server was down)")
steady = [ms for (a, b, ms) in s["send_spans"] if b < t_down or a > t_up]
across = [ms for (a, b, ms) in s["send_spans"] if not (b < t_down or a > t_up)]
print(f"  sends not spanning the server's restart: p50 {pct(steady, .5):.0f} ms, p99 {pct(steady, .99):.0f} ms, "
      f"max {pct(steady, 1):.0f} ms over {len(steady)}; spanning it ({(t_up - t_down) * 1000:.0f} ms down): "
      f"{', '.join(f'{x:.0f} ms' for x in sorted(across)) or 'none'}")
slow = sorted(((ms, a - t_down) for (a, b, ms) in s["send_spans"]), reverse=True)[:3]
print("  slowest sends: " + ", ".join(f"{ms:.0f} ms at t{t:+.1f} s from the server kill" for ms, t in slow))
# The server's own view: requests it took >= 250 ms to answer (gate.rs logs them at warn).
slow_srv = {}
for log in (f"{W}/server.log", f"{W}/server2.log"):
    for line in open(log, errors="replace") if os.path.exists(log) else []:
        if "slow request" in line:
            m = re.search(r'action="?([^" ]+)', line)
            t = re.search(r'took_ms=(\d+)', line)
            k = m.group(1) if m else "?"
            slow_srv.setdefault(k, []).append(int(t.group(1)) if t else 0)
print("  server-side answers >= 250 ms: " + (", ".join(f"{k} {len(v)} (max {max(v)} ms)" for k, v in sorted(slow_srv.items())) or "none"))
print(f"malformed POST (400): p50 {pct(s['bad_post_ms'], .5):.1f} ms, p99 {pct(s['bad_post_ms'], .99):.1f} ms over {len(s['bad_post_ms'])}; "
      f"reads p50 {pct(s['read_ms'], .5):.1f} ms, p99 {pct(s['read_ms'], .99):.1f} ms over {len(s['read_ms'])}")
print(f"invocations: offered {len(accepted) * N / load_secs:.1f}/s, done during the load {done_in_load / load_secs:.1f}/s; "
      f"5xx: {s['5xx']}; connection errors (server down): {s['conn_err']}; follower restarts: {s['follow_restarts']}")
print(f"runs: {len(accepted)} commands accepted, {len(missing)} missing after the restart, {len(pending)} not ended after the drain; "
      f"invocations {statuses}; ran twice: {dups}; Success without a run: {success_no_run}")
print(f"server RSS: start {rss_start} KiB, peak {s['peak_rss']} KiB, end-idle ({IDLE:g} s after the drain) {rss_idle} KiB; "
      f"load {open('/proc/loadavg').read().split()[0]} (1 min); restarted server's CPU under load: {cpu2:.2f} cores")
print(f"database files after the drain: {db_bytes / 1048576:.1f} MiB")
EOF
