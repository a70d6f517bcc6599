"""What the login node can check before anything is queued: inputs, weights, and whether the request fits the job.

A job that can only fail costs a queue wait and an allocation; every `ltm submit ...` and `ltm reproduce` (also
with `--dry-run`) runs these checks first and refuses with every problem at once, one line each
(`PreflightError`, exit 2). A launch that works but may not finish in one allocation is said as a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
from pathlib import Path

from ltm.config import Config, ConfigError

log = logging.getLogger("ltm.launcher")

TIME_MARGIN = 1.25  # wall time asked for >= the FLOP estimate x this (start-up, checkpoints, slower nodes)
GPU_PRECISIONS = ("bf16", "fp16")  # DeepSpeed's mixed precision needs CUDA


class PreflightError(ConfigError):
    """Everything found wrong before queueing, one problem per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def refuse(problems: list[str]) -> None:
    if problems:
        raise PreflightError(problems)


# --- training ----------------------------------------------------------------------------------------------------

def shard_problems(cfg: Config, folders: list[str], what: str) -> list[str]:
    """Each shard folder a training reads exists (as given, or under data.root) and holds shards."""
    from ltm.data.shards import ShardError, method_folders, resolve

    problems = []
    for folder in folders:
        try:
            method_folders(resolve(cfg, folder))
        except ShardError as exc:
            problems.append(f"{what} {folder!r}: {exc}")
    return problems


def eval_data_problems(cfg: Config, folders: list[str], what: str = "--eval") -> list[str]:
    from ltm.eval.evaluate import resolve_folder

    problems = []
    for folder in folders:
        try:
            resolve_folder(folder, cfg)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(f"{what} {folder!r}: {exc}")
    return problems


def weights_problems(cfg: Config) -> list[str]:
    """The names' default (timm) weights available offline, and weight files that exist (model.pretrained /
    teacher_pretrained)."""
    from ltm.models.weights import WeightsError, backbone_weights, check_offline, is_timm_default

    problems = []
    try:
        check_offline(cfg.model)
    except WeightsError as exc:
        problems.append(str(exc))
    roles = ("student",) if cfg.model.kind == "baseline" else ("student", "teacher")
    key = {"student": "model.pretrained", "teacher": "model.teacher_pretrained"}
    for role in roles:
        name, weights = backbone_weights(cfg.model)[role]
        if weights and not is_timm_default(weights) and not Path(weights).is_file():
            problems.append(f"{key[role]} {str(weights)!r} ({role} {name}): no such weights file")
    return list(dict.fromkeys(problems))


def resume_problems(run_dir: Path, resume: str) -> list[str]:
    from ltm.checkpoint import CheckpointError
    from ltm.checkpoint.checkpointer import Checkpointer

    try:
        Checkpointer(run_dir / "checkpoints").resolve(resume)
    except (CheckpointError, ValueError) as exc:
        return [f"--resume {resume}: {exc}"]
    return []


def batch_split_problems(cfg: Config) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the global batch split over the job's ranks (one per GPU, or one per node for a CPU
    job): a batch that does not divide refuses; what the split changes in the method (BatchNorm over a few images,
    mixup partners among a few) is warned with the fix
    (`ltm.train.batch_scaling.batch_warnings`, which `ltm train` logs too)."""
    from ltm.train import batch_scaling

    launch = cfg.launch
    world = launch.nodes * max(1, launch.gpus_per_node)
    gpus = launch.gpus_per_node > 0
    try:
        return [], batch_scaling.batch_warnings(cfg, world, cfg.train.sync_bn and gpus,
                                          batch_scaling.backbone_batchnorm_layers(cfg.model), gpus=gpus)
    except ValueError as exc:
        return [f"{exc}: the job's {world} rank(s) need a batch that divides (launch.nodes={launch.nodes}, "
                f"launch.gpus_per_node={launch.gpus_per_node})"], []


def launch_problems(cfg: Config, test_folders: list[str], tflops: float | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the job's shape against the config: GPUs where the config needs them, and the wall
    time against the FLOP estimate of `ltm reproduce --estimate` (training, validation, the chained evaluation)."""
    from ltm.reproduce.cost import DEFAULT_TFLOPS, run_cost

    launch, problems, warnings = cfg.launch, [], []
    problems_split, warnings_split = batch_split_problems(cfg)
    problems += problems_split
    warnings += warnings_split
    if launch.gpus_per_node == 0:
        if cfg.train.precision in GPU_PRECISIONS:
            problems.append(f"train.precision={cfg.train.precision} needs GPUs but the job asks for none: give "
                            "--gpus-per-node N (launch.gpus_per_node), or train.precision=fp32 for a CPU run")
        return problems, warnings  # no TFLOP/s figure for CPUs: the wall time is the user's call
    tflops = tflops or DEFAULT_TFLOPS
    gpus = launch.nodes * launch.gpus_per_node
    hours = run_cost(cfg, test_folders, tflops)["gpu_hours"] / gpus
    need_min = hours * 60 * TIME_MARGIN
    allocations = 1 + launch.max_requeue  # a time limit saves and requeues (launcher.jobs.TrainJob)
    estimate = (f"the run needs about {hours:.2f} h on {gpus} GPU(s) (FLOP estimate at {tflops:g} TFLOP/s per GPU, "
                f"see `ltm reproduce --estimate`; x{TIME_MARGIN} margin: {need_min:.0f} min)")
    if launch.time_min * allocations < need_min:
        problems.append(f"--time {launch.time_min} min (launch.time_min) x {allocations} allocation(s) "
                        f"(1 + launch.max_requeue={launch.max_requeue}) is too short: {estimate}; raise --time, "
                        "--max-requeue or the GPUs")
    elif launch.time_min < need_min:
        warnings.append(f"--time {launch.time_min} min is below the estimate, {estimate}: the job saves at its time "
                        f"limit and requeues itself, about {int(-(-need_min // launch.time_min))} allocations")
    return problems, warnings


def check_train(cfg: Config, eval_data: list[str] | None = None, resume: str = "auto",
                tflops: float | None = None) -> list[str]:
    """Every problem a training submission would only meet on the cluster; raises PreflightError, returns warnings."""
    run_dir = Path(cfg.train.run_dir)
    problems: list[str] = []
    root = Path(cfg.data.root)
    if not root.is_dir():
        problems.append(f"data.root {str(root)!r}: no such folder (the shard root that `ltm prep --out` wrote)")
    else:
        problems += shard_problems(cfg, [s.path for s in cfg.data.train], "data.train")
        problems += shard_problems(cfg, list(cfg.data.val), "data.val")
        problems += eval_data_problems(cfg, list(eval_data or []))
    if resume not in ("auto", "never"):
        problems += resume_problems(run_dir, resume)
    fresh = resume == "never" or not (run_dir / "checkpoints" / "latest").is_file()
    if fresh:  # a resumed run loads its own weights; a fresh one needs the ImageNet ones offline
        problems += weights_problems(cfg)
    launch, warnings = launch_problems(cfg, list(eval_data or []), tflops)
    refuse(problems + launch)
    return warnings


# --- evaluation --------------------------------------------------------------------------------------------------

def check_eval(run_dir: str | Path, data: list[str], tag: str | None = None,
               cfg_overrides: list[str] | None = None) -> None:
    """The run folder has a config and the checkpoint asked for, and every data folder holds shards."""
    from ltm.checkpoint import CheckpointError, resolve_tag, run_config

    try:
        cfg = run_config(run_dir, cfg_overrides)
    except (CheckpointError, ConfigError) as exc:
        refuse([f"--run: {exc}"])
    problems = []
    try:
        resolve_tag(run_dir, tag)
    except CheckpointError as exc:
        problems.append(f"--tag {tag or 'latest'}: {exc}")
    problems += eval_data_problems(cfg, data, "--data")
    refuse(problems)


def parse_quietly(add_arguments, argv: list[str], prog: str) -> tuple[argparse.Namespace | None, str | None]:
    """A command's own parser on `argv`: (namespace, None), or (None, argparse's error line) instead of its usage
    text and exit."""
    parser = argparse.ArgumentParser(prog=prog, add_help=False)
    add_arguments(parser)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv), None
    except SystemExit:
        lines = [line.split("error:", 1)[1].strip() for line in stderr.getvalue().splitlines() if "error:" in line]
        return None, lines[-1] if lines else "bad arguments"


# --- dataset preparation -----------------------------------------------------------------------------------------

def check_prep(prep_args: list[str]) -> None:
    """`ltm prep`'s own parser on the arguments, then the dataset adapter's listing (root, split files, inputs)."""
    from data_prep import cli as prep_cli
    from data_prep import datasets

    args, error = parse_quietly(prep_cli.add_arguments, prep_args, "ltm prep")
    if args is None:
        problems = [f"ltm prep {' '.join(prep_args[:1])}: {error}"]
        root = argparse.ArgumentParser(add_help=False)
        root.add_argument("--root")
        given = root.parse_known_args(prep_args)[0].root
        if given and not Path(given).is_dir():
            problems.append(f"--root {given!r}: no such folder")
        refuse(problems)
    problems = []
    if getattr(args, "detector_model", None) and not Path(args.detector_model).is_file():
        problems.append(f"--detector-model {args.detector_model!r}: no such file")
    from data_prep.adapters import ADAPTERS

    try:
        if args.source in ADAPTERS:  # the cross-dataset benchmarks (docs/datasets.md)
            name, items, _ = prep_cli.list_benchmark(args)
        elif args.source == "ffpp":
            name, items, _ = datasets.ffpp(args.root, args.splits, args.compression, args.methods, args.only_splits)
        elif args.source == "celebdf":
            name, items, _ = datasets.celebdf(args.root)
        elif args.source == "wdf":  # its listing unpacks archives: on the node; here only the root
            name, items = "wdf", [None]
            if not Path(args.root).is_dir():
                problems.append(f"--root {args.root!r}: no such folder")
        elif args.source == "synth":
            name, items = args.name, [None]
            if not Path(args.root).is_dir():
                problems.append(f"--root {args.root!r}: no such folder")
        elif args.csv:
            name, items, _ = datasets.csv_list(args.csv, args.root, args.split, args.name)
        elif args.root:
            name, items, _ = datasets.folder(args.root, args.split, args.name)
        else:
            name, items = "folder", [None]
            problems.append("prep folder needs --root DIR or --csv FILE")
        if not items:
            problems.append(f"{name}: no inputs found (nothing for the array tasks to do)")
    except (ValueError, FileNotFoundError) as exc:
        problems.append(str(exc))
    refuse(problems)


# --- prediction over a corpus ------------------------------------------------------------------------------------

def check_predict(args: argparse.Namespace) -> tuple[list[str], Path]:
    """`ltm submit predict`: the inputs list files, the run or exported model loads, and a table is named.
    Returns the files and the table."""
    from ltm.deploy.predict import media_files, table_path

    problems: list[str] = []
    files, folders = [], []
    try:
        files, folders = media_files(args.inputs)
    except ValueError as exc:
        problems.append(str(exc))
    missing = [f for f in files if not Path(f).exists()]
    problems += [f"{f}: no such file" for f in missing]
    if (args.run is None) == (args.model is None):
        problems.append("give --run RUN_FOLDER or --model FILE (an `ltm export` file), one of them")
    elif args.model:
        from ltm.deploy.exported import ExportError, read_metadata

        try:
            read_metadata(args.model)
        except (ExportError, ImportError) as exc:
            problems.append(str(exc))
    else:
        from ltm.checkpoint import CheckpointError, checked_run

        try:
            checked_run(args.run, args.overrides, args.tag, args.weights)
        except (CheckpointError, ConfigError) as exc:
            problems.append(f"--run: {exc}")
    table = None
    if not problems:
        table = table_path(args, folders)
        if table is None:
            problems.append("the array's merged table needs a name: a folder among the inputs, or --csv FILE")
    refuse(problems)
    return files, table


# --- reproduce -----------------------------------------------------------------------------------------------------

def check_plans(plans: list, tflops: float | None = None, launch: bool = True) -> list[str]:
    """`ltm reproduce`: every unfinished run of the table, checked as its submission would be (`launch`: also the
    SLURM request against each run's config); raises PreflightError, returns warnings."""
    problems: list[str] = []
    warnings: list[str] = []
    roots = {Path(p.cfg.data.root) for p in plans}
    for root in sorted(roots):
        if not root.is_dir():
            problems.append(f"--shards {str(root)!r}: no such folder")
    for plan in plans:
        if plan.state == "done" or not Path(plan.cfg.data.root).is_dir():
            continue
        cfg = plan.cfg
        found = []
        if plan.state in ("train", "resume"):
            found += shard_problems(cfg, [s.path for s in cfg.data.train], "data.train")
            found += shard_problems(cfg, list(cfg.data.val), "data.val")
            if plan.state == "train":
                found += weights_problems(cfg)
        found += eval_data_problems(cfg, list(plan.missing), "test data")
        problems += [f"{plan.name}: {p}" for p in dict.fromkeys(found)]
    for plan in plans if launch else []:
        if plan.state in ("train", "resume"):
            found, warn = launch_problems(plan.cfg, list(plan.missing), tflops)
            problems += [f"{plan.name}: {p}" for p in found]
            warnings += [f"{plan.name}: {w}" for w in warn]
    refuse(list(dict.fromkeys(problems)))
    return warnings
