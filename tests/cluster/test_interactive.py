"""An interactive python3 REPL under `mosrun -r 2`, driven through a tmux terminal in node 1."""

import time

import pytest

from conftest import PYTHON, run_host, wait_until, LOCAL_CLUSTER

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
