"""The plan of a table: its runs as the points of one sweep (run x seed), the split folders each must score, and
each point's state from its record and run folder."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ltm.config import Config, ConfigError, load_config
from ltm.reproduce.configs import config_diff, experiment_layer, map_path, resolve_base, run_config
from ltm.reproduce.paper import Row, Table
from ltm.sweep.run import Sweep, is_complete, point_config, read_record, unscored

STATE_DIR = ".reproduce"  # under --runs: the options of the last run per table


def select(table: Table, rows: list[str] | None = None, columns: list[str] | None = None) -> Table:
    """The table restricted to some rows / columns (by key); unknown keys are an error naming the choices."""
    for chosen, allowed, what in ((rows, [r.key for r in table.rows], "row"), (columns, list(table.columns), "column")):
        unknown = [k for k in chosen or [] if k not in allowed]
        if unknown:
            raise ConfigError(f"{table.name}: unknown {what}(s) {unknown}; choose from {allowed}")
    keep_cols = [c for c in table.columns if not columns or c in columns]
    kept_rows = [
        Row(r.key, r.label, {c: r.cells[c] for c in keep_cols if c in r.cells}, r.train)
        for r in table.rows if not rows or r.key in rows
    ]
    average = {c: src for c, src in table.average.items() if c in keep_cols and all(s in keep_cols for s in src)}
    return replace(table, columns={c: table.columns[c] for c in keep_cols}, rows=kept_rows, average=average)


def checkpoint_step(run_dir: Path) -> int | None:
    """Step of the run's `latest` checkpoint tag (`step<NNNNNNNN>`), None without checkpoints."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag.startswith("step") or not tag[4:].isdigit():
        raise ValueError(f"{latest}: unexpected checkpoint tag {tag!r} (expected step<NNNNNNNN>)")
    return int(tag[4:])


@dataclass
class RunPlan:
    """One point of the table's sweep: an experiment run with one seed."""

    name: str
    seed: int
    cfg: Config  # the point's training config (its run folder, seed and budget)
    run_dir: Path
    data: list[str]  # split folders (relative to the shard root) the table's cells need from this run
    missing: list[str] = field(default_factory=list)  # of those, the ones not scored yet
    step: int | None = None
    total: int = 0
    state: str = "train"  # done | eval | resume | train

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}"


def needed_data(table: Table, mapping: dict[str, str] | None = None) -> dict[str, list[str]]:
    """{run: the split folders its cells score}, runs in row order (a run shared by cells is trained once)."""
    needed: dict[str, list[str]] = {}
    for row in table.rows:
        for cell in row.cells.values():
            if cell.run is not None:
                data = map_path(cell.data or "", mapping or {})
                needed.setdefault(cell.run, [])
                if data not in needed[cell.run]:
                    needed[cell.run].append(data)
    return needed


def table_sweep(
    table: Table,
    shards: str | os.PathLike,
    runs: str | os.PathLike,
    base: str | None = None,
    overrides: list[str] | None = None,
    mapping: dict[str, str] | None = None,
    weights: dict[str, str] | None = None,
    seeds: list[int] | None = None,
) -> Sweep:
    """The table as a sweep: a variant per run (its resolved config as `key=value` over the base), scored on its own
    cells' split folders, seeds as asked (default: the config's), the run's full budget, test reports with pictures.

    Points live in `<runs>/<run>-seed<k>/` with their records in `<runs>/points/`, so tables sharing a run share
    its points, and a table needing a set a kept run was not scored on scores only that set."""
    needed = needed_data(table, mapping)
    if not needed:
        raise ConfigError(f"{table.name}: the selected rows and columns need no run (only cited numbers)")
    base = resolve_base(base)
    variants, budgets, config_seeds = {}, set(), set()
    references: dict[str, Config] = {}  # each base config loaded once
    for name in needed:
        cfg = run_config(name, shards, runs, base, overrides, mapping, weights)
        config = base or experiment_layer(name)[0]
        if config not in references:
            references[config] = load_config(config)
        variants[name] = [kv for kv in config_diff(cfg, references[config]) if not kv.startswith("train.run_dir=")]
        budgets.add(cfg.train.epochs * cfg.train.iters_per_epoch)
        config_seeds.add(cfg.train.seed)
    if len(budgets) != 1 or len(references) != 1:
        raise ConfigError(f"{table.name}: its runs train for different budgets {sorted(budgets)} or from different "
                          f"base configs {sorted(references)}; one sweep has one of each (pass --base)")
    seeds = list(seeds) if seeds else sorted(config_seeds)[:1]
    return Sweep(config=next(iter(references)), variants=variants, seeds=seeds, evals=[], out=Path(runs),
                 budgets=sorted(budgets), variant_evals=needed, runs_folder="", full_reports=True)


def plan_points(sweep: Sweep) -> list[RunPlan]:
    """One plan per point, in row order then seed, with its state from its record and run folder."""
    plans, total = [], sweep.budgets[-1]
    for name, seed in sweep.points():
        record = read_record(sweep.record_path(name, seed)) or {}
        plan = RunPlan(name, seed, point_config(sweep, name, seed, total), sweep.run_dir(name, seed),
                       sweep.evals_of(name), total=total)
        plan.missing = unscored(sweep, name, record)
        plan.step = checkpoint_step(plan.run_dir)
        if is_complete(sweep, name, seed, record):
            plan.state = "done"
        elif plan.step is not None and plan.step >= plan.total:
            plan.state = "eval"
        elif plan.step is not None:
            plan.state = "resume"
        plans.append(plan)
    return plans


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
