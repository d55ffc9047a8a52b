"""The syscall conformance programs (tests/syscalls, built into build/tests/syscalls/), each
under `mosrun -r 2`: exit 0, or 77 = skip."""

import os

import pytest

from conftest import BUILD

SYSCALLS = BUILD / "tests" / "syscalls"


def programs():
    if not SYSCALLS.is_dir():
        return []
    return sorted(p.name for p in SYSCALLS.iterdir()
                  if p.is_file() and os.access(p, os.X_OK) and not p.name.endswith((".so", ".a")))


@pytest.mark.parametrize("name", programs())
def test_conformance_program_remote(cluster, home, name):
    cp = cluster.mosrun([SYSCALLS / name], cwd=home, timeout=120)
    if cp.returncode == 77:
        pytest.skip(f"{name} skipped itself: {cp.stdout[-500:]!r} {cp.stderr[-500:]!r}")
    assert cp.returncode == 0, (f"{name} exited {cp.returncode}\nstdout: {cp.stdout[-3000:]!r}\n"
                                f"stderr: {cp.stderr[-3000:]!r}")
