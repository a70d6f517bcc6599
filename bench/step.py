"""Train-step cost of LearningToMask against the plain Baseline on the same batch and backbone.

LTM runs two CNNs and a small ViT, so it must cost more; the question is whether it costs more than its FLOPs
say. Both models are timed interleaved (A, B, A, B, ...) so that machine noise hits both alike, and the measured
time ratio is printed next to the FLOP ratio from torch's FlopCounterMode (forward + backward).
Target: time ratio <= 1.1 x FLOP ratio.

    python bench/step.py                      # resnet18 at 112 px, batch 16 (CPU-sized)
    python bench/step.py --backbone legacy_xception --size 224 --batch 32 --device cuda

`--engine` measures something else: the cost of the Trainer itself (ltm.train.trainer: the DeepSpeed engine, the
step's loader hand-off and RNG fork, the per-step collective) against a plain PyTorch loop of the same model, fed by
a second loader built from the same config (same kind, same batch size), in interleaved blocks of steps after a warm-up,
with the time of each phase (loader, forward, backward, optimizer step, the rest). Headline: engine images/s over
plain images/s, target >= 0.9. Default: `tiny-cpu` as shipped (EfficientNet-Lite0, 112 px, batch 32, fp32,
ZeRO-0), random init, on shards it writes from scikit-image's photos (bench/checkdata.py's writer) or `--data`.

    python bench/step.py --engine                                     # tiny-cpu, 112 px, batch 32
    python bench/step.py --engine train.precision=bf16 train.zero_stage=1   # config overrides
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ltm.config import load_config
from ltm.models import build_model


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    model(images, labels)["loss"].backward()
    optimizer.step()


def step_flops(model, images, labels) -> int:
    with FlopCounterMode(display=False) as counter:
        model(images, labels)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ --engine

PHASES = ("loader", "forward", "backward", "step", "rest")


class Phases:
    """Seconds per phase of the current step; `rest` is what the step spent outside the timed calls."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)

    def timed(self, phase: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.now[phase] += time.perf_counter() - start


class TimedEngine:
    """The DeepSpeed engine with its three per-step calls timed; everything else passes through."""

    def __init__(self, engine: Any, phases: Phases):
        self._engine, self._phases = engine, phases

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._phases.timed("forward", self._engine, *args, **kwargs)

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        return self._phases.timed("backward", self._engine.backward, *args, **kwargs)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return self._phases.timed("step", self._engine.step, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class TimedLoader:
    def __init__(self, loader: Any, phases: Phases):
        self._loader, self._phases = loader, phases

    def __iter__(self) -> TimedLoader:
        return self

    def __next__(self) -> Any:
        return self._phases.timed("loader", next, self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def engine_vs_plain(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from checkdata import configure, write_check_shards  # bench/checkdata.py: the GPU check's shards and config

    from ltm.data import build_train_loader
    from ltm.train.trainer import Trainer

    tmp = tempfile.TemporaryDirectory(prefix="ltm-step-engine-")
    work = Path(tmp.name)
    probe = load_config(args.config, args.overrides)
    split = Path(args.data) if args.data else write_check_shards(work / "shards", args.samples, probe.data.image_size)
    cfg = configure(args.config, split, work / "run", ["model.pretrained=null", "data.num_threads=1",
                                                      f"data.shuffle_buffer={min(1024, args.samples)}",
                                                      *args.overrides])
    trainer = Trainer(cfg, resume="never")
    try:
        engine_phases, plain_phases = Phases(), Phases()
        trainer.engine = TimedEngine(trainer.engine, engine_phases)
        trainer.loader = TimedLoader(trainer.loader, engine_phases)
        # the plain loop: the same initial weights (the Trainer's seed), a second loader of the same config, torch
        # SGD with the same settings, autocast where the engine runs bf16; the process-wide settings the Trainer
        # made (deterministic kernels, threads) hold for both
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, cfg.data.image_size, load_weights=False).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum,
                                    weight_decay=cfg.train.weight_decay)
        loader = build_train_loader(cfg, 0, 1, torch.device("cpu"))
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)

        def plain_step() -> None:
            images, labels = plain_phases.timed("loader", next, loader)

            def forward() -> torch.Tensor:
                with torch.autocast("cpu", dtype=half or torch.bfloat16, enabled=half is not None):
                    return model(images, labels)["loss"]

            loss = plain_phases.timed("forward", forward)
            optimizer.zero_grad(set_to_none=True)
            plain_phases.timed("backward", loss.backward)
            plain_phases.timed("step", optimizer.step)
            loss.item()  # the engine reads its losses back every step too

        steps: dict[str, list[dict[str, float]]] = {"engine": [], "plain": []}

        def run(name: str, timed: bool) -> None:
            phases = engine_phases if name == "engine" else plain_phases
            phases.now.clear()
            start = time.perf_counter()
            if name == "engine":
                trainer.train_step()
            else:
                plain_step()
            total = time.perf_counter() - start
            if timed:
                record = {p: phases.now.get(p, 0.0) for p in PHASES[:-1]}
                steps[name].append({**record, "rest": total - sum(record.values()), "total": total})

        for _ in range(args.warmup):
            run("engine", False)
            run("plain", False)
        for round_ in range(args.rounds):  # A B, B A, ...: slow spells of a shared machine hit both alike
            for name in ("engine", "plain") if round_ % 2 == 0 else ("plain", "engine"):
                for _ in range(args.block):
                    run(name, True)
        loader.close()
    finally:
        trainer.close()
        tmp.cleanup()

    median = {name: {p: statistics.median(s[p] for s in runs) for p in (*PHASES, "total")}
              for name, runs in steps.items()}
    batch = trainer.micro_batch
    ratio = median["plain"]["total"] / median["engine"]["total"]  # engine images/s over plain images/s
    print(f"{args.config}: {cfg.model.backbone} at {cfg.data.image_size} px, batch {batch}, {cfg.train.precision}, "
          f"ZeRO-{cfg.train.zero_stage}, {cfg.data.loader} loader, {torch.get_num_threads()} threads; "
          f"{args.warmup} warm-up steps each, then {args.rounds} interleaved blocks of {args.block} (medians)")
    print(f"{'ms per step':<12}" + "".join(f"{p:>10}" for p in (*PHASES, "total")) + f"{'img/s':>9}")
    for name in ("engine", "plain"):
        m = median[name]
        print(f"{name:<12}" + "".join(f"{m[p] * 1e3:>10.1f}" for p in (*PHASES, "total"))
              + f"{batch / m['total']:>9.2f}")
    print(f"engine / plain images/s: {ratio:.3f} (target >= 0.9)")
    print(json.dumps({
        "bench": "step-engine", "config": args.config, "overrides": args.overrides, "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size, "batch": batch, "precision": cfg.train.precision,
        "zero_stage": cfg.train.zero_stage, "loader": cfg.data.loader, "threads": torch.get_num_threads(),
        "warmup": args.warmup, "rounds": args.rounds, "block": args.block,
        "engine_ms": {p: round(v * 1e3, 2) for p, v in median["engine"].items()},
        "plain_ms": {p: round(v * 1e3, 2) for p, v in median["plain"].items()},
        "ratio": round(ratio, 4), "target": 0.9,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", action="store_true",
                        help="ltm.train.trainer's training step against a plain loop of the same model and loader")
    parser.add_argument("--config", default="tiny-cpu", help="--engine: the config (its model, size and batch)")
    parser.add_argument("--data", default=None, help="--engine: a shard split folder holding method folders")
    parser.add_argument("--samples", type=int, default=256, help="--engine: images in the shards it writes")
    parser.add_argument("--block", type=int, default=4, help="--engine: steps per block")
    parser.add_argument("overrides", nargs="*", help="--engine: config key=value overrides")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 2; --engine: 3 each, DeepSpeed's and DALI's start-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.engine:
        args.warmup = 3 if args.warmup is None else args.warmup
        engine_vs_plain(args)
        return
    args.warmup = 2 if args.warmup is None else args.warmup
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    labels = (torch.arange(args.batch, device=device) % 2).float()

    models, optimizers, flops = {}, {}, {}
    for kind in ("ltm", "baseline"):
        cfg = load_config("paper", [f"model.kind={kind}", f"model.backbone={args.backbone}", "model.pretrained=null",
                                    f"data.image_size={args.size}"])
        model = build_model(cfg.model, args.size).to(device).train()
        models[kind] = model
        optimizers[kind] = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        flops[kind] = step_flops(model, images, labels)

    times: dict[str, list[float]] = {"ltm": [], "baseline": []}
    for round_ in range(args.warmup + args.rounds):
        for kind in ("ltm", "baseline") if round_ % 2 == 0 else ("baseline", "ltm"):
            sync(device)
            start = time.perf_counter()
            train_step(models[kind], optimizers[kind], images, labels)
            sync(device)
            if round_ >= args.warmup:
                times[kind].append(time.perf_counter() - start)

    median = {kind: statistics.median(t) for kind, t in times.items()}
    time_ratio = median["ltm"] / median["baseline"]
    flop_ratio = flops["ltm"] / flops["baseline"]
    ratio = time_ratio / flop_ratio
    print(f"backbone {args.backbone}, {args.size} px, batch {args.batch}, {args.device}, "
          f"{args.rounds} interleaved rounds (median)")
    print(f"{'model':<10}{'step ms':>10}{'GFLOP/step':>12}{'img/s':>9}")
    for kind in ("ltm", "baseline"):
        print(f"{kind:<10}{median[kind] * 1e3:>10.1f}{flops[kind] / 1e9:>12.2f}{args.batch / median[kind]:>9.1f}")
    print(f"time ratio {time_ratio:.3f} / FLOP ratio {flop_ratio:.3f} = {ratio:.3f} (target <= 1.1)")
    print(json.dumps({
        "bench": "step", "backbone": args.backbone, "image_size": args.size, "batch": args.batch,
        "device": args.device, "ltm_step_s": median["ltm"], "baseline_step_s": median["baseline"],
        "ltm_flops": flops["ltm"], "baseline_flops": flops["baseline"], "time_ratio": time_ratio,
        "flop_ratio": flop_ratio, "ratio": ratio, "target": 1.1,
    }))


if __name__ == "__main__":
    main()
