"""`ltm submit` on the real local SLURM cluster (tests/conftest.py `slurm_cluster`, two nodes n1 and n2).

One tiny training on two nodes carries three checks: both ranks take part from their own node, the evaluation
chained after it writes its report, and preemption works end to end — SLURM's early-warning SIGUSR2 (what the
time limit sends) makes the ranks save and rank 0 requeue the job; then an outside `scontrol requeue` interrupts
the resumed allocation once more. Each new allocation resumes from `latest` and the step count continues to the
configured last step. The prep test compares a 2-task array + merge with a single-process prep of the same input.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from data_prep.shards import read_shard
from launcher.jobs import slurm_job_state
from launcher.submit import job_state, submit_prep, submit_train, wait_for
from ltm.config import load_config

pytestmark = pytest.mark.slurm

TOTAL_STEPS = 30
# the settings of the session fixture `sample_shards` (tests/conftest.py), so that both preps must agree
PREP_ARGS = ["--frames", "4", "--size", "112"]


def tiny_config(shards: Path, run_dir: Path, **launch):
    overrides = [
        f"data.root={shards}", "data.image_size=64", "model.backbone=resnet18", "model.pretrained=null",
        "model.vit.dim=32", "model.vit.depth=1", "model.vit.heads=2", "model.vit.mlp_ratio=2.0",
        "train.batch_size=8", "train.iters_per_epoch=10", f"train.epochs={TOTAL_STEPS // 10}",
        "train.ckpt_every=10", "train.log_every=1", "train.val_every=0", f"train.run_dir={run_dir}",
        "launch.cpus_per_task=1", "launch.time_min=15",
    ] + [f"launch.{k}={v}" for k, v in launch.items()]
    return load_config("tiny-cpu", overrides)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(what: str, predicate, timeout_s: float, job_id: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        state = job_state(job_id)
        assert state not in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT"), f"job {job_id} {state} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what} (job {job_id}: {state})"
        time.sleep(0.5)


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if r["type"] == "train"]


def ends(run_dir: Path) -> list[dict]:
    """The 'end' record each allocation's training wrote when it returned (preempted or completed)."""
    return [r for r in records(run_dir) if r["type"] == "end"]


@pytest.fixture(scope="module")
def requeued_training(slurm_cluster, sample_shards, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("runs") / "two-nodes"
    cfg = tiny_config(sample_shards, run_dir, nodes=2, max_requeue=3)
    submitted = submit_train(cfg, eval_data=["ffpp_c23/test"])
    train_id, eval_id = submitted["train"].job_id, submitted["eval"].job_id
    try:
        # 1. the time-limit path: SLURM's early signal (SIGUSR2) to every rank while training runs
        wait_until("training steps", lambda: len(train_steps(run_dir)) >= 3, 300, train_id)
        subprocess.run(["scancel", "--signal=USR2", train_id], check=True)
        wait_until("the preempted save", lambda: len(ends(run_dir)) >= 1, 120, train_id)
        preempted_at = max(train_steps(run_dir))
        # 2. an outside `scontrol requeue` of the resumed allocation, a few steps after it resumed
        wait_until("resumed steps", lambda: max(train_steps(run_dir)) >= preempted_at + 3, 300, train_id)
        subprocess.run(["scontrol", "requeue", train_id], check=True)
        states = wait_for([train_id, eval_id], timeout_s=420, poll_s=1.0)
    finally:
        subprocess.run(["scancel", train_id, eval_id], capture_output=True)
    logs = {p.name: p.read_text() for p in submitted["train"].folder.glob("*_log.*")}
    return {"run_dir": run_dir, "submitted": submitted, "states": states, "logs": logs,
            "train_id": train_id, "eval_id": eval_id, "preempted_at": preempted_at, "shards": sample_shards}


def test_two_node_training_then_chained_eval(requeued_training):
    r = requeued_training
    assert r["states"] == {r["train_id"]: "COMPLETED", r["eval_id"]: "COMPLETED"}, r["states"]
    logs = r["logs"]
    rank0, rank1 = logs[f"{r['train_id']}_0_log.err"], logs[f"{r['train_id']}_1_log.err"]
    assert "rank 0 of world size 2 on node n1" in rank0
    assert "rank 1 of world size 2 on node n2" in rank1
    assert "master n1:" in rank1
    # the evaluation ran after training and wrote its report for the test split
    eval_log = logs[f"{r['eval_id']}_0_log.err"]
    assert "ltm.eval.evaluate" in eval_log
    report = json.loads((r["run_dir"] / "eval" / "ffpp_c23-test" / "report.json").read_text())
    manifest = json.loads((r["shards"] / "ffpp_c23" / "test" / "manifest.json").read_text())
    n = manifest["totals"]["samples"]
    assert report["n_frames"] == n and report["checkpoint"].endswith(f"step{TOTAL_STEPS:08d}")
    assert 0.0 <= report["frame_auc"] <= 1.0
    assert (r["run_dir"] / "eval" / "ffpp_c23-test" / "scores.csv").read_text().count("\n") == n + 1
    # the submitter gets the final allocation's result
    result = r["submitted"]["train"].job.results()[0]
    assert result["status"] == "completed" and result["step"] == TOTAL_STEPS and result["world_size"] == 2


def test_preempted_training_requeues_and_resumes_to_the_last_step(requeued_training):
    r = requeued_training
    run_dir, k = r["run_dir"], r["preempted_at"]
    done = ends(run_dir)
    # the outside requeue leaves KillWait (5 s) to save: the resumed allocation then writes its own 'end' record
    assert done[0]["status"] == "preempted" and done[-1]["status"] == "completed" and len(done) in (2, 3), done
    # 1st interruption (SIGUSR2): saved exactly where the ranks stopped, rank 0 requeued the job itself
    assert done[0]["step"] == k and 3 <= k < TOTAL_STEPS
    rank0 = r["logs"][f"{r['train_id']}_0_log.err"]
    assert "training returned preempted at step" in rank0
    assert re.search(r"requeued job \d+ \(restart 1 of at most 3\)", rank0)
    assert "(restart 1): rank 0 of world size 2 on node n1" in rank0
    assert "(restart 2): rank 0 of world size 2 on node n1" in rank0
    assert f"resumed from {run_dir / 'checkpoints' / f'step{k:08d}'} (step {k}," in rank0
    # 2nd interruption (outside `scontrol requeue`): resumed from the newest complete checkpoint
    resumed = [int(m) for m in re.findall(r"resumed from \S+ \(step (\d+),", rank0)]
    second = [s for s in train_steps(run_dir) if s > k]
    assert len(resumed) == 2 and (resumed[1] == k or resumed[1] in second), (resumed, k, second)
    # the step count continues: every allocation starts right after the checkpoint it resumed from
    steps = train_steps(run_dir)
    assert steps[-1] == TOTAL_STEPS
    restarts = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert [steps[i] - 1 for i in restarts] == [k, resumed[1]][: len(restarts)]
    assert set(steps) == set(range(1, TOTAL_STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{TOTAL_STEPS:08d}"


def sample_digests(root: Path) -> dict[str, str]:
    """(split/method/key) -> digest of the sample's jpg, cls and json, over every shard under `root`."""
    out = {}
    for tar in sorted(root.glob("*/*/*/*.tar")):
        split, method = tar.parent.parent.name, tar.parent.name
        for sample in read_shard(tar):
            h = hashlib.sha256()
            for field in ("jpg", "cls", "json"):
                h.update(sample[field])
            out[f"{split}/{method}/{sample['__key__']}"] = h.hexdigest()
    return out


def test_prep_array_and_merge_equal_a_single_process_prep(slurm_cluster, sample_root, sample_shards, tmp_path):
    """`sample_shards` is the single-process prep (data_prep.pipeline.run in the test process) of `sample_root`."""
    shards = sample_shards
    out = tmp_path / "array-shards"
    prep_args = ["ffpp", "--root", str(sample_root), "--splits", str(sample_root / "splits"), "--out", str(out),
                 *PREP_ARGS]
    launch = tiny_config(shards, tmp_path / "unused").launch
    submitted = submit_prep(prep_args, array=2, launch=launch)
    parts, merge = submitted["parts"], submitted["merge"]
    assert "--array=0-1%2" in parts.script.replace("'", "")
    assert merge.dependency == f"afterok:{parts.job_id}"
    states = wait_for([parts.job_id, merge.job_id], timeout_s=300)
    assert states == {parts.job_id: "COMPLETED", merge.job_id: "COMPLETED"}, states
    logs = "".join(p.read_text() for p in parts.folder.glob("*_log.err"))
    assert "--part 0/2" in logs and "--part 1/2" in logs and "prep merge" in logs
    single, array = sample_digests(shards), sample_digests(out)
    assert len(single) > 0 and single == array
    for split in ("train", "val", "test"):
        a = json.loads((shards / "ffpp_c23" / split / "manifest.json").read_text())
        b = json.loads((out / "ffpp_c23" / split / "manifest.json").read_text())
        assert (a["parts"], b["parts"]) == (1, 2)
        for key in ("settings", "totals", "stats", "skipped", "shards"):
            assert a[key] == b[key], (split, key)
    assert not (out / ".prep").exists()  # the merge removed the parts' work folder


def test_cancelled_job_is_not_running_so_training_does_not_requeue_it(slurm_cluster, tmp_path):
    """A TrainJob requeues only while its job is RUNNING: after `scancel` (whose SIGTERM also makes the ranks
    save) SLURM would accept `scontrol requeue` and bring the cancelled job back."""
    job_id = subprocess.run(["sbatch", "--parsable", "--requeue", f"--output={tmp_path}/%j.out", "--wrap",
                             "srun bash -c 'trap \"\" TERM; sleep 60'"],
                            capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 60
        while slurm_job_state(job_id) != "RUNNING":
            assert time.monotonic() < deadline, slurm_job_state(job_id)
            time.sleep(0.2)
        subprocess.run(["scancel", job_id], check=True)
        time.sleep(0.5)
        assert slurm_job_state(job_id) in ("COMPLETING", "CANCELLED")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


GUARD_DRIVER = """
import logging, signal, sys, time
from launcher.jobs import TrainJob
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
cancelled = []
signal.signal(signal.SIGTERM, lambda *_: cancelled.append(1))
print("ready", flush=True)
while not cancelled:
    time.sleep(0.05)
time.sleep(0.5)  # SLURM marks the job cancelled as it signals the steps
TrainJob({"train": {"run_dir": sys.argv[1]}})._requeue(max_requeue=3, time_min=5, rank=0)
"""


def test_train_job_does_not_requeue_a_job_slurm_reports_cancelled(slurm_cluster, tmp_path):
    """The guard in TrainJob._requeue itself: after `scancel` the job's rank 0 reaches the requeue step (as when the
    SIGTERM made the ranks save) and must leave the job cancelled. Without the guard it would rewrite the submitted
    pickle and `scontrol requeue` the job, which SLURM accepts."""
    import os
    import sys

    repo = Path(__file__).resolve().parents[1]
    driver = tmp_path / "guard.py"
    driver.write_text(GUARD_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(repo), "SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(tmp_path)}
    out = tmp_path / "job.out"
    job_id = subprocess.run(["sbatch", "--parsable", "--requeue", f"--output={out}", "--wrap",
                             f"srun {sys.executable} {driver} {tmp_path / 'run'}"],
                            capture_output=True, text=True, check=True, env=env).stdout.strip()
    try:
        deadline = time.monotonic() + 120
        while not (out.is_file() and "ready" in out.read_text()):
            assert time.monotonic() < deadline and job_state(job_id) not in ("FAILED", "CANCELLED"), job_state(job_id)
            time.sleep(0.2)
        subprocess.run(["scancel", job_id], check=True)
        deadline = time.monotonic() + 60
        while "not requeued from here" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # a requeue, had there been one, shows in the job record by now
        show = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    log_text = out.read_text()
    assert re.search(rf"job {job_id} is (CANCELLED|COMPLETING): saved at step boundary, not requeued",
                     log_text), log_text
    assert "requeued job" not in log_text
    assert re.search(r"\bRestarts=0\b", show) and re.search(r"\bJobState=CANCELLED\b", show), show
    assert not list(tmp_path.glob("*_submitted.pkl"))  # the submission was not rewritten for a restart
