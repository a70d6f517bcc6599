"""Running a table here: each run's training and evaluation in its own `ltm` process, one after the other."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from ltm.reproduce.plan import RunPlan, checkpoint_step

log = logging.getLogger(__name__)

def _ltm(*args: str) -> list[str]:
    return [sys.executable, "-m", "ltm.cli", *args]


def train_command(plan: RunPlan, nproc: int | None = None) -> list[str]:
    assert plan.config_file is not None
    return _ltm("train", "--config", str(plan.config_file), *(["--nproc", str(nproc)] if nproc else []))


def eval_command(plan: RunPlan) -> list[str]:
    data = [a for d in plan.missing for a in ("--data", str(Path(plan.cfg.data.root) / d))]
    return _ltm("eval", "--run", str(plan.run_dir), *data)


def run_local(plans: list[RunPlan], nproc: int | None = None) -> int:
    """Train (or resume) and evaluate each unfinished run, one after the other, each in its own `ltm` process.

    A failed run is reported and the others still run; the exit status is 1 when any failed.
    """
    failed = []
    for plan in plans:
        if plan.state == "done":
            log.info("skipped %s: its reports exist", plan.name)
    todo = [p for p in plans if p.state != "done"]
    for i, plan in enumerate(todo, 1):
        if plan.state in ("train", "resume"):
            log.info("[%d/%d] train %s: %s", i, len(todo), plan.name, " ".join(train_command(plan, nproc)[1:]))
            rc = subprocess.run(train_command(plan, nproc), check=False).returncode
            step = checkpoint_step(plan.run_dir)
            if rc != 0 or step is None or step < plan.total:
                # a stopped (signalled) training exits 0 after saving: evaluating it would pass for a finished run
                log.error("training of %s did not finish (exit %d, checkpoint step %s of %d); the other runs go on",
                          plan.name, rc, step, plan.total)
                failed.append(plan.name)
                continue
        log.info("[%d/%d] eval %s: %s", i, len(todo), plan.name, " ".join(eval_command(plan)[1:]))
        rc = subprocess.run(eval_command(plan), check=False).returncode
        if rc != 0:
            log.error("evaluation of %s failed (exit %d); the other runs go on", plan.name, rc)
            failed.append(plan.name)
    if failed:
        log.error("failed runs: %s (re-run the same command to continue)", ", ".join(failed))
    return 1 if failed else 0
