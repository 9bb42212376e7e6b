# Shell helpers shared by scripts/bench.sh and scripts/bench-memory.sh:
# sourced, not run.

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

stop_pid() { # pid: TERM, wait up to 15 s, then KILL
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# CPU accounting, independent of what else the machine runs: `cpu_snap FILE
# GROUP=PID...` writes "group pid ticks" for each PID and all its descendants
# (a cluster's postmaster covers its walsenders, apply workers and backends);
# `cpu_used START END` prints "group seconds" summed over the processes alive
# at END (minus their ticks at START), so short-lived helpers (our polling
# psql sessions) are not counted.
cpu_snap() {
    local out="$1"; shift
    python3 - "$@" > "$out" <<'PY'
import os, sys
stat = {}
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            f = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        rest = f[f.rindex(")") + 2:].split()
        stat[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
children = {}
for pid, (ppid, _) in stat.items():
    children.setdefault(ppid, []).append(pid)
for arg in sys.argv[1:]:
    group, root = arg.split("=")
    todo = [int(root)] if root.isdigit() and int(root) in stat else []
    while todo:
        pid = todo.pop()
        try:
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ").strip()
        except OSError:
            cmd = "?"
        cmd = cmd.removeprefix("postgres: ").split(" 127.0.0.1")[0].replace(" ", "_")[:40] or "?"
        print(group, pid, stat[pid][1], cmd)
        todo.extend(children.get(pid, []))
PY
}

cpu_used() {
    python3 - "$@" <<'PY'
import os, sys
hz = os.sysconf("SC_CLK_TCK")
start = {}
for line in open(sys.argv[1]):
    g, pid, t, _ = line.split(); start[(g, pid)] = int(t)
used, procs = {}, {}
for line in open(sys.argv[2]):
    g, pid, t, cmd = line.split()
    d = int(t) - start.get((g, pid), 0)
    used[g] = used.get(g, 0) + d
    procs[(g, cmd)] = procs.get((g, cmd), 0) + d
print(" ".join(f"{g}={v / hz:.2f}" for g, v in sorted(used.items())))
if len(sys.argv) > 3:  # per process, for the record
    with open(sys.argv[3], "w") as f:
        for (g, cmd), v in sorted(procs.items(), key=lambda x: -x[1]):
            if v:
                f.write(f"{v / hz:8.2f}s  {g:9s} {cmd}\n")
PY
}
