"""Process families on a remote node (issue 6).

Home ids in the guest's own kernel: a guest lives in a pid namespace of its job on the remote
node, at its home pid, so the ids that the remote kernel writes itself are home ids."""

import json
import os
import signal
import subprocess
from pathlib import Path

from conftest import PYTHON, REMOTE_DIED, proc_alive, wait_until

IDS = r'''
import ctypes, json, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_getpid, SYS_gettid, SYS_futex = 39, 186, 202
FUTEX_LOCK_PI, FUTEX_UNLOCK_PI = 6, 7
word = ctypes.c_uint32(0)
assert libc.syscall(SYS_futex, ctypes.byref(word), FUTEX_LOCK_PI, 0, None, None, 0) == 0
locked = word.value & 0x3fffffff
assert libc.syscall(SYS_futex, ctypes.byref(word), FUTEX_UNLOCK_PI, 0, None, None, 0) == 0
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
os.kill(os.getpid(), signal.SIGUSR1)
info = signal.sigwaitinfo({signal.SIGUSR1})
stat_pid = int(open("/proc/self/stat").read().split()[0])
print(json.dumps({"getpid": os.getpid(), "raw_getpid": libc.syscall(SYS_getpid),
                  "raw_gettid": libc.syscall(SYS_gettid), "futex_tid": locked,
                  "si_pid": info.si_pid, "si_code": info.si_code, "stat_pid": stat_pid}),
      flush=True)
sys.stdin.read()
print("bye")
'''


def ns_pids(pid):
    """The NSpid line of /proc/PID/status on the host: pid in each namespace, outermost first."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no NSpid line for {pid}")


def test_guest_kernel_pid_is_home_pid(cluster, home):
    (home / "ids.py").write_text(IDS)
    job = cluster.start(1, ["mosrun", "-r", "2", PYTHON, "ids.py"], cwd=home,
                        stdin=subprocess.PIPE)
    out = job.read_until(b"}\n", timeout=60)
    ids = json.loads(out.decode().splitlines()[0])
    rec = cluster.wait_remote(job, "ids.py")
    p, guest = rec["pid"], rec["remotePid"]
    assert p == job.pid
    # Every view of the pid agrees with the home pid: the cache (getpid), the guest's kernel
    # (FUTEX_LOCK_PI's tid word, si_pid of a signal it sent itself), the /proc view.
    assert ids == {"getpid": p, "raw_getpid": p, "raw_gettid": p, "futex_tid": p, "si_pid": p,
                   "si_code": 0, "stat_pid": p}, ids  # 0: SI_USER
    # On node 2 the guest is a process of its own at another pid, whose pid in its namespace is
    # the home pid; the namespace's init is the job's reaper, a child of the supervisor.
    assert guest != p and guest in cluster.node_pids(2)
    outer, inner = ns_pids(guest)
    assert (outer, inner) == (guest, p)
    supervisor = int(Path(f"/proc/{guest}/stat").read_text().rsplit(")", 1)[1].split()[1])
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    reapers = [int(c) for c in children if int(c) != guest]
    assert len(reapers) == 1, children
    assert ns_pids(reapers[0])[1:] == [1]
    assert Path(f"/proc/{reapers[0]}/comm").read_text().strip() == "mos-reaper"

    status, out, err = job.wait(timeout=60)  # closes the job's stdin: it reads EOF and ends
    assert status == 0, err
    assert out.endswith(b"bye\n")


def test_namespace_dies_with_its_supervisor(cluster, home):
    """A supervisor killed outright (no cleanup of its own) takes its reaper, and with it the
    whole pid namespace and the guest, along; the job ends as for a dead node."""
    (home / "wait.py").write_text("import sys\nprint('up', flush=True)\nsys.stdin.read()\n")
    job = cluster.start(1, ["mosrun", "-r", "2", PYTHON, "wait.py"], cwd=home,
                        stdin=subprocess.PIPE)
    job.read_until(b"up\n", timeout=60)
    guest = cluster.wait_remote(job, "wait.py")["remotePid"]
    supervisor = int(Path(f"/proc/{guest}/stat").read_text().rsplit(")", 1)[1].split()[1])
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    reaper = next(int(c) for c in children if int(c) != guest)
    assert ns_pids(reaper)[1:] == [1]
    os.kill(supervisor, signal.SIGKILL)
    wait_until(lambda: not proc_alive(reaper) and not proc_alive(guest), timeout=10,
               what="the reaper and the guest to die with their supervisor")
    status, out, err = job.wait(timeout=60)
    assert status == REMOTE_DIED, (status, err)
