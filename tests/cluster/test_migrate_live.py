"""Live moves of a running job (issue 8): `migrate PID home` brings the user part of a remote job
back into its home process, which runs natively again: same pid, same output, same exit status,
signals and blocked calls as if nothing had happened. Refused moves leave the job where it was.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BUILD, PYTHON, let_zdtm_go, wait_until

# Computes a checksum in a loop long enough to be caught mid-run, then prints it and exits 7.
COUNTER = r'''
import os, sys
print("ready", os.getpid(), flush=True)
total = 0
for i in range(int(sys.argv[1])):
    total = (total * 31 + i) % 1000000007
    if i % 1000000 == 0:
        print("step", i, flush=True)
print("total", total, flush=True)
sys.exit(7)
'''

# Blocks in a read of its standard input (a pipe: a forwarded read while remote), then echoes it.
# Two more descriptors: one close-on-exec (Python's default), one inheritable.
READER = r'''
import os, sys
f = open(__file__)
g = os.open(__file__, os.O_RDONLY)
os.set_inheritable(g, True)
print("ready", f.fileno(), g, flush=True)
line = sys.stdin.readline()
print("got", line.strip(), flush=True)
sys.exit(3)
'''

# A SIGUSR1 handler counting, SIGUSR2 blocked; reports both after each line of input.
SIGNALS = r'''
import os, signal, sys
count = 0
def on_usr1(sig, frame):
    global count
    count += 1
signal.signal(signal.SIGUSR1, on_usr1)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    pending = sorted(int(s) for s in signal.sigpending())
    blocked = sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    print("usr1", count, "pending", pending, "blocked", blocked, flush=True)
    if line.strip() == "end":
        break
sys.exit(0)
'''

# A memfd: a node-local object of the guest; the move is refused and the job goes on.
MEMFD = r'''
import os, sys
fd = os.memfd_create("scratch")
os.write(fd, b"node-local")
print("ready", fd, flush=True)
line = sys.stdin.readline()
os.lseek(fd, 0, 0)
print("got", line.strip(), os.read(fd, 100).decode(), flush=True)
'''

# A parent and its forked child, both remote, talking through a pipe (a home object).
FAMILY = r'''
import os, sys
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(w)
    data = os.read(r, 100)
    print("child got", data.decode().strip(), flush=True)
    os._exit(5)
os.close(r)
print("ready", child, flush=True)
line = sys.stdin.readline()
os.write(w, line.encode())
_, status = os.waitpid(child, 0)
print("parent", line.strip(), "child status", os.waitstatus_to_exitcode(status), flush=True)
'''

# SIGRTMIN blocked: every instance sent to the job stays queued; counted at the end.
RT_COUNTER = r'''
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMIN})
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
n = 0
while signal.sigtimedwait([signal.SIGRTMIN], 0) is not None:
    n += 1
print("rt", n, flush=True)
'''

# Maps a home file (a copy from the remote content cache while remote), then waits for a line.
MAPPER = r'''
import mmap, os, sys
with open("data.txt", "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
print("ready", os.getpid(), flush=True)
line = sys.stdin.readline()
print("got", line.strip(), m[:11].decode(), flush=True)
'''

# A second thread, waiting on an event while the main thread reads.
THREADED = r'''
import os, sys, threading, time
stop = threading.Event()
t = threading.Thread(target=lambda: stop.wait())
t.start()
print("ready", os.getpid(), flush=True)
line = sys.stdin.readline()
stop.set()
t.join()
print("got", line.strip(), flush=True)
'''


def checksum(n):
    total = 0
    for i in range(n):
        total = (total * 31 + i) % 1000000007
    return total


def start(cluster, home, name, text, args=(), stdin=None):
    (home / name).write_text(text)
    job = cluster.start(1, ["mosrun", "-r", "2", PYTHON, name] + [str(a) for a in args], cwd=home,
                        stdin=stdin)
    job.read_until(b"ready", timeout=60)
    job.read_until(b"\n", timeout=60)
    rec = cluster.wait_remote(job, name)
    return job, rec["pid"]


def migrate_home(cluster, pid, timeout=120):
    return cluster.run(1, ["migrate", str(pid), "home"], timeout=timeout)


def exe(pid):
    return os.readlink(f"/proc/{pid}/exe")


def state_at_home(cluster, pid):
    for rec in cluster.mps():
        if rec.get("pid") == pid:
            return rec.get("state") == "home"
    return False


def blocked_in_read(pid):
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == "0"
    except (OSError, IndexError):
        return False


def test_computing_job_moves_home_and_finishes(cluster, home):
    n = 40_000_000
    job, pid = start(cluster, home, "counter.py", COUNTER, [n])
    job.read_until(b"step 1000000", timeout=120)
    assert exe(pid).endswith("mos-deputy")
    cp = migrate_home(cluster, pid)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert b"runs at home again" in cp.stdout
    # The same process, now the program itself, at home.
    assert b"pages" in cp.stdout, cp.stdout
    print(cp.stdout.decode())
    if job.popen.poll() is None:
        if exe(pid) != os.path.realpath(PYTHON):
            st, o, e = job.wait(timeout=600)
            assert False, (exe, st, o[-300:], e)
        assert wait_until(lambda: state_at_home(cluster, pid) or job.popen.poll() is not None,
                          timeout=30, what="mps shows the job at home")
    status, out, err = job.wait(timeout=600)
    assert status == 7, (out, err)
    assert out.endswith(b"total %d\n" % checksum(n)), out[-200:]
    steps = [line for line in out.splitlines() if line.startswith(b"step ")]
    assert steps == [b"step %d" % i for i in range(0, n, 1000000)]


STATE = Path("/run/umosix-cluster")


def listing(path):
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def test_job_blocked_in_a_forwarded_read_moves_home(cluster, home):
    job, pid = start(cluster, home, "reader.py", READER, stdin=subprocess.PIPE)
    cloexec_fd, inheritable_fd = (int(x) for x in job.out.split()[1:3])
    wait_until(lambda: blocked_in_read(pid), timeout=60, what="the deputy blocked in read")
    assert str(pid) in listing(STATE / "node-1" / "run" / "control")
    cp = migrate_home(cluster, pid)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert exe(pid) == os.path.realpath(PYTHON)
    # The job's descriptors, with their close-on-exec flags; none of the deputy's.
    assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == sorted(
        [0, 1, 2, cloexec_fd, inheritable_fd])

    def cloexec(fd):
        flags = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
        return bool(int(flags, 8) & 0o2000000)

    assert cloexec(cloexec_fd) and not cloexec(inheritable_fd)
    assert not cloexec(0) and not cloexec(1)
    # mps shows it at home; nothing of it is left on node 2, no image at home.
    assert state_at_home(cluster, pid)
    assert listing(STATE / "node-2" / "run" / "guests") == []
    assert listing(STATE / "node-2" / "run" / "shm") == []
    assert [f for f in listing(STATE / "node-1" / "run" / "images") if "home" in f] == []
    assert str(pid) not in listing(STATE / "node-1" / "run" / "control")
    # The read was re-issued at home, natively: it blocks there until the data comes.
    wait_until(lambda: blocked_in_read(pid), timeout=60, what="the job blocked in read at home")
    job.popen.stdin.write(b"hello from home\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 3, (out, err)
    assert out.endswith(b"got hello from home\n"), out


def test_handlers_blocked_and_pending_signals_move_home(cluster, home):
    job, pid = start(cluster, home, "signals.py", SIGNALS, stdin=subprocess.PIPE)
    wait_until(lambda: blocked_in_read(pid), timeout=60, what="the deputy blocked in read")
    os.kill(pid, signal.SIGUSR1)  # its handler runs on the remote node
    os.kill(pid, signal.SIGUSR2)  # blocked: pending in the guest
    job.popen.stdin.write(b"remote\n")
    job.popen.stdin.flush()
    job.read_until(b"usr1 1 pending [12] blocked [12]\n", timeout=60)
    wait_until(lambda: blocked_in_read(pid), timeout=60, what="the deputy blocked in read")
    cp = migrate_home(cluster, pid)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert exe(pid) == os.path.realpath(PYTHON)
    os.kill(pid, signal.SIGUSR1)  # now delivered by the home kernel to the job's own handler
    job.popen.stdin.write(b"home\nend\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 0, (out, err)
    lines = out.decode().splitlines()
    assert lines[-2:] == ["usr1 2 pending [12] blocked [12]"] * 2, out


def test_signals_sent_during_the_move_arrive_once_each(cluster, home):
    import threading
    job, pid = start(cluster, home, "rt.py", RT_COUNTER, stdin=subprocess.PIPE)
    wait_until(lambda: blocked_in_read(pid), timeout=60, what="the deputy blocked in read")
    sent = 0
    done = threading.Event()

    def sender():  # before, during and after the move, spread out
        nonlocal sent
        while (not done.is_set() or sent < 200) and sent < 2500:
            os.kill(pid, signal.SIGRTMIN)
            sent += 1
            time.sleep(0.0005)

    t = threading.Thread(target=sender)
    t.start()
    try:
        cp = migrate_home(cluster, pid)
    finally:
        done.set()
        t.join()
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert exe(pid) == os.path.realpath(PYTHON)
    job.popen.stdin.write(b"count\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 0, (out, err)
    assert out.endswith(b"rt %d\n" % sent), (sent, out)


def test_home_refuses_an_image_whose_mapped_file_changed_and_the_job_runs_on(cluster, home):
    (home / "data.txt").write_text("mapped data\n")
    job, pid = start(cluster, home, "mapper.py", MAPPER, stdin=subprocess.PIPE)
    wait_until(lambda: blocked_in_read(pid), timeout=60, what="the deputy blocked in read")
    st = (home / "data.txt").stat()
    os.utime(home / "data.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cp = migrate_home(cluster, pid)
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    assert b"data.txt changed since the image was taken" in cp.stderr, cp.stderr
    assert exe(pid).endswith("mos-deputy")  # still remote; its read was issued again there
    wait_until(lambda: blocked_in_read(pid), timeout=60, what="the deputy blocked in read again")
    job.popen.stdin.write(b"still remote\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 0, (out, err)
    assert out.endswith(b"got still remote mapped data\n"), out


def refused_and_runs_on(cluster, home, name, text, reason, last_line):
    """Starts `text` remotely, asks for a move home: refused with `reason` (exit 1), the job is
    still remote, reads the line it is then fed and ends with `last_line`."""
    job, pid = start(cluster, home, name, text, stdin=subprocess.PIPE)
    cp = migrate_home(cluster, pid)
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    assert reason in cp.stderr, cp.stderr
    assert exe(pid).endswith("mos-deputy")  # still remote
    job.popen.stdin.write(b"still remote\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 0, (out, err)
    assert out.endswith(last_line), out


def test_threaded_job_moves_home_and_runs_on(cluster, home):
    # Its second thread waits on a lock (a futex, local on the node), its main thread in a
    # forwarded read (test_migrate_threads.py checks the threads' ids and state in detail).
    job, pid = start(cluster, home, "threaded.py", THREADED, stdin=subprocess.PIPE)
    cp = migrate_home(cluster, pid)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert exe(pid) == os.path.realpath(PYTHON)
    assert len(os.listdir(f"/proc/{pid}/task")) == 2
    job.popen.stdin.write(b"at home\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 0, (out, err)
    assert out.endswith(b"got at home\n"), out


def test_job_holding_a_node_local_memfd_is_refused_and_runs_on(cluster, home):
    refused_and_runs_on(cluster, home, "memfd.py", MEMFD, b"live on node 2",
                        b"got still remote node-local\n")


def test_forked_child_and_its_parent_move_home_one_by_one(cluster, home):
    job, pid = start(cluster, home, "family.py", FAMILY, stdin=subprocess.PIPE)
    child = int(job.out.split(b"ready")[1].split()[0])
    wait_until(lambda: blocked_in_read(child) and blocked_in_read(pid), timeout=60,
               what="both deputies blocked in read")
    assert exe(child).endswith("mos-deputy")
    cp = migrate_home(cluster, child)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert exe(child) == os.path.realpath(PYTHON)
    assert exe(pid).endswith("mos-deputy")  # the parent is still remote
    cp = migrate_home(cluster, pid)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert exe(pid) == os.path.realpath(PYTHON)
    assert listing(STATE / "node-2" / "run" / "guests") == []
    job.popen.stdin.write(b"both home\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 0, (out, err)
    lines = sorted(out.decode().splitlines()[1:])
    assert lines == ["child got both home", "parent both home child status 5"], out


def test_migrate_home_of_a_job_at_home_is_a_no_op(cluster, home):
    cp = cluster.run(1, ["migrate", str(os.getpid()), "home"])
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert b"already runs at home" in cp.stdout


# The zdtm-style programs of tests/migrate (one kind of state each; run.py runs them through a
# checkpoint file), here in the remote->home direction: started remote by mosrun, moved home
# while they wait for "go", then they verify their state natively at home.
ZDTM = ["regs_fpu", "regs_avx512", "memory", "files", "signals", "handlers", "timers",
        "robust_rseq", "blocked_read", "self_pipe", "sigwait", "threads"]


@pytest.mark.parametrize("name", ZDTM)
def test_zdtm_program_moves_home(cluster, home, name):
    program = BUILD / "tests" / "migrate" / f"migrate_{name}"
    work = home / "work"
    work.mkdir()
    job = cluster.start(1, ["mosrun", "-r", "2", program, work], cwd=home, stdin=subprocess.PIPE)
    wait_until(lambda: (work / "ready").exists() or job.popen.poll() is not None, timeout=60,
               what=f"{name} ready")
    if job.popen.poll() is not None:
        status, out, err = job.wait(timeout=10)
        if status == 77:
            pytest.skip(out.decode(errors="replace").strip())
        raise AssertionError(f"{name} ended before it was ready ({status}): {out!r} {err!r}")
    pid = cluster.wait_remote(job, program.name)["pid"]
    cp = migrate_home(cluster, pid)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert exe(pid) == str(program.resolve())
    let_zdtm_go(job, work)
    status, out, err = job.wait(timeout=60)
    assert status == 0 and b"PASS" in out, (status, out, err)


# Maps a home file shared and writable: something only home can give. The job is brought home by
# its supervisor and deputy, and the mmap is issued again there, natively.
SHARED_WRITER = r'''
import mmap, os, sys
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
with open("shared.bin", "r+b") as f:
    m = mmap.mmap(f.fileno(), 4096)
    m[0:5] = b"HELLO"
    m.flush()
    print("mapped", bytes(m[0:8]).decode(), flush=True)
line = sys.stdin.readline()
print("got", line.strip(), flush=True)
'''


def test_job_that_maps_a_file_shared_and_writable_is_brought_home(cluster, home):
    (home / "shared.bin").write_bytes(b"abcdefgh" + bytes(4088))
    job, pid = start(cluster, home, "writer.py", SHARED_WRITER, stdin=subprocess.PIPE)
    assert exe(pid).endswith("mos-deputy")
    job.popen.stdin.write(b"map\n")
    job.popen.stdin.flush()
    job.read_until(b"mapped HELLOfgh\n", timeout=60)
    # It runs at home now, natively: the same pid, the program itself.
    wait_until(lambda: exe(pid) == os.path.realpath(PYTHON), timeout=30, what="the job at home")
    assert (home / "shared.bin").read_bytes()[:8] == b"HELLOfgh"
    rec = wait_until(lambda: state_at_home(cluster, pid) and
                     [r for r in cluster.mps() if r.get("pid") == pid][0], timeout=30,
                     what="mps shows it at home")
    assert rec["trail"] == [1, 2, 1], rec
    job.popen.stdin.write(b"after\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 0 and out.splitlines()[-1] == b"got after", (out, err)
    assert not list((STATE / "node-2" / "run" / "guests").glob("*")), "node 2 kept a record"


def test_locked_job_that_maps_a_file_shared_and_writable_gets_enodev(cluster, home):
    (home / "shared.bin").write_bytes(bytes(4096))
    (home / "writer.py").write_text(SHARED_WRITER)
    job = cluster.start(1, ["mosrun", "-L", "-r", "2", PYTHON, "writer.py"], cwd=home,
                        stdin=subprocess.PIPE)
    job.read_until(b"ready", timeout=60)
    job.popen.stdin.write(b"map\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status != 0 and b"No such device" in err, (status, out, err)
