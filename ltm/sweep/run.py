"""One sweep point — a (variant, seed) run trained through every budget — and the local loop over all of them.

A point is idempotent and resumable: its record `<out>/points/<variant>-seed<k>.json` says which budgets were
trained and scored on val, which one val selected, and the test AUCs of that one checkpoint. Running a point again
skips what the record holds, resumes training from the run folder's `latest` and refuses a record whose config
differs from the one asked for now (naming the keys). The same function runs here (`run_local`) and in a SLURM
array task (`launcher.sweep.SweepPointJob`), so the two give the same table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ltm.config import Config, ConfigError, load_config, to_dict, to_yaml
from ltm.data.shards import data_digests

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "deepspeed", "timm", "numpy", "scipy", "scikit-learn", "submitit")
# keys that may differ between the submissions of one sweep without changing what a point means
VOLATILE = ("launch", "train.epochs", "train.keep_last", "train.run_dir")
# scoring settings of every sweep evaluation: pictures cost time and the table reads only the AUCs
EVAL_OVERRIDES = ["eval.attention_samples=0", "eval.error_samples=0", "eval.region_samples=0"]


@dataclass
class Sweep:
    """What `ltm sweep` was asked: the variants (name -> overrides, in order), seeds, budgets and test sets."""

    config: str
    variants: dict[str, list[str]]
    seeds: list[int]
    evals: list[str]
    out: Path
    budgets: list[int] = field(default_factory=list)  # empty: the config's epochs x iters_per_epoch
    reference: str = ""  # default: the first variant
    heads: list[str] = field(default_factory=list)  # empty: the config's inference head
    overrides: list[str] = field(default_factory=list)  # for every variant
    effect: float = 0.02
    runs_folder: str = "runs"  # run folders under out/ ("" : directly in out/, bench/generalization.py's layout)
    variant_evals: dict[str, list[str]] = field(default_factory=dict)  # a variant's own test sets (ltm reproduce)
    full_reports: bool = False  # test reports with pictures, in the run's eval/ as `ltm eval` writes them

    def __post_init__(self) -> None:
        self.out = Path(self.out).absolute()
        if not self.variants:
            raise ConfigError("a sweep needs at least one --variant")
        self.reference = self.reference or next(iter(self.variants))
        if self.reference not in self.variants:
            raise ConfigError(f"--reference {self.reference!r}: not one of the variants {list(self.variants)}")
        if not self.seeds:
            raise ConfigError("--seeds: at least one seed")
        if not self.evals and not all(self.variant_evals.get(v) for v in self.variants):
            raise ConfigError("--eval: at least one test folder")
        if not self.budgets:
            cfg = load_config(self.config, self.overrides)
            self.budgets = [cfg.train.epochs * cfg.train.iters_per_epoch]
        self.budgets = sorted(set(self.budgets))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "out": str(self.out)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sweep:
        return cls(**data)

    def points(self) -> list[tuple[str, int]]:
        return [(v, s) for v in self.variants for s in self.seeds]

    def evals_of(self, variant: str) -> list[str]:
        """The test sets a variant is scored on: its own where it has them, else every `--eval`."""
        return list(self.variant_evals.get(variant) or self.evals)

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.out / self.runs_folder / f"{variant}-seed{seed}"

    def record_path(self, variant: str, seed: int) -> Path:
        return self.out / "points" / f"{variant}-seed{seed}.json"


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """`NAME:key=value key=value` (overrides space-separated; `NAME:` alone is the config as it is)."""
    name, sep, rest = spec.partition(":")
    overrides = rest.split()
    if not sep or not name or not all("=" in o for o in overrides) or "/" in name:
        raise ConfigError(f"--variant {spec!r}: expected NAME:key=value [key=value ...]")
    return name, overrides


# ------------------------------------------------------------------------------------------------- configs
def point_config(sweep: Sweep, variant: str, seed: int, budget: int) -> Config:
    """The resolved training config of one point, trained to `budget` optimizer steps."""
    base = load_config(sweep.config, [*sweep.overrides, *sweep.variants[variant]])
    ipe = base.train.iters_per_epoch
    bad = [b for b in sweep.budgets if b % ipe]
    if bad:
        raise ConfigError(f"--steps {','.join(map(str, bad))}: not a multiple of train.iters_per_epoch ({ipe}); "
                          "a budget ends an epoch (the lr decays per epoch): set train.iters_per_epoch")
    # every budget's checkpoint stays until val has picked one (epoch ends always save)
    keep = sweep.budgets[-1] // ipe if len(sweep.budgets) > 1 else 1
    return load_config(sweep.config, [
        *sweep.overrides, *sweep.variants[variant], f"train.run_dir={sweep.run_dir(variant, seed)}",
        f"train.seed={seed}", f"data.seed={seed}", f"train.epochs={budget // ipe}", f"train.keep_last={keep}",
        f"train.ckpt_every={ipe}"])


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def fingerprint(cfg: Config) -> dict[str, Any]:
    """The settings that make a point what it is (flat keys); launch and per-budget keys left out."""
    return {k: v for k, v in _flat(to_dict(cfg)).items() if not any(k == p or k.startswith(p + ".") for p in VOLATILE)}


def config_changes(stored: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """`key: old there, new here` for every key whose value differs."""
    keys = sorted(set(stored) | set(mine))
    return [f"{k}: {stored.get(k)!r} there, {mine.get(k)!r} here" for k in keys if stored.get(k) != mine.get(k)]


def point_changes(record: dict[str, Any], sweep: Sweep, final: Config) -> list[str]:
    """What differs between a kept point and the one asked for now: config keys, and the budgets (a point's curve
    and val's choice among them are what its record answers for)."""
    changes = config_changes(record["config"], fingerprint(final))
    if record.get("budgets", sweep.budgets) != sweep.budgets:
        changes.append(f"--steps: {','.join(map(str, record['budgets']))} there, "
                       f"{','.join(map(str, sweep.budgets))} here")
    return changes


def heads_of(sweep: Sweep, cfg: Config) -> list[str]:
    """The heads scored for a point: a Baseline has one; an LTM run the asked heads (default its inference head)."""
    if cfg.model.kind == "baseline":
        return ["baseline"]
    return list(sweep.heads) or [cfg.model.inference_head]


# ------------------------------------------------------------------------------------------------- records
def provenance() -> dict[str, Any]:
    """Where and with what a point was trained: runs are not bit-identical across machines or builds."""
    commit = None
    try:
        proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        commit = proc.stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - provenance must never stop a run
        gpu = None
    return {"commit": commit, "python": platform.python_version(), "packages": versions, "host": socket.gethostname(),
            "cpu": cpu, "cpus": os.cpu_count(), "gpu": gpu, "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); delete it to rerun the point") from exc


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def point_problem(sweep: Sweep, variant: str, seed: int) -> str | None:
    """Why a kept point cannot be reused for this sweep (its config changed), or None."""
    record = read_record(sweep.record_path(variant, seed))
    if record is None:
        return None
    changes = point_changes(record, sweep, point_config(sweep, variant, seed, sweep.budgets[-1]))
    if changes:
        return (f"{sweep.record_path(variant, seed)}: point {variant} seed {seed} was run with another config "
                f"({'; '.join(changes)}): use another --out or the same settings")
    return None


def check_sweep(sweep: Sweep) -> None:
    """Refuse, before anything runs, a sweep whose kept points were made with another config."""
    problems = [p for v, s in sweep.points() if (p := point_problem(sweep, v, s))]
    if problems:
        raise ConfigError("\n".join(problems))


def is_done(record: dict[str, Any] | None) -> bool:
    return bool(record) and record.get("status") == "done"


def unscored(sweep: Sweep, variant: str, record: dict[str, Any] | None) -> list[str]:
    """The test sets the sweep asks of this variant that some scored head of the record lacks (another table may
    ask a kept run for a set it was not scored on)."""
    tests = (record or {}).get("test") or {}
    return [s for s in sweep.evals_of(variant) if not tests or any(s not in aucs for aucs in tests.values())]


def is_complete(sweep: Sweep, variant: str, seed: int, record: dict[str, Any] | None = None) -> bool:
    """Done, with a test score of every head on every set the sweep asks of this variant."""
    record = record if record is not None else read_record(sweep.record_path(variant, seed))
    return is_done(record) and not unscored(sweep, variant, record)


# ------------------------------------------------------------------------------------------------- one point
def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def select_budget(val: dict[str, dict[str, float]], head: str) -> int:
    """The budget whose checkpoint scored best on val with `head` (the earliest of equals): the only choice a
    sweep makes, and it never looks at a test set."""
    budgets = sorted(val, key=int)
    return int(max(budgets, key=lambda b: (val[b][head], -int(b))))


def score(run_dir: Path, data: list[str], budget: int, head: str, out_dir: Path,
          pictures: bool = False) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Frame AUC of one checkpoint (the tag of `budget`) with `head` on each folder of `data`: ({folder: auc},
    {folder: {fake method: auc of that method against the real frames}})."""
    from ltm.checkpoint import tag_for
    from ltm.eval.evaluate import evaluate

    overrides = ([] if pictures else [*EVAL_OVERRIDES]) + ([] if head == "baseline" else
                                                           [f"model.inference_head={head}"])
    reports = evaluate(run_dir, data, tag=tag_for(budget), cfg_overrides=overrides, out_dir=out_dir)
    aucs, methods = {}, {}
    for d, r in zip(data, reports):
        if r.get("frame_auc") is None:  # one class only: no AUC, and a sweep's table has nothing to average
            raise ValueError(f"{d}: AUC undefined (the folder holds only one class); a sweep's --eval and data.val "
                             "need real and fake frames")
        aucs[d] = float(r["frame_auc"])
        methods[d] = {m: float(v["frame_auc"]) for m, v in (r.get("per_method") or {}).items()
                      if v.get("frame_auc") is not None}
    return aucs, methods


def train_to(cfg: Config, nproc: int | None) -> dict[str, Any]:
    """Train (or resume) the point's run to the config's last step: in this process, or `ltm train --nproc P`."""
    if not nproc or nproc <= 1:
        from ltm.train.trainer import train

        return train(cfg, resume="auto")
    run_dir = Path(cfg.train.run_dir)
    config_file = run_dir / "sweep-train.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(to_yaml(cfg))
    proc = subprocess.run([sys.executable, "-m", "ltm.cli", "train", "--config", str(config_file), "--nproc",
                           str(nproc)], check=False)
    from ltm.checkpoint import tag_for

    latest = run_dir / "checkpoints" / "latest"
    done = latest.is_file() and latest.read_text().strip() == tag_for(cfg.train.epochs * cfg.train.iters_per_epoch)
    return {"status": "completed" if proc.returncode == 0 and done else "failed", "returncode": proc.returncode}


def run_point(sweep: Sweep, variant: str, seed: int, nproc: int | None = None) -> dict[str, Any]:
    """Train the point through every budget (resuming), score each budget's checkpoint on val, let val select one
    checkpoint, score that one on every test folder; returns the record ("status": done | preempted | failed).

    Every rank of a distributed task calls this (training and scoring are collective); rank 0 writes the record.
    """
    path = sweep.record_path(variant, seed)
    final = point_config(sweep, variant, seed, sweep.budgets[-1])
    record = read_record(path)
    if record is not None:
        changes = point_changes(record, sweep, final)
        if changes:
            raise ConfigError(f"{path}: point {variant} seed {seed} was run with another config "
                              f"({'; '.join(changes)}): use another --out or the same settings")
        if is_complete(sweep, variant, seed, record):
            log.info("%s seed %d: done before, kept", variant, seed)
            return record
    else:
        record = {"variant": variant, "seed": seed, "overrides": [*sweep.overrides, *sweep.variants[variant]],
                  "config": fingerprint(final), "budgets": sweep.budgets, "val": {}, "test": {}, "trained": [],
                  "status": "started"}
    heads = heads_of(sweep, final)
    record["heads"] = heads
    run_dir = sweep.run_dir(variant, seed)
    here = provenance()
    record["provenance"] = here  # the machine of the latest session; every training session is in "trained"
    record["data"] = data_digests(final)  # the shard splits' content digests: tables told apart by their data

    def save() -> None:
        if _rank() == 0:
            write_json(path, record)

    save()
    val = [str(v) for v in final.data.val]
    for budget in sweep.budgets:
        if val and all(h in record["val"].get(str(budget), {}) for h in heads):
            continue  # trained and scored on val before (a head added since is scored below)
        session = train_budget(sweep, variant, seed, budget, nproc, here)
        if session is None and not any(s["budget"] == budget and s["status"] == "completed"
                                       for s in record["trained"]):
            # its checkpoint is complete, but the session that wrote it was stopped before it could say so here
            session = {"budget": budget, "status": "completed", "step": budget, "seconds": None,
                       "recorded": "afterwards, from its complete checkpoint"}
        if session is not None:
            record["trained"].append(session)
            if session["status"] != "completed":
                record["status"] = "preempted" if session["status"] == "preempted" else "failed"
                save()
                return record
        if val:
            out = run_dir / "sweep-eval" / f"step{budget}-val"
            done = record["val"].setdefault(str(budget), {})
            done.update({h: _mean(score(run_dir, val, budget, h, out / h)[0]) for h in heads if h not in done})
            save()
    if val:
        selected = select_budget(record["val"], heads[0])
    else:  # nothing to select on (Celeb-DF and WildDeepfake have no val split): the full budget, as trained
        selected = sweep.budgets[-1]
        record["selected_by"] = "the last budget: data.val is empty"
    if record.get("selected") not in (None, selected):
        record["test"], record["test_methods"] = {}, {}  # scores of another checkpoint (a head added since)
    record["selected"] = selected
    # scored once per test set, with val's checkpoint; a set asked for since (another table) is added
    for h in heads:
        have = record["test"].setdefault(h, {})
        todo = [s for s in sweep.evals_of(variant) if s not in have]
        if not todo:
            continue
        if sweep.full_reports:
            out = run_dir / "eval" if len(heads) == 1 else run_dir / "eval" / h
        else:
            out = run_dir / "sweep-eval" / f"step{selected}-test" / h
        aucs, methods = score(run_dir, todo, selected, h, out, pictures=sweep.full_reports)
        have.update(aucs)
        record.setdefault("test_methods", {}).setdefault(h, {}).update(methods)
    record["status"] = "done"
    save()
    log.info("%s seed %d: done (budget %d selected on val)", variant, seed, selected)
    return record


def train_budget(sweep: Sweep, variant: str, seed: int, budget: int, nproc: int | None = None,
                 here: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Train (or resume) one point's run to `budget` steps unless its checkpoint of that budget is there.

    Returns the training session ({budget, status, step, seconds} and the machine it ran on), None when the run was
    already trained that far. Every run of a sweep and of bench/generalization.py is trained here."""
    if trained_to(sweep.run_dir(variant, seed), budget):
        return None
    here = here or provenance()
    started = time.perf_counter()
    result = train_to(point_config(sweep, variant, seed, budget), nproc)
    return {"budget": budget, "status": result.get("status"), "step": result.get("step"),
            "seconds": round(time.perf_counter() - started, 1),
            **{k: here[k] for k in ("host", "cpu", "gpu", "commit", "slurm_job", "time")}}


def trained_to(run_dir: Path, budget: int) -> bool:
    """The run's checkpoint of `budget` exists and `latest` is at or past it (a complete save)."""
    from ltm.checkpoint import step_of, tag_for

    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file() or not (run_dir / "checkpoints" / tag_for(budget)).is_dir():
        return False
    try:
        return step_of(latest.read_text().strip()) >= budget
    except ValueError:
        return False


def _mean(aucs: dict[str, float]) -> float:
    return sum(aucs.values()) / len(aucs)


# ------------------------------------------------------------------------------------------------- local loop
def save_spec(sweep: Sweep) -> None:
    """The sweep's own description beside its points (what `--collect` and the SLURM tasks read)."""
    write_json(sweep.out / "sweep-spec.json", sweep.to_dict())


def run_local(sweep: Sweep, nproc: int | None = None) -> int:
    """Every unfinished point here, one after the other; a failed point is reported and the others still run."""
    check_sweep(sweep)
    save_spec(sweep)
    failed = []
    for i, (variant, seed) in enumerate(sweep.points(), 1):
        if is_complete(sweep, variant, seed):
            log.info("[%d/%d] %s seed %d: done before, kept", i, len(sweep.points()), variant, seed)
            continue
        log.info("[%d/%d] %s seed %d", i, len(sweep.points()), variant, seed)
        try:
            record = run_point(sweep, variant, seed, nproc)
        except Exception as exc:  # noqa: BLE001 - one point's broken input must not stop the other points
            log.error("%s seed %d failed: %s", variant, seed, exc)
            record = read_record(sweep.record_path(variant, seed))
            if record is None:  # refused before it started: nothing of it to keep
                record = {"status": "failed"}
            else:
                record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                write_json(sweep.record_path(variant, seed), record)
        if record["status"] != "done":
            failed.append(f"{variant} seed {seed} ({record['status']})")
    if failed:
        log.error("unfinished points: %s (rerun the same command to continue)", ", ".join(failed))
    return 1 if failed else 0
