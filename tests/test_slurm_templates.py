"""The plain sbatch templates (slurm/*.sbatch) on the local cluster: no submitit, srun + SLURM variables only.

train.sbatch trains on two nodes, gets the early-warning signal that a time limit sends (B:USR2, to the batch
shell), forwards it to the ranks, requeues itself after they saved and finishes from `latest`; eval.sbatch,
chained with afterok, then scores the test split with one rank on each node.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.submit import job_state, wait_for

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
TOTAL_STEPS = 20

pytestmark = pytest.mark.slurm


def sbatch(*args: str, env: dict | None = None) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, check=True, env=env,
                         cwd=REPO).stdout
    return out.strip().split(";")[0]


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r["step"] for r in map(json.loads, filter(None, lines)) if r["type"] == "train"]


def test_templates_are_valid_batch_scripts(slurm_cluster):
    for name in ("train", "eval", "prep"):
        script = SLURM / f"{name}.sbatch"
        subprocess.run(["bash", "-n", str(script)], check=True)
        # --test-only: SLURM parses every #SBATCH option and schedules the job without submitting it
        proc = subprocess.run(["sbatch", "--test-only", "--time=10", "--cpus-per-task=1", str(script)],
                              capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0 and "to start at" in proc.stderr, (name, proc.stderr)


def test_train_template_requeues_on_the_time_limit_signal_then_eval_template(slurm_cluster, sample_shards,
                                                                             tmp_path):
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "LTM": str(Path(sys.executable).parent / "ltm"), "LTM_MAX_REQUEUE": "2"}
    overrides = [
        f"data.root={sample_shards}", "data.image_size=64", "model.vit.dim=32", "model.vit.depth=1",
        "model.vit.heads=2", "train.batch_size=8", "train.iters_per_epoch=10", f"train.epochs={TOTAL_STEPS // 10}",
        "train.ckpt_every=10", "train.log_every=1", "train.val_every=0", f"train.run_dir={run_dir}",
    ]
    train_id = sbatch("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=15",
                      f"--output={logs}/train-%j.out", str(SLURM / "train.sbatch"), "--config", "tiny-cpu",
                      *overrides, env=env)
    eval_id = sbatch(f"--dependency=afterok:{train_id}", "--kill-on-invalid-dep=yes", "--nodes=2",
                     "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10", f"--output={logs}/eval-%j.out",
                     str(SLURM / "eval.sbatch"), "--run", str(run_dir), "--data", "ffpp_c23/test", env=env)
    try:
        deadline = time.monotonic() + 300
        while len(train_steps(run_dir)) < 3:
            assert job_state(train_id) in ("PENDING", "RUNNING", "CONFIGURING"), job_state(train_id)
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        # what SLURM sends `--signal=B:USR2@120` before the time limit: the batch shell only
        subprocess.run(["scancel", "--batch", "--signal=USR2", train_id], check=True)
        states = wait_for([train_id, eval_id], timeout_s=420)
    finally:
        subprocess.run(["scancel", train_id, eval_id], capture_output=True)
    train_log = (logs / f"train-{train_id}.out").read_text()
    assert states == {train_id: "COMPLETED", eval_id: "COMPLETED"}, (states, train_log[-3000:])

    assert f"job {train_id} (restart 0): 2 tasks on n[1-2], master n1:" in train_log
    assert "signal received: asking every rank to save" in train_log
    assert f"requeueing job {train_id}" in train_log
    assert f"job {train_id} (restart 1): 2 tasks on n[1-2]" in train_log
    # rank 0 of `ltm train` prints its result as one JSON line per allocation
    results = [json.loads(line) for line in train_log.splitlines() if line.startswith('{"status"')]
    assert [r["status"] for r in results] == ["preempted", "completed"], train_log[-3000:]
    assert all(r["world_size"] == 2 for r in results)
    k = results[0]["step"]
    assert 3 <= k < TOTAL_STEPS and results[1]["step"] == TOTAL_STEPS
    steps = train_steps(run_dir)
    assert steps == list(range(1, TOTAL_STEPS + 1)), steps  # each step once: resumed right after step k
    assert re.search(rf"resumed from \S+step{k:08d} \(step {k},", train_log)

    report = json.loads((run_dir / "eval" / "ffpp_c23-test" / "report.json").read_text())
    manifest = json.loads((sample_shards / "ffpp_c23" / "test" / "manifest.json").read_text())
    assert report["world_size"] == 2 and report["n_frames"] == manifest["totals"]["samples"]
    assert report["checkpoint"].endswith(f"step{TOTAL_STEPS:08d}")
