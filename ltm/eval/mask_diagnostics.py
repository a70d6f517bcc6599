"""Does the mask find the evidence? The teacher's maps measured against fakes whose manipulated region is known.

A fake sample may carry `region.png` (docs/shards.md): how strongly each pixel was manipulated, 0..255, aligned
with its `jpg` crop. `ltm prep synth` writes the blending mask of each family (or, with `--shortcut`, the planted
artefact's place) and `ltm prep ffpp` FaceForensics++'s own masks or the difference to the aligned original.
Each region is averaged over the teacher's h x w grid (`cell_coverage`: the share of each cell the region covers),
and every map the teacher can rank cells by (`LearningToMask.teacher_maps`) is scored against it:

- hit rate: one of the region's strongest cells (the cells with the highest coverage) is among the map's top k
  (k of Eq. 4). For the mask itself (`mask`), whether Eq. 4's M = 0 covers one; `chance` is the rate of a random
  k-cell mask, computed per sample from the number of strongest cells.
- masked in region (mask only): the mean coverage of the masked cells, i.e. the share of masked positions inside
  the region; chance: the region's mean coverage over all cells.
- attention in region: the map's mass (negative values clipped) on the region, coverage-weighted; chance as above.
- entropy (of the normalised map, divided by log(h w): 1 = uniform) and top-k share (its mass on its top k cells):
  how concentrated the map is.

`ltm eval` reports these per method folder under `mask_diagnostics` in report.json and draws the first few samples
with their region outlined (`regions/*.png`).
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_prep import jpeg
from ltm.data.shards import Shard, ShardError, method_folders, scan_source
from ltm.eval.report.tables import fmt, markdown_table
from ltm.models.masking import num_masked

log = logging.getLogger(__name__)

REGION_MEMBER = "region.png"
STRONGEST = 0.999  # cells within this fraction of the best coverage count as the region's strongest


@dataclass
class RegionSample:
    key: str
    method: str
    kind: str  # the json's "region" (blend, shortcut, ffpp_mask, pair_difference) or "unknown"
    image: torch.Tensor  # (3, S, S) float in [0, 1]
    region: torch.Tensor  # (S, S) float in [0, 1]


def _member(shard: Shard, i: int, ext: str) -> bytes:
    m = shard.members[i][ext]
    with open(shard.tar, "rb") as f:
        f.seek(m.offset)
        return f.read(m.size)


def decode_region(data: bytes, size: int, where: str) -> np.ndarray:
    """`region.png` bytes -> float32 (size, size) in [0, 1], resized (bilinear) as the loaders resize the crop."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # PIL raises several types for broken files
        raise ShardError(f"{where}: corrupt {REGION_MEMBER} ({type(exc).__name__}: {exc})") from exc
    if img.mode not in ("L", "I;16", "1", "P"):
        raise ShardError(f"{where}: {REGION_MEMBER} must be single-channel, got mode {img.mode}")
    img = img.convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def region_samples(folder: Path, image_size: int, limit: int) -> list[RegionSample]:
    """Up to `limit` samples with a region per method folder under `folder`, in shard order."""
    out: list[RegionSample] = []
    for mfolder in method_folders(Path(folder)):
        source = scan_source(mfolder, on_bad="skip")
        taken = 0
        for shard in source.shards:
            for i, key in enumerate(shard.keys):
                if taken >= limit:
                    break
                if REGION_MEMBER not in shard.members[i]:
                    continue
                where = f"shard {shard.tar} key {key!r}"
                meta = json.loads(_member(shard, i, "json")) if "json" in shard.members[i] else {}
                try:
                    image = jpeg.decode_jpeg(_member(shard, i, "jpg"), image_size)
                except Exception as exc:
                    raise ShardError(f"{where}: corrupt JPEG ({type(exc).__name__}: {exc})") from exc
                region = decode_region(_member(shard, i, REGION_MEMBER), image_size, where)
                out.append(RegionSample(key, mfolder.name, str(meta.get("region", "unknown")),
                                        torch.from_numpy(image).permute(2, 0, 1).float() / 255.0,
                                        torch.from_numpy(region)))
                taken += 1
    return out


def cell_coverage(regions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) region weights -> (B, h, w): the mean weight inside each grid cell."""
    return F.adaptive_avg_pool2d(regions[:, None].float(), grid)[:, 0]


def _strongest(coverage: torch.Tensor) -> torch.Tensor:
    """(B, n) -> bool (B, n): the cells whose coverage is within STRONGEST of the best one (and above 0)."""
    best = coverage.amax(dim=1, keepdim=True)
    return (coverage >= STRONGEST * best) & (best > 0)


def chance_hit(strongest: torch.Tensor, k: int) -> torch.Tensor:
    """P(a uniformly random k-cell mask covers at least one strongest cell), per sample: 1 - C(n-s, k) / C(n, k)."""
    n = strongest.shape[1]
    s = strongest.sum(dim=1).tolist()
    return torch.tensor([1.0 - math.comb(n - si, k) / math.comb(n, k) if si else 0.0 for si in s])


def map_scores(attention: torch.Tensor, coverage: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per-sample figures of one map (B, h, w) against the coverage (B, h, w); see the module docstring."""
    a = attention.flatten(1).float()
    c = coverage.flatten(1).float()
    strongest = _strongest(c)
    top = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    mass = a.clamp_min(0)
    total = mass.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, mass / total.clamp_min(1e-30), torch.full_like(mass, 1.0 / a.shape[1]))
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=1) / math.log(a.shape[1])
    return {
        "hit_rate": (top & strongest).any(dim=1).float(),
        "attention_in_region": (p * c).sum(dim=1),
        "entropy": entropy,
        "topk_share": (p * top).sum(dim=1),
    }


def mask_scores(mask: torch.Tensor, coverage: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample figures of Eq. 4's mask M (B, h, w; 0 = masked) against the coverage."""
    masked = mask.flatten(1) == 0
    c = coverage.flatten(1).float()
    strongest = _strongest(c)
    k = int(masked.sum(dim=1).max()) if masked.numel() else 0
    return {
        "hit_rate": (masked & strongest).any(dim=1).float(),
        "chance_hit_rate": chance_hit(strongest, k) if k else torch.zeros(len(c)),
        "masked_in_region": (c * masked).sum(dim=1) / masked.sum(dim=1).clamp_min(1),
        "region_share": c.mean(dim=1),  # the chance level of masked_in_region and attention_in_region
    }


def _mean(values: list[torch.Tensor]) -> float:
    return float(torch.cat(values).mean()) if values else float("nan")


@torch.no_grad()
def diagnose(model: torch.nn.Module, folder: Path, image_size: int, limit: int, device: torch.device,
             batch_size: int = 32) -> tuple[dict | None, list[tuple]]:
    """The mask diagnostics of one eval folder, or None when no sample of it carries a region.

    Returns (figures, pictures): figures `{grid, k, n, per_method: {method: {n, kinds, mask: {...}, maps: {name:
    {...}}}}}` with each figure averaged over the method's samples; pictures `(method, key, image, map, mask,
    region)` of the first samples for the report."""
    samples = region_samples(folder, image_size, limit)
    if not samples:
        return None, []
    grid = tuple(model.grid)
    k = num_masked(model.cfg.mask_ratio, grid)
    if k == 0:
        log.info("model.mask_ratio %.3g masks no cell: no mask diagnostics", model.cfg.mask_ratio)
        return None, []
    was_training = model.training
    model.eval()
    per: dict[str, dict] = {}
    pictures = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            images = torch.stack([s.image for s in chunk]).to(device)
            coverage = cell_coverage(torch.stack([s.region for s in chunk]), grid)
            maps = {name: m.cpu() for name, m in model.teacher_maps(images).items()}
            mask = model.explain(images)["mask"].float().cpu()
            for j, s in enumerate(chunk):  # the first two of each method, eight at most
                if len(pictures) < 8 and sum(p[0] == s.method for p in pictures) < 2:
                    pictures.append((s.method, s.key, s.image, maps["mask_map"][j], mask[j], s.region))
            by_method: dict[str, list[int]] = {}
            for j, s in enumerate(chunk):
                by_method.setdefault(s.method, []).append(j)
            for method, idx in by_method.items():
                acc = per.setdefault(method, {"n": 0, "kinds": set(), "mask": {}, "maps": {}})
                acc["n"] += len(idx)
                acc["kinds"].update(chunk[j].kind for j in idx)
                sel = torch.tensor(idx)
                for name, v in mask_scores(mask[sel], coverage[sel]).items():
                    acc["mask"].setdefault(name, []).append(v)
                for mname, m in maps.items():
                    for name, v in map_scores(m[sel], coverage[sel], k).items():
                        acc["maps"].setdefault(mname, {}).setdefault(name, []).append(v)
    finally:
        model.train(was_training)
    figures = {
        "grid": list(grid), "k": k, "n": len(samples), "mask_strategy": model.cfg.mask_strategy,
        "attention_map": model.cfg.attention_map,
        "per_method": {
            method: {"n": acc["n"], "kinds": sorted(acc["kinds"]),
                     "mask": {name: _mean(v) for name, v in acc["mask"].items()},
                     "maps": {m: {name: _mean(v) for name, v in d.items()} for m, d in acc["maps"].items()}}
            for method, acc in sorted(per.items())
        },
    }
    return figures, pictures


def diagnostics_markdown(figures: dict) -> list[str]:
    """report.md's section: the mask's figures per method, then every map's hit rate and attention in region."""
    h, w = figures["grid"]
    lines = [f"Mask diagnostics on fakes with a known manipulated region ({figures['n']} samples; "
             f"{h}x{w} grid, k = {figures['k']} cells masked, strategy `{figures['mask_strategy']}` on map "
             f"`{figures['attention_map']}`). Hit: one of the region's strongest cells masked; chance: a random "
             "k-cell mask.", ""]
    lines += markdown_table(
        ["method", "region", "n", "hit rate", "chance", "masked in region", "region share"],
        [[method, ", ".join(d["kinds"]), d["n"], *(fmt(d["mask"][key], 3) for key in
                                                   ("hit_rate", "chance_hit_rate", "masked_in_region", "region_share"))]
         for method, d in figures["per_method"].items()], align="llrrrrr")
    names = list(next(iter(figures["per_method"].values()))["maps"])
    lines += ["", "Each map's hit rate (region's strongest cell in its top k) / attention in region / entropy:", ""]
    lines += markdown_table(["method", *names], [
        [method, *(" / ".join(fmt(d["maps"][n][key], 2) for key in ("hit_rate", "attention_in_region", "entropy"))
                   for n in names)] for method, d in figures["per_method"].items()])
    lines.append("")
    return lines
