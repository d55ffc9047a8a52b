"""Deputy inspection (issue 7): `mps -d PID` and `mps -d PID --json` on a job whose user part
runs on node 2 and is blocked in a forwarded read of an empty pipe. The in-flight call, its
growing duration, the fd table (against `ls -l /proc/PID/fd` at home), the cwd, the signal sets
and the remote node's counters; bad pids give a clear error and exit status 1."""

import json
import os
import re
import signal
import time

from conftest import PYTHON, wait_until

# Opens a pipe and a file (reads 5 bytes of it, so its offset is 5), then blocks reading the
# empty pipe: a forwarded read(2) that the deputy executes at home and that never returns.
BLOCKED_READ = r'''
import os, signal, sys
signal.signal(signal.SIGUSR1, lambda s, f: None)   # caught
signal.signal(signal.SIGPIPE, signal.SIG_IGN)      # ignored
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
r, w = os.pipe()
f = os.open("data.txt", os.O_RDONLY)
os.read(f, 5)
print(r, w, f, "ready", flush=True)  # the numbers first: read_until(b"ready") has them
os.read(r, 100)
'''


def mps_d(cluster, pid, *extra):
    return cluster.run(1, ["mps", "-d", str(pid), *extra], timeout=60)


def ls_fds(cluster, pid):
    """{fd: target} from `ls -l /proc/PID/fd` run at home."""
    cp = cluster.run(1, ["ls", "-l", f"/proc/{pid}/fd"], timeout=30)
    assert cp.returncode == 0, cp.stderr
    fds = {}
    for line in cp.stdout.decode().splitlines():
        m = re.search(r" (\d+) -> (.*)$", line)
        if m:
            fds[int(m.group(1))] = m.group(2)
    return fds


def test_mps_d_shows_a_blocked_forwarded_read_and_the_home_fd_table(cluster, home):
    (home / "blocked_read.py").write_text(BLOCKED_READ)
    (home / "data.txt").write_text("0123456789\n")
    job = cluster.start_mosrun([PYTHON, "blocked_read.py"], cwd=home)
    out = job.read_until(b"ready", timeout=60)
    rec = cluster.wait_remote(job, "blocked_read.py")
    pid = rec["pid"]
    r, w, f = (int(x) for x in out.split(b"ready", 1)[0].split()[-3:])

    def blocked_view():
        cp = mps_d(cluster, pid, "--json")
        assert cp.returncode == 0, cp.stderr
        view = json.loads(cp.stdout)
        reads = [c for c in view["inFlight"] if c["syscall"] == "read" and c["args"][0] == r]
        return (view, reads[0]) if reads else None

    view, call = wait_until(blocked_view, 60, what="the read of the pipe in flight at home")
    # The same facts as the kernel's at home.
    assert view["pid"] == pid
    assert view["state"] == "remote" and view["node"] == 2 and view["homeNode"] == 1
    assert view["remotePid"] == rec["remotePid"]
    assert view["cwd"] == str(home)
    assert call["args"][2] == 100
    assert call["tid"] == pid
    assert call["elapsedUs"] >= 0
    fds = {e["fd"]: e for e in view["fds"]}
    assert {n: e["target"] for n, e in fds.items()} == ls_fds(cluster, pid)
    assert fds[r]["target"].startswith("pipe:[") and fds[r]["target"] == fds[w]["target"]
    assert fds[f]["target"] == str(home / "data.txt")
    assert fds[f]["offset"] == 5
    assert fds[f]["flags"] & os.O_ACCMODE == os.O_RDONLY
    assert fds[w]["flags"] & os.O_ACCMODE == os.O_WRONLY
    job_fds = {n for n, e in fds.items() if not e["deputy"]}
    assert {0, 1, 2, r, w, f} <= job_fds
    assert any(e["deputy"] for e in fds.values()), "the job channel is the deputy's own"
    # Signals as the deputy holds them at home: the job's dispositions are the guest's, so only
    # the blocked set is compared with the home kernel's.
    with open(f"/proc/{pid}/status") as status:
        blk = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status.read(), re.M).group(1), 16)
    assert view["signals"]["blockedMask"] == blk
    # Remote counters from node 2's supervisor.
    remote = view["remote"]
    assert remote["found"] is True and remote["node"] == 2
    routes = {x["route"]: x for x in remote["routes"]}
    assert routes["forwarded"]["calls"] > 0
    assert routes["emulated"]["calls"] > 0  # getpid and friends from the cache
    assert remote["cacheHits"] + remote["cacheMisses"] > 0  # python and its libraries
    assert view["bytesIn"] > 0 and view["bytesOut"] > 0
    assert view["stayReason"] == "none"

    # The duration grows while the call stays in flight.
    first = call["elapsedUs"]
    def grown():
        got = blocked_view()
        return got if got and got[1]["elapsedUs"] >= first + 200000 else None
    _, later = wait_until(grown, 30, interval=0.1, what="a longer duration")
    assert later["startNs"] == call["startNs"]

    # The text view says the same.
    cp = mps_d(cluster, pid)
    assert cp.returncode == 0, cp.stderr
    text = cp.stdout.decode()
    assert re.search(rf"^  in flight +read\({r}, 0x[0-9a-f]+, 100\)  tid {pid}  for ", text,
                     re.M), text
    assert f"node 2 (pid {rec['remotePid']} there)" in text
    for n, target in ls_fds(cluster, pid).items():
        assert re.search(rf"^ *{n}  \S+ +\d+  {re.escape(target)}", text, re.M), (n, text)

    os.kill(pid, signal.SIGKILL)
    job.wait(timeout=60)


def test_mps_d_of_a_pid_that_is_not_a_job_process_fails_clearly(cluster):
    cp = mps_d(cluster, 4194303)
    assert cp.returncode == 1
    assert b"no process with pid 4194303" in cp.stderr
    mosd = cluster.mosd_pid(1)
    cp = mps_d(cluster, mosd)
    assert cp.returncode == 1
    assert f"process {mosd} is not a umosix job process".encode() in cp.stderr
    cp = mps_d(cluster, "abc")
    assert cp.returncode == 2
    assert b"-d" in cp.stderr
