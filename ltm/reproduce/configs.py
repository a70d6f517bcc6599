"""Each run's resolved config: its experiment file, `--base`, `--map`, `--weights` and overrides."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ltm.config import CONFIG_DIR, Config, ConfigError, SourceConfig, load_config, read_mapping, to_dict, validate

EXPERIMENTS_DIR = CONFIG_DIR / "experiments"


def experiment_path(name: str) -> Path:
    """`experiments/<name>.yaml`, or `experiments/<table>/<name>.yaml` for a table outside the paper's (whose runs
    build other models than the paper's checks of the top folder expect); a name is one file in either place."""
    path = EXPERIMENTS_DIR / f"{name}.yaml"
    found = [path] if path.is_file() else []
    found += sorted(EXPERIMENTS_DIR.glob(f"*/{name}.yaml"))
    if len(found) > 1:
        raise ConfigError(f"experiment {name!r}: more than one file ({', '.join(map(str, found))})")
    if not found:
        raise ConfigError(f"experiment {name!r}: no file {path} (nor in a folder beside it)")
    return found[0]


def experiment_layer(name: str) -> tuple[str, list[str]]:
    """The experiment file as (its base config, its keys as `key=value` overrides of that base)."""
    layer = read_mapping(experiment_path(name))
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


def resolve_base(base: str | None) -> str | None:
    """`--base`: a packaged config name as given, a YAML path made absolute (run folders may live elsewhere)."""
    if base is not None and Path(base).suffix in (".yaml", ".yml"):
        return str(Path(base).resolve())
    return base


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
    base = resolve_base(base)
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
