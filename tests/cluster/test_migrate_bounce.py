"""Real programs moved many times while they run (issue 8): `xz -6` fed from a pipe, and a python3
numeric script, are each bounced across three nodes (home -> 2 -> 3 -> home -> ...) with
`migrate`, 12 moves (4 of them straight from one remote node to the other), each while they
compute or wait for input, and write exactly what native runs write; `mps --json` counts the
moves and lists where the job has been."""

import random
import subprocess

from conftest import PYTHON, wait_until

# Targets of `migrate PID TARGET`, in order. A move from one remote node to another is direct:
# the deputy reconnects to the new node, and the job never runs at home in between.
TARGETS = ["2", "3", "home", "3", "2", "home", "2", "home", "3", "2", "home", "2"]


def expected_trail(targets):
    trail = [1]
    for t in targets:
        node = 1 if t == "home" else int(t)
        if node != trail[-1]:
            trail.append(node)
    return trail


def finish(job, last):
    """Writes `last` to the job's stdin, closes it, and waits for the job: (status, out, err)."""
    job.popen.stdin.write(last)
    job.popen.stdin.close()
    job.popen.stdin = None
    return job.wait(timeout=600)


def bounce(cluster, job, inputs):
    """For each of TARGETS in turn: writes the next of `inputs` to the job's stdin and moves the
    job there with `migrate` while it works on it. A failed move ends the job and reports its
    stderr. Returns the job's mps record, whose trail and move count must be the bounce's."""
    for i, target in enumerate(TARGETS):
        job.popen.stdin.write(inputs[i])
        job.popen.stdin.flush()
        assert job.popen.poll() is None, job.wait(timeout=10)
        cp = cluster.run(1, ["migrate", str(job.pid), target], timeout=300)
        if cp.returncode != 0:
            raise AssertionError((i, target, cp.stdout, cp.stderr, finish(job, b"")))
    trail = expected_trail(TARGETS)
    rec = wait_until(lambda: cluster.record(job.pid), timeout=60, what="the job's record")
    assert rec["trail"] == trail and rec["moves"] == len(trail) - 1, rec
    return rec


def word_chunks(seed, vocabulary, words_per_chunk):
    """len(TARGETS) + 1 chunks of compressible text, one per move and one after the last:
    `words_per_chunk` words drawn from `vocabulary` words of 2-10 letters (random.Random(seed))."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 10)))
             for _ in range(vocabulary)]
    return [" ".join(rng.choice(words) for _ in range(words_per_chunk)).encode()
            for _ in range(len(TARGETS) + 1)]


def test_xz_bounced_across_three_nodes_writes_what_a_native_run_writes(cluster, home):
    chunks = word_chunks(12, 20000, 250000)
    (home / "in.txt").write_bytes(b"".join(chunks))
    native = cluster.run(1, ["sh", "-c", "xz -6 -c < in.txt > native.xz"], cwd=home, timeout=600)
    assert native.returncode == 0, native.stderr

    job = cluster.start(1, ["mosrun", "sh", "-c", "exec xz -6 -c > moved.xz"], cwd=home,
                        stdin=subprocess.PIPE)
    rec = bounce(cluster, job, chunks)
    assert rec["node"] == 2 and rec["state"] == "remote", rec
    status, out, err = finish(job, chunks[-1])
    assert status == 0, err
    assert (home / "moved.xz").read_bytes() == (home / "native.xz").read_bytes()


NUMERIC = r'''
import math, sys
state = 1.0
for phase in range(13):
    sys.stdin.readline()  # the go for this phase; the move happens while it computes
    acc = 0.0
    for k in range(1, 1000000):
        state = (state * 1.000003 + math.sqrt(k) / (k + phase)) % 1e6
        acc += math.sin(state) * math.log1p(k)
    print(phase, repr(acc), repr(state), f"end{phase}", flush=True)
'''


def test_python_numeric_script_bounced_across_three_nodes_prints_what_a_native_run_prints(
        cluster, home):
    (home / "numeric.py").write_text(NUMERIC)
    native = cluster.run(1, [PYTHON, "numeric.py"], cwd=home, input=b"go\n" * 13, timeout=600)
    assert native.returncode == 0, native.stderr
    job = cluster.start(1, ["mosrun", PYTHON, "numeric.py"], cwd=home, stdin=subprocess.PIPE)
    for i, target in enumerate(TARGETS):
        job.popen.stdin.write(b"go\n")
        job.popen.stdin.flush()
        if i > 0:
            job.read_until(f"end{i - 1}\n".encode(), timeout=300)
        cp = cluster.run(1, ["migrate", str(job.pid), target], timeout=300)
        assert cp.returncode == 0, (i, target, cp.stdout, cp.stderr)
    rec = wait_until(lambda: cluster.record(job.pid), timeout=60, what="the job's record")
    assert rec["moves"] == len(expected_trail(TARGETS)) - 1, rec
    job.popen.stdin.write(b"go\n")
    job.popen.stdin.close()
    job.popen.stdin = None
    status, out, err = job.wait(timeout=600)
    assert status == 0, err
    assert out == native.stdout


# sqlite3 building a table and its indexes, one statement per phase, moved after each: the moves
# land while it inserts, sorts an index, or waits for its next statement on stdin. The database
# lives at home (every read and write is forwarded), and both runs must print the same results
# and end with databases of the same content (.sha3sum) and a clean integrity check.
SQL_PHASES = [
    "CREATE TABLE t(a INTEGER, b TEXT, c REAL);",
    "WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < 150000) "
    "INSERT INTO t SELECT (x * 7919) % 100003, printf('k%08d', (x * 104729) % 1000003), "
    "((x * 31) % 997) / 7.0 FROM s;",
    "CREATE INDEX tb ON t(b);",
    "CREATE INDEX tca ON t(c, a);",
    "SELECT count(*), sum(a), min(b), max(b) FROM t;",
    "UPDATE t SET c = c * 2 WHERE a % 3 = 0;",
    "CREATE INDEX ta ON t(a DESC);",
    "SELECT b, a FROM t WHERE b > 'k0050000' ORDER BY b LIMIT 5;",
    "DELETE FROM t WHERE a % 11 = 0;",
    "REINDEX;",
    "SELECT count(*), total(c) FROM t;",
    "PRAGMA integrity_check;",
]


def test_sqlite3_bounced_across_three_nodes_builds_what_a_native_run_builds(cluster, home):
    script = "".join(p + "\n" for p in SQL_PHASES) + ".sha3sum\n"
    native = cluster.run(1, ["sqlite3", "native.db"], cwd=home, input=script.encode(),
                         timeout=600)
    assert native.returncode == 0, native.stderr
    assert native.stdout.splitlines()[-2] == b"ok", native.stdout  # integrity_check
    job = cluster.start(1, ["mosrun", "sqlite3", "moved.db"], cwd=home, stdin=subprocess.PIPE)
    bounce(cluster, job, [(phase + "\n").encode() for phase in SQL_PHASES])
    status, out, err = finish(job, b".sha3sum\n")
    assert status == 0, err
    assert out == native.stdout
