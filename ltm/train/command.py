"""`ltm train`'s command line. With `--nproc N` this process only starts the N local ranks and forwards signals to
them, so it imports neither DeepSpeed nor the model: each rank pays for those once, the launcher not at all."""

from __future__ import annotations

import argparse
import json
import os

from ltm.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="paper", help="packaged config name (paper, tiny-cpu) or a YAML path")
    parser.add_argument("--nproc", type=int, default=1,
                        help="start this many local ranks (gloo on CPU); under SLURM or torchrun leave it at 1")
    parser.add_argument("--resume", default="auto",
                        help="auto: continue from <run>/checkpoints/latest if present; never; or a tag (step00000300)")
    parser.add_argument("--universal", action="store_true",
                        help="load the checkpoint through DeepSpeed's universal format (automatic when the world "
                             "size differs from the one that saved it)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.run_dir=runs/x")


def run(args: argparse.Namespace) -> int:
    from ltm.checkpoint import step_of

    if args.resume not in ("auto", "never"):
        step_of(args.resume)  # a clear error for a malformed tag before any rank starts
    load_config(args.config, args.overrides)  # a bad config fails here, once, not in every rank
    if args.nproc > 1:
        from ltm.launch import launch_local

        if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
            raise ValueError("--nproc starts its own ranks, but RANK/WORLD_SIZE are already set by a launcher")
        argv = ["-m", "ltm.cli", *(["-v"] if getattr(args, "verbose", False) else []), "train",
                "--config", args.config, "--resume", args.resume, *(["--universal"] if args.universal else []),
                *args.overrides]
        return launch_local(args.nproc, argv)
    from ltm.train.trainer import train

    result = train(load_config(args.config, args.overrides), resume=args.resume, universal=args.universal)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0
