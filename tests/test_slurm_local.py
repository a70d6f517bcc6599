"""The single-machine SLURM cluster of slurm/local: real slurmctld + slurmd nodes with their own hostnames.

The session's cluster comes from the `slurm_cluster` fixture (tests/conftest.py), which runs slurm/local/start.sh.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START, STOP = REPO / "slurm/local/start.sh", REPO / "slurm/local/stop.sh"

pytestmark = pytest.mark.slurm


def pids(base: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in sorted((base / "run").glob("*.pid"))}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_nodes_have_their_own_hostnames_and_resolve(slurm_cluster):
    out = subprocess.run(["srun", "-N2", "-n2", "--label", "bash", "-c", "hostname; getent hosts n1 n2 | wc -l"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    lines = sorted(out.split("\n"))
    assert "0: n1" in lines and "1: n2" in lines, out
    assert "0: 2" in lines and "1: 2" in lines, out  # n1 and n2 resolve on every node (MASTER_ADDR=n1 works)
    # the machine's own hosts file is untouched
    assert "n1" not in Path("/etc/hosts").read_text().split()


def test_start_is_idempotent(slurm_cluster):
    base = slurm_cluster["base"]
    before = pids(base)
    assert {"slurmctld", "slurmd-n1", "slurmd-n2"} <= set(before)
    subprocess.run(["bash", str(START)], check=True, capture_output=True, timeout=120,
                   env={**os.environ, "LTM_SLURM_BASE": str(base)})
    assert pids(base) == before
    assert all(alive(p) for p in before.values())


def test_second_cluster_starts_and_stops_only_its_own_processes(slurm_cluster, tmp_path):
    """A second one-node cluster on other ports: stop.sh ends its daemons, and only those."""
    base = tmp_path / "cluster2"
    env = {**os.environ, "LTM_SLURM_BASE": str(base), "LTM_SLURM_NODES": "1", "LTM_SLURM_PORT": "7817",
           "SLURM_CONF": str(base / "etc/slurm.conf")}
    first = pids(slurm_cluster["base"])
    try:
        subprocess.run(["bash", str(START)], check=True, capture_output=True, timeout=120, env=env)
        second = pids(base)
        assert set(second) == {"slurmctld", "slurmd-n1"}  # munged is shared: started by neither, stopped by neither
        out = subprocess.run(["srun", "-N1", "hostname"], capture_output=True, text=True, timeout=60, env=env,
                             check=True).stdout
        assert out.strip() == "n1"
    finally:
        subprocess.run(["bash", str(STOP)], check=True, capture_output=True, timeout=120, env=env)
    assert not any(alive(p) for p in second.values())
    assert not list((base / "run").glob("*.pid"))
    assert all(alive(p) for p in first.values())  # the session's cluster runs on
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, check=True).stdout
    nodes = dict(line.split() for line in out.strip().splitlines())
    assert set(nodes) == {"n1", "n2"} and not any("down" in s or "*" in s for s in nodes.values()), out
