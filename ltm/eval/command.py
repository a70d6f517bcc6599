"""`ltm eval`'s command line. With `--nproc N` this process only starts the N local ranks, so it imports neither torch
nor the model: each rank pays for those once, the launcher not at all. The scoring itself: `ltm.eval.evaluate`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ltm.checkpoint import checked_run
from ltm.eval.metrics import VIDEO_AGGREGATIONS
from ltm.eval.report.crossdata import PROTOCOLS, protocol_overrides
from ltm.launch import launch_local


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default=None, help="run folder (holds config.yaml and checkpoints/); required "
                        "unless --compare")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), default=None,
                        help="no scoring: put two evaluated runs' reports side by side in one HTML page (run folders, "
                             "eval roots or report folders; --out FILE, default <RUN_A>/eval/compare-<RUN_B>.html)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one in checkpoints/latest)")
    parser.add_argument("--weights", default=None, help="a consolidated fp32 state-dict file instead of a tag")
    parser.add_argument("--data", action="append", default=None,
                        help="shard folder (split or method folder; relative to data.root unless it exists); "
                             "repeat for a cross-dataset table (default: the config's data.test)")
    parser.add_argument("--video-agg", choices=VIDEO_AGGREGATIONS, default=None,
                        help="frame scores -> video score (default: eval.video_agg)")
    parser.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: eval.batch_size)")
    parser.add_argument("--perturb", metavar="TYPE:LEVEL", default=None,
                        help="score every crop under a DeeperForensics-style perturbation, e.g. blur:3 (types: "
                             "saturation contrast block noise blur pixelate jpeg video; levels 1-5; video: H.264 "
                             "re-encoding of each video's clip at CRF 30-40; see ltm/data/perturb.py)")
    parser.add_argument("--frames-per-video", type=int, default=None, metavar="N",
                        help="score N evenly spaced frames per video (eval.frames_per_video; default: all frames "
                             "in the shards)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None,
                        help="a named evaluation protocol: frames per video and video aggregation as the field "
                             "reports them (" + "; ".join(f"{k}: {v['about']}" for k, v in PROTOCOLS.items())
                             + "); stated in the cross-dataset table")
    parser.add_argument("--robustness", action="store_true",
                        help="score each --data folder clean and under every --perturb type at levels 1-5: "
                             "robustness.json, robustness.md and robustness.png beside the report")
    parser.add_argument("--threshold-from", metavar="FOLDER", default=None,
                        help="a validation shard folder: its EER threshold, instead of eval.threshold, decides the "
                             "accuracy of every --data report")
    parser.add_argument("--out", default=None, help="report root (default: <run>/eval)")
    parser.add_argument("--nproc", type=int, default=1, help="start N local ranks")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. data.loader=reference")


def run(args: argparse.Namespace) -> int:
    if args.compare:
        from ltm.eval.report.html import write_compare

        print(write_compare(*args.compare, args.out))
        return 0
    if args.run is None:
        raise ValueError("ltm eval: --run RUN is required (or --compare RUN_A RUN_B)")
    if args.nproc > 1 and "RANK" not in os.environ:
        # a clear error here, once, before any rank imports torch
        checked_run(args.run, list(args.overrides), args.tag, args.weights)
        argv = ["-m", "ltm.cli", "eval", "--run", str(args.run)]
        if args.robustness:
            argv.append("--robustness")
        for flag, value in (("--tag", args.tag), ("--weights", args.weights), ("--video-agg", args.video_agg),
                            ("--batch-size", args.batch_size), ("--out", args.out),
                            ("--threshold-from", args.threshold_from), ("--perturb", args.perturb),
                            ("--frames-per-video", args.frames_per_video), ("--protocol", args.protocol)):
            if value is not None:
                argv += [flag, str(value)]
        for folder in args.data or []:
            argv += ["--data", str(folder)]
        return launch_local(args.nproc, [*argv, *args.overrides])
    from ltm.eval.evaluate import evaluate, robustness

    overrides = list(args.overrides)
    if args.protocol:

        if args.video_agg or args.frames_per_video is not None:
            raise ValueError(f"--protocol {args.protocol} fixes frames per video and video aggregation: leave out "
                             "--frames-per-video and --video-agg")
        overrides += protocol_overrides(args.protocol)
    if args.video_agg:
        overrides.append(f"eval.video_agg={args.video_agg}")
    if args.batch_size:
        overrides.append(f"eval.batch_size={args.batch_size}")
    if args.perturb:
        overrides.append(f"eval.perturb={args.perturb}")
    if args.frames_per_video is not None:
        overrides.append(f"eval.frames_per_video={args.frames_per_video}")
    if args.robustness:
        if args.perturb or args.threshold_from:
            raise ValueError("--robustness scores every perturbation itself: leave out --perturb and --threshold-from")
        for result in robustness(args.run, args.data, args.tag, overrides, args.weights, args.out):
            if "report_dir" in result:
                print(Path(result["report_dir"]) / "robustness.md")
        return 0
    reports = evaluate(args.run, args.data, args.tag, overrides, args.weights, args.out, args.threshold_from,
                       args.protocol)
    if "report_dir" in reports[-1]:  # the main process, which wrote the reports
        from ltm.eval.report.files import print_table

        print_table(reports)
        for r in reports:
            print(f"report: {r['report_dir']}")
        print(str(Path(reports[-1]["report_dir"]) / "report.json"))
    return 0
