"""ltm.data: batches from the shards (docs/shards.md, "Shard format") for training and evaluation.

Public API:
    per_rank_batch(cfg, world_size) -> int
    build_train_loader(cfg, rank, world_size, device) -> TrainLoader
        endless iterator of (images float32 (b,3,S,S) in [0,1], labels float32 (b,)) on `device`;
        `.state_dict()` / `.load_state_dict(d)`: a restored loader yields exactly the batches an uninterrupted one
        would have; `.skipped` counts bad samples dropped when cfg.data.on_bad_sample == "skip".
    build_eval_loader(cfg, folders, rank, world_size, device, batch_size) -> iterable of dict
        {"images", "labels", "keys", "videos", "methods"}; every sample of the folders once across the ranks, or
        with `eval.frames_per_video` N every selected sample (N evenly spaced frames per video, `ltm.data.plan`);
        `.num_samples` is this rank's share, `.total_samples` all ranks' together. `eval.perturb` perturbs every
        crop (inside the DALI pipeline with the DALI loader) or every video's clip (`ltm.data.perturb`). Keys and
        videos are unique across datasets and methods (`<dataset>-<method>-<video>[-<frame>]`,
        `ltm.data.shards.sample_ids`), also for shards written before prep wrote them in that form.
    loader_identity(loader) -> dict, check_state(loader, state)
        what a saved loader state must match to be restored (kind, sources, rank split, batch size); both loaders
        (`ltm.data.state`).

`cfg.data.loader` picks the implementation: "dali" (NVIDIA DALI pipelines, `ltm.data.dali`) or "reference"
(webdataset + PIL + torch DataLoader, `ltm.data.reference`). Where nvidia.dali cannot be imported the DALI choice
falls back to the reference loader with a warning (`ltm.env.dali_import_error`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch

from ltm.config import Config
from ltm.data.shards import ShardError, Source, method_folders, resolve, scan_source
from ltm.data.state import check_state, loader_identity
from ltm.env import dali_import_error

log = logging.getLogger(__name__)

__all__ = [
    "ShardError",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "check_state",
    "per_rank_batch",
    "train_sources",
    "eval_sources",
    "loader_identity",
]


class TrainLoader(Protocol):
    kind: str  # "dali" | "reference"
    skipped: int  # bad samples dropped so far (data.on_bad_sample: skip)

    def __iter__(self) -> TrainLoader: ...
    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def close(self) -> None: ...


def _loader_kind(cfg: Config) -> str:
    if cfg.data.loader == "dali" and (error := dali_import_error()) is not None:
        log.warning("data.loader=dali but nvidia.dali cannot be imported (%s); using the reference loader", error)
        return "reference"
    return cfg.data.loader


def per_rank_batch(cfg: Config, world_size: int) -> int:
    """cfg.train.batch_size is the global batch: per rank = batch_size / (world_size * grad_accum)."""
    parts = world_size * cfg.train.grad_accum
    if world_size < 1 or cfg.train.batch_size % parts:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by world_size ({world_size}) x "
            f"train.grad_accum ({cfg.train.grad_accum})"
        )
    return cfg.train.batch_size // parts


def train_sources(cfg: Config) -> list[Source]:
    if not cfg.data.train:
        raise ShardError("data.train lists no shard folders")
    return [
        scan_source(resolve(cfg, s.path), ("jpg", "cls"), cfg.data.on_bad_sample, weight=s.weight)
        for s in cfg.data.train
    ]


def eval_sources(cfg: Config, folders: list[str | Path]) -> list[Source]:
    if not folders:
        raise ShardError("no eval folders given")
    out: list[Source] = []
    for f in folders:
        for m in method_folders(resolve(cfg, f)):
            out.append(scan_source(m, ("jpg", "cls", "json"), cfg.data.on_bad_sample))
    return out


def build_train_loader(cfg: Config, rank: int, world_size: int, device: torch.device | str) -> TrainLoader:
    device = torch.device(device)
    batch = per_rank_batch(cfg, world_size)
    sources = train_sources(cfg)
    if _loader_kind(cfg) == "dali":
        from ltm.data.dali import DaliTrainLoader

        return DaliTrainLoader(sources, cfg, rank, world_size, device, batch)
    from ltm.data.reference import ReferenceTrainLoader

    return ReferenceTrainLoader(sources, cfg, rank, world_size, device, batch)


def build_eval_loader(
    cfg: Config,
    folders: list[str | Path],
    rank: int,
    world_size: int,
    device: torch.device | str,
    batch_size: int,
) -> Any:
    device = torch.device(device)
    sources = eval_sources(cfg, folders)
    if _loader_kind(cfg) == "dali":
        from ltm.data.dali import DaliEvalLoader

        return DaliEvalLoader(sources, cfg, rank, world_size, device, batch_size)
    from ltm.data.reference import ReferenceEvalLoader

    return ReferenceEvalLoader(sources, cfg, rank, world_size, device, batch_size)
