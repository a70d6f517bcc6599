"""Running a table on SLURM: training and evaluation jobs through the launcher, remembered between calls."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ltm.config import ConfigError
from ltm.reproduce.plan import STATE_DIR, RunPlan, write_atomic

log = logging.getLogger(__name__)

def load_jobs(runs: Path) -> dict[str, dict[str, str]]:
    """Job ids of earlier submissions per run: {run: {"train": id, "eval": id}}."""
    path = runs / STATE_DIR / "jobs.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it to forget earlier submissions") from exc


def save_jobs(runs: Path, jobs: dict[str, dict[str, str]]) -> None:
    (runs / STATE_DIR).mkdir(parents=True, exist_ok=True)
    write_atomic(runs / STATE_DIR / "jobs.json", json.dumps(jobs, indent=2, sort_keys=True) + "\n")


def active_jobs(ids: list[str]) -> set[str]:
    """Those of `ids` that SLURM still knows as pending, running or requeued (not in a final state)."""
    if not ids or shutil.which("scontrol") is None:
        return set()
    from launcher.submit import FINAL_STATES, job_state

    active = set()
    for job_id in ids:
        state = job_state(job_id)
        if state != "UNKNOWN" and not all(s in FINAL_STATES for s in state.split(",")):
            active.add(job_id)
    return active


def submit_slurm(plans: list[RunPlan], runs: Path, dry_run: bool = False) -> list[tuple[RunPlan, dict[str, Any]]]:
    """Submit each unfinished run through the launcher: training, then its evaluation with `afterok`.

    A run whose training finished gets only the evaluation job; a run with jobs of an earlier submission still
    queued or running gets nothing new. Job ids are recorded in `<runs>/.reproduce/jobs.json` after each run.
    """
    from launcher.submit import submit_eval, submit_train

    if not dry_run and shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: this machine has no SLURM client; run with --local instead")
    jobs = load_jobs(runs)
    active = active_jobs([i for rec in jobs.values() for i in rec.values() if i])
    submitted = []
    for plan in plans:
        if plan.state == "done":
            continue
        busy = [i for i in jobs.get(plan.name, {}).values() if i in active]
        if busy:
            log.info("%s: job(s) %s of an earlier submission still queued or running; not submitted again",
                     plan.name, ", ".join(busy))
            continue
        data = [str(Path(plan.cfg.data.root) / d) for d in plan.missing]
        if plan.state in ("train", "resume"):
            # checked by launcher.checks.check_plans with the rest of the table, before the first submission
            out: dict[str, Any] = submit_train(plan.cfg, eval_data=data, dry_run=dry_run, check=False)
        else:
            out = {"eval": submit_eval(str(plan.run_dir), data, launch=plan.cfg.launch, dry_run=dry_run,
                                       check=False)}
        if not dry_run:
            jobs[plan.name] = {kind: sub.job_id for kind, sub in out.items()}
            save_jobs(runs, jobs)
            log.info("%s: %s", plan.name, ", ".join(f"{k} job {v.job_id}" for k, v in out.items()))
        submitted.append((plan, out))
    return submitted


def wait_for(ids: list[str]) -> dict[str, str]:
    """Block until every job of `ids` reached a final state; {job id: state}."""
    from launcher.submit import wait_for as launcher_wait

    log.info("waiting for %d job(s): %s", len(ids), ", ".join(ids))
    states = launcher_wait(ids, timeout_s=float("inf"), poll_s=5.0)
    for job_id, state in states.items():
        (log.info if state == "COMPLETED" else log.error)("job %s: %s", job_id, state)
    return states
