"""What dropping the masked tokens saves: the student ViT's training step with the teacher's mask as dropped tokens
(`model.mask_at=tokens`, `mask_fill=drop`) against the same student on every token, next to their FLOP ratio.

    python bench/tokens.py                        # vit-tiny-cpu's student: ViT-Tiny, 4 blocks, 112 px
    python bench/tokens.py --backbone vit_small_patch16_224 --depth 12 --size 224 --batch 16
    python bench/tokens.py --backbone vit_large_patch14_clip_224 --size 224 --batch 32 --device cuda

The two steps (forward and backward of the student backbone and a linear head, BCE) are timed interleaved (A, B, A,
B, ...) on the same weights and images; a fixed random mask of round(ratio * h * w) tokens per image stands for the
teacher's (which tokens are dropped does not change the cost). FLOPs from torch's FlopCounterMode (forward and
backward). Target: the time ratio within 10% of the FLOP ratio (the saving is what the arithmetic says, not eaten by
the gather). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ltm.models.foundation import ViTBackbone
from ltm.models.masking import feature_mask, num_masked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="vit_tiny_patch16_224")
    parser.add_argument("--depth", type=int, default=4, help="blocks (timm's default for the name: 0)")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.25, help="model.mask_ratio")
    parser.add_argument("--block", type=int, default=0, help="model.mask_block")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    extra = {"depth": args.depth} if args.depth else {}
    backbone = ViTBackbone(args.backbone, image_size=args.size, **extra).to(device)
    head = torch.nn.Linear(backbone.channels, 1).to(device)
    params = [*backbone.parameters(), *head.parameters()]
    grid = backbone.grid(args.size)
    n = grid[0] * grid[1]
    kept = n - num_masked(args.ratio, grid)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)
    labels = (torch.arange(args.batch, device=device) % 2).float()
    keep = feature_mask(torch.rand(args.batch, *grid, device=device), args.ratio, "random")

    def step(masked: bool) -> None:
        features = backbone.pooled(images, keep, args.block, kept) if masked else backbone.pooled(images)
        loss = F.binary_cross_entropy_with_logits(head(features).squeeze(1), labels)
        torch.autograd.grad(loss, params)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    flops = {}
    for masked in (False, True):
        with FlopCounterMode(display=False) as counter:
            step(masked)
        flops[masked] = counter.get_total_flops()
    for masked in (False, True, False, True):  # warm-up
        step(masked)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for masked in (False, True):
            sync()
            start = time.perf_counter()
            step(masked)
            sync()
            times[masked].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    time_ratio = median[True] / median[False]
    flop_ratio = flops[True] / flops[False]
    ratio = time_ratio / flop_ratio
    print(f"{args.backbone} ({args.depth or 'all'} blocks) at {args.size} px, batch {args.batch}, {device}: "
          f"{n} patch tokens, {n - kept} dropped at block {args.block}")
    print(f"{'student step':<22}{'median ms':>12}{'GFLOP':>10}")
    print(f"{'every token':<22}{median[False] * 1e3:>12.1f}{flops[False] / 1e9:>10.2f}")
    print(f"{'masked tokens dropped':<22}{median[True] * 1e3:>12.1f}{flops[True] / 1e9:>10.2f}")
    print(f"time ratio {time_ratio:.3f} / FLOP ratio {flop_ratio:.3f} = {ratio:.3f} (target 0.9-1.1: "
          f"{'met' if 0.9 <= ratio <= 1.1 else 'not met'})")
    print(json.dumps({"backbone": args.backbone, "depth": args.depth, "size": args.size, "batch": args.batch,
                      "tokens": n, "dropped": n - kept,
                      "ms": {"full": median[False] * 1e3, "dropped": median[True] * 1e3},
                      "gflop": {"full": flops[False] / 1e9, "dropped": flops[True] / 1e9}, "time_ratio": time_ratio,
                      "flop_ratio": flop_ratio, "ratio": ratio, "target": [0.9, 1.1]}))


if __name__ == "__main__":
    main()
