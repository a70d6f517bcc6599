"""Shared test fixtures, and how the suite is spread over parallel workers (`make test` runs pytest-xdist)."""

import os

import pytest

# Passive OpenMP waits, set before torch (and its OpenMP runtime, which reads this once) is imported here or in the
# processes tests start: the suite runs more processes than cores, and a test that takes 2 intra-op threads would
# otherwise spin on a core another process holds (the speed-options test: 34-170 CPU-s instead of 12).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test of the local SLURM cluster is marked `slurm`, also where it only takes the `slurm_cluster` fixture:
    `make test` runs them in a session of their own (`-m slurm`), one after another, beside the rest (`-m "not
    slurm"` on xdist workers). The cluster is one set of daemons on this machine, started by the first such test and
    stopped at the end of the session, so tests of another session or worker could find it gone, or start it at the
    same moment (two slurmd on one port). First among the hooks: `-m` deselects by the marks this adds."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slurm)
    # Longest modules first: `--dist loadfile` hands whole modules to whichever worker is free, in collection order
    # (`make test` passes --no-loadscope-reorder, which keeps this order instead of xdist's most-tests-first). A heavy
    # module that starts last leaves one core idle while it runs alone; started first, the short ones fill in beside.
    items.sort(key=lambda item: _module_rank(item.nodeid))


# Modules by measured time on 2 cores (`make test`'s --durations), longest first; the rest follow in file order.
SLOWEST_MODULES = ("test_train.py", "test_eval.py", "test_wheelhouse.py", "test_scale.py", "test_reproduce.py",
                   "test_bench_generalization.py", "test_docs.py", "test_gpu_check.py", "test_prep_ffpp.py",
                   "test_export.py", "test_accelerate_eval.py")


def _module_rank(nodeid: str) -> int:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return SLOWEST_MODULES.index(module) if module in SLOWEST_MODULES else len(SLOWEST_MODULES)

# --- the sample dataset and its shards (data_prep; used by every area's tests) ----------------------------------------

SAMPLE_IDENTITIES = 12  # 6 pairs: train 4, val 1, test 1 (ids 000-011)
SAMPLE_LENGTH = 8  # frames per video
SAMPLE_FRAMES = 4  # frames per video taken into the shards
SAMPLE_SIZE = 112  # face crop side


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    """The sample dataset (FF++ layout: original_sequences/, manipulated_sequences/{SelfBlend,FaceSwap}/, splits/),
    small: 12 identities, 8-frame 160 px videos. Built once per session with `data_prep.sample.build_sample`."""
    from data_prep.sample import build_sample

    root = tmp_path_factory.mktemp("sample")
    build_sample(root, n_identities=SAMPLE_IDENTITIES, length=SAMPLE_LENGTH, frame_size=160)
    return root


@pytest.fixture(scope="session")
def sample_shards(sample_root, tmp_path_factory):
    """Shard root of the sample dataset: `<root>/ffpp_c23/{train,val,test}/{real,SelfBlend,FaceSwap}/*.tar` (+ .idx,
    manifest.json per split), 112 px crops, 4 frames per video, made by the FF++ path of `ltm prep`
    (point `data.root` here and the tiny-cpu config's shard paths resolve)."""
    from data_prep import datasets, pipeline

    out = tmp_path_factory.mktemp("sample_shards")
    name, items, skipped = datasets.ffpp(sample_root, sample_root / "splits", "c23")
    settings = pipeline.Settings(frames=SAMPLE_FRAMES, size=SAMPLE_SIZE)
    result = pipeline.run(name, items, skipped, out, settings, pipeline.Runtime(progress=False))
    assert result["samples"] > 0
    return out

# --- a tiny run to score with (ltm predict, ltm serve) ----------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder with the tiny-cpu config and a consolidated weights file (`weights.pt`) of its LTM model, built
    from the ImageNet weights that ship with the backbones (no training: scoring needs weights, not good ones)."""
    import torch

    from ltm.config import load_config, save_config
    from ltm.models import build_model

    run = tmp_path_factory.mktemp("tiny-run")
    cfg = load_config("tiny-cpu", ["data.root=" + str(run / "no-shards")])  # no manifest: prep's default crops
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.data.image_size).state_dict(), run / "weights.pt")
    return run

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
