"""mps lists every process of a job (issue 6): a family of three processes forked on node 2, with
their home pids and parents, and why they stay there (the memory they share)."""

import json
import re

from conftest import PYTHON, wait_until

FAMILY = r'''
import json, mmap, os, sys, time
shared = mmap.mmap(-1, 4096)  # MAP_SHARED|MAP_ANONYMOUS, inherited by both forks
r, w = os.pipe()
child = os.fork()
if child == 0:
    grandchild = os.fork()
    if grandchild == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    print(json.dumps({"child": os.getpid(), "grandchild": grandchild}), flush=True)
    os.close(w)
    os.read(r, 1)
    os.waitpid(grandchild, 0)
    os._exit(0)
os.close(r)
print(json.dumps({"parent": os.getpid(), "child": child}), flush=True)
while not os.path.exists("go"):
    time.sleep(0.05)
os.close(w)
os.waitpid(child, 0)
print("done", flush=True)
'''


def test_mps_lists_a_forked_family_with_parents_and_stay_reasons(cluster, home):
    (home / "family.py").write_text(FAMILY)
    job = cluster.start_mosrun([PYTHON, "family.py"], cwd=home)
    out = job.read_until(b"grandchild", timeout=120)
    out = job.read_until(b"parent", timeout=120)
    ids = {}
    # Two processes print: with PYTHONUNBUFFERED a line and its newline are two writes, and the
    # other's line may come between them (natively too).
    for obj in re.findall(r"\{[^{}]*\}", out.decode()):
        ids.update(json.loads(obj))
    parent, child, grandchild = ids["parent"], ids["child"], ids["grandchild"]
    assert parent == job.pid

    def family():
        records = {r["pid"]: r for r in cluster.mps() if r.get("job") == parent}
        if set(records) != {parent, child, grandchild}:
            return None
        if any(not r["stay"] for r in records.values()):
            return None  # a guest not served yet
        return records

    records = wait_until(family, 60, interval=0.2, what="mps --json listing the family of 3")
    assert records[child]["ppid"] == parent
    assert records[grandchild]["ppid"] == child
    for pid, r in records.items():
        assert r["node"] == 2 and r["state"] == "remote", r
        assert r["threads"] == 1, r
        assert r["remotePid"] > 0, r
        others = sorted({parent, child, grandchild} - {pid})
        assert r["stay"] == (f"shares memory with {others[0]}, {others[1]} "
                             "(MAP_SHARED|MAP_ANONYMOUS)"), r

    table = cluster.run(1, ["mps"], timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.decode().splitlines()
    assert lines[0].split() == ["PID", "PPID", "WHERE", "STATE", "THR", "MOVES", "SYSCALLS",
                                 "COMMAND"]
    rows = {int(line.split()[0]): line.split() for line in lines[1:] if re.match(r"\s*\d", line)}
    assert rows[child][1] == str(parent) and rows[grandchild][1] == str(child)
    assert all(rows[p][2] == "2" and rows[p][4] == "1" for p in (parent, child, grandchild))
    assert sum("stays on node 2: shares memory with" in line for line in lines) == 3

    (home / "go").write_text("")
    job.read_until(b"done", timeout=120)
    assert job.popen.wait(timeout=60) == 0
    wait_until(lambda: not [r for r in cluster.mps() if r.get("job") == parent], 60,
               what="the family gone from mps")
