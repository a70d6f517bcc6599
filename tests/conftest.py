"""Shared test fixtures."""

import pytest

# --- the local SLURM cluster (launcher/SLURM tests) -----------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm_cluster():
    """A real two-node SLURM cluster on this machine (slurm/local/start.sh), stopped at the end of the session
    unless it was already running before. Sets SLURM_CONF for the session's client commands and jobs."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    base = Path(os.environ.get("LTM_SLURM_BASE", "/tmp/ltm-slurm"))
    pid_file = base / "run" / "slurmctld.pid"
    was_running = pid_file.exists() and Path(f"/proc/{pid_file.read_text().strip()}").exists()
    subprocess.run(["bash", str(repo / "slurm/local/start.sh")], check=True, timeout=600,
                   env={**os.environ, "LTM_SLURM_BASE": str(base)})
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(base / "etc" / "slurm.conf")
    yield {"base": base, "conf": base / "etc" / "slurm.conf"}
    if old_conf is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old_conf
    if not was_running:
        subprocess.run(["bash", str(repo / "slurm/local/stop.sh")], timeout=300,
                       env={**os.environ, "LTM_SLURM_BASE": str(base)})
