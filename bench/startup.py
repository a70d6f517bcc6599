"""A command's start-up CPU time with the collector's full passes deferred (what every `ltm` command and SLURM job
does, `ltm.cli.defer_full_gc`) against Python's default thresholds, in alternating runs of the same command.

    python bench/startup.py [--runs 5] [-- plan --config tiny-cpu --gpus 2]

The default command, `ltm plan`, imports what a training rank imports before its first step (torch, DeepSpeed, timm,
the model) and builds the model on the meta device, so its CPU time is a rank's start without the data and the
steps. Each run is a fresh process; its user + system CPU seconds are read from the kernel (the children's rusage),
its full collections counted by a `gc.callbacks` hook. Target: deferred / default <= 0.9 (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_COMMAND = ["plan", "--config", "tiny-cpu", "--gpus", "2"]
PROBE = """
import gc, json, sys
full = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and full.append(1))
import ltm.cli
if sys.argv[1] == "default":
    ltm.cli.defer_full_gc = lambda: None  # Python's thresholds stay as they are
status = ltm.cli.main(sys.argv[2:])
print(json.dumps({"status": status, "full_passes": len(full), "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def run_once(mode: str, command: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-c", PROBE, mode, *command], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"ltm {' '.join(command)} failed ({mode}):\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu_s": round(cpu, 3), "full_passes": result["full_passes"], "imported_torch": result["torch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each mode, alternating (default 5)")
    parser.add_argument("command", nargs="*", help=f"the ltm command (default: {' '.join(DEFAULT_COMMAND)})")
    args = parser.parse_args()
    command = args.command or DEFAULT_COMMAND
    runs: dict[str, list[dict]] = {"deferred": [], "default": []}
    for _ in range(args.runs):  # alternating, so a change in the machine's speed falls on both
        for mode in runs:
            runs[mode].append(run_once(mode, command))
    medians = {mode: statistics.median(r["cpu_s"] for r in rs) for mode, rs in runs.items()}
    print(f"ltm {' '.join(command)}: CPU seconds per start, median of {args.runs}")
    for mode, rs in runs.items():
        print(f"  {mode:9s} {medians[mode]:6.2f} s   full passes {[r['full_passes'] for r in rs]}   "
              f"runs {[r['cpu_s'] for r in rs]}")
    ratio = medians["deferred"] / medians["default"]
    print(f"deferred / default: {ratio:.3f} (target <= 0.9: {'met' if ratio <= 0.9 else 'not met'})")
    print(json.dumps({"command": command, "runs": runs, "median_cpu_s": medians, "ratio": round(ratio, 4)}))


if __name__ == "__main__":
    main()
