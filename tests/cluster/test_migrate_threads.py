"""Multi-threaded processes moved while they run (issue 8; docs/design.md, "Migration of a running
process", threads): every thread is stopped, captured and restored together, with the thread ids
the job sees unchanged, and each guest thread's deputy thread follows.

The program (tests/migrate/live_threads.cc) has three workers: one blocked in a forwarded read of
its standard input (a pipe from the test), one in pthread_cond_wait, one computing. After the
moves it prints the tids each thread sees, their thread-local values, what the reader read, and
the results pthread_join returned, and exits 5. While the job is remote, /proc/PID/task at home
lists its deputy threads, at the job's tids; at home, its own threads."""

import os
import subprocess
from pathlib import Path

from conftest import BUILD, wait_until

PROGRAM = BUILD / "tests" / "migrate" / "migrate_live_threads"


def tasks(pid):
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def exe(pid):
    return os.readlink(f"/proc/{pid}/exe")


def start(cluster, home, remote):
    work = home / "work"
    work.mkdir()
    argv = (["mosrun", "-r", "2"] if remote else ["mosrun"]) + [PROGRAM, work]
    job = cluster.start(1, argv, cwd=home, stdin=subprocess.PIPE)
    job.read_until(b"ready", timeout=60)
    line = job.read_until(b"\n", timeout=60).split(b"ready")[1].split(b"\n")[0]
    pid, *tids = (int(x) for x in line.split())
    assert pid == job.pid and len(tids) == 3, line
    if remote:
        cluster.wait_remote(job, PROGRAM.name)
    return job, work, tids


def migrate(cluster, pid, target):
    cp = cluster.run(1, ["migrate", str(pid), target], timeout=180)
    assert cp.returncode == 0, (target, cp.stdout, cp.stderr)
    return cp


def where(cluster, pid):
    rec = cluster.record(pid)
    return None if rec is None else (rec.get("state"), rec.get("node"))


def finish(job, work, tids):
    """Feeds the reader, lets the job go, and checks everything it prints."""
    job.popen.stdin.write(b"line after the moves\n")
    job.popen.stdin.flush()
    (work / "go").touch()
    status, out, err = job.wait(timeout=120)
    assert status == 5, (status, out, err)
    lines = out.decode().splitlines()
    assert lines[1:] == [
        "seen %d %d %d" % tuple(tids),
        "tls 1000 1001 1002 main 7 leader",
        "read line after the moves",
        "joined 21 11 22",
    ], (out, err)


def test_threaded_job_moves_home(cluster, home):
    job, work, tids = start(cluster, home, remote=True)
    pid = job.pid
    # Each guest thread has a deputy thread at home, at its tid.
    assert tasks(pid) == sorted([pid] + tids)
    assert exe(pid).endswith("mos-deputy")
    migrate(cluster, pid, "home")
    assert exe(pid) == str(PROGRAM.resolve())
    assert tasks(pid) == sorted([pid] + tids)
    assert wait_until(lambda: where(cluster, pid) == ("home", 1), timeout=30, what="job at home")
    finish(job, work, tids)
