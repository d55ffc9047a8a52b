"""Shared by bench/fork_wait and bench/pipe_throughput: run a build/bench program natively at home
and under `mosrun -r 2` on the local cluster, in interleaved rounds, and report each side's median
and their ratio. A remote run that fails is reported as `remote run failed: ...`, never a crash
(guests can fork only once issue 6 has landed)."""

import os
import re
import statistics
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = Path(os.environ.get("UMOSIX_BUILD", REPO / "build")).resolve()
LOCAL_CLUSTER = REPO / "scripts" / "local-cluster"
STATE = Path("/run/umosix-cluster")


def node(k, argv):
    return [str(LOCAL_CLUSTER), "exec", str(k)] + [str(a) for a in argv]


@contextmanager
def local_cluster(tool, nodes=2):
    """A cluster of at least `nodes` nodes (2 or more): the running one, or one started (and
    stopped) here."""
    if os.geteuid() != 0:
        sys.exit(f"{tool}: needs root (network namespaces)")
    started = False
    if not (STATE / "nodes").exists():
        subprocess.run([str(LOCAL_CLUSTER), "start", str(nodes)], check=True, timeout=120,
                       stdin=subprocess.DEVNULL)
        started = True
    elif int((STATE / "nodes").read_text()) < nodes:
        sys.exit(f"{tool}: the running cluster has fewer than {nodes} nodes")
    try:
        yield
    finally:
        if started:
            subprocess.run([str(LOCAL_CLUSTER), "stop"], timeout=120, stdin=subprocess.DEVNULL)


def measure(argv, key, timeout):
    """Runs argv; returns the float printed as `key=V`, or raises RuntimeError saying why not."""
    try:
        cp = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no result within {timeout}s") from None
    m = re.search(re.escape(key) + r"=([0-9.]+)", cp.stdout)
    if cp.returncode != 0 or not m:
        tail = (cp.stderr.strip() or cp.stdout.strip())[-600:].replace("\n", " | ")
        raise RuntimeError(f"exit status {cp.returncode}: {tail}")
    return float(m.group(1))


def compare(tool, program_argv, key, unit, rounds, timeout, higher_is_better):
    """Native and remote (mosrun -r 2) runs of program_argv in `rounds` interleaved rounds; prints
    the medians and remote/native (or native/remote when higher is better: the slowdown either
    way). Returns the exit status for the tool: 0, or 1 if a side failed."""
    values = {"native": [], "remote": []}
    errors = {}
    with local_cluster(tool):
        for _ in range(max(1, rounds)):
            for side, argv in (("native", node(1, program_argv)),
                               ("remote", node(1, ["mosrun", "-r", "2"] + program_argv))):
                if side in errors:
                    continue  # a side that failed once fails the same way again
                try:
                    values[side].append(measure(argv, key, timeout))
                except RuntimeError as e:
                    errors[side] = str(e)
    med = {s: statistics.median(v) for s, v in values.items() if v}
    print(f"{tool}: {' '.join(str(a) for a in program_argv)}, {rounds} interleaved rounds in one "
          f"run, median of the rounds")
    for side in ("native", "remote"):
        if side in med:
            print(f"  {side:<7} {med[side]:>12.2f} {unit}   rounds: "
                  + " ".join(f"{v:.2f}" for v in values[side]))
        else:
            print(f"{side} run failed: {errors[side]}")
    if "native" in med and "remote" in med and med["native"] > 0 and med["remote"] > 0:
        ratio = med["native"] / med["remote"] if higher_is_better else \
            med["remote"] / med["native"]
        what = "native / guest throughput" if higher_is_better else "guest / native time"
        print(f"ratio {what} = {ratio:.2f} (the guest's slowdown)")
    return 1 if errors else 0
