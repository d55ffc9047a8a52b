"""Live moves from one remote node to another (issue 8): `migrate PID NODE` of a job that runs on
node 2 moves its user part straight to node 3. The deputy takes the migration stream from node 2,
starts the job on node 3 and reconnects its channel there; the job never runs at home in
between, keeps its pid, output and exit status, and node 2 keeps nothing of it. A move that
cannot happen (the target node is down) leaves the job running where it was."""

import os
import signal
import subprocess
from pathlib import Path
import pytest

from conftest import BUILD, PYTHON, let_zdtm_go, proc_times, wait_until
from test_migrate_live import COUNTER, READER, SIGNALS, ZDTM, blocked_in_read, checksum, start


def move(cluster, pid, node, timeout=120):
    return cluster.run(1, ["migrate", str(pid), str(node)], timeout=timeout)


def job_processes(cluster, node):
    """Processes on `node` other than its mosd: guests and supervisors (one job at a time runs
    in these tests)."""
    mosd = str(BUILD / "tools" / "mosd")
    found = []
    for p in cluster.node_pids(node):
        try:
            if os.readlink(f"/proc/{p}/exe") == mosd:
                continue
            found.append(p)
        except OSError:
            continue
    return found


def guest_cpu_ticks(pid):
    return proc_times(pid) or 0


def test_computing_job_moves_from_node_2_to_node_3_without_going_home(cluster, home):
    n = 60_000_000
    job, pid = start(cluster, home, "counter.py", COUNTER, [n])
    job.read_until(b"step 1000000", timeout=120)
    cp = move(cluster, pid, 3)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert b"runs on node 3 (from node 2)" in cp.stdout, cp.stdout
    rec = cluster.wait_record_on(pid, 3, timeout=30, what="mps shows the job on node 3")
    assert rec["state"] == "remote" and rec["trail"] == [1, 2, 3] and rec["moves"] == 2, rec
    # Node 2 keeps nothing of the job: its guest and supervisor are gone.
    wait_until(lambda: not job_processes(cluster, 2), timeout=30,
               what="nothing of the job left on node 2")
    # It computes on node 3 (its guest's CPU time grows there), and home stays a deputy.
    guest = rec["remotePid"]
    assert guest in cluster.node_pids(3), (guest, rec)
    before = guest_cpu_ticks(guest)
    wait_until(lambda: job.popen.poll() is not None or guest_cpu_ticks(guest) > before + 20,
               timeout=120, what="the guest on node 3 computing")
    assert os.readlink(f"/proc/{pid}/exe").endswith("mos-deputy")
    status, out, err = job.wait(timeout=900)
    assert status == 7, (out[-300:], err)
    assert out.endswith(b"total %d\n" % checksum(n)), out[-200:]
    steps = [line for line in out.splitlines() if line.startswith(b"step ")]
    assert steps == [b"step %d" % i for i in range(0, n, 1000000)]


def test_job_blocked_in_a_forwarded_read_moves_to_node_3_and_reads_there(cluster, home):
    job, pid = start(cluster, home, "reader.py", READER, stdin=subprocess.PIPE)
    wait_until(lambda: blocked_in_read(pid), timeout=60, what="the deputy blocked in read(0)")
    cp = move(cluster, pid, 3)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    cluster.wait_remote(job, "reader.py", node=3)
    job.popen.stdin.write(b"x" * 100000 + b"\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 3, (out, err)
    assert out.splitlines()[-1] == b"got " + b"x" * 100000, out[-200:]


def test_handlers_blocked_and_pending_signals_move_between_nodes(cluster, home):
    job, pid = start(cluster, home, "signals.py", SIGNALS, stdin=subprocess.PIPE)
    wait_until(lambda: blocked_in_read(pid), timeout=60, what="the deputy blocked in read")
    os.kill(pid, signal.SIGUSR1)  # its handler runs on node 2
    os.kill(pid, signal.SIGUSR2)  # blocked: pending in the guest, it moves with it
    job.popen.stdin.write(b"node2\n")
    job.popen.stdin.flush()
    job.read_until(b"usr1 1 pending [12] blocked [12]\n", timeout=60)
    wait_until(lambda: blocked_in_read(pid), timeout=60, what="the deputy blocked in read")
    cp = move(cluster, pid, 3)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    cluster.wait_remote(job, "signals.py", node=3)
    os.kill(pid, signal.SIGUSR1)  # its handler runs on node 3
    job.popen.stdin.write(b"node3\nend\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 0, (out, err)
    lines = out.decode().splitlines()
    assert lines[-2:] == ["usr1 2 pending [12] blocked [12]"] * 2, out


def test_move_to_a_dead_node_is_refused_and_the_job_runs_on(cluster, home):
    job, pid = start(cluster, home, "reader.py", READER, stdin=subprocess.PIPE)
    cluster.kill_node(3)
    try:
        cp = move(cluster, pid, 3)
        assert cp.returncode != 0, (cp.stdout, cp.stderr)
        assert b"runs on where it was" in cp.stderr, cp.stderr
        assert b"node 3" in cp.stderr, cp.stderr
    finally:
        cluster.revive(3)
    rec = cluster.record(pid)
    assert rec["node"] == 2 and rec["state"] == "remote" and rec["moves"] == 1, rec
    job.popen.stdin.write(b"still here\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 3, (out, err)
    assert out.splitlines()[-1] == b"got still here", out


def test_move_to_the_node_it_runs_on_is_a_no_op(cluster, home):
    job, pid = start(cluster, home, "reader.py", READER, stdin=subprocess.PIPE)
    cp = move(cluster, pid, 2)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert b"already runs on node 2" in cp.stdout, cp.stdout
    job.popen.stdin.write(b"ok\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 3 and out.splitlines()[-1] == b"got ok", (out, err)


def passes(job, work, what):
    """Lets a zdtm program (or the process resumed from its checkpoint) verify its state: `go`
    in its directory and on its stdin; it must exit 0 and print PASS."""
    let_zdtm_go(job, work)
    status, out, err = job.wait(timeout=60)
    assert status == 0 and b"PASS" in out, (what, status, out, err)


def start_zdtm_on_node_2(cluster, home, name, sub):
    program = BUILD / "tests" / "migrate" / f"migrate_{name}"
    work = home / sub
    work.mkdir()
    job = cluster.start(1, ["mosrun", "-r", "2", program, work], cwd=home, stdin=subprocess.PIPE)
    wait_until(lambda: (work / "ready").exists() or job.popen.poll() is not None, timeout=60,
               what=f"{name} ready")
    if job.popen.poll() is not None:
        status, out, err = job.wait(timeout=10)
        if status == 77:
            pytest.skip(out.decode(errors="replace").strip())
        raise AssertionError(f"{name} ended before it was ready ({status}): {out!r} {err!r}")
    return job, work, cluster.wait_remote(job, program.name)["pid"]


# The zdtm-style programs of tests/migrate (one kind of state each), here remote -> remote:
# started on node 2, moved to node 3 while they wait for "go", then they verify their state.
@pytest.mark.parametrize("name", ZDTM)
def test_zdtm_program_moves_from_node_2_to_node_3(cluster, home, name):
    job, work, pid = start_zdtm_on_node_2(cluster, home, name, "work")
    cp = move(cluster, pid, 3)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    cluster.wait_remote(job, f"migrate_{name}", node=3)
    passes(job, work, "moved to node 3")


# `mosrun -L`: the job is locked where it starts. Every move is refused with the reason, mps
# shows why it stays, and the job runs on, correct, where it was.
def test_job_locked_on_its_node_is_never_moved(cluster, home):
    (home / "reader.py").write_text(READER)
    job = cluster.start(1, ["mosrun", "-L", "-r", "2", PYTHON, "reader.py"], cwd=home,
                        stdin=subprocess.PIPE)
    job.read_until(b"ready", timeout=60)
    pid = cluster.wait_remote(job, "reader.py")["pid"]
    for target in ("home", "3"):
        cp = move(cluster, pid, target)
        assert cp.returncode == 1, (target, cp.stdout, cp.stderr)
        assert b"locked by mosrun -L" in cp.stderr and b"runs on where it was" in cp.stderr, \
            cp.stderr
    rec = cluster.record(pid)
    assert rec["node"] == 2 and rec["moves"] == 1, rec
    assert rec["stay"] == "locked by mosrun -L", rec
    out = cluster.run(1, ["mps"]).stdout.decode()
    assert "stays on node 2: locked by mosrun -L" in out, out
    job.popen.stdin.write(b"locked\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 3 and out.splitlines()[-1] == b"got locked", (out, err)


FORKER = r'''
import os, sys
child = os.fork()
if child == 0:
    sys.stdin.readline()
    print("child done", flush=True)
    os._exit(4)
print("ready", child, flush=True)
_, status = os.waitpid(child, 0)
print("child status", os.waitstatus_to_exitcode(status), flush=True)
'''


def test_fork_of_a_locked_job_is_locked_too(cluster, home):
    (home / "forker.py").write_text(FORKER)
    job = cluster.start(1, ["mosrun", "-L", "-r", "2", PYTHON, "forker.py"], cwd=home,
                        stdin=subprocess.PIPE)
    job.read_until(b"ready ", timeout=60)
    child = int(job.read_until(b"\n", timeout=60).split()[-1])
    cluster.wait_record_on(child, 2, timeout=60, what="the child's record on node 2")
    cp = move(cluster, child, "home")
    assert cp.returncode == 1 and b"locked by mosrun -L" in cp.stderr, (cp.stdout, cp.stderr)
    job.popen.stdin.write(b"go\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 0 and out.splitlines()[-2:] == [b"child done", b"child status 4"], (out, err)


def test_job_locked_at_home_is_never_moved(cluster, home):
    (home / "reader.py").write_text(READER)
    job = cluster.start(1, ["mosrun", "-L", PYTHON, "reader.py"], cwd=home, stdin=subprocess.PIPE)
    job.read_until(b"ready", timeout=60)
    cp = move(cluster, job.pid, 2)
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    assert b"locked by mosrun -L" in cp.stderr and b"stays at home" in cp.stderr, cp.stderr
    assert os.readlink(f"/proc/{job.pid}/exe") == os.path.realpath(PYTHON)
    job.popen.stdin.write(b"home\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 3 and out.splitlines()[-1] == b"got home", (out, err)


# Checkpoints of a job whose user part runs on node 2 (`migrate PID checkpoint FILE` of its
# deputy): the image is streamed home and written with the job's descriptors and cwd, and the
# job runs on, on node 2. The zdtm programs pass in the original (kept running) and resumed at
# home from the file (`mosrun -R FILE`) after the original is killed.
@pytest.mark.parametrize("name", ZDTM)
def test_zdtm_program_checkpointed_on_node_2_runs_on_and_resumes_at_home(cluster, home, name):
    image = home / f"{name}.ckpt"
    job, work, pid = start_zdtm_on_node_2(cluster, home, name, "kept")
    cp = cluster.run(1, ["migrate", str(pid), "checkpoint", image], timeout=120)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert image.exists() and not list(home.glob(f"{name}.ckpt.tmp.*"))
    rec = cluster.record(pid)
    assert rec["node"] == 2 and rec["state"] == "remote", rec
    passes(job, work, "kept running")

    job, work, pid = start_zdtm_on_node_2(cluster, home, name, "resumed")
    cp = cluster.run(1, ["migrate", str(pid), "checkpoint", image], timeout=120)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    job.kill()
    passes(cluster.start(1, ["mosrun", "-R", image], cwd=home, stdin=subprocess.PIPE), work,
           "resumed")


def test_periodic_checkpoints_of_a_job_running_on_node_2(cluster, home):
    """mosrun -C FILE -A MINUTES -r 2: the checkpointer asks the deputy for each checkpoint while
    the user part runs on node 2; the job keeps running there and passes, and the last
    checkpoint, resumed at home after the job is killed, passes too."""
    for phase in ("original", "resumed"):
        image = home / f"{phase}.ckpt"
        program = BUILD / "tests" / "migrate" / "migrate_memory"
        work = home / phase
        work.mkdir()
        job = cluster.start(1, ["mosrun", "-C", image, "-A", "0.005", "-r", "2", program, work],
                            cwd=home, stdin=subprocess.PIPE)
        wait_until(lambda: (work / "ready").exists() or job.popen.poll() is not None,
                   timeout=60, what="memory ready")
        assert job.popen.poll() is None, job.wait(timeout=10)
        pid = cluster.wait_remote(job, program.name)["pid"]
        ready = (work / "ready").stat().st_mtime_ns
        seen = set()

        def rewritten_after_ready():
            try:
                st = image.stat()  # each checkpoint is a new file renamed over the last
            except FileNotFoundError:
                return False
            if st.st_mtime_ns > ready:
                seen.add(st.st_ino)
            return len(seen) >= 3
        wait_until(rewritten_after_ready, timeout=120, what="three checkpoints after ready")
        rec = cluster.record(pid)
        assert rec["node"] == 2 and rec["state"] == "remote", rec
        if phase == "original":
            passes(job, work, "kept running")
            continue
        job.kill()
        passes(cluster.start(1, ["mosrun", "-R", image], cwd=home, stdin=subprocess.PIPE), work,
               "resumed")


class BrokenCache:
    """Node K's content cache made unusable (its directory replaced by a file): the supervisor
    cannot install the files a job maps, so it fails the job's start before the guest runs."""

    def __init__(self, node):
        self.cache = STATE / f"node-{node}" / "cache"
        self.saved = STATE / f"node-{node}" / "cache.saved"

    def __enter__(self):
        self.cache.rename(self.saved)
        self.cache.write_text("not a directory\n")
        return self

    def __exit__(self, *exc):
        self.cache.unlink()
        self.saved.rename(self.cache)


STATE = Path("/run/umosix-cluster")


def test_job_whose_node_fails_its_start_runs_on_at_home(cluster, home):
    """migrate PID 2 of a job at home whose start node 2 fails: migrate streams the image itself
    and execs the deputy only once the guest runs, so the job never stops being itself: it runs
    on at home, correct, and migrate says why."""
    (home / "reader.py").write_text(READER)
    job = cluster.start(1, ["mosrun", PYTHON, "reader.py"], cwd=home, stdin=subprocess.PIPE)
    job.read_until(b"ready", timeout=60)
    job.read_until(b"\n", timeout=60)
    with BrokenCache(2):
        cp = move(cluster, job.pid, 2)
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    assert b"runs on at home" in cp.stderr, cp.stderr
    wait_until(lambda: os.readlink(f"/proc/{job.pid}/exe") == os.path.realpath(PYTHON),
               timeout=30, what="the job itself again at home")
    job.popen.stdin.write(b"still here\n")
    job.popen.stdin.flush()
    status, out, err = job.wait(timeout=60)
    assert status == 3 and out.splitlines()[-1] == b"got still here", (out, err)


def test_mosrun_r_whose_node_fails_the_start_runs_the_job_at_home(cluster, home):
    with BrokenCache(2):
        cp = cluster.mosrun([PYTHON, "-c", "import os; print('pid', os.getpid() > 0)"], cwd=home,
                            timeout=120)
    assert cp.returncode == 0, (cp.stdout, cp.stderr)
    assert cp.stdout == b"pid True\n", cp.stdout
    assert b"the job runs on at home" in cp.stderr, cp.stderr
