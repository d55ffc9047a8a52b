"""Threads of a guest (issue 6, docs/design.md "Threads"): each guest thread has a deputy thread
at home, so one thread blocked in a forwarded call never blocks its siblings; exit_group, exec
and SIGKILL of a threaded job end every thread on every node (the autouse fixture checks that
no process is left behind)."""

import signal

from conftest import PYTHON, wait_until

# A reader blocks in a forwarded read of an empty pipe while a sibling computes and exits; only
# then the main thread writes. Prints the same lines natively and remotely when the sibling
# finished (not alive) while the reader was still blocked (alive).
BLOCKED_READER = r'''
import os, threading
r, w = os.pipe()
got = []
reader = threading.Thread(target=lambda: got.append(os.read(r, 100)))
reader.start()
result = []
worker = threading.Thread(target=lambda: result.append(sum(i * i for i in range(3000000))))
worker.start()
worker.join(timeout=120)
print("computed", result, worker.is_alive(), reader.is_alive(), flush=True)
os.write(w, b"data")
reader.join(timeout=120)
print(got, reader.is_alive(), threading.active_count())
'''

# exit_group from a thread while the main thread blocks in a forwarded read.
EXIT_FROM_THREAD = r'''
import os, sys, threading
r, w = os.pipe()
def leave():
    print("leaving", flush=True)
    os._exit(7)
threading.Thread(target=leave).start()
os.read(r, 1)
print("not reached")
'''

# exec from a thread while three others block in forwarded reads: the exec ends them all.
EXEC_FROM_THREAD = r'''
import os, threading
r, w = os.pipe()
for _ in range(3):
    threading.Thread(target=os.read, args=(r, 1), daemon=True).start()
argv = ["sh", "-c", "echo exec from a thread; exit 4"]
t = threading.Thread(target=os.execv, args=("/bin/sh", argv))
t.start()
t.join()
'''

# A signal to the process reaches a thread that takes it (the main thread waits on a lock
# while another thread blocks in a forwarded read).
SIGNAL_TO_PROCESS = r'''
import os, signal, threading
got = threading.Event()
signal.signal(signal.SIGUSR1, lambda s, f: got.set())
r, w = os.pipe()
threading.Thread(target=os.read, args=(r, 1), daemon=True).start()
print("ready", flush=True)
print("handled", got.wait(60), flush=True)
'''

# Threads that block (reads) and compute, until the job is killed.
BUSY = r'''
import os, threading
r, w = os.pipe()
for _ in range(3):
    threading.Thread(target=os.read, args=(r, 1), daemon=True).start()
def spin():
    while True:
        sum(range(10000))
threading.Thread(target=spin, daemon=True).start()
print("ready", flush=True)
os.read(r, 1)
'''


def same_as_native(cluster, home, script, name):
    (home / name).write_text(script)
    remote = cluster.mosrun([PYTHON, name], cwd=home, timeout=180)
    native = cluster.native([PYTHON, name], cwd=home, timeout=180)
    assert (remote.returncode, remote.stdout, remote.stderr) == \
        (native.returncode, native.stdout, native.stderr), (native, remote)
    return remote


def test_thread_blocked_in_read_does_not_block_a_computing_sibling(cluster, home):
    cp = same_as_native(cluster, home, BLOCKED_READER, "blocked.py")
    assert cp.returncode == 0
    assert cp.stdout == (b"computed [8999995500000500000] False True\n"
                         b"[b'data'] False 1\n"), cp.stdout


def test_exit_group_from_a_thread_while_main_reads(cluster, home):
    cp = same_as_native(cluster, home, EXIT_FROM_THREAD, "leave.py")
    assert cp.returncode == 7 and cp.stdout == b"leaving\n", cp


def test_exec_from_a_thread_ends_its_siblings(cluster, home):
    cp = same_as_native(cluster, home, EXEC_FROM_THREAD, "exec.py")
    assert cp.returncode == 4 and cp.stdout == b"exec from a thread\n", cp


def test_signal_to_the_process_reaches_a_thread(cluster, home):
    (home / "sig.py").write_text(SIGNAL_TO_PROCESS)
    job = cluster.start_mosrun([PYTHON, "sig.py"], cwd=home)
    job.read_until(b"ready\n", timeout=60)
    cluster.wait_remote(job, "sig.py")
    job.popen.send_signal(signal.SIGUSR1)
    status, out, err = job.wait(timeout=60)
    assert status == 0 and out == b"ready\nhandled True\n", (status, out, err)


def test_sigkill_of_a_threaded_job_leaves_nothing(cluster, home):
    (home / "busy.py").write_text(BUSY)
    job = cluster.start_mosrun([PYTHON, "busy.py"], cwd=home)
    job.read_until(b"ready\n", timeout=60)
    cluster.wait_remote(job, "busy.py")
    job.popen.kill()
    status, out, err = job.wait(timeout=60)
    assert status == -signal.SIGKILL, (status, err)
    wait_until(lambda: not cluster.strays(), timeout=30, what="every thread's process to end")
