"""`ltm reproduce`: options, the printed plan, the order of planning, running and collecting, and the SLURM side.

The plans, configs, local runs and collection live in `ltm.reproduce`; submitting them (training and evaluation
jobs through `launcher.submit`, remembered between calls) lives here, above `ltm`, as every SLURM path does."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from launcher.checks import check_plans
from launcher.submit import FINAL_STATES, add_launch_arguments, job_state, launch_from_args, submit_eval, submit_train
from launcher.submit import wait_for as launcher_wait
from ltm.config import Config, ConfigError, load_config
from ltm.paper_results import TABLES, Table
from ltm.reproduce.configs import config_diff, experiment_path, parse_pairs
from ltm.reproduce.cost import DEFAULT_TFLOPS, estimate, print_estimate
from ltm.reproduce.local import eval_command, run_local, train_command
from ltm.reproduce.plan import STATE_DIR, RunPlan, plan_table, report_dir, select, write_atomic, write_configs
from ltm.reproduce.results import collect, render_markdown, write_collected

log = logging.getLogger(__name__)


def _remember(runs: Path, table: str, options: dict[str, Any]) -> None:
    """The selection and mapping of the last run of a table, so that `--collect` finds the same reports."""
    folder = runs / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{table}.json", json.dumps(options, indent=2) + "\n")


def _recall(runs: Path, table: str) -> dict[str, Any]:
    path = runs / STATE_DIR / f"{table}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _csv(value: str | None) -> list[str] | None:
    return [v for v in value.split(",") if v] if value else None


def _keys_epilog() -> str:
    lines = ["row and column keys (--rows / --columns):"]
    for t in TABLES.values():
        lines.append(f"  {t.name}: rows {','.join(r.key for r in t.rows if not r.cited)}; "
                     f"columns {','.join(t.columns)}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _keys_epilog()
    parser.add_argument("table", choices=sorted(TABLES), help="which of the paper's tables")
    parser.add_argument("--runs", required=True, help="folder holding one run folder per experiment, and the tables")
    parser.add_argument("--shards", help="shard root (data.root) with ffpp_c23/, ffpp_c40/, celebdf_v2/, wdf/")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--collect", action="store_true", help="only read the reports and write tableN.md/.json")
    mode.add_argument("--local", action="store_true", help="run here, one run after the other (default: SLURM)")
    parser.add_argument("--dry-run", action="store_true", help="list runs, configs and jobs; change nothing")
    parser.add_argument("--rows", help="comma list of row keys to run/collect (default: all)")
    parser.add_argument("--columns", help="comma list of column keys to run/collect (default: all)")
    parser.add_argument("--base", help="start every experiment from this config instead of paper (e.g. tiny-cpu)")
    parser.add_argument("--map", action="append", metavar="OLD=NEW",
                        help="rename a shard path component (dataset, split or method); repeatable")
    parser.add_argument("--weights", action="append", metavar="BACKBONE=FILE",
                        help="local pretrained weights for a backbone name (sets model.pretrained / "
                             "model.teacher_pretrained where the run uses it); repeatable")
    parser.add_argument("--nproc", type=int, help="--local: ranks per training (ltm train --nproc)")
    parser.add_argument("--estimate", action="store_true", help="print the GPU hours each run needs (from FLOPs)")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                        help=f"sustained TFLOP/s per GPU for --estimate and for the wall-time check before submitting "
                             f"(default {DEFAULT_TFLOPS:g}: bf16 Xception on an A100, see docs/reproduce.md)")
    parser.add_argument("--wait", action="store_true", help="SLURM: wait until the submitted jobs left the queue, "
                        "then collect")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    _add_submit_arguments(parser)
    _allow_trailing_overrides(parser)


def _allow_trailing_overrides(parser: argparse.ArgumentParser) -> None:
    """Let `key=value` overrides follow the options (`tableN --local train.epochs=1`).

    argparse fills every positional at the first run of positionals it meets, so after `tableN` the `nargs="*"`
    overrides are already taken (empty) and later ones are "unrecognized". Python's intermixed parsing takes
    positionals from anywhere; it calls `parse_known_args` itself, hence the plain method during the call.
    """
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):  # type: ignore[no-untyped-def]
        parser.parse_known_args = plain  # type: ignore[method-assign]
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser.parse_known_args = parse_known_args  # type: ignore[method-assign]

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """The resource flags of `ltm submit train` (same names and parsing: `launcher.submit.launch_from_args`)."""
    add_launch_arguments(parser, dry_run=False)


def _sbatch_lines(script: str) -> str:
    keep = ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--partition",
            "--account", "--qos", "--constraint", "--mem", "--exclusive", "--dependency")
    opts = [line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH")]
    return " ".join(o for o in opts if o.startswith(keep))


def print_plan(plans: list[RunPlan], table: Table, paper: Config, nproc: int | None = None,
               jobs: list[tuple[RunPlan, dict[str, Any]]] | None = None) -> None:
    """What a run of the table would do: runs with state and config, then the commands or SLURM jobs."""
    print(f"{table.name}: {len(plans)} runs, {sum(p.state != 'done' for p in plans)} to do")
    for plan in plans:
        where = f"checkpoint step {plan.step} of {plan.total}" if plan.step is not None else f"{plan.total} steps"
        print(f"\n{plan.name}  [{plan.state}; {where}]  {plan.run_dir}")
        print(f"  experiment: {experiment_path(plan.name)}")
        print("  config (against paper.yaml): " + " ".join(config_diff(plan.cfg, paper)))
        reports = ", ".join(str(report_dir(plan.run_dir, d).relative_to(plan.run_dir)) for d in plan.data)
        print(f"  reports: {reports}" + (f" (missing: {', '.join(plan.missing)})" if plan.missing else " (present)"))
    todo = [p for p in plans if p.state != "done"]
    if jobs is None:
        print("\ncommands, in this order:")
        for plan in todo:
            if plan.state in ("train", "resume"):
                print("  ltm " + " ".join(train_command(plan, nproc)[3:]))
            print("  ltm " + " ".join(eval_command(plan)[3:]))
    else:
        print("\nSLURM jobs:")
        for n, (plan, out) in enumerate(jobs, 1):
            for kind, sub in out.items():
                after = "" if kind == "train" or "train" not in out else f"  afterok: train job of {plan.name}"
                job = f"  job {sub.job_id}" if sub.job_id else ""
                print(f"  {n}. {kind} {plan.name}{job}{after}")
                print(f"     {_sbatch_lines(sub.script)}")
                if kind == "eval":
                    print(f"     data: {' '.join(plan.missing)}")
        skipped = len(todo) - len(jobs)
        if skipped:
            print(f"  ({skipped} run(s) not submitted again: their jobs are still queued or running)")
    if not todo:
        print("\nnothing to do: every report exists (collect with --collect)")


def run(args: argparse.Namespace) -> int:
    runs = Path(args.runs)
    stored = _recall(runs, args.table)
    mapping = parse_pairs(args.map, "--map") if args.map else stored.get("map", {})
    rows, columns = _csv(args.rows), _csv(args.columns)
    if args.collect and rows is None and columns is None:
        rows, columns = stored.get("rows"), stored.get("columns")
    table = select(TABLES[args.table], rows, columns)
    if args.collect:
        if not runs.is_dir():
            raise ConfigError(f"--runs {str(runs)!r}: no such folder (nothing to collect)")
        return _collect_and_print(table, runs, mapping, write=not args.dry_run)
    if not args.shards and not args.estimate:
        raise ConfigError("--shards ROOT is needed to run a table (the shard root that the experiments read)")
    weights = parse_pairs(args.weights, "--weights")
    # --estimate alone needs no shards: without manifests to count, frames are the datasets' nominal counts
    plans = plan_table(table, args.shards or "shards", runs, args.base, args.overrides, mapping, weights)
    if not args.local:
        for plan in plans:
            plan.cfg = replace(plan.cfg, launch=launch_from_args(args, plan.cfg.launch))
    for plan in plans:
        plan.config_file = runs / STATE_DIR / "configs" / f"{plan.name}.yaml"
    paper = load_config("paper")
    if args.estimate:
        print_estimate(estimate(plans, args.tflops), args.tflops)
        if not args.dry_run:
            return 0
        print()
    for warning in check_plans(plans, args.tflops, launch=not args.local):  # before anything is queued or run
        log.warning("%s", warning)
    if args.dry_run:
        jobs = None if args.local else submit_slurm(plans, runs, dry_run=True)
        print_plan(plans, table, paper, args.nproc, jobs)
        return 0
    write_configs(plans, runs)
    _remember(runs, args.table, {"map": mapping, "rows": rows, "columns": columns, "base": args.base})
    if args.local:
        status = run_local(plans, args.nproc)
    else:
        submitted = submit_slurm(plans, runs)
        print_plan(plans, table, paper, jobs=submitted)
        status = 0
        if args.wait:
            # this submission's jobs and those of an earlier one still in flight for the same runs
            recorded = load_jobs(runs)
            ids = [i for plan in plans if plan.state != "done" for i in recorded.get(plan.name, {}).values() if i]
            new = [sub.job_id for _, out in submitted for sub in out.values()]
            states = wait_for([i for i in dict.fromkeys(ids) if i in new or i in active_jobs([i])])
            status = 0 if all(v == "COMPLETED" for v in states.values()) else 1
    if args.local or args.wait:
        _collect_and_print(table, runs, mapping, write=True)
    return status


def _collect_and_print(table: Table, runs: Path, mapping: dict[str, str], write: bool) -> int:
    result = collect(table, runs, mapping)
    print(render_markdown(result), end="")
    if write:
        md, js = write_collected(result, runs)
        print(f"\nwrote {md} and {js}")
    return 0


# --- SLURM: jobs through the launcher, remembered between calls --------------------------------------------------

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
    log.info("waiting for %d job(s): %s", len(ids), ", ".join(ids))
    states = launcher_wait(ids, timeout_s=float("inf"), poll_s=5.0)
    for job_id, state in states.items():
        (log.info if state == "COMPLETED" else log.error)("job %s: %s", job_id, state)
    return states
