"""Train-step cost of LearningToMask against the plain Baseline on the same batch and backbone.

LTM runs two CNNs and a small ViT, so it must cost more; the question is whether it costs more than its FLOPs
say. Both models are timed interleaved (A, B, A, B, ...) so that machine noise hits both alike, and the measured
time ratio is printed next to the FLOP ratio from torch's FlopCounterMode (forward + backward).
Target: time ratio <= 1.1 x FLOP ratio.

    python bench/step.py                      # resnet18 at 112 px, batch 16 (CPU-sized)
    python bench/step.py --backbone legacy_xception --size 224 --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
