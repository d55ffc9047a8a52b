"""Signals sent to P at home reach the guest; SIGKILL of P ends the guest; the death of the
remote node ends the job with status 112."""

import os
import signal
import time

from conftest import PYTHON, REMOTE_DIED, proc_alive, wait_until

HANDLER = r'''
import signal, sys, time
def on_term(sig, frame):
    print("got SIGTERM", flush=True)
    sys.exit(5)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:  # until a signal ends it
    time.sleep(0.1)
'''

SLEEPER = r'''
import time
print("ready", flush=True)
while True:  # until a signal ends it
    time.sleep(0.1)
'''


def start_remote(cluster, home, name, text):
    (home / name).write_text(text)
    job = cluster.start_mosrun([PYTHON, name], cwd=home)
    job.read_until(b"ready\n", timeout=60)
    rec = cluster.wait_remote(job, name)
    return job, rec


def test_sigterm_with_a_handler(cluster, home):
    job, rec = start_remote(cluster, home, "handler.py", HANDLER)
    os.kill(rec["pid"], signal.SIGTERM)
    status, out, err = job.wait(timeout=60)
    assert out == b"ready\ngot SIGTERM\n", err
    assert status == 5


def test_unhandled_sigterm_kills_the_job(cluster, home):
    job, rec = start_remote(cluster, home, "sleeper.py", SLEEPER)
    os.kill(rec["pid"], signal.SIGTERM)
    status, out, err = job.wait(timeout=60)
    assert status == -signal.SIGTERM, (status, err)
    assert out == b"ready\n"
    assert not proc_alive(rec["remotePid"])


def test_sigkill_of_p_ends_the_guest(cluster, home):
    job, rec = start_remote(cluster, home, "sleeper.py", SLEEPER)
    guest = rec["remotePid"]
    assert proc_alive(guest)
    os.kill(rec["pid"], signal.SIGKILL)
    # The supervisor kills the guest as soon as it sees the channel close; how soon that is
    # depends on the machine's load, so the deadline only catches a guest that outlives P.
    wait_until(lambda: not proc_alive(guest), timeout=30, interval=0.02,
               what=f"guest {guest} to die after SIGKILL of P")
    status, _, _ = job.wait(timeout=60)
    assert status == -signal.SIGKILL


def test_death_of_the_remote_node_ends_the_job_with_112(cluster, home):
    job, rec = start_remote(cluster, home, "sleeper.py", SLEEPER)
    try:
        cluster.kill_node(2)
        # From the moment node 2 is gone (kill_node returns when none of its processes is
        # left): the deputy sees the reset at once, or its 5 s TCP_USER_TIMEOUT at worst.
        t0 = time.monotonic()
        status, out, err = job.wait(timeout=60)
        elapsed = time.monotonic() - t0
        assert status == REMOTE_DIED, (status, err)
        assert err.strip(), "no message on stderr"
        assert elapsed < 15, f"mosrun took {elapsed:.1f}s to notice the node's death"
        assert not proc_alive(rec["pid"])
    finally:
        job.kill()
        cluster.revive(2)
