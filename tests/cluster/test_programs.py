"""Real programs, run natively at home and under `mosrun -r 2`, with their inputs only in
/srv/umosix-home (absent on node 2): outputs must be equal byte for byte, exit statuses equal."""

import json
import os
import random
import stat

import pytest

from conftest import PYTHON


def same(native, remote, what):
    assert remote.returncode == native.returncode, (
        f"{what}: status native {native.returncode}, remote {remote.returncode}; remote stderr: "
        f"{remote.stderr[-2000:]!r}")
    assert remote.stdout == native.stdout, f"{what}: stdout differs"
    assert remote.stderr == native.stderr, f"{what}: stderr differs"


def test_sha256sum_of_100_mb(cluster, home):
    data = home / "big.bin"
    rng = random.Random(7)
    with open(data, "wb") as f:
        for _ in range(100):
            f.write(rng.randbytes(1 << 20))
    native = cluster.native(["sha256sum", "big.bin"], cwd=home, timeout=120)
    assert native.returncode == 0 and len(native.stdout) == 64 + 2 + 7 + 1
    remote = cluster.mosrun(["sha256sum", "big.bin"], cwd=home, timeout=600)
    same(native, remote, "sha256sum")


def test_sort_then_uniq_with_redirections(cluster, home):
    rng = random.Random(11)
    words = [f"w{rng.randrange(5000):05d} {rng.choice(['a', 'b', 'c'])}" for _ in range(100000)]
    (home / "in.txt").write_text("\n".join(words) + "\n")
    for tag, prefix in (("n", ""), ("r", "mosrun -r 2 ")):
        cp = cluster.sh(f"{prefix}sort --parallel=1 < in.txt > mid.{tag} && "
                        f"{prefix}uniq -c < mid.{tag} > out.{tag}", cwd=home, timeout=300)
        assert cp.returncode == 0, (tag, cp.stderr)
    assert (home / "mid.r").read_bytes() == (home / "mid.n").read_bytes()
    assert (home / "out.r").read_bytes() == (home / "out.n").read_bytes()
    assert (home / "out.n").stat().st_size > 0


CONVERT = r'''
import csv, json, sys
with open(sys.argv[1]) as f:
    records = json.load(f)
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["id", "name", "score"])
    for r in records:
        w.writerow([r["id"], r["name"], r["score"]])
total = sum(r["score"] for r in records)
print(f"{len(records)} records, total {total:.3f}")
'''


def test_python_json_to_csv(cluster, home):
    rng = random.Random(3)
    records = [{"id": i, "name": f"n{i}", "score": rng.random() * 100} for i in range(20000)]
    (home / "data.json").write_text(json.dumps(records))
    (home / "convert.py").write_text(CONVERT)
    native = cluster.native([PYTHON, "convert.py", "data.json", "out.n.csv"], cwd=home)
    assert native.returncode == 0, native.stderr
    remote = cluster.mosrun([PYTHON, "convert.py", "data.json", "out.r.csv"], cwd=home,
                            timeout=300)
    same(native, remote, "python json->csv")
    assert (home / "out.r.csv").read_bytes() == (home / "out.n.csv").read_bytes()


SQL = """
create table t(id integer primary key, name text, v real);
with recursive c(x) as (select 1 union all select x + 1 from c where x < 5000)
insert into t(name, v) select 'n' || x, x * 0.5 from c;
create index t_v on t(v);
select count(*), sum(v), min(name), max(name) from t;
select name from t where v between 100 and 102 order by id;
"""


def test_sqlite3_creates_and_queries_a_db(cluster, home):
    native = cluster.native(["sqlite3", "n.db", SQL], cwd=home)
    assert native.returncode == 0 and native.stdout, native.stderr
    remote = cluster.mosrun(["sqlite3", "r.db", SQL], cwd=home, timeout=300)
    same(native, remote, "sqlite3 create")
    assert (home / "r.db").read_bytes() == (home / "n.db").read_bytes()
    query = "select count(*), avg(v) from t where name like 'n1%';"
    native = cluster.native(["sqlite3", "n.db", query], cwd=home)
    remote = cluster.mosrun(["sqlite3", "n.db", query], cwd=home, timeout=120)
    same(native, remote, "sqlite3 query")


def test_xz_compresses_to_the_same_bytes(cluster, home):
    rng = random.Random(5)
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", str(rng.random())])
                    for _ in range(300000))
    for tag in ("n", "r"):
        (home / f"text.{tag}").write_text(text)
    native = cluster.native(["xz", "-9", "-k", "text.n"], cwd=home, timeout=300)
    assert native.returncode == 0, native.stderr
    remote = cluster.mosrun(["xz", "-9", "-k", "text.r"], cwd=home, timeout=600)
    same(native, remote, "xz")
    assert (home / "text.r").read_bytes() == (home / "text.n").read_bytes()  # -k kept it
    assert (home / "text.r.xz").read_bytes() == (home / "text.n.xz").read_bytes()


def test_ls_la_of_a_home_dir(cluster, home):
    d = home / "listed"
    d.mkdir()
    for i, mode in enumerate([0o644, 0o600, 0o755, 0o444]):
        f = d / f"file{i}"
        f.write_bytes(b"x" * (i * 1000))
        f.chmod(mode)
        os.utime(f, (1_600_000_000 + i, 1_600_000_000 + i))
    (d / "sub").mkdir()
    os.symlink("file1", d / "link")
    os.utime(d / "sub", (1_500_000_000, 1_500_000_000))
    native = cluster.native(["ls", "-la", "--time-style=full-iso", "listed"], cwd=home)
    assert native.returncode == 0 and b"file3" in native.stdout
    remote = cluster.mosrun(["ls", "-la", "--time-style=full-iso", "listed"], cwd=home)
    same(native, remote, "ls -la")


def test_exit_status_3(cluster, home):
    for argv in (["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
                 [PYTHON, "-c", "import sys; print('bye'); sys.exit(3)"]):
        native = cluster.native(argv, cwd=home)
        assert native.returncode == 3
        remote = cluster.mosrun(argv, cwd=home)
        same(native, remote, f"exit 3: {argv}")


SCRIPT = r'''
import os, sys
with open("input.txt") as f:
    lines = f.read().splitlines()
print(sys.argv[0].rsplit("/", 1)[-1], len(lines), lines[-1], os.getcwd())
sys.exit(4)
'''


def test_sh_exec_python_and_a_shebang_script(cluster, home):
    """exec happens at home and the new program goes remote again."""
    (home / "input.txt").write_text("".join(f"line {i}\n" for i in range(1000)))
    (home / "x.py").write_text(SCRIPT)
    (home / "shebang").write_text("#!/usr/bin/python3\n" + SCRIPT)
    (home / "shebang").chmod(0o755)
    for argv in (["/bin/sh", "-c", f"exec {PYTHON} x.py"], ["./shebang"]):
        native = cluster.native(argv, cwd=home)
        assert native.returncode == 4 and b"line 999" in native.stdout, native.stderr
        remote = cluster.mosrun(argv, cwd=home)
        same(native, remote, f"exec chain {argv}")


def test_stdin_and_stdout_are_the_jobs_own(cluster, home):
    data = bytes(range(256)) * 4096
    native = cluster.native(["cat"], input=data)
    remote = cluster.mosrun(["cat"], input=data, timeout=120)
    same(native, remote, "cat through pipes")
    assert remote.stdout == data
