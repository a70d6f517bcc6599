"""`ltm sweep`: train every (variant, seed) point here or as one SLURM array, score, and print the paired table.

    ltm sweep --config tiny-cpu --variant base:model.kind=baseline --variant ltm:model.kind=ltm --seeds 5 \\
        --eval ffpp_c23/test --eval celebdf_v2/test --out runs/sweep-ltm            # here, one point after the other
    ltm sweep ... --submit --gpus-per-node 4 --time 4:00:00 --wait                  # one SLURM array task per point
    ltm sweep ... --collect                                                          # only the table

A point is one run: trained through every `--steps` budget (resuming itself), each budget's checkpoint scored on
val, val selecting one checkpoint, that one scored once on every `--eval` folder (`ltm.sweep.run`). Rerunning the
same command continues: finished points are kept, a crashed or preempted point resumes from its `latest`, a point
whose config changed is refused with the keys that differ. `--submit` checks every point as `ltm submit train`
does before anything is queued, then submits one array of the unfinished points (one task per point, DeepSpeed
inside as `ltm train` runs it, requeued on preemption); points whose task of an earlier submission is still
queued or running are not submitted again. The table: `<out>/sweep.md`, `sweep.json`, `sweep.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import submitit

from launcher.checks import check_train
from launcher.jobs import TrainJob, setup_task
from launcher.submit import (
    FINAL_STATES,
    Submitted,
    add_gpu_mem_argument,
    add_launch_arguments,
    batch_script,
    check_memory,
    cleaned_up_on_failure,
    executor_parameters,
    job_state,
    launch_from_args,
    submission_folder,
    wait_for,
)
from ltm.config import ConfigError, to_dict
from ltm.sweep import table
from ltm.sweep.run import (
    Sweep,
    check_sweep,
    is_complete,
    parse_variant,
    point_config,
    run_local,
    run_point,
    save_spec,
    write_json,
)

log = logging.getLogger("ltm.launcher")


class SweepPointJob(TrainJob):
    """One array task: `ltm.sweep.run.run_point` of one (variant, seed) on every task of the allocation; a
    preempted training saves, and the task requeues itself like a training job (`TrainJob`)."""

    def __init__(self, sweep: dict[str, Any], variant: str, seed: int) -> None:
        self.sweep, self.variant, self.seed = sweep, variant, seed
        cfg = point_config(Sweep.from_dict(sweep), variant, seed, Sweep.from_dict(sweep).budgets[-1])
        super().__init__(to_dict(cfg), resume="auto")

    def __call__(self) -> dict[str, Any]:  # type: ignore[override]
        sweep = Sweep.from_dict(self.sweep)
        launch = point_config(sweep, self.variant, self.seed, sweep.budgets[-1]).launch
        dist_env = setup_task(launch.gpus_per_node, launch.cpus_per_task)
        log.info("sweep point %s seed %d", self.variant, self.seed)
        record = run_point(sweep, self.variant, self.seed)
        if record["status"] == "preempted":
            self._requeue(launch.max_requeue, launch.time_min, dist_env.rank)
        if record["status"] != "done":
            raise RuntimeError(f"sweep point {self.variant} seed {self.seed}: {record['status']}")
        return {k: record[k] for k in ("variant", "seed", "selected", "test")}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(type(self)(self.sweep, self.variant, self.seed))


# ------------------------------------------------------------------------------------------------- SLURM
def jobs_path(sweep: Sweep) -> Path:
    return sweep.out / ".sweep" / "jobs.json"


def load_jobs(sweep: Sweep) -> dict[str, str]:
    """{"<variant>-seed<k>": SLURM job id of its array task} from earlier submissions."""
    path = jobs_path(sweep)
    return json.loads(path.read_text()) if path.is_file() else {}


def active(job_id: str) -> bool:
    state = job_state(job_id)
    return state != "UNKNOWN" and not all(s in FINAL_STATES for s in state.split(","))


def in_flight(sweep: Sweep) -> list[str]:
    """`<variant>-seed<k> (task id)` of the points whose array task of an earlier submission is not finished."""
    if shutil.which("scontrol") is None:
        return []
    return [f"{k} (task {j})" for k, j in load_jobs(sweep).items() if active(j)]


def check_points(sweep: Sweep, points: list[tuple[str, int]], launch_args: argparse.Namespace) -> list[str]:
    """`ltm submit train`'s checks of every point to submit (inputs, weights, launch against the config; with
    `--gpu-mem`, the memory plan, refused with the change that makes it fit)."""
    warnings = []
    gpu_mem = getattr(launch_args, "gpu_mem", None)
    for variant, seed in points:
        cfg = point_config(sweep, variant, seed, sweep.budgets[-1])
        cfg = dataclasses.replace(cfg, launch=launch_from_args(launch_args, cfg.launch))
        if gpu_mem:
            check_memory(cfg, gpu_mem, label=f"variant {variant!r}: ")
        warnings += check_train(cfg, [*sweep.evals_of(variant), *map(str, cfg.data.val)], "auto")
    return list(dict.fromkeys(warnings))


def submit_sweep(sweep: Sweep, launch_args: argparse.Namespace, dry_run: bool = False) -> Submitted | None:
    """One SLURM array of the sweep's unfinished points not in flight; None when there is nothing to submit."""
    check_sweep(sweep)
    jobs = load_jobs(sweep)
    todo = []
    for variant, seed in sweep.points():
        key = f"{variant}-seed{seed}"
        if is_complete(sweep, variant, seed):
            continue
        if key in jobs and shutil.which("scontrol") and active(jobs[key]):
            log.info("%s: task %s of an earlier submission still queued or running; not submitted again", key,
                     jobs[key])
            continue
        todo.append((variant, seed))
    if not todo:
        return None
    for warning in check_points(sweep, todo, launch_args):  # before anything is queued
        log.warning("%s", warning)
    first = point_config(sweep, *todo[0], sweep.budgets[-1])
    launch = launch_from_args(launch_args, first.launch)
    if launch.nodes != 1:
        raise ConfigError(f"--nodes {launch.nodes}: a sweep point runs on one node (its array task); the points "
                          "are the parallelism")
    folder = submission_folder(sweep.out / "slurm", "sweep")
    params = executor_parameters(launch, f"ltm-sweep-{sweep.out.name}")
    params["additional_parameters"] = {"requeue": True}
    params["srun_args"] = ["--kill-on-bad-exit=1"]
    if dry_run:
        return Submitted("sweep", folder, batch_script(folder, params, array=len(todo)))
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: this machine has no SLURM client; run without --submit")
    sd = sweep.to_dict()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=launch.max_requeue)
    executor.update_parameters(**params)
    with cleaned_up_on_failure(folder, "sweep array"):
        submitted = executor.submit_array([SweepPointJob(sd, v, s) for v, s in todo])
    save_spec(sweep)
    array_id = str(submitted[0].job_id).split("_")[0]
    for (variant, seed), job in zip(todo, submitted):
        jobs[f"{variant}-seed{seed}"] = str(job.job_id)
    write_json(jobs_path(sweep), jobs)
    script = submitted[0].paths.submission_file.read_text() if submitted[0].paths.submission_file.exists() else ""
    log.info("submitted array %s: %s", array_id, ", ".join(f"{v} seed {s}" for v, s in todo))
    return Submitted("sweep", folder, script, job_id=array_id, job=submitted,
                     logs=[p for j in submitted for p in (j.paths.stderr, j.paths.stdout)])


# ------------------------------------------------------------------------------------------------- CLI
def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{text!r}: expected a comma list of whole numbers") from None


def seeds_from(text: str) -> list[int]:
    """`--seeds`: N means seeds 0..N-1; a comma list names them."""
    try:
        seeds = _ints(text)
    except ConfigError as exc:
        raise ConfigError(f"--seeds {exc}") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r}: at least one seed")
    return list(range(seeds[0])) if len(seeds) == 1 and "," not in text else seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--config", default="paper", help="packaged config name or YAML path")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE ...",
                        help="a variant: its name and space-separated overrides (`base:` = the config itself); "
                        "repeatable, in table order")
    parser.add_argument("--seeds", default="3", help="N (seeds 0..N-1) or a comma list of seeds (3)")
    parser.add_argument("--eval", action="append", default=[], metavar="DATA",
                        help="test shard folder (relative to data.root or a path); repeatable; scored once, with "
                        "the checkpoint val selected")
    parser.add_argument("--steps", default="", help="budget(s) in optimizer steps, comma list (default: the "
                        "config's epochs x iters_per_epoch); several give val learning curves")
    parser.add_argument("--reference", default="", help="the variant the others are compared with (the first)")
    parser.add_argument("--heads", default="", help="LTM heads to score, comma list (default: model.inference_head); "
                        "the first selects the budget")
    parser.add_argument("--effect", type=float, default=0.02, help="the AUC difference a verdict's N resolves (0.02)")
    parser.add_argument("--nproc", type=int, help="here: ranks per training (ltm train --nproc)")
    parser.add_argument("--out", required=True, help="the sweep's folder: runs, point records, the table")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--submit", action="store_true", help="one SLURM array task per unfinished point")
    mode.add_argument("--collect", action="store_true", help="only write and print the table")
    parser.add_argument("--wait", action="store_true", help="--submit: wait for the array, then collect")
    parser.add_argument("--dry-run", action="store_true", help="--submit: print the batch script; submit nothing")
    add_gpu_mem_argument(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every variant")
    add_launch_arguments(parser, dry_run=False)


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    out = Path(args.out)
    spec_file = out / "sweep-spec.json"
    if args.collect and not args.variant and spec_file.is_file():  # `--collect --out DIR` alone: the stored sweep
        return Sweep.from_dict(json.loads(spec_file.read_text()))
    variants = dict(parse_variant(v) for v in args.variant)
    if len(variants) != len(args.variant):
        raise ConfigError("--variant: two variants share a name")
    seeds = seeds_from(args.seeds)
    return Sweep(config=args.config, variants=variants, seeds=seeds, evals=list(args.eval), out=out,
                 budgets=_ints(args.steps), reference=args.reference,
                 heads=[h for h in args.heads.split(",") if h], overrides=list(args.overrides), effect=args.effect)


def print_table(sweep: Sweep) -> dict[str, Any]:
    result = table.write(sweep)
    print(table.sweep_markdown(result), end="")
    print(f"\nwrote {sweep.out / 'sweep.md'}, {sweep.out / 'sweep.json'}"
          + (f", {sweep.out / 'sweep.png'}" if (sweep.out / "sweep.png").is_file() else ""))
    return result


def run(args: argparse.Namespace) -> int:
    sweep = sweep_from_args(args)
    if args.collect:
        print_table(sweep)
        return 0
    if not args.submit:
        busy = in_flight(sweep)
        if busy:  # two trainings of one run folder would overwrite each other's checkpoints
            raise ConfigError("points still queued or running on SLURM: " + ", ".join(busy) + "; wait for them "
                              "(or scancel them) before running the sweep here")
        status = run_local(sweep, args.nproc)
        print_table(sweep)
        return status
    sub = submit_sweep(sweep, args, dry_run=args.dry_run)
    if args.dry_run:
        print(sub.script if sub else "nothing to submit: every point is done or in flight")
        return 0
    if sub is None:
        busy = in_flight(sweep)
        log.info("nothing to submit: every point is done%s", f" or in flight ({', '.join(busy)})" if busy else "")
        if busy and not args.wait:
            return 0  # the table once they finished: rerun the command, or --collect
    else:
        print(sub.describe())
    if args.wait:
        ids = [i for i in load_jobs(sweep).values() if active(i)]
        states = wait_for(ids, timeout_s=float("inf"), poll_s=5.0) if ids else {}
        if any(s != "COMPLETED" for s in states.values()):
            log.error("unfinished tasks: %s (rerun the same command to continue)",
                      ", ".join(f"{k} {v}" for k, v in states.items() if v != "COMPLETED"))
    if args.wait or sub is None:
        result = print_table(sweep)
        return 1 if result["missing"] else 0
    return 0
