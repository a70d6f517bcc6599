"""The plan of a table: its runs, the split folders each must evaluate, and each run's state from its folder."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ltm.config import Config, ConfigError, save_config
from ltm.paper_results import Row, Table
from ltm.reproduce.configs import map_path, run_config

STATE_DIR = ".reproduce"  # under --runs: resolved configs, submitted jobs, the options of the last run per table


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


def report_dir(run_dir: Path, data: str) -> Path:
    """`<run>/eval/<dataset>-<split>/` for the split folder `<dataset>/<split>` (DESIGN.md "Run folder")."""
    parts = Path(data).parts
    return run_dir / "eval" / "-".join(parts[-2:])


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
    name: str
    cfg: Config
    run_dir: Path
    data: list[str]  # split folders (relative to the shard root) the table's cells need from this run
    missing: list[str] = field(default_factory=list)  # of those, the ones without report.json
    step: int | None = None
    total: int = 0
    state: str = "train"  # done | eval | resume | train
    config_file: Path | None = None


def plan_table(
    table: Table,
    shards: str | os.PathLike,
    runs: str | os.PathLike,
    base: str | None = None,
    overrides: list[str] | None = None,
    mapping: dict[str, str] | None = None,
    weights: dict[str, str] | None = None,
) -> list[RunPlan]:
    """One plan per run of the table, in row order, with its state read from the run folder."""
    needed: dict[str, list[str]] = {}
    for row in table.rows:
        for cell in row.cells.values():
            if cell.run is not None:
                data = map_path(cell.data or "", mapping or {})
                needed.setdefault(cell.run, [])
                if data not in needed[cell.run]:
                    needed[cell.run].append(data)
    plans = []
    for name, data in needed.items():
        cfg = run_config(name, shards, runs, base, overrides, mapping, weights)
        run_dir = Path(cfg.train.run_dir)
        plan = RunPlan(name, cfg, run_dir, data, total=cfg.train.epochs * cfg.train.iters_per_epoch)
        plan.missing = [d for d in data if not (report_dir(run_dir, d) / "report.json").is_file()]
        plan.step = checkpoint_step(run_dir)
        if not plan.missing:
            plan.state = "done"
        elif plan.step is not None and plan.step >= plan.total:
            plan.state = "eval"
        elif plan.step is not None:
            plan.state = "resume"
        plans.append(plan)
    return plans


def write_configs(plans: list[RunPlan], runs: Path) -> None:
    """The resolved config of every run still to do, as the file `ltm train --config` reads (atomic writes)."""
    folder = runs / STATE_DIR / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    for plan in plans:
        plan.config_file = folder / f"{plan.name}.yaml"
        if plan.state != "done":
            save_config(plan.cfg, plan.config_file)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
