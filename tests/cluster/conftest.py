"""Fixtures of the cluster tests: one 3-node local cluster per session (scripts/local-cluster).

Node 1 is home (host mount namespace, sees /srv/umosix-home); nodes 2 and 3 are remote (their
/srv is an empty tmpfs), so a remote job can read the home files only through its deputy.

Every subprocess has a timeout. The session fixture always stops the cluster, even when starting
it failed, and then asserts that no namespace, mount or umosix process is left behind. After each
test, an autouse fixture asserts that no job process is left on any node (only the mosds).
"""

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("UMOSIX_BUILD", REPO / "build")).resolve()
LOCAL_CLUSTER = REPO / "scripts" / "local-cluster"
STATE = Path("/run/umosix-cluster")
HOME_DATA = Path("/srv/umosix-home")
PYTHON = "/usr/bin/python3"
NODES = 3
REMOTE = 2

# Exit statuses of mosrun (the contract).
MOSRUN_FAILED = 125
NOT_EXECUTABLE = 126
NOT_FOUND = 127
REMOTE_DIED = 112

# Same environment for the native and the remote runs, so outputs can be compared byte for byte.
BASE_ENV = dict(os.environ, LC_ALL="C", LANG="C", TZ="UTC", PYTHONHASHSEED="0",
                PYTHONDONTWRITEBYTECODE="1")
BASE_ENV.pop("PYTHONPATH", None)


class CommandTimeout(AssertionError):
    pass


def run_host(argv, timeout=60, check=True, **kw):
    """Runs argv on the host with a timeout; returns CompletedProcess (text)."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("capture_output", True)
    try:
        cp = subprocess.run([str(a) for a in argv], timeout=timeout, text=True, **kw)
    except subprocess.TimeoutExpired as e:
        raise CommandTimeout(f"timed out after {timeout}s: {argv}\nstdout: {e.stdout}\n"
                             f"stderr: {e.stderr}") from None
    if check and cp.returncode != 0:
        raise AssertionError(f"{argv} exited {cp.returncode}\nstdout: {cp.stdout}\n"
                             f"stderr: {cp.stderr}")
    return cp


def proc_times(pid):
    """utime + stime of pid in clock ticks, or None when it is gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[11]) + int(fields[12])


def proc_alive(pid):
    return proc_times(pid) is not None


def proc_describe(pid):
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} exe={exe} cmd={cmd.strip()}"


def wait_until(predicate, timeout, interval=0.05, what="condition"):
    """Polls predicate until it returns a true value (returned) or raises after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def let_zdtm_go(job, work):
    """Lets a zdtm program of tests/migrate go on: DIR/go, then "go" on its stdin (blocked_read
    waits there) and stdin closed. A program that does not read stdin may see the file, pass and
    exit before the line is written: its stdin is then a broken pipe, which is no failure."""
    (work / "go").touch()
    try:
        job.popen.stdin.write(b"go\n")
        job.popen.stdin.flush()
    except BrokenPipeError:
        pass
    try:
        job.popen.stdin.close()  # closes the descriptor even when the flush fails
    except BrokenPipeError:
        pass
    job.popen.stdin = None


class Job:
    """A process started in a node with Popen (binary pipes). Always reaped by the fixture."""

    def __init__(self, popen, argv):
        self.popen = popen
        self.argv = argv
        self.out = b""
        self.err = b""

    @property
    def pid(self):
        return self.popen.pid

    def read_until(self, needle: bytes, timeout=60):
        """Reads stdout until it contains needle; returns everything read so far."""
        sel = selectors.DefaultSelector()
        sel.register(self.popen.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while needle not in self.out:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.argv}: no {needle!r} on stdout after {timeout}s;"
                                         f" got {self.out!r}")
                if not sel.select(left):
                    continue
                chunk = os.read(self.popen.stdout.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"{self.argv}: stdout closed before {needle!r}; got "
                                         f"{self.out!r}, status {self.popen.poll()}")
                self.out += chunk
        finally:
            sel.close()
        return self.out

    def wait(self, timeout=60):
        """Waits for the end; returns (status, stdout, stderr). Kills it on timeout."""
        try:
            out, err = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CommandTimeout(f"{self.argv} did not end within {timeout}s") from None
        self.out += out or b""
        self.err += err or b""
        return self.popen.returncode, self.out, self.err

    def kill(self):
        if self.popen.poll() is None:
            try:
                self.popen.kill()
            except ProcessLookupError:
                pass
            try:
                self.popen.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pass


class Cluster:
    def __init__(self):
        self.jobs = []

    # --- running things in nodes -------------------------------------------------------------

    def argv(self, node, argv):
        return [str(LOCAL_CLUSTER), "exec", str(node)] + [str(a) for a in argv]

    def run(self, node, argv, cwd=None, stdin=None, input=None, timeout=120, env=None):
        """Runs argv in node (text=False); returns CompletedProcess with bytes stdout/stderr."""
        kw = dict(cwd=cwd, env=env or BASE_ENV, capture_output=True, timeout=timeout)
        if input is not None:
            kw["input"] = input
        else:
            kw["stdin"] = stdin if stdin is not None else subprocess.DEVNULL
        full = self.argv(node, argv)
        try:
            return subprocess.run(full, **kw)
        except subprocess.TimeoutExpired as e:
            raise CommandTimeout(f"timed out after {timeout}s: {full}\nstdout: "
                                 f"{(e.stdout or b'')[-2000:]!r}\nstderr: "
                                 f"{(e.stderr or b'')[-2000:]!r}") from None

    def native(self, argv, **kw):
        """Runs argv natively at home (node 1)."""
        return self.run(1, argv, **kw)

    def mosrun(self, argv, node=REMOTE, **kw):
        """Runs `mosrun -r node argv` from the home node's shell."""
        return self.run(1, ["mosrun", "-r", str(node)] + list(argv), **kw)

    def sh(self, script, cwd=None, timeout=120):
        """Runs a shell script in node 1 (the user's shell)."""
        return self.run(1, ["/bin/sh", "-c", script], cwd=cwd, timeout=timeout)

    def start(self, node, argv, cwd=None, stdin=None):
        """Starts argv in node with piped stdout/stderr; the fixture reaps it."""
        full = self.argv(node, argv)
        p = subprocess.Popen(full, cwd=cwd, env=BASE_ENV, stdin=stdin or subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        job = Job(p, full)
        self.jobs.append(job)
        return job

    def start_mosrun(self, argv, node=REMOTE, cwd=None):
        return self.start(1, ["mosrun", "-r", str(node)] + list(argv), cwd=cwd)

    # --- inspection ---------------------------------------------------------------------------

    def mps(self, node=1):
        """The jobs listed by `mps --json` on node: a list of dicts."""
        cp = self.run(node, ["mps", "--json"], timeout=60)
        assert cp.returncode == 0, f"mps --json failed: {cp.stderr!r}"
        text = cp.stdout.decode()
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        if isinstance(data, dict):
            data = data.get("jobs", [data])
        return data

    def record(self, pid):
        """The `mps --json` record of job process `pid` on node 1, or None."""
        for rec in self.mps():
            if rec.get("pid") == pid:
                return rec
        return None

    def wait_record_on(self, pid, node, timeout=60, what=None):
        """Waits until job process `pid`'s record says it runs on `node` (state `remote`: a record
        may name the node while the move there is still `migrating`); returns the record."""
        def find():
            r = self.record(pid)
            return r if r and r.get("node") == node and r.get("state") == "remote" else None
        return wait_until(find, timeout, interval=0.05, what=what or f"job {pid} on node {node}")

    def wait_remote(self, job, token, node=REMOTE, timeout=60):
        """Waits until mps at home lists the job (pid == job.pid, or command containing token)
        as running remotely on node; returns its mps record."""
        def find():
            if job.popen.poll() is not None:
                raise AssertionError(f"job ended before it was seen remote: status "
                                     f"{job.popen.returncode}, stdout {job.out!r}, stderr "
                                     f"{job.popen.stderr.read()!r}")
            for rec in self.mps():
                mine = rec.get("pid") == job.pid or token in str(rec.get("command", ""))
                if mine and rec.get("state") == "remote" and rec.get("node") == node:
                    return rec
            return None
        return wait_until(find, timeout, interval=0.05, what=f"job {token} remote on node {node}")

    def node_pids(self, node):
        cp = run_host([LOCAL_CLUSTER, "pids", node], timeout=30)
        return {int(x) for x in cp.stdout.split()}

    def mosd_pid(self, node):
        try:
            return int((STATE / f"node-{node}" / "mosd.pid").read_text())
        except (OSError, ValueError):
            return None

    def strays(self):
        """Processes of any node other than its mosd (and mosd's own forks that run the mosd
        program, not a job), described. A supervisor that outlives its job is a stray."""
        left = []
        mosd = str(BUILD / "tools" / "mosd")
        for k in range(1, NODES + 1):
            for pid in sorted(self.node_pids(k) - {self.mosd_pid(k)}):
                if not proc_alive(pid):
                    continue
                try:
                    if os.readlink(f"/proc/{pid}/exe") == mosd:
                        continue
                except OSError:
                    continue
                left.append(f"node {k}: {proc_describe(pid)}")
        return left

    def kill_node(self, node):
        run_host([LOCAL_CLUSTER, "kill", node], timeout=30)

    def revive(self, node):
        run_host([LOCAL_CLUSTER, "revive", node], timeout=60)

    def reap_jobs(self):
        for job in self.jobs:
            job.kill()
        self.jobs.clear()


def leftovers():
    """What a stopped cluster must not leave: namespaces, mounts, state, umosix processes."""
    found = []
    cp = run_host(["ip", "netns", "list"], check=False, timeout=20)
    found += [f"netns {line}" for line in cp.stdout.splitlines() if line.startswith("umosix-")]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if "umosix" in line:
            found.append(f"mount {line}")
    if STATE.exists():
        found.append(f"state dir {STATE}")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            exe = os.readlink(d / "exe")
        except OSError:
            continue
        if exe.startswith(str(BUILD) + "/"):
            found.append(f"process {proc_describe(int(d.name))}")
    return found


@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.fail("the cluster tests need root (network and mount namespaces)")
    HOME_DATA.mkdir(parents=True, exist_ok=True)
    # A cluster left over by an interrupted run.
    run_host([LOCAL_CLUSTER, "stop"], check=False, timeout=120)
    c = Cluster()
    try:
        cp = run_host([LOCAL_CLUSTER, "start", NODES], check=False, timeout=120,
                      env=dict(os.environ, UMOSIX_BUILD=str(BUILD)))
        if cp.returncode != 0:
            pytest.fail(f"local-cluster start {NODES} failed ({cp.returncode}):\n{cp.stderr}",
                        pytrace=False)
        yield c
    finally:
        c.reap_jobs()
        cp = run_host([LOCAL_CLUSTER, "stop"], check=False, timeout=120)
        left = leftovers()
        assert cp.returncode == 0, f"local-cluster stop failed: {cp.stderr}"
        assert not left, "the stopped cluster left things behind:\n" + "\n".join(left)


@pytest.fixture(autouse=True)
def no_strays(request):
    """After each test that uses the cluster: reap its jobs, then no job process may remain."""
    yield
    if "cluster" not in request.fixturenames:
        return
    c = request.getfixturevalue("cluster")
    c.reap_jobs()
    try:
        wait_until(lambda: not c.strays(), timeout=30, interval=0.05,
                   what="no stray processes")
    except AssertionError:
        left = c.strays()
        # Kill them so that the next test starts clean, then fail this one.
        for line in left:
            pid = int(re.search(r": (\d+) ", line).group(1))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail("processes left behind:\n" + "\n".join(left), pytrace=False)


@pytest.fixture
def home(request):
    """A fresh directory under /srv/umosix-home for one test (removed afterwards)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80]
    d = HOME_DATA / f"t-{name}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)
