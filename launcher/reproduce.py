"""`ltm reproduce`: options, the printed plan, and the order of planning, running and collecting.

The table as a sweep, its points' states and the collection live in `ltm.reproduce`; the points run through
`ltm.sweep` here or as one SLURM array through `launcher.sweep` (submitted, remembered and waited for there)."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from launcher.checks import check_plans
from launcher.submit import add_launch_arguments, launch_from_args, wait_for
from launcher.sweep import active, in_flight, load_jobs, seeds_from, submit_sweep
from ltm.config import Config, ConfigError, load_config
from ltm.reproduce.configs import config_diff, experiment_path, parse_pairs
from ltm.reproduce.cost import DEFAULT_TFLOPS, estimate, print_estimate
from ltm.reproduce.foundation import ALL_TABLES
from ltm.reproduce.paper import Table
from ltm.reproduce.plan import STATE_DIR, RunPlan, plan_points, select, table_sweep, write_atomic
from ltm.reproduce.results import collect, results_markdown, write_collected
from ltm.sweep.run import Sweep, run_local

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
    for t in ALL_TABLES.values():
        lines.append(f"  {t.name}: rows {','.join(r.key for r in t.rows if not r.cited)}; "
                     f"columns {','.join(t.columns)}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _keys_epilog()
    parser.add_argument("table", choices=sorted(ALL_TABLES), help="which of the paper's tables, or foundation "
                        "(LTM on CLIP ViT-L/14 beside the field's published figures: docs/foundation.md)")
    parser.add_argument("--runs", required=True, help="folder holding one run folder per experiment, and the tables")
    parser.add_argument("--shards", help="shard root (data.root) with ffpp_c23/, ffpp_c40/, celebdf_v2/, wdf/ "
                        "(foundation: ffpp_c23/, celebdf_v2/, dfdc/, dfdcp/, dfd_c23/)")
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
    parser.add_argument("--seeds", default="", help="N (seeds 0..N-1) or a comma list: every cell the mean over "
                        "them with its 95%% t-interval (default: the config's train.seed)")
    parser.add_argument("--nproc", type=int, help="--local: ranks per training (ltm train --nproc)")
    parser.add_argument("--estimate", action="store_true", help="print the GPU hours each run needs (from FLOPs)")
    parser.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                        help=f"sustained TFLOP/s per GPU for --estimate and for the wall-time check before submitting "
                             f"(default {DEFAULT_TFLOPS:g}: bf16 Xception on an A100, see docs/reproduce-cost.md)")
    parser.add_argument("--wait", action="store_true", help="SLURM: wait until the array's tasks left the queue, "
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
            "--account", "--qos", "--constraint", "--mem", "--exclusive", "--array", "--requeue")
    opts = [line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH")]
    return " ".join(o for o in opts if o.startswith(keep))


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def print_plan(plans: list[RunPlan], table: Table, paper: Config, script: str | None = None) -> None:
    """What a run of the table would do: its points with state and config, then the order here or the array."""
    runs = list(dict.fromkeys(p.name for p in plans))
    seeds = len(plans) // max(len(runs), 1)
    print(f"{table.name}: {_n(len(runs), 'run')} x {_n(seeds, 'seed')} = {_n(len(plans), 'point')}, "
          f"{sum(p.state != 'done' for p in plans)} to do")
    for plan in plans:
        where = f"checkpoint step {plan.step} of {plan.total}" if plan.step is not None else f"{plan.total} steps"
        print(f"\n{plan.label}  [{plan.state}; {where}]  {plan.run_dir}")
        print(f"  experiment: {experiment_path(plan.name)}")
        print("  config (against paper.yaml): " + " ".join(
            kv for kv in config_diff(plan.cfg, paper) if not kv.startswith(("train.run_dir=", "launch."))))
        print(f"  scored on: {', '.join(plan.data)}"
              + (f" (missing: {', '.join(plan.missing)})" if plan.missing else " (all scored)"))
    todo = [p for p in plans if p.state != "done"]
    if not todo:
        print("\nnothing to do: every point is scored (collect with --collect)")
    elif script is None:
        print("\nhere, in this order (each trained to its budget, then scored): "
              + ", ".join(p.label for p in todo))
    else:
        print(f"\nSLURM: one array, a task per point: {_sbatch_lines(script)}")
        for n, plan in enumerate(todo):
            print(f"  task {n}: {plan.label}")


def _sweep(args: argparse.Namespace, table: Table, runs: Path, mapping: dict[str, str], stored: dict[str, Any],
           seeds: list[int] | None) -> Sweep:
    if args.collect:  # the options of the run being collected
        return table_sweep(table, stored.get("shards") or "shards", runs, stored.get("base"),
                           stored.get("overrides"), mapping, seeds=seeds)
    return table_sweep(table, args.shards or "shards", runs, args.base, args.overrides, mapping,
                       parse_pairs(args.weights, "--weights"), seeds)


def run(args: argparse.Namespace) -> int:
    runs = Path(args.runs)
    stored = _recall(runs, args.table)
    mapping = parse_pairs(args.map, "--map") if args.map else stored.get("map", {})
    rows, columns = _csv(args.rows), _csv(args.columns)
    seeds = seeds_from(args.seeds) if args.seeds else None
    if args.collect and rows is None and columns is None:
        rows, columns = stored.get("rows"), stored.get("columns")
    if args.collect and seeds is None:
        seeds = stored.get("seeds")
    table = select(ALL_TABLES[args.table], rows, columns)
    if args.collect:
        if not runs.is_dir():
            raise ConfigError(f"--runs {str(runs)!r}: no such folder (nothing to collect)")
        return _collect_and_print(table, _sweep(args, table, runs, mapping, stored, seeds), mapping,
                                  write=not args.dry_run)
    if not args.shards and not args.estimate:
        raise ConfigError("--shards ROOT is needed to run a table (the shard root that the experiments read)")
    # --estimate alone needs no shards: without manifests to count, frames are the datasets' nominal counts
    sweep = _sweep(args, table, runs, mapping, stored, seeds)
    plans = plan_points(sweep)
    if not args.local:
        for plan in plans:
            plan.cfg = replace(plan.cfg, launch=launch_from_args(args, plan.cfg.launch))
    paper = load_config("paper")
    if args.estimate:
        rows = estimate(plans, args.tflops)
        if len(sweep.seeds) > 1:  # a row per point, named as its folder
            for row, plan in zip(rows, plans):
                row["run"] = plan.run_dir.name
        print_estimate(rows, args.tflops)
        if not args.dry_run:
            return 0
        print()
    for warning in check_plans(plans, args.tflops, launch=not args.local):  # before anything is queued or run
        log.warning("%s", warning)
    if args.dry_run:
        sub = None if args.local else submit_sweep(sweep, args, dry_run=True)
        print_plan(plans, table, paper, None if args.local else (sub.script if sub else ""))
        return 0
    _remember(runs, args.table, {"map": mapping, "rows": rows, "columns": columns, "base": args.base,
                                 "shards": str(Path(args.shards).resolve()), "overrides": list(args.overrides),
                                 "seeds": sweep.seeds})
    status = 0
    if args.local:
        busy = in_flight(sweep)
        if busy:  # two trainings of one run folder would overwrite each other's checkpoints
            raise ConfigError("points still queued or running on SLURM: " + ", ".join(busy) + "; wait for them "
                              "(or scancel them) before running the table here")
        status = run_local(sweep, args.nproc)
    else:
        sub = submit_sweep(sweep, args)
        print_plan(plans, table, paper, sub.script if sub else "")
        if sub is not None:
            print(sub.describe())
        if args.wait:
            ids = [i for i in load_jobs(sweep).values() if active(i)]
            states = wait_for(ids, timeout_s=float("inf"), poll_s=5.0) if ids else {}
            for job_id, state in states.items():
                (log.info if state == "COMPLETED" else log.error)("task %s: %s", job_id, state)
            status = 0 if all(v == "COMPLETED" for v in states.values()) else 1
    if args.local or args.wait:
        _collect_and_print(table, sweep, mapping, write=True)
    return status


def _collect_and_print(table: Table, sweep: Sweep, mapping: dict[str, str], write: bool) -> int:
    result = collect(table, sweep, mapping)
    print(results_markdown(result), end="")
    if write:
        md, js = write_collected(result, Path(sweep.out))
        print(f"\nwrote {md} and {js}")
    return 0
