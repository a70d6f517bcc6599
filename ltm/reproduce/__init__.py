"""`ltm reproduce tableN`: train and evaluate every run of one of the paper's tables, then collect the table.

    ltm reproduce table4 --shards /data/shards --runs runs/paper --local          # one run after the other here
    ltm reproduce table4 --shards /data/shards --runs runs/paper --gpus-per-node 4  # SLURM: train + eval afterok
    ltm reproduce table4 --runs runs/paper --collect                             # table4.md / table4.json

A table (`ltm.paper_results`) names, per cell, the experiment config that trains it
(`ltm/configs/experiments/<run>.yaml`, run folder `<runs>/<run>/`) and the shard split its evaluation scores.
Runs shared by several tables are trained once. Each run's config is resolved once (experiment <- `--base` <-
`--map` <- `--weights` <- key=value overrides <- shard root and run folder) and written to
`<runs>/.reproduce/configs/<run>.yaml`, the file `ltm train --config` reads (a SLURM job gets the same config).

State of a run, from its folder: `done` (every report its cells need exists: skipped), `eval` (training finished:
only the missing evaluations run), `resume` (checkpoints but not the last step: training resumes from `latest`,
then evaluation), `train` (nothing yet). Re-running the same command therefore continues where it stopped.
On SLURM, jobs still queued or running from an earlier submission (recorded in `<runs>/.reproduce/jobs.json`)
are not submitted again.

`--map OLD=NEW` renames one path component (dataset, split or method) in every shard path and per-method key,
so that a table can run on other shards: e.g. on the sample dataset (FF++ layout, methods SelfBlend and
FaceSwap) `--map Deepfakes=SelfBlend --map Face2Face=SelfBlend --map NeuralTextures=FaceSwap`.

The package, one concern per module: `configs` (each run's resolved config), `plan` (a table's runs and their
state), `local` (running here), `cost` (GPU-hour estimates), `results` (collecting the reports into
tableN.md/.json). The command and the SLURM submission (submitting, remembering and waiting for jobs) are
`launcher.reproduce`: SLURM sits above `ltm`. The paper's numbers are data in `ltm.paper_results`.
"""

from ltm.reproduce.configs import (
    EXPERIMENTS_DIR,
    config_diff,
    experiment_layer,
    experiment_path,
    map_path,
    parse_pairs,
    run_config,
)
from ltm.reproduce.cost import estimate, model_gflops, print_estimate, split_frames
from ltm.reproduce.local import eval_command, run_local, train_command
from ltm.reproduce.plan import STATE_DIR, RunPlan, checkpoint_step, plan_table, report_dir, select, write_configs
from ltm.reproduce.results import collect, render_markdown, write_collected

__all__ = [
    "EXPERIMENTS_DIR",
    "STATE_DIR",
    "RunPlan",
    "checkpoint_step",
    "collect",
    "config_diff",
    "estimate",
    "eval_command",
    "experiment_layer",
    "experiment_path",
    "map_path",
    "model_gflops",
    "parse_pairs",
    "plan_table",
    "print_estimate",
    "render_markdown",
    "report_dir",
    "run_config",
    "run_local",
    "select",
    "split_frames",
    "train_command",
    "write_collected",
    "write_configs",
]
