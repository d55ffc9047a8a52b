"""The local cluster itself: what every other test relies on."""

from conftest import HOME_DATA, NODES, run_host, LOCAL_CLUSTER


def test_nodes_reach_each_other_over_the_bridge(cluster):
    for src in range(1, NODES + 1):
        for dst in range(1, NODES + 1):
            cp = cluster.run(src, ["ping", "-c", "1", "-W", "2", f"10.77.0.{dst}"], timeout=20)
            assert cp.returncode == 0, (src, dst, cp.stdout, cp.stderr)


def test_home_data_exists_only_at_home(cluster, home):
    (home / "marker").write_bytes(b"home only\n")
    assert cluster.run(1, ["cat", home / "marker"]).stdout == b"home only\n"
    for k in range(2, NODES + 1):
        cp = cluster.run(k, ["test", "-e", HOME_DATA])
        assert cp.returncode == 1, f"node {k} sees {HOME_DATA}"


def test_every_node_answers(cluster):
    cp = run_host([LOCAL_CLUSTER, "status"], timeout=60)
    lines = [l for l in cp.stdout.splitlines() if l.startswith("node ")]
    assert len(lines) == NODES
    assert all("alive=yes answers=yes" in l for l in lines), cp.stdout
