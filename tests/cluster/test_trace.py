"""Tracing (issue 7): mostrace's view of real programs on a remote node against strace -f of the
same programs run natively at home, attach/detach that the job never notices, mosrun --trace and
the -c summary. Inputs live in /srv/umosix-home (absent on node 2), so every file the remote run
reads is read through its deputy, and its forwarded calls are the native program's own calls.

The comparison is per thread, over the calls the syscall table routes home (FORWARD rows, from the
generated docs/syscalls.md): the same calls, in the same order, with the same arguments and
results once addresses and the job's pid are normalised."""

import json
import random
import re
import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, wait_until

# FORWARD rows of the syscall table whose calls the deputy executes as the guest made them.
# Excluded: exec (it happens at home before the job is migrated, so it is not in the remote
# trace) and the fork family (mirrored by the guest's own clone, not one forwarded call).
ROW = re.compile(r"^\| *\d+ \| (\w+) \| (\w+) \| (\w*) \|")


def forward_names():
    names, flattened = set(), set()
    for line in (REPO / "docs" / "syscalls.md").read_text().splitlines():
        m = ROW.match(line)
        if not m or m.group(2) != "FORWARD" or m.group(3) in ("EXEC", "FORK", "MMAP"):
            continue
        names.add(m.group(1))
        if m.group(3) in ("IOV", "SOCKMSG"):
            flattened.add(m.group(1))
    return names, flattened


FORWARD, FLATTENED = forward_names()
NATIVE_LINE = re.compile(r"^(\d+) +(\w+)\((.*)\) += (.*)$")
TRACE_LINE = re.compile(r"^\[pid (\d+) node (\d+) (\w+)\] (\w+)\((.*)\) += (.*)$")
ADDRESS = re.compile(r"0x[0-9a-f]{6,}")


def normalise(name, args, result, pid):
    """One call as text that both tools agree on: addresses and the job's pid replaced. For the
    calls the supervisor flattens (readv/writev into one read/write, sendmsg/recvmsg), whose
    vectors strace decodes and mostrace shows as an address, only the descriptor is kept."""
    if name in FLATTENED:
        args = args.split(",")[0] + ", ..."
    text = f"{name}({args}) = {result}"
    text = ADDRESS.sub("ADDR", text)
    return re.sub(rf"\b{pid}\b", "PID", text)


def native_calls(path, pid):
    """strace -f -o output: {tid: [normalised calls routed home]}; raises on a line it cannot
    read that names a forwarded call (an unfinished call would make the comparison meaningless)."""
    calls = defaultdict(list)
    for line in Path(path).read_text().splitlines():
        m = NATIVE_LINE.match(line)
        if not m:
            word = re.match(r"^\d+ +(\w+)\(", line)
            assert not (word and word.group(1) in FORWARD), f"unparsed strace line: {line}"
            continue
        tid, name, args, result = m.groups()
        if name in FORWARD:
            calls[int(tid)].append(normalise(name, args, result, pid))
    return calls


def traced_calls(path, pid):
    """mostrace output: ({tid: [normalised calls of FORWARD rows]}, [(route, name)] of every
    line)."""
    calls, routes = defaultdict(list), []
    for line in Path(path).read_text().splitlines():
        m = TRACE_LINE.match(line)
        assert m, f"unparsed mostrace line: {line}"
        tid, node, route, name, args, result = m.groups()
        assert node == "2", line
        routes.append((route, name))
        if name in FORWARD:
            calls[int(tid)].append(normalise(name, args, result, pid))
    return calls, routes


STRUCT = r"\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}"


def same_call(native, traced):
    """Equal, or equal where mostrace shows a struct it does not decode as `{...}` (sysinfo's
    contents, which also change from one run to the next)."""
    if native == traced:
        return True
    if "{...}" not in traced:
        return False
    pattern = re.escape(traced).replace(re.escape("{...}"), STRUCT)
    return re.fullmatch(pattern, native) is not None


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if not same_call(x, y):
            return i, x, y
    n = min(len(a), len(b))
    if len(a) == len(b):
        return None
    return n, a[n] if n < len(a) else "<end>", b[n] if n < len(b) else "<end>"


def compare_with_strace(cluster, home, tmp, argv, what):
    """Runs argv natively under strace -f and remotely under mosrun --trace; asserts the same
    output and status, and the same forwarded calls per thread. Returns the trace's routes."""
    native_trace = tmp / f"{what}.strace"
    remote_trace = tmp / f"{what}.mostrace"
    native = cluster.native(["strace", "-f", "-qq", "-o", native_trace] + argv, cwd=home,
                            timeout=300)
    remote = cluster.mosrun([f"--trace={remote_trace}"] + argv, cwd=home, timeout=300)
    assert remote.returncode == native.returncode, (remote.returncode, remote.stderr[-2000:])
    assert remote.stdout == native.stdout, f"{what}: stdout differs"
    # The tracer writes its own two lines (attached, detached) to mosrun's stderr.
    remote_err = b"".join(line for line in remote.stderr.splitlines(keepends=True)
                          if not line.startswith(b"mostrace: "))
    assert remote_err == native.stderr, f"{what}: stderr differs: {remote.stderr[-2000:]!r}"
    # mosrun's pipes close when the tracer exits, after the job's last event.
    native_pid = int(Path(native_trace).read_text().split(None, 1)[0])
    first = Path(remote_trace).read_text().split("\n", 1)[0]
    remote_pid = int(TRACE_LINE.match(first).group(1))
    want = native_calls(native_trace, native_pid)
    got, routes = traced_calls(remote_trace, remote_pid)
    assert len(got) == len(want), (sorted(got), sorted(want))
    for (ntid, ncalls), (rtid, rcalls) in zip(sorted(want.items()), sorted(got.items())):
        diff = first_difference(ncalls, rcalls)
        if diff is not None:
            i, n, r = diff
            pytest.fail(f"{what}: thread {rtid} (native {ntid}), call {i} of {len(rcalls)} "
                        f"traced / {len(ncalls)} native:\n  strace:   {n}\n  mostrace: {r}",
                        pytrace=False)
    assert sum(len(c) for c in want.values()) > 20, "too few calls to prove anything"
    return routes


@pytest.fixture
def tmp(home):
    d = Path("/tmp") / f"umosix-trace-{home.name}"
    subprocess.run(["rm", "-rf", str(d)], check=False)
    d.mkdir()
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def test_ls_la_matches_strace(cluster, home, tmp):
    (home / "dir").mkdir()
    for i, size in enumerate((0, 10, 5000)):
        (home / "dir" / f"f{i}").write_bytes(b"x" * size)
    (home / "dir" / "link").symlink_to("f1")
    routes = compare_with_strace(cluster, home, tmp, ["ls", "-la", "dir"], "ls")
    assert ("forwarded", "getdents64") in routes
    assert ("local", "mmap") in routes  # the libraries, from the content cache


READ_JSON = """
import json, sys
with open(sys.argv[1]) as f:
    data = json.load(f)
print(len(data["values"]), sum(data["values"]), data["name"])
"""


def test_python_reading_json_matches_strace(cluster, home, tmp):
    rng = random.Random(5)
    (home / "data.json").write_text(json.dumps(
        {"name": "trace", "values": [rng.randrange(1000) for _ in range(5000)]}))
    (home / "read.py").write_text(READ_JSON)
    compare_with_strace(cluster, home, tmp, [PYTHON, "read.py", "data.json"], "python")


def test_sqlite3_query_matches_strace(cluster, home, tmp):
    cp = cluster.native(["sqlite3", "db.sqlite",
                         "create table t(id integer primary key, v text);"
                         "with recursive c(x) as (select 1 union all select x + 1 from c "
                         "where x < 2000) insert into t(v) select 'v' || x from c;"], cwd=home)
    assert cp.returncode == 0, cp.stderr
    routes = compare_with_strace(
        cluster, home, tmp,
        ["sqlite3", "db.sqlite", "select count(*), min(v), max(v) from t where id % 7 = 3;"],
        "sqlite3")
    assert ("forwarded", "fcntl") in routes  # its record locks, decoded as strace does
    assert ("forwarded", "pread64") in routes


LOOP = """
import json, os, sys, time
n = 0
while True:
    with open("data.json") as f:
        data = json.load(f)
    n += 1
    if n >= 3 and os.path.exists("stop"):
        break
    time.sleep(0.01)
print(len(data["values"]), sum(data["values"]), flush=True)
sys.exit(7)
"""


def test_attach_detach_50_times_changes_nothing(cluster, home, tmp):
    (home / "data.json").write_text(json.dumps({"values": list(range(300))}))
    (home / "loop.py").write_text(LOOP)
    (home / "stop").write_text("")
    untraced = cluster.mosrun([PYTHON, "loop.py"], cwd=home, timeout=120)
    assert untraced.returncode == 7, untraced.stderr
    (home / "stop").unlink()

    job = cluster.start_mosrun([PYTHON, "loop.py"], cwd=home)
    rec = cluster.wait_remote(job, "loop.py")
    pid = rec["pid"]
    traced_lines = 0
    for i in range(50):
        out = tmp / f"attach-{i}.trace"
        tracer = subprocess.Popen(cluster.argv(1, ["mostrace", "-p", pid, "-o", out]),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
        try:
            # Attached once events arrive: the job opens and reads data.json every 10 ms.
            wait_until(lambda: out.exists() and out.read_text().count("\n") >= 1, timeout=30,
                       interval=0.02, what=f"events of attach {i}")
            tracer.send_signal(signal.SIGTERM)
            _, err = tracer.communicate(timeout=30)
        finally:
            if tracer.poll() is None:
                tracer.kill()
                tracer.communicate(timeout=10)
        assert tracer.returncode == 0, err
        assert f"Process {pid} detached".encode() in err, err
        lines = out.read_text().splitlines()
        assert all(TRACE_LINE.match(line) for line in lines), lines[:5]
        traced_lines += len(lines)
    assert job.popen.poll() is None, "the job ended while it was traced"
    (home / "stop").write_text("")
    status, stdout, stderr = job.wait(timeout=120)
    assert status == untraced.returncode
    assert stdout == untraced.stdout
    assert stderr == untraced.stderr
    assert traced_lines >= 50


def test_mosrun_trace_writes_the_trace(cluster, home, tmp):
    (home / "a.txt").write_text("alpha\n")
    out = tmp / "cat.trace"
    cp = cluster.mosrun([f"--trace={out}", "cat", "a.txt", "missing.txt"], cwd=home)
    assert cp.returncode == 1
    assert cp.stdout == b"alpha\n"
    lines = out.read_text().splitlines()
    assert lines and all(TRACE_LINE.match(line) for line in lines), lines[:5]
    text = "\n".join(re.sub(r" +", " ", line) for line in lines)
    assert re.search(r'\] openat\(AT_FDCWD, "a.txt", O_RDONLY\) = 3$', text, re.M), text
    assert re.search(r'\] read\(3, "alpha\\n", \d+\) = 6$', text, re.M), text
    assert re.search(r'\] write\(1, "alpha\\n", 6\) = 6$', text, re.M), text
    assert re.search(r'\] openat\(AT_FDCWD, "missing.txt", O_RDONLY\) = -1 ENOENT \(No such '
                     r'file or directory\)$', text, re.M), text
    # The guest's first calls are the dynamic loader's: traced from the job's start.
    assert "ld.so.cache" in lines[0] or "ld.so.cache" in "\n".join(lines[:5]), lines[:5]


def summary_table(text):
    """mostrace -c's tables: ({syscall: (calls, errors)}, total calls, {route: calls})."""
    rows, total, routes = {}, None, {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) in (5, 6) and re.match(r"^\d+\.\d\d$", cols[0]):
            calls, errors = int(cols[3]), int(cols[4]) if len(cols) == 6 else 0
            if cols[-1] == "total":
                total = calls
            else:
                rows[cols[-1]] = (calls, errors)
        elif len(cols) == 7 and cols[0] in ("forwarded", "emulated", "local", "denied"):
            routes[cols[0]] = int(cols[1])
    return rows, total, routes


def test_summary_counts_match_the_lines_of_the_same_calls(cluster, home, tmp):
    (home / "big.txt").write_text("".join(f"line {i}\n" for i in range(5000)))
    # The job waits in a forwarded read of its stdin until both tracers are subscribed; then
    # it execs cat at home, which comes back to node 2 as the same job.
    job = cluster.start(1, ["mosrun", "-r", "2", "/bin/sh", "-c",
                            "read x; exec cat big.txt missing.txt"],
                        cwd=home, stdin=subprocess.PIPE)
    rec = cluster.wait_remote(job, "/bin/sh")
    pid = rec["pid"]
    full, table = tmp / "full.trace", tmp / "summary.txt"
    tracers = [subprocess.Popen(cluster.argv(1, ["mostrace", "-p", pid, "-o", full]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE),
               subprocess.Popen(cluster.argv(1, ["mostrace", "-c", "-p", pid, "-o", table]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)]
    try:
        for t in tracers:
            line = t.stderr.readline()
            assert b"attached" in line, (line, t.stderr.read())
        job.popen.stdin.write(b"go\n")
        job.popen.stdin.close()
        job.popen.stdin = None  # communicate() would flush it
        status, out, _ = job.wait(timeout=120)
        assert status == 1 and out == (home / "big.txt").read_bytes()
        for t in tracers:
            t.wait(timeout=60)
            assert t.returncode == 0, t.stderr.read()
    finally:
        for t in tracers:
            if t.poll() is None:
                t.kill()
                t.wait(timeout=10)
    counts, errors, by_route = defaultdict(int), defaultdict(int), defaultdict(int)
    for line in full.read_text().splitlines():
        m = TRACE_LINE.match(line)
        assert m, line
        counts[m.group(4)] += 1
        by_route[m.group(3)] += 1
        if m.group(6).startswith("-1 "):
            errors[m.group(4)] += 1
    rows, total, routes = summary_table(table.read_text())
    assert rows == {name: (n, errors[name]) for name, n in counts.items()}
    assert total == sum(counts.values())
    assert routes == dict(by_route)
    assert counts["read"] > 2 and errors["openat"] >= 1  # cat's reads; missing.txt


FORK = """
import os
pid = os.fork()
if pid == 0:
    with open("a.txt") as f:
        f.read()
    os._exit(3)
print(os.waitpid(pid, 0)[1] >> 8, pid)
"""


def test_forked_processes_are_in_the_jobs_trace(cluster, home, tmp):
    (home / "a.txt").write_text("child\n")
    (home / "fork.py").write_text(FORK)
    out = tmp / "fork.trace"
    cp = cluster.mosrun([f"--trace={out}", PYTHON, "fork.py"], cwd=home)
    assert cp.returncode == 0, cp.stderr
    status, child = cp.stdout.split()
    assert status == b"3"
    by_pid = defaultdict(list)
    for line in out.read_text().splitlines():
        m = TRACE_LINE.match(line)
        assert m, line
        by_pid[int(m.group(1))].append(re.sub(r" +", " ", f"{m.group(4)}({m.group(5)}) = "
                                                          f"{m.group(6)}"))
    assert len(by_pid) == 2, sorted(by_pid)
    child_calls = by_pid[int(child)]
    assert 'openat(AT_FDCWD, "a.txt", O_RDONLY|O_CLOEXEC) = 3' in child_calls, child_calls
    assert any(c.startswith('read(3, "child\\n"') for c in child_calls), child_calls
    parent = [p for p in by_pid if p != int(child)][0]
    waits = [c for c in by_pid[parent] if c.startswith("wait4(")]
    assert any(c.endswith(f"= {child.decode()}") for c in waits), waits
