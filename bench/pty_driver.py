"""Drives `fleetrun shell` sessions on real PTYs for bench/sessions.sh.

  keystrokes FLEETRUN NODE N      one shell; N keystrokes, each timed from the write to the first
                                  byte of its echo; prints p50/p99/max in ms
  shells FLEETRUN NODE N PID      N shells open at once (each waits for its prompt); prints the RSS
                                  of process PID (the server) before and with them open
"""
import os, pty, select, sys, time

PROMPT_WAIT = 30.0


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def spawn(fleetrun, node):
    """A `fleetrun shell NODE` on a new PTY: (pid, master fd)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["TERM"] = "xterm"
        os.execv(fleetrun, [fleetrun, "shell", node])
    return pid, fd


def read_until(fd, needle, deadline):
    """Reads until `needle` was seen (bytes so far returned) or the deadline passes (an error)."""
    seen = b""
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit(f"no {needle!r} within the deadline; saw {seen[-200:]!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise SystemExit(f"the shell ended; saw {seen[-200:]!r}")
            seen += chunk
    return seen


def ready(fd):
    """Waits for the remote shell: a marker echoed back by it."""
    os.write(fd, b"echo READY$((1+1))\r")
    read_until(fd, b"READY2", time.monotonic() + PROMPT_WAIT)


def keystrokes(fleetrun, node, n):
    pid, fd = spawn(fleetrun, node)
    ready(fd)
    lat = []
    for i in range(n):
        # A letter, then a backspace: the line never grows, each key is echoed (letter, or "\b \b").
        key = b"a" if i % 2 == 0 else b"\x7f"
        # Drain anything pending so the next read is this key's echo.
        while select.select([fd], [], [], 0)[0]:
            os.read(fd, 65536)
        t0 = time.perf_counter_ns()
        os.write(fd, key)
        select.select([fd], [], [], 5.0)
        chunk = os.read(fd, 65536)
        lat.append((time.perf_counter_ns() - t0) / 1e6)
        if not chunk:
            raise SystemExit("the shell ended")
    os.write(fd, b"\x15exit\r")
    os.waitpid(pid, 0)
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    print(f"keystroke echo, {n} keys: p50 {pick(0.5):.2f} ms, p99 {pick(0.99):.2f} ms, max {lat[-1]:.2f} ms")


def shells(fleetrun, node, n, server_pid):
    before = rss_kb(server_pid)
    opened = []
    for _ in range(n):
        opened.append(spawn(fleetrun, node))
    for _, fd in opened:
        ready(fd)
    during = rss_kb(server_pid)
    for pid, fd in opened:
        os.write(fd, b"exit\r")
    for pid, _ in opened:
        os.waitpid(pid, 0)
    per = (during - before) / n
    print(f"{n} shells open: server RSS {before / 1024:.1f} -> {during / 1024:.1f} MB ({per:.0f} KB per session)")


if __name__ == "__main__":
    mode, fleetrun, node, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if mode == "keystrokes":
        keystrokes(fleetrun, node, n)
    elif mode == "shells":
        shells(fleetrun, node, n, int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
