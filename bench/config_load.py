"""CPU time of `ltm.config.load_config` against the plain OmegaConf route, in alternating rounds in one process.

    python bench/config_load.py [--rounds 5] [--loads 40] [--config tiny-cpu]

The plain route builds the structured defaults from the dataclasses for every load, merges the file's `base:` chain
(read with PyYAML's pure-Python safe loader) and then each `key=value` override with `OmegaConf.merge`, which copies
the whole config each time. `load_config` copies defaults built once per process, merges each file of the chain
and each override into that copy in place, and keeps each file's parsed node per text. Both return the same Config
(checked). A sweep or a reproduce plan loads a config per point, with about 14 overrides (the sweep's shards, data
folders and budget, the variant's model keys, the seed). Target: load_config / plain <= 0.5 (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import yaml
from omegaconf import OmegaConf

from ltm.config import Config, load_config, resolve_config_path, validate

TARGET = 0.5
POINT_OVERRIDES = [
    "train.batch_size=8", "data.root=/data/shards", "data.val=[]", "data.test=[synth/val]",
    "data.train=[{path: synth/train/real, weight: 1}, {path: synth/train/SelfBlend, weight: 1}]",
    "train.iters_per_epoch=2", "train.lr_gamma=0.9", "train.val_every=0", "train.log_every=50",
    "eval.attention_samples=0", "model.kind=ltm", "model.mask_strategy=high", "train.seed=1", "train.epochs=1",
]


def plain_load(name: str, overrides: list[str]) -> Config:
    """The textbook OmegaConf route, no state kept between loads."""
    def chain(path):
        data = yaml.safe_load(path.read_text()) or {}
        base = data.pop("base", None)
        node = OmegaConf.create(data)
        if base is None:
            return node
        base_path = path.parent / base if (path.parent / str(base)).exists() else resolve_config_path(base)
        return OmegaConf.merge(chain(base_path), node)

    merged = OmegaConf.merge(OmegaConf.structured(Config), chain(resolve_config_path(name)))
    for item in overrides:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def cpu_per_load(load, name: str, overrides: list[str], loads: int) -> float:
    start = time.process_time()
    for _ in range(loads):
        load(name, overrides)
    return (time.process_time() - start) / loads * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loads", type=int, default=40, help="loads per route and round")
    parser.add_argument("--config", default="tiny-cpu")
    args = parser.parse_args()
    figures = {}
    for overrides in ([], POINT_OVERRIDES):
        assert load_config(args.config, overrides) == plain_load(args.config, overrides)  # the same Config
        times: dict[str, list[float]] = {"plain": [], "load_config": []}
        for _ in range(args.rounds):  # alternating: the machine's speed drifts
            times["plain"].append(cpu_per_load(plain_load, args.config, overrides, args.loads))
            times["load_config"].append(cpu_per_load(load_config, args.config, overrides, args.loads))
        plain, ours = (statistics.median(times[k]) for k in ("plain", "load_config"))
        print(f"{args.config} with {len(overrides):2d} overrides: load_config {ours:5.1f} ms, plain OmegaConf "
              f"{plain:5.1f} ms per load (CPU, median of {args.rounds} rounds of {args.loads}): "
              f"ratio {ours / plain:.2f}")
        figures[len(overrides)] = {"load_config_ms": round(ours, 2), "plain_ms": round(plain, 2),
                                   "ratio": round(ours / plain, 3)}
    ratio = figures[len(POINT_OVERRIDES)]["ratio"]  # the sweep point's load is the headline
    print(json.dumps({"config": args.config, "overrides": figures, "ratio": ratio, "target": TARGET,
                      "met": ratio <= TARGET}))


if __name__ == "__main__":
    main()
