"""An interactive python3 REPL under `mosrun -r 2`, driven through a tmux terminal in node 1."""

import os
import time

import pytest

from conftest import BUILD, PYTHON, run_host, wait_until, LOCAL_CLUSTER

SOCKET = "umosix-test"


class Tmux:
    def __init__(self, cluster):
        self.cluster = cluster

    def __call__(self, *args, timeout=60):
        cp = self.cluster.run(1, ["tmux", "-L", SOCKET] + list(args), timeout=timeout)
        assert cp.returncode == 0, (args, cp.stderr)
        return cp.stdout.decode(errors="replace")

    def screen(self):
        return self("capture-pane", "-p", "-t", "repl")

    def lines(self):
        return [l.rstrip() for l in self.screen().splitlines() if l.strip()]

    def wait_screen(self, predicate, what, timeout=60):
        try:
            return wait_until(lambda: predicate(self.lines()), timeout, interval=0.1, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}; screen:\n{self.screen()}") from None


def test_python_repl_in_a_terminal(cluster, home):
    tmux = Tmux(cluster)
    try:
        tmux("new-session", "-d", "-s", "repl", "-x", "100", "-y", "30", "-c", str(home),
             f"mosrun -r 2 {PYTHON} -q; echo EXIT=$?; sleep 300")
        tmux.wait_screen(lambda l: l and l[-1] == ">>>", "the first prompt", timeout=120)
        rec = wait_until(lambda: [r for r in cluster.mps() if r.get("state") == "remote"],
                         60, interval=0.05, what="the REPL remote")[0]
        assert rec["node"] == 2

        tmux("send-keys", "-t", "repl", "print(6*7)", "Enter")
        tmux.wait_screen(lambda l: l[-2:] == ["42", ">>>"], "42 and a new prompt")

        tmux("send-keys", "-t", "repl", "C-c")
        tmux.wait_screen(lambda l: l[-2:] == ["KeyboardInterrupt", ">>>"],
                         "KeyboardInterrupt and a new prompt")

        tmux("send-keys", "-t", "repl", "C-d")
        tmux.wait_screen(lambda l: "EXIT=0" in l, "the REPL to exit with status 0")
    finally:
        cluster.run(1, ["tmux", "-L", SOCKET, "kill-server"], timeout=60)


def test_job_control_stops_and_resumes_a_remote_repl(cluster, home):
    """Ctrl-Z stops the job as the shell sees it (the guest stops on node 2 too); fg resumes."""
    tmux = Tmux(cluster)
    try:
        tmux("new-session", "-d", "-s", "repl", "-x", "100", "-y", "30", "-c", str(home),
             "bash --norc -i")
        tmux("send-keys", "-t", "repl", f"PS1='$ '; mosrun -r 2 {PYTHON} -q", "Enter")
        tmux.wait_screen(lambda l: l and l[-1] == ">>>", "the first prompt", timeout=120)
        rec = wait_until(lambda: [r for r in cluster.mps() if r.get("state") == "remote"],
                         60, interval=0.05, what="the REPL remote")[0]
        guest = rec["remotePid"]

        tmux("send-keys", "-t", "repl", "C-z")
        tmux.wait_screen(lambda l: any("Stopped" in x for x in l) and l[-1] == "$",
                         "the shell to report the job stopped")
        with open(f"/proc/{guest}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        assert state == "T", f"the guest on node 2 is in state {state}, not stopped"

        tmux("send-keys", "-t", "repl", "fg", "Enter")
        # bash echoes the job's command when it resumes it in the foreground.
        tmux.wait_screen(lambda l: len(l) >= 2 and l[-2] == "$ fg" and l[-1].endswith(" -q"),
                         "the shell to resume the job")
        tmux("send-keys", "-t", "repl", "print(6*7)", "Enter")
        tmux.wait_screen(lambda l: l[-2:] == ["42", ">>>"], "42 after fg")
        tmux("send-keys", "-t", "repl", "C-d")
        tmux("send-keys", "-t", "repl", "echo EXIT=$?", "Enter")
        tmux.wait_screen(lambda l: "EXIT=0" in l, "the REPL to exit with status 0 after fg")
    finally:
        cluster.run(1, ["tmux", "-L", SOCKET, "kill-server"], timeout=60)


MAKEFILE = """\
all: a.run b.run c.run d.run
%.run:
\twhile :; do echo tick >> $@.log; sleep 0.05; done
"""


def guest_states(cluster, node=2):
    """{pid: state letter} of the job processes on node: everything but mosd and supervisors."""
    skip = {str((BUILD / "tools") / "mosd"), str((BUILD / "tools") / "mos-supervisor")}
    states = {}
    for pid in cluster.node_pids(node):
        try:
            if os.readlink(f"/proc/{pid}/exe") in skip:
                continue
            with open(f"/proc/{pid}/stat") as f:
                states[pid] = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
    return states


def log_sizes(home):
    return {p.name: p.stat().st_size for p in home.glob("*.run.log")}


def home_pid(pid):
    """The pid of node process `pid` in its job's pid namespace: the job process's home pid
    (docs/design.md, "Home ids in the guest's kernel"), which is its deputy at home."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return None


def stopped_as_natively(pid, state):
    """True when job process `pid` on the node, in `state`, is stopped as it would be natively:
    in a group stop itself; or waiting in a vfork for a child that a stop caught before its exec
    (natively, too, a vfork parent waits in the kernel and stops only once the child has execed);
    or waiting in a call at home whose deputy is stopped (a Ctrl-Z that came while the job
    process executed at home, between its fork and its exec: the home process is the one the
    shell sees stopped)."""
    if state == "T":
        return True
    try:
        with open(f"/proc/{pid}/wchan") as f:
            if state == "D" and f.read().strip() == "kernel_clone":
                return True
        deputy = home_pid(pid)
        with open(f"/proc/{deputy}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, TypeError):
        return False


def describe_job(cluster, node=2):
    """ps-style lines of the job processes on node and of their deputies at home, for a failure
    message: pid, home pid, state, wchan, command line."""
    lines = []
    for pid, state in sorted(guest_states(cluster, node).items()):
        deputy = home_pid(pid)
        try:
            wchan = open(f"/proc/{pid}/wchan").read().strip()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            with open(f"/proc/{deputy}/stat") as f:
                dstate = f.read().rsplit(")", 1)[1].split()[0]
            dwchan = open(f"/proc/{deputy}/wchan").read().strip()
            with open(f"/proc/{deputy}/status") as f:
                sig = [x.strip() for x in f if x.startswith(("SigPnd", "ShdPnd", "SigBlk"))]
        except (OSError, TypeError):
            lines.append(f"{pid} (home {deputy}) {state} gone")
            continue
        lines.append(f"{pid} {state} {wchan} {cmd!r} | home {deputy} {dstate} {dwchan} {sig}")
    return "\n".join(lines)


def test_job_control_of_a_remote_make_family(cluster, home):
    """`mosrun -r 2 make -j2` in a terminal: Ctrl-Z stops every process of the job on node 2,
    fg resumes them all, Ctrl-C ends them all; nothing of the job remains on any node."""
    (home / "Makefile").write_text(MAKEFILE)
    tmux = Tmux(cluster)
    try:
        tmux("new-session", "-d", "-s", "repl", "-x", "100", "-y", "30", "-c", str(home),
             "bash --norc -i")
        tmux("send-keys", "-t", "repl", "PS1='$ '; mosrun -r 2 make -j2", "Enter")
        # Two recipes run at once (-j2): both logs grow, written by shells on node 2.
        wait_until(lambda: len([s for s in log_sizes(home).values() if s > 0]) == 2, 120,
                   interval=0.1, what="two recipes running")
        wait_until(lambda: len(guest_states(cluster)) >= 3, 60, interval=0.05,
                   what="make and two recipe shells on node 2")

        tmux("send-keys", "-t", "repl", "C-z")
        tmux.wait_screen(lambda l: any("Stopped" in x for x in l) and l[-1] == "$",
                         "the shell to report the job stopped")
        # Every job process on node 2 stops (a sleep may still be finishing its exec: wait).
        def all_stopped():
            s = guest_states(cluster)
            return s if s and all(stopped_as_natively(p, st) for p, st in s.items()) else None
        states = wait_until(all_stopped, 60, interval=0.05, what="every job process stopped")
        assert len(states) >= 3, states
        assert "T" in states.values(), states
        before = log_sizes(home)

        tmux("send-keys", "-t", "repl", "fg", "Enter")
        tmux.wait_screen(lambda l: any(x == "$ fg" for x in l), "the shell to resume the job")
        # Both running recipes write again.
        try:
            wait_until(lambda: all(log_sizes(home).get(k, 0) > v for k, v in before.items()),
                       60, interval=0.1, what="both recipes writing again after fg")
        except AssertionError as e:
            raise AssertionError(f"{e}\nlogs before {before}, now {log_sizes(home)}\n"
                                 f"{describe_job(cluster)}") from None

        tmux("send-keys", "-t", "repl", "C-c")
        tmux.wait_screen(lambda l: l and l[-1] == "$", "the prompt after Ctrl-C")
        tmux("send-keys", "-t", "repl", "echo EXIT=$?", "Enter")
        tmux.wait_screen(lambda l: any(x.startswith("EXIT=") for x in l), "the exit status")
        status = [x for x in tmux.lines() if x.startswith("EXIT=")][-1]
        assert status in ("EXIT=130", "EXIT=2"), status  # make killed by SIGINT, or make's 2
        wait_until(lambda: not guest_states(cluster), 60, interval=0.05,
                   what="no job process left on node 2")
    finally:
        cluster.run(1, ["tmux", "-L", SOCKET, "kill-server"], timeout=60)
