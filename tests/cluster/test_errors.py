"""Bad input: mosrun fails before the job starts with 125 (node problems, bad map), 126/127 for
a program that cannot be executed; none leaves a process behind (checked by the fixture)."""

import os
import re

import pytest

from conftest import MOSRUN_FAILED, NOT_EXECUTABLE, NOT_FOUND, PYTHON, STATE

OK = [PYTHON, "-c", "print('should not run')"]


def test_node_not_in_the_map(cluster, home):
    cp = cluster.mosrun(OK, node=9, cwd=home, timeout=30)
    assert cp.returncode == MOSRUN_FAILED, cp.stderr
    assert b"9" in cp.stderr
    assert b"should not run" not in cp.stdout


def test_node_in_the_map_without_mosd(cluster, home):
    cluster.kill_node(3)
    try:
        cp = cluster.mosrun(OK, node=3, cwd=home, timeout=60)
        assert cp.returncode == MOSRUN_FAILED, cp.stderr
        assert cp.stderr.strip()
        assert b"should not run" not in cp.stdout
    finally:
        cluster.revive(3)


def test_node_in_the_map_that_does_not_exist(cluster, home):
    """Node 4 is in this map, but no machine has its address."""
    (home / "map").write_text("1 10.77.0.1 4\n")
    cp = cluster.run(1, ["env", f"UMOSIX_MAP={home / 'map'}", "mosrun", "-r", "4"] + OK,
                     cwd=home, timeout=60)
    assert cp.returncode == MOSRUN_FAILED, cp.stderr
    assert cp.stderr.strip()


def test_missing_program(cluster, home):
    cp = cluster.mosrun(["/nonexistent/program"], cwd=home, timeout=30)
    assert cp.returncode == NOT_FOUND, cp.stderr
    cp = cluster.mosrun(["no-such-program-umosix"], cwd=home, timeout=30)
    assert cp.returncode == NOT_FOUND, cp.stderr


def test_program_not_executable(cluster, home):
    (home / "plain.txt").write_text("not a program\n")
    cp = cluster.mosrun(["./plain.txt"], cwd=home, timeout=30)
    assert cp.returncode == NOT_EXECUTABLE, cp.stderr


@pytest.mark.parametrize("bad", ["1 10.77.0.1 3\nnot a map line\n",
                                 "1 10.77.0.1 3\n2 10.77.0.999 1\n"])
def test_malformed_map_names_the_line(cluster, home, bad):
    (home / "bad.map").write_text(bad)
    cp = cluster.run(1, ["env", f"UMOSIX_MAP={home / 'bad.map'}", "mosrun", "-r", "2"] + OK,
                     cwd=home, timeout=30)
    assert cp.returncode == MOSRUN_FAILED, cp.stderr
    assert re.search(rb"line\s*2\b|:2\b", cp.stderr), cp.stderr
    assert b"should not run" not in cp.stdout


def test_another_cluster_key_is_refused(cluster, home):
    """A node that cannot prove the cluster key gets nothing from mosd, which keeps serving."""
    key = home / "other.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    cp = cluster.run(1, ["env", f"UMOSIX_KEY={key}", "mosrun", "-r", "2"] + OK, cwd=home,
                     timeout=60)
    assert cp.returncode == MOSRUN_FAILED, cp.stderr
    assert b"refused node 1" in cp.stderr, cp.stderr
    assert b"should not run" not in cp.stdout
    log = (STATE / "node-2" / "mosd.log").read_text(errors="replace")
    assert "claiming node 1: wrong proof" in log
    cp = cluster.mosrun([PYTHON, "-c", "print('ran')"], cwd=home, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == b"ran\n"
