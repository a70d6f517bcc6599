"""`ltm submit {train,eval,prep}`: submit ltm's jobs to SLURM with submitit.

    ltm submit train --config paper --nodes 2 --gpus-per-node 8 --eval ffpp_c23/test train.run_dir=runs/x
    ltm submit eval --run runs/x --data celebdf_v2/test
    ltm submit prep ffpp --root /data/FaceForensics++ --splits /data/ffpp-splits --out shards --array 8

Training runs one task per GPU (one per node without GPUs), every task calling `ltm.train.trainer.train` in-process
(launcher.jobs.TrainJob); `--eval` chains an evaluation job (`afterok`, cancelled if training fails). `prep`
submits an array of N parts (`--part i/N`) and a merge job after all of them. `--dry-run` prints the batch
scripts and submits nothing. Each submission gets a fresh submitit folder: a local test cluster restarts job
ids at 1, and a reused folder would hand back an older job's result.

Python API (the same the CLI uses): `submit_train`, `submit_eval`, `submit_prep`; each returns `Submitted`
records (job id, job handle, batch script, log paths).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError

from launcher.checks import check_eval, check_predict, check_prep, check_train, parse_quietly
from launcher.jobs import CommandJob, EvalJob, PrepMergeJob, PrepPartJob, TrainJob
from ltm.config import Config, ConfigError, LaunchConfig, load_config, to_dict

log = logging.getLogger("ltm.launcher")

DEPENDENCY_PLACEHOLDER = "afterok:TRAIN_JOB_ID"


class SubmitError(ConfigError):
    """sbatch refused a job: SLURM's own message, one line."""


@dataclass
class Submitted:
    """One submitted (or, with dry_run, only prepared) SLURM job."""

    kind: str  # train | eval | prep | merge
    folder: Path  # submitit folder: batch script, pickles, logs
    script: str  # the batch script
    job_id: str | None = None  # None on a dry run
    job: Any = None  # submitit Job (or list of Jobs for an array)
    dependency: str | None = None
    logs: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{self.kind} job {self.job_id or '(dry run)'}" + (f" after {self.dependency}" if self.dependency
                                                                    else "")]
        lines += [f"  log: {p}" for p in self.logs]
        return "\n".join(lines)


# --- parameters -----------------------------------------------------------------------------------------------------

def parse_time(text: str) -> int:
    """SLURM time (`MM`, `HH:MM:SS`, `D-HH`, `D-HH:MM`, `D-HH:MM:SS`, `MM:SS`) -> whole minutes (rounded up)."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"--time {text!r}: expected minutes or [D-]HH:MM[:SS]")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        seconds = int(a) * 60 + int(b)
    else:  # MM
        seconds = int(a) * 60
    if seconds <= 0:
        raise ConfigError(f"--time {text!r}: must be positive")
    return -(-seconds // 60)


def parse_mem_gb(text: str) -> int:
    """`64`, `64G`, `64GB`, `65536M` -> whole GB (0 = the cluster's default)."""
    m = re.fullmatch(r"(\d+)\s*([GgMmTt]?)[Bb]?", str(text).strip())
    if not m:
        raise ConfigError(f"--mem {text!r}: expected a size like 64G or 65536M")
    value, unit = int(m.group(1)), m.group(2).upper()
    return {"": value, "G": value, "T": value * 1024, "M": -(-value // 1024)}[unit]


def executor_parameters(launch: LaunchConfig, name: str, tasks_per_node: int | None = None,
                        nodes: int | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch options) for one job of `launch`'s shape."""
    gpus = launch.gpus_per_node
    params: dict[str, Any] = {
        "job_name": name,
        "nodes": launch.nodes if nodes is None else nodes,
        # one task per GPU; one per node on CPU nodes
        "ntasks_per_node": tasks_per_node if tasks_per_node is not None else max(1, gpus),
        "cpus_per_task": launch.cpus_per_task,
        "time": launch.time_min,
        "signal_delay_s": launch.signal_delay_s,
    }
    if gpus > 0:
        params["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            params[key] = getattr(launch, key)
    if launch.mem_gb > 0:
        params["mem"] = f"{launch.mem_gb}GB"
    if launch.exclusive:
        params["exclusive"] = True
    if launch.setup:
        params["setup"] = list(launch.setup)
    return params


def submission_folder(base: str | Path, kind: str) -> Path:
    """A fresh folder per submission: `<base>/<kind>-<UTC time>-<random>`."""
    return Path(base).absolute() / f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def batch_script(folder: Path, params: dict[str, Any], array: int | None = None) -> str:
    """The exact batch script submitit writes for these parameters (also for dry runs, where no folder exists)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    extra = {"map_count": array} if array else {}
    return _make_sbatch_string(command=command, folder=folder, **params, **extra)


def sbatch_message(exc: BaseException) -> str:
    """SLURM's own words from a failed sbatch (submitit puts its stderr in the exception), as one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line.split("error:", 1)[1].strip() for line in lines if "error:" in line]
    return "; ".join(errors) or (lines[-1] if lines else type(exc).__name__)


def highest_missing(folder: Path) -> Path | None:
    """The outermost of `folder` and its parents that does not exist yet (what a submission will create)."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    return missing[-1] if missing else None


def remove_created(created: Path | None) -> None:
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)


@contextlib.contextmanager
def cleaned_up_on_failure(folder: Path, kind: str):
    """Remove what a refused submission created (its submitit folder and the parents made for it) and turn
    submitit's error into one line; sbatch's stderr, which submitit also prints, is kept out of the terminal."""
    created = highest_missing(folder)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    except (FailedJobError, FailedSubmissionError, OSError) as exc:
        remove_created(created)
        raise SubmitError(f"sbatch refused the {kind} job: {sbatch_message(exc)}") from None


def _submit(kind: str, folder: Path, params: dict[str, Any], fn: Any, dry_run: bool,
            max_num_timeout: int = 3) -> Submitted:
    dependency = params.get("dependency")
    if dry_run:
        return Submitted(kind, folder, batch_script(folder, params), dependency=dependency)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_num_timeout)
    executor.update_parameters(**params)
    with cleaned_up_on_failure(folder, kind):
        job = executor.submit(fn)
    script = job.paths.submission_file.read_text() if job.paths.submission_file.exists() else ""
    # per task: stderr (ltm's log) and stdout
    tasks = params["nodes"] * params["ntasks_per_node"]
    logs = [path.with_name(path.name.replace("_0_", f"_{t}_"))
            for t in range(tasks) for path in (job.paths.stderr, job.paths.stdout)]
    return Submitted(kind, folder, script, job_id=str(job.job_id), job=job, dependency=dependency, logs=logs)


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", str(job_id)], capture_output=True, text=True, timeout=60)


def _with_dependency(params: dict[str, Any], dependency: str | None) -> dict[str, Any]:
    if not dependency:
        return params
    params = dict(params, dependency=dependency)
    # A failed dependency cancels the dependant job instead of leaving it pending forever.
    params["additional_parameters"] = {**params.get("additional_parameters", {}), "kill-on-invalid-dep": "yes"}
    return params


# --- train --------------------------------------------------------------------------------------------------------

def check_memory(cfg: Config, gpu_mem: float, label: str = "") -> None:
    """Refuse (ConfigError) a config whose `ltm plan` does not fit GPUs of `gpu_mem` GiB; the message names the
    change that makes it fit. Before anything is queued: an out-of-memory job fails only once it got its nodes."""
    from ltm.train.plan import check_fits

    try:
        check_fits(cfg, gpu_mem)
    except ConfigError as exc:
        raise ConfigError(f"{label}{exc}") from None

def absolute_paths(cfg: Config) -> Config:
    """Run folder and data root made absolute against the submitting directory (the job may start elsewhere)."""
    train = dataclasses.replace(cfg.train, run_dir=str(Path(cfg.train.run_dir).absolute()))
    data = dataclasses.replace(cfg.data, root=str(Path(cfg.data.root).absolute()))
    return dataclasses.replace(cfg, train=train, data=data)


def submit_train(
    cfg: Config,
    eval_data: list[str] | None = None,
    eval_tag: str | None = None,
    resume: str = "auto",
    dry_run: bool = False,
    check: bool = True,
    gpu_mem: float | None = None,
) -> dict[str, Submitted]:
    """Submit training (and, with `eval_data`, an evaluation chained after it). Returns {"train": .., "eval": ..}.

    `launcher.checks.check_train` first (also on a dry run): inputs, weights, the launch against the config; with
    `gpu_mem` (GiB per GPU), `ltm plan`'s memory check too: a config that does not fit is refused with the change
    that makes it fit."""
    cfg = absolute_paths(cfg)
    run_dir = Path(cfg.train.run_dir)
    launch = cfg.launch
    if launch.nodes < 1:
        raise ConfigError(f"key 'launch.nodes': must be >= 1, got {launch.nodes}")
    if gpu_mem:
        check_memory(cfg, gpu_mem)
    if check:
        for warning in check_train(cfg, eval_data, resume):
            log.warning("%s", warning)
    folder = submission_folder(run_dir / "slurm", "train")
    created = highest_missing(folder)
    params = executor_parameters(launch, f"ltm-train-{run_dir.name}")
    params["additional_parameters"] = {"requeue": True}  # a preempted allocation comes back (`scontrol requeue`)
    # One rank failing must end the others instead of leaving them blocked in a collective until the time limit.
    params["srun_args"] = ["--kill-on-bad-exit=1"]
    out: dict[str, Submitted] = {}
    try:
        out["train"] = _submit("train", folder, params, TrainJob(to_dict(cfg), resume=resume), dry_run,
                               max_num_timeout=launch.max_requeue)
        if eval_data:
            dependency = DEPENDENCY_PLACEHOLDER if dry_run else f"afterok:{out['train'].job_id}"
            out["eval"] = submit_eval(str(run_dir), eval_data, tag=eval_tag, launch=launch, dependency=dependency,
                                      dry_run=dry_run, folder=folder, check=False)
    except SubmitError:
        if "train" in out and out["train"].job_id:
            cancel(out["train"].job_id)  # all or nothing: a training whose evaluation was refused is withdrawn
        remove_created(created)
        raise
    return out


# --- eval ---------------------------------------------------------------------------------------------------------

def submit_eval(
    run_dir: str,
    data: list[str],
    tag: str | None = None,
    launch: LaunchConfig | None = None,
    dependency: str | None = None,
    cfg_overrides: list[str] | None = None,
    dry_run: bool = False,
    folder: Path | None = None,
    check: bool = True,
) -> Submitted:
    """Submit `ltm eval --run run_dir --data ...` on one node (one task per GPU), optionally after `dependency`.

    `check`: the run folder, its checkpoint and the data folders are verified first (off when chained after the
    training that writes the checkpoint; `check_train` verified the data)."""
    launch = launch or LaunchConfig()
    if not data:
        raise ConfigError("eval: no --data folder given")
    if check:
        check_eval(run_dir, data, tag, cfg_overrides)
    run_path = Path(run_dir).absolute()
    folder = folder or submission_folder(run_path / "slurm", "eval")
    params = _with_dependency(executor_parameters(launch, f"ltm-eval-{run_path.name}", nodes=1), dependency)
    job = EvalJob(str(run_path), data, tag=tag, cfg_overrides=cfg_overrides, gpus_per_node=launch.gpus_per_node)
    return _submit("eval", folder, params, job, dry_run)


# --- arrays of parts and the merge after them (prep, predict) -----------------------------------------------------

def _submit_array_and_merge(kind: str, folder: Path, params: dict[str, Any], parts: list, merge: Any, merge_name: str,
                            dry_run: bool) -> dict[str, Submitted]:
    """An N-task array of `parts`, then `merge` with `afterok` on the whole array (CPU only); all or nothing: a
    refused merge withdraws the array and removes the folders made for the submission."""
    created = highest_missing(folder)
    out: dict[str, Submitted] = {}
    if dry_run:
        out["parts"] = Submitted(kind, folder, batch_script(folder, params, array=len(parts)))
        dependency = f"afterok:{kind.upper()}_ARRAY_JOB_ID"
    else:
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**params)
        with cleaned_up_on_failure(folder, f"{kind} array"):
            jobs = executor.submit_array(parts)
        array_id = str(jobs[0].job_id).split("_")[0]
        script = jobs[0].paths.submission_file.read_text() if jobs[0].paths.submission_file.exists() else ""
        out["parts"] = Submitted(kind, folder, script, job_id=array_id, job=jobs,
                                 logs=[p for j in jobs for p in (j.paths.stderr, j.paths.stdout)])
        dependency = f"afterok:{array_id}"
    merge_params = _with_dependency(dict(params, job_name=merge_name), dependency)
    merge_params.pop("gpus_per_node", None)
    try:
        out["merge"] = _submit("merge", folder, merge_params, merge, dry_run)
    except SubmitError:
        cancel(out["parts"].job_id)
        remove_created(created)
        raise
    return out


# --- prep ---------------------------------------------------------------------------------------------------------

def submit_prep(
    prep_args: list[str],
    array: int,
    launch: LaunchConfig | None = None,
    logs_dir: str | Path | None = None,
    dataset: str | None = None,
    dry_run: bool = False,
) -> dict[str, Submitted]:
    """`ltm prep <prep_args> --part i/N` as an N-task array, then `ltm prep merge` (afterok on the whole array).

    `prep_args` is what `ltm prep` takes: `<source> --root R --out O [...]`. Logs go to `<out>/.slurm/` by default.
    """
    if array < 1:
        raise ConfigError(f"--array {array}: must be >= 1")
    if not prep_args or prep_args[0] in ("sample", "merge"):
        raise ConfigError("prep: give the source and its options, e.g. `ffpp --root R --out O` "
                          "(`sample` and `merge` do not split into parts)")
    if any(a == "--part" or a.startswith("--part=") for a in prep_args):
        raise ConfigError("prep: --part is set per array task; use --array N")
    out_parser = argparse.ArgumentParser(add_help=False)
    out_parser.add_argument("--out")
    out = out_parser.parse_known_args(prep_args)[0].out
    if not out:
        raise ConfigError("prep: --out is required (the shard root the parts and the merge write)")
    check_prep(prep_args)
    prep_args = list(prep_args) + ([] if "--no-progress" in prep_args else ["--no-progress"])  # logs, not bars
    launch = launch or LaunchConfig()
    source = prep_args[0]
    folder = submission_folder(logs_dir or Path(out) / ".slurm", f"prep-{source}")
    params = executor_parameters(launch, f"ltm-prep-{source}", tasks_per_node=1, nodes=1)
    if launch.gpus_per_node > 0:
        params["gpus_per_node"] = 1  # the face detector uses one GPU
    parts = [PrepPartJob(prep_args, i, array) for i in range(array)]
    out_jobs = _submit_array_and_merge("prep", folder, params, parts, PrepMergeJob(out, array, dataset),
                                       f"ltm-prep-{source}-merge", dry_run)
    return out_jobs


# --- predict over a corpus -----------------------------------------------------------------------------------------

def predict_argv(args: argparse.Namespace, table: Path) -> list[str]:
    """`ltm predict` arguments with every path absolute (the tasks may start in another directory)."""
    def absolute(path: str) -> str:
        return str(Path(path).absolute())

    argv = [absolute(p) for p in args.inputs]
    for flag, value, is_path in (("--run", args.run, True), ("--model", args.model, True), ("--tag", args.tag, False),
                                 ("--weights", args.weights, True), ("--frames", args.frames, False),
                                 ("--detector", args.detector, False), ("--detector-model", args.detector_model, True)):
        if value is not None:
            argv += [flag, absolute(value) if is_path else str(value)]
    return [*argv, "--csv", str(table.absolute()), *args.overrides]


def submit_predict(
    predict_args: list[str],
    array: int,
    launch: LaunchConfig | None = None,
    dry_run: bool = False,
) -> dict[str, Submitted]:
    """`ltm predict <predict_args> --part i/N` as an N-task array (each a deterministic slice of the files,
    resumable through its journal), then `ltm predict ... --merge N` after all of them: one table, input order.

    A rerun of the same submission skips the files the tasks already scored. Logs go to `<table dir>/.slurm/`."""
    from ltm.deploy import predict as predict_cli

    if array < 1:
        raise ConfigError(f"--array {array}: must be >= 1")
    args, error = parse_quietly(predict_cli.add_arguments, predict_args, "ltm predict")
    if args is None:
        raise ConfigError(f"ltm predict: {error}")
    if args.part or args.merge is not None:
        raise ConfigError("predict: --part and --merge are set by the array; use --array N")
    launch = launch or LaunchConfig()
    files, table = check_predict(args)
    if launch.gpus_per_node > 0:
        args.device = "cuda"
    argv = predict_argv(args, table)
    device = ["--device", args.device] if args.device != "auto" else []
    folder = submission_folder(table.parent / ".slurm", "predict")
    params = executor_parameters(launch, f"ltm-predict-{table.stem}", tasks_per_node=1, nodes=1)
    if launch.gpus_per_node > 0:
        params["gpus_per_node"] = 1
    parts = [CommandJob(["predict", *argv, *device, "--part", f"{i}/{array}"]) for i in range(array)]
    merge = CommandJob(["predict", *argv, "--merge", str(array)])
    out = _submit_array_and_merge("predict", folder, params, parts, merge, f"ltm-predict-{table.stem}-merge", dry_run)
    log.info("%d files in %d parts -> %s", len(files), array, table)
    out["table"] = table  # type: ignore[assignment]
    return out


# --- CLI ----------------------------------------------------------------------------------------------------------

def add_launch_arguments(p: argparse.ArgumentParser, dry_run: bool = True) -> None:
    """The SLURM resource flags (read back by `launch_from_args`); `ltm reproduce` shares them."""
    g = p.add_argument_group("SLURM resources (default: the config's launch.* keys)")
    g.add_argument("--nodes", type=int, help="nodes (launch.nodes)")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node = tasks per node; 0: one CPU task per node")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per task (data loading threads + 1)")
    g.add_argument("--mem", help="memory per node, e.g. 64G (launch.mem_gb)")
    g.add_argument("--time", help="time limit: minutes or [D-]HH:MM[:SS] (launch.time_min)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint", help="node features, e.g. a100")
    g.add_argument("--exclusive", action="store_true", default=None, help="whole nodes only")
    g.add_argument("--setup", action="append", metavar="LINES",
                   help="shell lines run before the job, e.g. 'module load cuda/12.4' (repeatable)")
    g.add_argument("--max-requeue", type=int, help="requeues after preemption/time limit (launch.max_requeue)")
    g.add_argument("--signal-delay", type=int, help="seconds between the save signal and the kill")
    if dry_run:
        p.add_argument("--dry-run", action="store_true", help="print the batch script(s); submit nothing")


def add_gpu_mem_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu-mem", type=float, metavar="GIB",
                   help="GiB per GPU: refuse a config whose `ltm plan` does not fit, naming the change that does")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="submit_kind", metavar="{train,eval,prep,predict}", required=True)

    p = sub.add_parser("train", help="multi-node training (+ chained evaluation with --eval)")
    p.add_argument("--config", default="paper", help="packaged config name or YAML path")
    p.add_argument("--eval", action="append", metavar="FOLDER", dest="eval_data",
                   help="shard folder to evaluate once training succeeded (repeatable)")
    p.add_argument("--eval-tag", help="checkpoint tag for the chained evaluation (default: latest)")
    p.add_argument("--resume", default="auto", help="auto | never | <tag>")
    add_gpu_mem_argument(p)
    add_launch_arguments(p)
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.run_dir=runs/x")

    p = sub.add_parser("eval", help="evaluate a run's checkpoint on shard folders")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--data", action="append", required=True, help="shard folder (repeatable)")
    p.add_argument("--tag", help="checkpoint tag (default: latest)")
    p.add_argument("--after", metavar="JOBID", help="start only after this job succeeded (afterok)")
    add_launch_arguments(p)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (e.g. eval.batch_size=32)")

    p = sub.add_parser("prep", help="dataset preparation as an array of N parts plus a merge job",
                       description="ltm submit prep <dataset> [ltm prep options] --array N [SLURM options]; "
                                   "options not listed here go to `ltm prep`.")
    p.add_argument("--array", type=int, default=1, help="number of parts (array tasks)")
    p.add_argument("--dataset", help="dataset name for the merge (default: found in <out>/.prep)")
    p.add_argument("--logs", help="folder for the submission's logs (default: <out>/.slurm)")
    add_launch_arguments(p)
    p.add_argument("prep_args", nargs=argparse.REMAINDER, help="`ltm prep` arguments: <dataset> [options]")

    p = sub.add_parser("predict", help="score a corpus of videos/images as an array of N slices plus a merge job",
                       description="ltm submit predict <inputs> (--run R | --model FILE) [ltm predict options] "
                                   "--array N [SLURM options]; options not listed here go to `ltm predict`.")
    p.add_argument("--array", type=int, default=1, help="number of slices (array tasks)")
    add_launch_arguments(p)
    p.add_argument("predict_args", nargs=argparse.REMAINDER, help="`ltm predict` arguments: inputs and options")


def launch_from_args(args: argparse.Namespace, launch: LaunchConfig) -> LaunchConfig:
    """Command-line flags over the config's launch.* keys."""
    changes: dict[str, Any] = {}
    for flag, key in (("nodes", "nodes"), ("gpus_per_node", "gpus_per_node"), ("cpus_per_task", "cpus_per_task"),
                      ("partition", "partition"), ("account", "account"), ("qos", "qos"),
                      ("constraint", "constraint"), ("exclusive", "exclusive"), ("max_requeue", "max_requeue"),
                      ("signal_delay", "signal_delay_s")):
        value = getattr(args, flag, None)
        if value is not None:
            changes[key] = value
    if getattr(args, "time", None):
        changes["time_min"] = parse_time(args.time)
    if getattr(args, "mem", None):
        changes["mem_gb"] = parse_mem_gb(args.mem)
    if getattr(args, "setup", None):
        changes["setup"] = [line for block in args.setup for line in block.splitlines() if line.strip()]
    for key in ("nodes", "cpus_per_task"):
        if changes.get(key, 1) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} {changes[key]}: must be >= 1")
    if changes.get("gpus_per_node", 0) < 0:
        raise ConfigError(f"--gpus-per-node {changes['gpus_per_node']}: must be >= 0")
    return dataclasses.replace(launch, **changes)


def _prep_split(args: argparse.Namespace, rest_key: str = "prep_args") -> list[str]:
    """Launch flags may also follow the dataset (or the inputs): pull them out of the `ltm prep` (`ltm predict`)
    arguments."""
    launch_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    launch_parser.add_argument("--array", type=int)
    if rest_key == "prep_args":
        launch_parser.add_argument("--logs")
        launch_parser.add_argument("--dataset")
    add_launch_arguments(launch_parser)
    known, rest = launch_parser.parse_known_args(getattr(args, rest_key))
    for key, value in vars(known).items():
        if value not in (None, False):
            setattr(args, key, value)
    return rest


def _print(results: dict[str, Submitted], dry_run: bool) -> None:
    for sub in results.values():
        if dry_run:
            dep = f" (dependency {sub.dependency})" if sub.dependency else ""
            print(f"# ---- {sub.kind} job: batch script{dep}, submitit folder {sub.folder}")
            print(sub.script)
        else:
            print(sub.describe())


def run(args: argparse.Namespace) -> int:
    kind = args.submit_kind
    if kind == "train":
        cfg = load_config(args.config, args.overrides)
        cfg = dataclasses.replace(cfg, launch=launch_from_args(args, cfg.launch))
        results = submit_train(cfg, eval_data=args.eval_data, eval_tag=args.eval_tag, resume=args.resume,
                               dry_run=args.dry_run, gpu_mem=args.gpu_mem)
        print(f"run folder: {Path(cfg.train.run_dir).absolute()}")
        tasks = max(1, cfg.launch.gpus_per_node)
        print(f"nodes={cfg.launch.nodes} tasks_per_node={tasks} gpus_per_node={cfg.launch.gpus_per_node} "
              f"world_size={cfg.launch.nodes * tasks}")
    elif kind == "eval":
        launch = launch_from_args(args, LaunchConfig())
        dependency = f"afterok:{args.after}" if args.after else None
        results = {"eval": submit_eval(args.run, args.data, tag=args.tag, launch=launch, dependency=dependency,
                                       cfg_overrides=args.overrides, dry_run=args.dry_run)}
    elif kind == "prep":
        prep_args = _prep_split(args)
        if not prep_args:
            raise ConfigError("prep: missing the dataset and its `ltm prep` arguments")
        launch = launch_from_args(args, LaunchConfig())
        results = submit_prep(prep_args, args.array, launch=launch, logs_dir=args.logs, dataset=args.dataset,
                              dry_run=args.dry_run)
        print(f"parts={args.array} (--part i/{args.array}), then merge")
    elif kind == "predict":
        predict_args = _prep_split(args, "predict_args")
        launch = launch_from_args(args, LaunchConfig())
        results = submit_predict(predict_args, args.array, launch=launch, dry_run=args.dry_run)
        table = results.pop("table")
        print(f"parts={args.array} (--part i/{args.array}), then merge into {table}")
    else:  # argparse restricts the choices
        raise ConfigError(f"unknown submit kind {kind!r}")
    _print(results, args.dry_run)
    return 0


# --- job state (works without accounting: `scontrol` knows a job until MinJobAge after its end) ---------------------

FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE")


def job_state(job_id: str) -> str:
    """SLURM state of a job (for an array id: the states of its tasks joined by ','); UNKNOWN when nobody knows."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True)
    states = re.findall(r"\bJobState=(\S+)", proc.stdout) if proc.returncode == 0 else []
    if not states:
        proc = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)],
                              capture_output=True, text=True)
        states = [s.split()[0] for s in proc.stdout.split()] if proc.returncode == 0 else []
    return ",".join(sorted(set(states))) if states else "UNKNOWN"


def wait_for(job_ids: list[str], timeout_s: float, poll_s: float = 1.0) -> dict[str, str]:
    """Block until every job reached a final state (or `timeout_s` passed); returns {job id: state}."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {j: job_state(j) for j in job_ids}
        if all(s != "UNKNOWN" and all(p in FINAL_STATES for p in s.split(",")) for s in states.values()):
            return states
        if time.monotonic() > deadline:
            return states
        time.sleep(poll_s)
