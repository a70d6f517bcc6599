"""`ltm reproduce tableN`: train and evaluate every run of one of the paper's tables, then collect the table.

    ltm reproduce table4 --shards /data/shards --runs runs/paper --local --seeds 3    # here, one point after another
    ltm reproduce table4 --shards /data/shards --runs runs/paper --gpus-per-node 4   # SLURM: one array task a point
    ltm reproduce table4 --runs runs/paper --collect                              # table4.md / table4.json

A table (`ltm.reproduce.paper`) names, per cell, the experiment config that trains it
(`ltm/configs/experiments/<run>.yaml`) and the shard split its evaluation scores. A table is run as one sweep
(`ltm.sweep`): each run a variant (its resolved config: experiment <- `--base` <- `--map` <- `--weights` <- key=value
overrides <- shard root, as `key=value` over the base), each seed a point `<runs>/<run>-seed<k>/` trained to the
run's budget and scored once on the splits its cells need (val selects the checkpoint where the run has a val
split; Celeb-DF and WildDeepfake runs have none and score their last one). Every cell is the mean over seeds with
its 95% t-interval (`ltm.sweep.stats`). Runs shared by several tables are trained once, and a table that needs
a split a kept run was not scored on scores only that split.

State of a point, from its record and folder: `done` (scored on every split its cells need: skipped), `eval`
(trained: only the missing scores run), `resume` (checkpoints short of the end: training resumes from `latest`),
`train` (nothing yet). Re-running the same command continues where it stopped; a point whose config changed is
refused naming the keys. On SLURM, points whose array task of an earlier submission is still queued or running
are not submitted again.

`--map OLD=NEW` renames one path component (dataset, split or method) in every shard path and per-method key,
so that a table can run on other shards: e.g. on the sample dataset (FF++ layout, methods SelfBlend and
FaceSwap) `--map Deepfakes=SelfBlend --map Face2Face=SelfBlend --map NeuralTextures=FaceSwap`.

`ltm reproduce foundation` runs the same way a table beyond the paper's: LTM on CLIP ViT-L/14 and its Baselines,
frame and video AUC on Celeb-DF v2, DFDC, DFDC-P and DFD beside the field's published figures
(`ltm.reproduce.foundation`, docs/foundation.md).

The package, one concern per module: `configs` (each run's resolved config), `plan` (the table as a sweep, and
each point's state), `cost` (GPU-hour estimates), `results` (collecting the points into tableN.md/.json). Running
points (here or as a SLURM array) is `ltm.sweep` / `launcher.sweep`; the command is `launcher.reproduce`. The
paper's numbers are data in `ltm.reproduce.paper`, the foundation table's in `ltm.reproduce.foundation`.
"""

from ltm.models.flops import model_gflops
from ltm.reproduce.configs import (
    EXPERIMENTS_DIR,
    config_diff,
    experiment_layer,
    experiment_path,
    map_path,
    parse_pairs,
    run_config,
)
from ltm.reproduce.cost import estimate, print_estimate, split_frames
from ltm.reproduce.plan import STATE_DIR, RunPlan, checkpoint_step, plan_points, select, table_sweep
from ltm.reproduce.results import collect, results_markdown, write_collected

__all__ = [
    "EXPERIMENTS_DIR",
    "STATE_DIR",
    "RunPlan",
    "checkpoint_step",
    "collect",
    "config_diff",
    "estimate",
    "experiment_layer",
    "experiment_path",
    "map_path",
    "model_gflops",
    "parse_pairs",
    "plan_points",
    "print_estimate",
    "results_markdown",
    "run_config",
    "select",
    "split_frames",
    "table_sweep",
    "write_collected",
]
