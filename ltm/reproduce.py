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
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ltm.config import CONFIG_DIR, Config, ConfigError, SourceConfig, load_config, save_config, to_dict, validate
from ltm.paper_results import TABLES, Cell, Row, Table

log = logging.getLogger(__name__)

EXPERIMENTS_DIR = CONFIG_DIR / "experiments"
STATE_DIR = ".reproduce"  # under --runs: resolved configs, submitted jobs, the options of the last run per table


# --------------------------------------------------------------------------------------------------- configs


def experiment_path(name: str) -> Path:
    path = EXPERIMENTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"experiment {name!r}: no file {path}")
    return path


def experiment_layer(name: str) -> tuple[str, list[str]]:
    """The experiment file as (its base config, its keys as `key=value` overrides of that base)."""
    path = experiment_path(name)
    try:
        layer = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(layer, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = str(layer.pop("base", "paper"))
    return base, _dotlist(layer)


def _dotlist(tree: dict[str, Any], prefix: str = "") -> list[str]:
    items = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            items += _dotlist(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={_format(value)}")
    return items


def _format(value: Any) -> str:
    """A value as OmegaConf's dotlist parses it back (JSON is valid there); plain strings stay readable."""
    if isinstance(value, str) and value and all(c.isalnum() or c in "_-./" for c in value):
        return value
    return json.dumps(value)


def parse_pairs(items: list[str] | None, option: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise ConfigError(f"{option} {item!r}: expected OLD=NEW")
        pairs[old] = new
    return pairs


def map_path(path: str, mapping: dict[str, str]) -> str:
    """Rename whole path components (`wdf/train/fake` with {wdf: ffpp_c23, fake: SelfBlend})."""
    if not mapping:
        return path
    return "/".join(mapping.get(part, part) for part in path.split("/"))


def _map_sources(sources: list[SourceConfig], mapping: dict[str, str]) -> list[SourceConfig]:
    """Mapped sources; two sources mapped onto one folder become one with the summed weight."""
    merged: dict[str, float] = {}
    for source in sources:
        path = map_path(source.path, mapping)
        merged[path] = merged.get(path, 0.0) + source.weight
    return [SourceConfig(path=p, weight=w) for p, w in merged.items()]


def run_config(
    name: str,
    shards: str | os.PathLike,
    runs: str | os.PathLike,
    base: str | None = None,
    overrides: list[str] | None = None,
    mapping: dict[str, str] | None = None,
    weights: dict[str, str] | None = None,
) -> Config:
    """The resolved config of one run: experiment (on `base` instead of its own when given), then overrides."""
    own_base, layer = experiment_layer(name)
    if base is not None and Path(base).suffix in (".yaml", ".yml"):
        base = str(Path(base).resolve())
    fixed = [f"data.root={_format(str(Path(shards).resolve()))}",
             f"train.run_dir={_format(str((Path(runs) / name).resolve()))}"]
    try:
        cfg = load_config(base or own_base, layer + list(overrides or []) + fixed)
    except ConfigError as exc:
        raise ConfigError(f"experiment {name!r}: {exc}") from exc
    if mapping:
        cfg.data.train = _map_sources(cfg.data.train, mapping)
        cfg.data.val = list(dict.fromkeys(map_path(p, mapping) for p in cfg.data.val))
        cfg.data.test = list(dict.fromkeys(map_path(p, mapping) for p in cfg.data.test))
    if weights:
        # Local ImageNet weights per backbone name (Table 5 mixes backbones, so one file cannot serve all runs).
        teacher = cfg.model.teacher_backbone or cfg.model.backbone
        if cfg.model.backbone in weights:
            cfg.model.pretrained = weights[cfg.model.backbone]
        if teacher in weights:
            cfg.model.teacher_pretrained = weights[teacher]
    validate(cfg)
    return cfg


def config_diff(cfg: Config, reference: Config) -> list[str]:
    """`key=value` for every leaf where `cfg` differs from `reference` (what a run changes against paper.yaml)."""
    a, b = _flatten(to_dict(cfg)), _flatten(to_dict(reference))
    return [f"{k}={_format(v)}" for k, v in a.items() if b.get(k, object()) != v]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------------------------------- tables


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


# --------------------------------------------------------------------------------------------------- running


def _ltm(*args: str) -> list[str]:
    return [sys.executable, "-m", "ltm.cli", *args]


def train_command(plan: RunPlan, nproc: int | None = None) -> list[str]:
    assert plan.config_file is not None
    return _ltm("train", "--config", str(plan.config_file), *(["--nproc", str(nproc)] if nproc else []))


def eval_command(plan: RunPlan) -> list[str]:
    data = [a for d in plan.missing for a in ("--data", str(Path(plan.cfg.data.root) / d))]
    return _ltm("eval", "--run", str(plan.run_dir), *data)


def run_local(plans: list[RunPlan], nproc: int | None = None) -> int:
    """Train (or resume) and evaluate each unfinished run, one after the other, each in its own `ltm` process.

    A failed run is reported and the others still run; the exit status is 1 when any failed.
    """
    failed = []
    for plan in plans:
        if plan.state == "done":
            log.info("skipped %s: its reports exist", plan.name)
    todo = [p for p in plans if p.state != "done"]
    for i, plan in enumerate(todo, 1):
        if plan.state in ("train", "resume"):
            log.info("[%d/%d] train %s: %s", i, len(todo), plan.name, " ".join(train_command(plan, nproc)[1:]))
            rc = subprocess.run(train_command(plan, nproc), check=False).returncode
            step = checkpoint_step(plan.run_dir)
            if rc != 0 or step is None or step < plan.total:
                # a stopped (signalled) training exits 0 after saving: evaluating it would pass for a finished run
                log.error("training of %s did not finish (exit %d, checkpoint step %s of %d); the other runs go on",
                          plan.name, rc, step, plan.total)
                failed.append(plan.name)
                continue
        log.info("[%d/%d] eval %s: %s", i, len(todo), plan.name, " ".join(eval_command(plan)[1:]))
        rc = subprocess.run(eval_command(plan), check=False).returncode
        if rc != 0:
            log.error("evaluation of %s failed (exit %d); the other runs go on", plan.name, rc)
            failed.append(plan.name)
    if failed:
        log.error("failed runs: %s (re-run the same command to continue)", ", ".join(failed))
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------------- SLURM


def load_jobs(runs: Path) -> dict[str, dict[str, str]]:
    """Job ids of earlier submissions per run: {run: {"train": id, "eval": id}}."""
    path = runs / STATE_DIR / "jobs.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it to forget earlier submissions") from exc


def save_jobs(runs: Path, jobs: dict[str, dict[str, str]]) -> None:
    (runs / STATE_DIR).mkdir(parents=True, exist_ok=True)
    _write_atomic(runs / STATE_DIR / "jobs.json", json.dumps(jobs, indent=2, sort_keys=True) + "\n")


def active_jobs(ids: list[str]) -> set[str]:
    """Those of `ids` that SLURM still knows as pending, running or requeued (not in a final state)."""
    if not ids or shutil.which("scontrol") is None:
        return set()
    from launcher.submit import FINAL_STATES, job_state

    active = set()
    for job_id in ids:
        state = job_state(job_id)
        if state != "UNKNOWN" and not all(s in FINAL_STATES for s in state.split(",")):
            active.add(job_id)
    return active


def submit_slurm(plans: list[RunPlan], runs: Path, dry_run: bool = False) -> list[tuple[RunPlan, dict[str, Any]]]:
    """Submit each unfinished run through the launcher: training, then its evaluation with `afterok`.

    A run whose training finished gets only the evaluation job; a run with jobs of an earlier submission still
    queued or running gets nothing new. Job ids are recorded in `<runs>/.reproduce/jobs.json` after each run.
    """
    from launcher.submit import submit_eval, submit_train

    if not dry_run and shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found: this machine has no SLURM client; run with --local instead")
    jobs = load_jobs(runs)
    active = active_jobs([i for rec in jobs.values() for i in rec.values() if i])
    submitted = []
    for plan in plans:
        if plan.state == "done":
            continue
        busy = [i for i in jobs.get(plan.name, {}).values() if i in active]
        if busy:
            log.info("%s: job(s) %s of an earlier submission still queued or running; not submitted again",
                     plan.name, ", ".join(busy))
            continue
        data = [str(Path(plan.cfg.data.root) / d) for d in plan.missing]
        if plan.state in ("train", "resume"):
            out: dict[str, Any] = submit_train(plan.cfg, eval_data=data, dry_run=dry_run)
        else:
            out = {"eval": submit_eval(str(plan.run_dir), data, launch=plan.cfg.launch, dry_run=dry_run)}
        if not dry_run:
            jobs[plan.name] = {kind: sub.job_id for kind, sub in out.items()}
            save_jobs(runs, jobs)
            log.info("%s: %s", plan.name, ", ".join(f"{k} job {v.job_id}" for k, v in out.items()))
        submitted.append((plan, out))
    return submitted


def wait_for(ids: list[str]) -> dict[str, str]:
    """Block until every job of `ids` reached a final state; {job id: state}."""
    from launcher.submit import wait_for as launcher_wait

    log.info("waiting for %d job(s): %s", len(ids), ", ".join(ids))
    states = launcher_wait(ids, timeout_s=float("inf"), poll_s=5.0)
    for job_id, state in states.items():
        (log.info if state == "COMPLETED" else log.error)("job %s: %s", job_id, state)
    return states


# --------------------------------------------------------------------------------------------------- estimate

FRAMES_PER_VIDEO = 32  # `ltm prep` default (--frames)
NOMINAL_VIDEOS = {  # videos (WDF: face sequences) per split folder where no manifest is there to count
    ("ffpp", "val"): 140, ("ffpp", "test"): 140,  # per method folder; the official 70 pairs -> 140 videos
    ("celebdf_v2", "test"): 518,  # List_of_testing_videos.txt: 178 real, 340 fake
    ("wdf", "test"): 1460,  # assumed: about a fifth of WildDeepfake's 7,314 sequences
}
FFPP_METHODS_IN_SPLIT = 5  # real + the paper's four methods


def split_frames(root: Path, folder: str) -> int:
    """Frames in a split (or method) folder: the manifest's totals when the shards exist, else a nominal count."""
    parts = Path(folder).parts
    dataset, split = parts[0], parts[1] if len(parts) > 1 else "test"
    method = parts[2] if len(parts) > 2 else None
    manifest = root / dataset / split / "manifest.json"
    if manifest.is_file():
        by_method = json.loads(manifest.read_text()).get("totals", {}).get("by_method", {})
        if by_method:
            return int(by_method.get(method, 0) if method else sum(by_method.values()))
    family = "ffpp" if dataset.startswith("ffpp") else dataset
    videos = NOMINAL_VIDEOS.get((family, split), 0)
    if family == "ffpp" and method is None:
        videos *= FFPP_METHODS_IN_SPLIT
    return videos * FRAMES_PER_VIDEO


def model_gflops(cfg: Config) -> tuple[float, float]:
    """(training forward, inference) GFLOP per image, counted by torch's FlopCounterMode on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ltm.models import build_model

    size = cfg.data.image_size
    with torch.device("meta"):
        # mixup draws lambda with .item(), which meta tensors cannot do; it adds no measurable FLOPs
        model = build_model(replace(cfg.model, mixup=False), size)
        images, labels = torch.empty(2, 3, size, size), torch.empty(2)
        with torch.no_grad(), FlopCounterMode(display=False) as train_fc:
            model(images, labels)
        with FlopCounterMode(display=False) as predict_fc:
            model.predict(images)
    return train_fc.get_total_flops() / 2e9, predict_fc.get_total_flops() / 2e9


def estimate(plans: list[RunPlan], tflops: float) -> list[dict[str, Any]]:
    """GPU hours per run from FLOPs: training steps at 3x the forward cost (forward + backward), validation and
    evaluation forward-only, all at `tflops` sustained TFLOP/s."""
    rows = []
    for plan in plans:
        cfg = plan.cfg
        fwd, pred = model_gflops(cfg)
        root = Path(cfg.data.root)
        images = cfg.train.epochs * cfg.train.iters_per_epoch * cfg.train.batch_size
        total_steps = cfg.train.epochs * cfg.train.iters_per_epoch
        passes = max(total_steps // cfg.train.val_every, cfg.train.epochs) if cfg.train.val_every else cfg.train.epochs
        val_frames = sum(split_frames(root, f) for f in cfg.data.val)
        if cfg.train.val_batches:
            val_frames = min(val_frames, cfg.train.val_batches * cfg.eval.batch_size)
        test_frames = sum(split_frames(root, f) for f in plan.data)
        pflop = {"train": 3 * fwd * images / 1e6, "val": pred * val_frames * (passes if cfg.data.val else 0) / 1e6,
                 "eval": pred * test_frames / 1e6}
        hours = sum(pflop.values()) * 1e15 / (tflops * 1e12) / 3600
        rows.append({"run": plan.name, "state": plan.state, "train_images": images,
                     "train_gflop_per_image": 3 * fwd, "predict_gflop_per_image": pred, "val_frames": val_frames,
                     "val_passes": passes, "test_frames": test_frames, "pflop": pflop, "gpu_hours": hours})
    return rows


def print_estimate(rows: list[dict[str, Any]], tflops: float) -> None:
    print(f"{'run':<38} {'GFLOP/img':>9} {'train PFLOP':>11} {'val PFLOP':>9} {'eval PFLOP':>10} {'GPU h':>6}")
    for r in rows:
        p = r["pflop"]
        print(f"{r['run']:<38} {r['train_gflop_per_image']:>9.1f} {p['train']:>11.2f} {p['val']:>9.2f} "
              f"{p['eval']:>10.3f} {r['gpu_hours']:>6.2f}")
    todo = sum(r["gpu_hours"] for r in rows if r["state"] != "done")
    print(f"total {sum(r['gpu_hours'] for r in rows):.1f} GPU hours ({todo:.1f} still to run) at {tflops:g} TFLOP/s "
          "sustained per GPU; training = 3x forward FLOPs (FlopCounterMode), validation/eval forward only")


# --------------------------------------------------------------------------------------------------- collecting


def _read_auc(run_dir: Path, cell: Cell, mapping: dict[str, str]) -> tuple[float | None, Path]:
    path = report_dir(run_dir, map_path(cell.data or "", mapping)) / "report.json"
    if not path.is_file():
        return None, path
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if cell.method is None:
        value = report.get("frame_auc")
    else:
        method = mapping.get(cell.method, cell.method)
        per_method = report.get("per_method") or {}
        if method not in per_method:
            raise ValueError(f"{path}: no per_method entry {method!r} (has {sorted(per_method)})")
        value = per_method[method].get("frame_auc")
    if value is None:
        return None, path  # AUC undefined (one class only): shown as missing
    return 100.0 * float(value), path  # sklearn's AUC is a fraction; the paper prints percent


def collect(table: Table, runs: str | os.PathLike, mapping: dict[str, str] | None = None) -> dict[str, Any]:
    """Our AUC next to the paper's for every cell; missing reports are listed, not fatal."""
    runs = Path(runs)
    mapping = mapping or {}
    rows, missing = [], []
    for row in table.rows:
        cells: dict[str, dict[str, Any]] = {}
        for col in table.columns:
            cell = row.cells.get(col)
            if cell is None:
                continue
            entry: dict[str, Any] = {"paper": cell.paper, "ours": None, "diff": None, "run": cell.run}
            if col in table.average and not row.cited:
                parts = [cells.get(c, {}).get("ours") for c in table.average[col]]
                entry["status"] = "ok" if all(p is not None for p in parts) else "missing"
                if entry["status"] == "ok":
                    entry["ours"] = sum(parts) / len(parts)
            elif cell.run is None:
                entry["status"] = "cited"
            else:
                auc, path = _read_auc(runs / cell.run, cell, mapping)
                entry.update(ours=auc, report=str(path), data=cell.data, method=cell.method)
                entry["status"] = "ok" if auc is not None else "missing"
                if auc is None:
                    missing.append(str(path))
            if entry["ours"] is not None and cell.paper is not None:
                entry["diff"] = entry["ours"] - cell.paper
            cells[col] = entry
        rows.append({"key": row.key, "label": row.label, "train": row.train, "cited": row.cited, "cells": cells})
    return {
        "table": table.name,
        "caption": table.caption,
        "metric": "frame-level AUC (%)",
        "row_header": table.row_header,
        "columns": table.columns,
        "rows": rows,
        "missing": missing,
        "map": mapping,
    }


def _num(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def render_markdown(result: dict[str, Any]) -> str:
    title = result["table"].replace("table", "Table ")
    lines = [
        f"# {title}: {result['caption']}",
        "",
        f"{result['metric']}: ours, the paper's, and ours − paper. `missing`: no evaluation report yet; "
        "`—`: nothing to show (a number the paper cites from another paper, or `-` in the paper).",
    ]
    if result.get("map"):
        lines.append("Shard names mapped: " + ", ".join(f"{k} → {v}" for k, v in result["map"].items()) + ".")
    has_train = any(r["train"] for r in result["rows"])
    header = [result["row_header"]] + (["Train"] if has_train else [])
    for label in result["columns"].values():
        header += [f"{label} ours", f"{label} paper", "Δ"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        out = [row["label"]] + ([row["train"]] if has_train else [])
        for col in result["columns"]:
            c = row["cells"].get(col)
            if c is None:
                out += ["", "", ""]
                continue
            ours = "missing" if c["status"] == "missing" else _num(c["ours"])
            out += [ours, _num(c["paper"]), _num(c["diff"], signed=True)]
        lines.append("| " + " | ".join(out) + " |")
    if result["missing"]:
        lines += ["", f"Missing reports ({len(result['missing'])}):"] + [f"- `{p}`" for p in result["missing"]]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_collected(result: dict[str, Any], runs: Path) -> tuple[Path, Path]:
    runs.mkdir(parents=True, exist_ok=True)
    md, js = runs / f"{result['table']}.md", runs / f"{result['table']}.json"
    _write_atomic(js, json.dumps(result, indent=2) + "\n")
    _write_atomic(md, render_markdown(result))
    return md, js


# --------------------------------------------------------------------------------------------------- CLI


def _remember(runs: Path, table: str, options: dict[str, Any]) -> None:
    """The selection and mapping of the last run of a table, so that `--collect` finds the same reports."""
    folder = runs / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / f"{table}.json", json.dumps(options, indent=2) + "\n")


def _recall(runs: Path, table: str) -> dict[str, Any]:
    path = runs / STATE_DIR / f"{table}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _csv(value: str | None) -> list[str] | None:
    return [v for v in value.split(",") if v] if value else None


def _keys_epilog() -> str:
    lines = ["row and column keys (--rows / --columns):"]
    for t in TABLES.values():
        lines.append(f"  {t.name}: rows {','.join(r.key for r in t.rows if not r.cited)}; "
                     f"columns {','.join(t.columns)}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _keys_epilog()
    parser.add_argument("table", choices=sorted(TABLES), help="which of the paper's tables")
    parser.add_argument("--runs", required=True, help="folder holding one run folder per experiment, and the tables")
    parser.add_argument("--shards", help="shard root (data.root) with ffpp_c23/, ffpp_c40/, celebdf_v2/, wdf/")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--collect", action="store_true", help="only read the reports and write tableN.md/.json")
    mode.add_argument("--local", action="store_true", help="run here, one run after the other (default: SLURM)")
    parser.add_argument("--dry-run", action="store_true", help="list runs, configs and jobs; change nothing")
    parser.add_argument("--rows", help="comma list of row keys to run/collect (default: all)")
    parser.add_argument("--columns", help="comma list of column keys to run/collect (default: all)")
    parser.add_argument("--base", help="start every experiment from this config instead of paper (e.g. tiny-cpu)")
    parser.add_argument("--map", action="append", metavar="OLD=NEW",
                        help="rename a shard path component (dataset, split or method); repeatable")
    parser.add_argument("--weights", action="append", metavar="BACKBONE=FILE",
                        help="local pretrained weights for a backbone name (sets model.pretrained / "
                             "model.teacher_pretrained where the run uses it); repeatable")
    parser.add_argument("--nproc", type=int, help="--local: ranks per training (ltm train --nproc)")
    parser.add_argument("--estimate", action="store_true", help="print the GPU hours each run needs (from FLOPs)")
    parser.add_argument("--tflops", type=float, default=25.0,
                        help="--estimate: sustained TFLOP/s per GPU (default 25: bf16 Xception on an A100, see README)")
    parser.add_argument("--wait", action="store_true", help="SLURM: wait until the submitted jobs left the queue, "
                        "then collect")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    _add_submit_arguments(parser)
    _allow_trailing_overrides(parser)


def _allow_trailing_overrides(parser: argparse.ArgumentParser) -> None:
    """Let `key=value` overrides follow the options (`tableN --local train.epochs=1`).

    argparse fills every positional at the first run of positionals it meets, so after `tableN` the `nargs="*"`
    overrides are already taken (empty) and later ones are "unrecognized". Python's intermixed parsing takes
    positionals from anywhere; it calls `parse_known_args` itself, hence the plain method during the call.
    """
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):  # type: ignore[no-untyped-def]
        parser.parse_known_args = plain  # type: ignore[method-assign]
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser.parse_known_args = parse_known_args  # type: ignore[method-assign]

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """The resource flags of `ltm submit train` (same names and parsing: `launcher.submit.launch_from_args`)."""
    from launcher.submit import add_launch_arguments

    add_launch_arguments(parser, dry_run=False)


def _sbatch_lines(script: str) -> str:
    keep = ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--partition",
            "--account", "--qos", "--constraint", "--mem", "--exclusive", "--dependency")
    opts = [line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH")]
    return " ".join(o for o in opts if o.startswith(keep))


def print_plan(plans: list[RunPlan], table: Table, paper: Config, nproc: int | None = None,
               jobs: list[tuple[RunPlan, dict[str, Any]]] | None = None) -> None:
    """What a run of the table would do: runs with state and config, then the commands or SLURM jobs."""
    print(f"{table.name}: {len(plans)} runs, {sum(p.state != 'done' for p in plans)} to do")
    for plan in plans:
        where = f"checkpoint step {plan.step} of {plan.total}" if plan.step is not None else f"{plan.total} steps"
        print(f"\n{plan.name}  [{plan.state}; {where}]  {plan.run_dir}")
        print(f"  experiment: {experiment_path(plan.name)}")
        print("  config (against paper.yaml): " + " ".join(config_diff(plan.cfg, paper)))
        reports = ", ".join(str(report_dir(plan.run_dir, d).relative_to(plan.run_dir)) for d in plan.data)
        print(f"  reports: {reports}" + (f" (missing: {', '.join(plan.missing)})" if plan.missing else " (present)"))
    todo = [p for p in plans if p.state != "done"]
    if jobs is None:
        print("\ncommands, in this order:")
        for plan in todo:
            if plan.state in ("train", "resume"):
                print("  ltm " + " ".join(train_command(plan, nproc)[3:]))
            print("  ltm " + " ".join(eval_command(plan)[3:]))
    else:
        print("\nSLURM jobs:")
        for n, (plan, out) in enumerate(jobs, 1):
            for kind, sub in out.items():
                after = "" if kind == "train" or "train" not in out else f"  afterok: train job of {plan.name}"
                job = f"  job {sub.job_id}" if sub.job_id else ""
                print(f"  {n}. {kind} {plan.name}{job}{after}")
                print(f"     {_sbatch_lines(sub.script)}")
                if kind == "eval":
                    print(f"     data: {' '.join(plan.missing)}")
        skipped = len(todo) - len(jobs)
        if skipped:
            print(f"  ({skipped} run(s) not submitted again: their jobs are still queued or running)")
    if not todo:
        print("\nnothing to do: every report exists (collect with --collect)")


def run(args: argparse.Namespace) -> int:
    runs = Path(args.runs)
    stored = _recall(runs, args.table)
    mapping = parse_pairs(args.map, "--map") if args.map else stored.get("map", {})
    rows, columns = _csv(args.rows), _csv(args.columns)
    if args.collect and rows is None and columns is None:
        rows, columns = stored.get("rows"), stored.get("columns")
    table = select(TABLES[args.table], rows, columns)
    if args.collect:
        return _collect_and_print(table, runs, mapping, write=not args.dry_run)
    if not args.shards:
        raise ConfigError("--shards ROOT is needed to run a table (the shard root that the experiments read)")
    weights = parse_pairs(args.weights, "--weights")
    plans = plan_table(table, args.shards, runs, args.base, args.overrides, mapping, weights)
    if not args.local:
        from launcher.submit import launch_from_args

        for plan in plans:
            plan.cfg = replace(plan.cfg, launch=launch_from_args(args, plan.cfg.launch))
    for plan in plans:
        plan.config_file = runs / STATE_DIR / "configs" / f"{plan.name}.yaml"
    paper = load_config("paper")
    if args.estimate:
        print_estimate(estimate(plans, args.tflops), args.tflops)
        return 0
    if args.dry_run:
        jobs = None if args.local else submit_slurm(plans, runs, dry_run=True)
        print_plan(plans, table, paper, args.nproc, jobs)
        return 0
    write_configs(plans, runs)
    _remember(runs, args.table, {"map": mapping, "rows": rows, "columns": columns, "base": args.base})
    if args.local:
        status = run_local(plans, args.nproc)
    else:
        submitted = submit_slurm(plans, runs)
        print_plan(plans, table, paper, jobs=submitted)
        status = 0
        if args.wait:
            # this submission's jobs and those of an earlier one still in flight for the same runs
            recorded = load_jobs(runs)
            ids = [i for plan in plans if plan.state != "done" for i in recorded.get(plan.name, {}).values() if i]
            new = [sub.job_id for _, out in submitted for sub in out.values()]
            states = wait_for([i for i in dict.fromkeys(ids) if i in new or i in active_jobs([i])])
            status = 0 if all(v == "COMPLETED" for v in states.values()) else 1
    if args.local or args.wait:
        _collect_and_print(table, runs, mapping, write=True)
    return status


def _collect_and_print(table: Table, runs: Path, mapping: dict[str, str], write: bool) -> int:
    result = collect(table, runs, mapping)
    print(render_markdown(result), end="")
    if write:
        md, js = write_collected(result, runs)
        print(f"\nwrote {md} and {js}")
    return 0
