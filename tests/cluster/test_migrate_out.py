"""`migrate PID NODE`: a job started at home (`mosrun prog`, no -r) moves to node 2 while it runs
(docs/migrate.1.md, docs/design.md "Migration of a running process"). The job goes on from where
it was: same pid, same output as a native run, same exit status, its CPU now on node 2; a
refused move leaves it running at home, unharmed."""

import os
import subprocess

import pytest

from conftest import BUILD, PYTHON, REMOTE, let_zdtm_go, proc_alive, proc_times, wait_until

COUNTER = r'''
import sys
print("pid", __import__("os").getpid(), flush=True)
total = 0
for i in range(30):
    for k in range(1000000):  # CPU work between lines
        total += k * i
    print("tick", i, total % 1000003, flush=True)
sys.exit(7)
'''

READER = r'''
import os, sys
print("ready", flush=True)
line = sys.stdin.readline()  # blocked in read(0) of a pipe while it moves
print("read", repr(line), flush=True)
data = sys.stdin.read()
print("rest", len(data), flush=True)
sys.exit(3)
'''

SIGNALS = r'''
import os, signal, sys, time
ticks = 0
usr1 = 0
def on_alrm(s, f):
    global ticks
    ticks += 1
def on_usr1(s, f):
    global usr1
    usr1 += 1
signal.signal(signal.SIGALRM, on_alrm)
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
os.kill(os.getpid(), signal.SIGUSR1)  # pending while blocked: must arrive exactly once
signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
print("ready", flush=True)
sys.stdin.readline()  # moved here
print("pending", sorted(int(s) for s in signal.sigpending()), flush=True)
print("usr2 ignored", signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN, flush=True)
t0 = ticks
deadline = time.monotonic() + 20
while ticks - t0 < 5 and time.monotonic() < deadline:
    time.sleep(0.01)
print("itimer fires", ticks - t0 >= 5, flush=True)
signal.setitimer(signal.ITIMER_REAL, 0, 0)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
time.sleep(0.1)
print("usr1", usr1, flush=True)
sys.exit(0)
'''

THREADED = r'''
import sys, threading
threading.Thread(target=lambda: sys.stdin.readline() and None, daemon=True).start()
print("ready", flush=True)
import time
time.sleep(0.5)
sys.stdin2 = open("/dev/null")
total = 0
for i in range(5):
    total += i
print("done", total, flush=True)
'''


def start_home(cluster, home, name, text, stdin=None):
    (home / name).write_text(text)
    return cluster.start(1, ["mosrun", PYTHON, name], cwd=home, stdin=stdin)


def feed(job, data):
    """Writes data to the job's stdin and closes it (communicate() must not touch it then)."""
    job.popen.stdin.write(data)
    job.popen.stdin.close()
    job.popen.stdin = None


def migrate(cluster, pid, node=REMOTE, timeout=120, job=None):
    cp = cluster.run(1, ["migrate", str(pid), str(node)], timeout=timeout)
    if cp.returncode != 0 and job is not None and job.popen.poll() is not None:
        cp.stderr += b"\njob's stderr: " + job.popen.stderr.read()
        try:
            log = open(f"/run/umosix-cluster/node-{node}/mosd.log", "rb").read()[-3000:]
        except OSError:
            log = b"(none)"
        cp.stderr += b"\nnode's log: " + log
        print(cp.stderr.decode(errors="replace"))
    return cp


def test_counter_moved_mid_run(cluster, home):
    (home / "counter.py").write_text(COUNTER)
    native = cluster.native([PYTHON, "counter.py"], cwd=home)
    assert native.returncode == 7, native.stderr
    job = start_home(cluster, home, "counter.py", COUNTER)
    job.read_until(b"tick 3 ", timeout=60)
    cp = migrate(cluster, job.pid, job=job)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert f"pid {job.pid} runs on node {REMOTE}".encode() in cp.stdout
    rec = cluster.wait_record_on(job.pid, REMOTE, timeout=30, what="job record on node 2")
    # The guest computes on node 2: its CPU time grows there, while P at home (the deputy now)
    # only serves the writes.
    guest = rec["remotePid"]
    home0, guest0 = proc_times(job.pid), proc_times(guest)
    assert guest0 is not None
    wait_until(lambda: (proc_times(guest) or 10**9) >= guest0 + 30, 60,
               what="0.3 s of CPU on node 2")
    assert proc_times(job.pid) - home0 < 10
    status, out, err = job.wait(timeout=120)
    first, _, rest = out.partition(b"\n")
    assert first == f"pid {job.pid}".encode(), out  # the same process all along
    assert rest == native.stdout.partition(b"\n")[2], err
    assert status == 7, err


def test_blocked_read_moved_then_fed(cluster, home):
    job = start_home(cluster, home, "reader.py", READER, stdin=subprocess.PIPE)
    job.read_until(b"ready\n", timeout=60)
    # Wait until it sleeps in read(0).
    wait_until(lambda: open(f"/proc/{job.pid}/syscall").read().split()[:2] == ["0", "0x0"],
               30, what="job blocked in read(0, ...)")
    cp = migrate(cluster, job.pid, job=job)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert cluster.record(job.pid)["node"] == REMOTE
    feed(job, b"hello there\n" + b"x" * 100000)
    status, out, err = job.wait(timeout=120)
    assert out == b"ready\nread 'hello there\\n'\nrest 100000\n", err
    assert status == 3, err


def test_handlers_blocked_pending_itimer(cluster, home):
    job = start_home(cluster, home, "signals.py", SIGNALS, stdin=subprocess.PIPE)
    job.read_until(b"ready\n", timeout=60)
    cp = migrate(cluster, job.pid, job=job)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    feed(job, b"go\n")
    status, out, err = job.wait(timeout=120)
    assert out == (b"ready\npending [10]\nusr2 ignored True\nitimer fires True\nusr1 1\n"), err
    assert status == 0, err


def test_threaded_job_moves_and_runs_on(cluster, home):
    # Its second thread reads stdin (test_migrate_threads.py checks threads in detail).
    job = start_home(cluster, home, "threaded.py", THREADED, stdin=subprocess.PIPE)
    job.read_until(b"ready\n", timeout=60)
    cp = migrate(cluster, job.pid, job=job)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert f"pid {job.pid} runs on node {REMOTE}".encode() in cp.stdout
    feed(job, b"x\n")
    status, out, err = job.wait(timeout=60)
    assert out == b"ready\ndone 10\n", err
    assert status == 0, err
    assert cluster.record(job.pid) is None


def test_unknown_or_down_node_is_refused(cluster, home):
    job = start_home(cluster, home, "reader.py", READER, stdin=subprocess.PIPE)
    job.read_until(b"ready\n", timeout=60)
    cp = migrate(cluster, job.pid, node=9)
    assert cp.returncode == 1 and b"not in the cluster map" in cp.stderr, cp.stderr
    cluster.kill_node(3)
    try:
        cp = migrate(cluster, job.pid, node=3)
        assert cp.returncode == 1, (cp.stdout, cp.stderr)
        assert b"down or unreachable" in cp.stderr, cp.stderr
    finally:
        cluster.revive(3)
    assert not os.readlink(f"/proc/{job.pid}/exe").endswith("mos-deputy")  # still native
    feed(job, b"at home\n")
    status, out, err = job.wait(timeout=60)
    assert out == b"ready\nread 'at home\\n'\nrest 0\n", err
    assert status == 3


# The zdtm programs of tests/migrate (each sets up one kind of state, signals DIR/ready, waits
# for DIR/go and "go" on stdin, then verifies and prints PASS), moved home→remote instead of
# through a checkpoint file.
ZDTM = ["regs_fpu", "regs_avx512", "memory", "files", "signals", "handlers", "timers",
        "robust_rseq", "blocked_read", "self_pipe", "sigwait"]


@pytest.mark.parametrize("name", ZDTM)
def test_zdtm_home_to_remote(cluster, home, name):
    program = BUILD / "tests" / "migrate" / f"migrate_{name}"
    work = home / "work"
    work.mkdir()
    job = cluster.start(1, ["mosrun", program, work], cwd=home, stdin=subprocess.PIPE)
    wait_until(lambda: (work / "ready").exists() or job.popen.poll() is not None, 60,
               what=f"{name} ready")
    if job.popen.poll() == 77:
        pytest.skip(f"{name}: not on this machine")
    assert job.popen.poll() is None, job.popen.stdout.read()
    cp = migrate(cluster, job.pid, job=job)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    let_zdtm_go(job, work)
    status, out, err = job.wait(timeout=120)
    assert status == 0 and b"PASS" in out, (status, out, err)


WAITER = r'''
import sys
print("ready", flush=True)
line = sys.stdin.readline()  # blocked here in the checkpoint, and again once resumed and moved
print("got", line.strip(), sum(k * k for k in range(200000)), flush=True)
sys.exit(7)
'''


def test_checkpoint_resumed_with_r_goes_on_on_the_node(cluster, home):
    # `mosrun -R FILE -r 2`: a checkpoint of a job that ran at home, blocked in read(0), is
    # resumed at home, then moved to node 2; there it reads what it is fed and ends as natively.
    (home / "waiter.py").write_text(WAITER)
    native = cluster.run(1, [PYTHON, "waiter.py"], cwd=home, input=b"x\n", timeout=120)
    assert native.returncode == 7, native.stderr
    first = cluster.start(1, [PYTHON, "waiter.py"], cwd=home, stdin=subprocess.PIPE)
    first.read_until(b"ready\n", timeout=60)
    image = home / "waiter.img"
    cp = cluster.run(1, ["migrate", str(first.pid), "checkpoint", str(image)], timeout=120)
    assert cp.returncode == 0, cp.stderr
    first.kill()
    resumed = cluster.start(1, ["mosrun", "-R", str(image), "-r", str(REMOTE)], cwd=home,
                            stdin=subprocess.PIPE)
    rec = cluster.wait_record_on(resumed.pid, REMOTE, timeout=120,
                                 what="the resumed job on node 2")
    assert rec["state"] == "remote", rec
    feed(resumed, b"x\n")
    status, out, err = resumed.wait(timeout=120)
    assert status == 7, err
    assert out == native.stdout.replace(b"ready\n", b""), (out, err)
