"""Idle daemons and waiting clients sleep (issue 5, section 1).

KJ-on-libuv (runtime/uv_event_port.cc) once polled with a zero timeout forever after the first
queued event of a Promise::wait(): every mosd burned a whole CPU from its first accepted
connection on, and mps and mosrun's node check spun while they waited for an answer. These tests
measure CPU time (utime + stime) over a window in which the process only waits.
"""

import os
import socket
import subprocess
import time

from conftest import BUILD, NODES, proc_times, wait_until

TICKS = os.sysconf("SC_CLK_TCK")
WINDOW_S = 5.0  # the measurement window: mosd must be idle throughout


def test_idle_mosds_use_almost_no_cpu_after_a_job(cluster):
    cp = cluster.mosrun(["/bin/echo", "ran on node 2"])
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == b"ran on node 2\n"
    # Every mosd has now served connections (mps asks its own node's mosd), the trigger of the
    # old spin.
    for k in range(1, NODES + 1):
        cluster.mps(k)
    wait_until(lambda: not cluster.strays(), timeout=30, interval=0.1,
               what="the job's supervisor to end")
    pids = {k: cluster.mosd_pid(k) for k in range(1, NODES + 1)}
    assert all(pids.values()), pids
    before = {k: proc_times(p) for k, p in pids.items()}
    start = time.monotonic()
    time.sleep(WINDOW_S)  # the window itself, not a wait for some state
    elapsed = time.monotonic() - start
    after = {k: proc_times(p) for k, p in pids.items()}
    assert all(v is not None for v in list(before.values()) + list(after.values())), \
        "a mosd died during the measurement"
    used = {k: (after[k] - before[k]) / TICKS for k in pids}
    share = sum(used.values()) / elapsed
    print(f"idle mosds: {share:.2%} of a CPU over {elapsed:.1f} s (CPU seconds per node: {used})")
    assert share <= 0.01, (f"idle mosds used {share:.1%} of a CPU over {elapsed:.1f} s "
                           f"(seconds per node: {used})")


def silent_peer(address):
    """A listening TCP socket on address:0 that never accepts: connections complete in its
    backlog and then hear nothing. Returns (socket, port)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((address, 0))
    s.listen(16)
    return s, s.getsockname()[1]


def cluster_files(tmp_path, map_text):
    (tmp_path / "map").write_text(map_text)
    key = tmp_path / "cluster.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    (tmp_path / "run").mkdir()
    return tmp_path / "map", key


def run_measured(argv, env, timeout):
    """Runs argv to its end; returns (status, stderr, CPU seconds, wall seconds)."""
    start = time.monotonic()
    p = subprocess.Popen([str(a) for a in argv], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid == p.pid:
            break
        if time.monotonic() >= deadline:
            p.kill()
            os.wait4(p.pid, 0)
            raise AssertionError(f"{argv} did not end within {timeout} s")
        time.sleep(0.05)
    wall = time.monotonic() - start
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, p.stderr.read().decode(), usage.ru_utime + usage.ru_stime, wall


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("UMOSIX_")}
    env.update(extra)
    return env


def test_mps_waiting_for_a_silent_mosd_sleeps(tmp_path):
    peer, port = silent_peer("127.0.0.1")
    with peer:
        map_path, key = cluster_files(tmp_path, "1 127.0.0.1\n")
        status, err, cpu, wall = run_measured(
            [BUILD / "tools" / "mps", "--map", map_path, "--node", "1", "--port", port, "--key",
             key, "--timeout", "2000"], clean_env(), timeout=60)
    print(f"mps: {cpu * 1000:.1f} ms of CPU in {wall:.2f} s")
    assert status == 1, err
    assert "did not answer within 2000 ms" in err
    assert wall >= 1.9
    # A spinning mps used about all of the 2 s; startup costs a few ms.
    assert cpu <= 0.2, f"mps used {cpu:.3f} s of CPU while waiting {wall:.1f} s"


def test_mosrun_node_check_of_a_silent_mosd_sleeps(tmp_path):
    peer, port = silent_peer("127.0.0.2")
    with peer:
        map_path, key = cluster_files(tmp_path, "1 127.0.0.1\n2 127.0.0.2\n")
        env = clean_env(UMOSIX_MAP=str(map_path), UMOSIX_NODE="1", UMOSIX_PORT=str(port),
                        UMOSIX_KEY=str(key), UMOSIX_RUN_DIR=str(tmp_path / "run"))
        status, err, cpu, wall = run_measured(
            [BUILD / "tools" / "mosrun", "-r", "2", "/bin/true"], env, timeout=60)
    print(f"mosrun: {cpu * 1000:.1f} ms of CPU in {wall:.2f} s")
    assert status == 125, err
    assert "unreachable" in err
    assert wall >= 2.9  # mosrun's node check waits 3 s
    assert cpu <= 0.3, f"mosrun used {cpu:.3f} s of CPU while waiting {wall:.1f} s"
