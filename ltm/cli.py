"""`ltm <command>`: one console script; each command's module defines `add_arguments(parser)` and `run(args)`.

Modules are imported only for the command that runs, so `ltm prep` does not pay for DeepSpeed's import.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import re
import sys

# a config override as the commands take them (`train.lr=0.001`, `data.train[0].weight=2`)
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\[\d+\])?(\.[A-Za-z_]\w*(\[\d+\])?)+=")

# Python's cyclic collector makes a full pass over every tracked object whenever the heap has grown by a quarter since
# the last one and 10 younger passes have run. Importing torch, DeepSpeed, timm and scikit-learn grows the heap from a
# few thousand objects to over a million, so a rank paid about seven full passes before its first step: 15% of its
# start-up CPU time, 1.7 of the 12 CPU-s a one-rank tiny-cpu training takes (docs/experiments.md, "A rank's start").
# Young generations are collected as before. Later in a run a full pass waits for 1000 generation-1 passes (about 7
# million container allocations) instead of 10: over a heap of a million objects the quarter rule already spaced
# them far apart, and only cyclic garbage that has outlived two collections waits for one.
FULL_GC_EVERY = 1000  # generation-1 passes between full passes (Python's default: 10)


def defer_full_gc() -> None:
    """Collect young objects as usual, but make a full pass only every FULL_GC_EVERY generation-1 passes: for a
    process about to import the training stack (a command, a SLURM job)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_GC_EVERY)


COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep.cli", "preprocess a dataset (videos/frames) into WebDataset shards of face crops"),
    "train": ("ltm.train.command", "train a detector with DeepSpeed (one process, --nproc N local ranks, or SLURM)"),
    "eval": ("ltm.eval.command", "score shard folders with a run's checkpoint: frame/video AUC report and plots"),
    "predict": ("ltm.deploy.predict", "P(fake) for a video or image file, per frame, with attention pictures"),
    "serve": ("ltm.deploy.serve", "an HTTP scoring service (P(fake) of uploads, batched) with a drop-a-file page"),
    "export": ("ltm.deploy.export", "write one inference head (the student by default) as ONNX or TorchScript"),
    "plan": ("ltm.train.plan", "memory per GPU by ZeRO stage, the micro-batch that fits, communication and step "
             "time of a config on N GPUs"),
    "submit": ("launcher.submit", "submit train / eval / prep jobs to SLURM with submitit"),
    "sweep": ("launcher.sweep", "paired multi-seed experiments: variants x seeds, here or as a SLURM array, with "
              "t-intervals and a verdict"),
    "reproduce": ("launcher.reproduce", "run or collect one of the paper's tables (Tables 1-5)"),
    "weights": ("ltm.models.weights", "ImageNet backbone weights: fetch into the cache, list what loads offline"),
    "config": ("ltm.cli", "print a resolved config (packaged name or path, plus key=value overrides)"),
    "env": ("ltm.env", "the installed builds (torch/CUDA, DALI, driver, DeepSpeed) and whether they fit together"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="packaged config name or YAML path (default: paper)")
    parser.add_argument("overrides", nargs="*", metavar="[NAME] key=value",
                        help="a packaged config name or YAML path (as --config), then key=value overrides, e.g. "
                             "`ltm config clip-l14 train.lr=0.001`")


def run(args: argparse.Namespace) -> int:
    from ltm.config import load_config, packaged_configs, to_yaml

    overrides = list(args.overrides)
    name = args.config
    if name is None:
        name = overrides.pop(0) if overrides and "=" not in overrides[0] else "paper"
    print(to_yaml(load_config(name, overrides)), end="")
    logging.getLogger(__name__).debug("packaged configs: %s", packaged_configs())
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltm", description="Learning to Mask: face-forgery detection at scale")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    defer_full_gc()  # before the command's module (and what it imports) is loaded
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    # argparse fills a command's trailing `overrides` with the positionals before its first option, so
    # `ltm predict clip.mp4 --run R eval.batch_size=8` leaves the override over: it belongs to `overrides` too
    stray = [a for a in extra if not (OVERRIDE.match(a) and hasattr(args, "overrides"))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    level = logging.DEBUG if args.verbose else getattr(logging, os.environ.get("LTM_LOG_LEVEL", "INFO"))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:
        if args.verbose:
            raise
        for line in str(exc).splitlines() or [type(exc).__name__]:  # several problems: one line each
            logging.getLogger("ltm").error("%s", line)
        return 2


if __name__ == "__main__":
    sys.exit(main())
