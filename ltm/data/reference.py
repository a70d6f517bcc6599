"""The reference loader: PIL decoding in torch DataLoader workers, reading the same shards as the DALI pipeline.

It is the fallback where DALI does not install and the baseline of `bench/loader.py`. Outputs and the rank split
match the DALI loader: training yields endless `(images, labels)` batches drawn from the weighted sources; eval
yields every sample of the rank's contiguous range exactly once, with its key, video and method.

Training reads samples by their byte offsets from the `.idx` index, so the order is a pure function of
(seed, rank, batch number, per-source counters): `state_dict()` is those counters and a restored loader continues
with exactly the batches an uninterrupted one would have produced, without replaying anything. Eval streams the
tars with webdataset in stored order, or, with an eval plan (`eval.frames_per_video`, video compression:
`ltm.data.plan`), reads the rank's share of the plan by the index offsets; `eval.perturb` runs on the CPU here
(`ltm.data.perturb`), on each crop at its stored size before the resize, or on each video's clip.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from data_prep import jpeg
from ltm.data.plan import (
    Item,
    MemberReader,
    Plan,
    ShareEvalLoader,
    clip_perturbation,
    compressed_frames,
    decode_jpeg,
    eval_share,
    parse_label,
)
from ltm.data.shards import Shard, ShardError, Source, rank_range, sample_ids
from ltm.data.state import check_state, loader_identity

log = logging.getLogger(__name__)

# A worker that produces nothing for this long is reported instead of waited for (a batch takes well under a second).
WORKER_TIMEOUT_S = 300


def start_workers(loader: DataLoader) -> Iterator:
    """`iter(loader)`, which forks the worker processes, with the garbage collector's objects frozen meanwhile.

    A forked worker inherits this process's uncollected garbage, and its own collector would finalize it there.
    Some finalizers must not run in a child: a DALI pipeline's joins its executor threads, which the child does not
    have, and the worker dies of a segmentation fault (seen when a DALI loader was dropped shortly before a
    reference loader started). Frozen objects are never collected in the child; the parent unfreezes them at once
    and finalizes its garbage itself."""
    gc.freeze()
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# ----------------------------------------------------------------------------------------------------- training


class _IndexedSamples(Dataset):
    """Item (source, position in the rank's part) -> (uint8 CHW image, label) or None for a skipped bad sample."""

    def __init__(self, parts: list[list[tuple[Shard, int]]], size: int, on_bad: str):
        self.parts, self.size, self.on_bad = parts, size, on_bad
        self._files: dict[Path, Any] = {}  # open tar handles, one set per worker process

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def _read(self, shard: Shard, i: int, ext: str) -> bytes:
        f = self._files.get(shard.tar)
        if f is None:
            f = self._files[shard.tar] = open(shard.tar, "rb")  # noqa: SIM115 - kept open for the worker's life
        m = shard.members[i][ext]
        f.seek(m.offset)
        return f.read(m.size)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, float] | tuple[str, str]:
        source, pos = item
        shard, i = self.parts[source][pos]
        where = f"shard {shard.tar} key {shard.keys[i]!r}"
        try:
            label = parse_label(self._read(shard, i, "cls"), where)
            image = decode_jpeg(self._read(shard, i, "jpg"), self.size, where)
        except ShardError as exc:
            if self.on_bad != "skip":
                raise
            return (str(shard.tar), str(exc))
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), label


def _collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    good = [b for b in batch if isinstance(b[0], torch.Tensor)]
    bad = [b[1] for b in batch if not isinstance(b[0], torch.Tensor)]
    if not good:
        return torch.empty(0), torch.empty(0), bad
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good], dtype=torch.float32), bad


class WeightedPlan:
    """The batch plan: which (source, position) each sample of batch t comes from.

    Each sample picks its source with probability weight / sum(weights) (an independent draw per sample, the same
    rule as the DALI pipeline); within a source the rank's part is read in a fresh permutation per pass.
    Everything derives from (seed, rank, t, counters), so a plan restarted from saved counters continues exactly.
    """

    def __init__(self, sizes: list[int], weights: list[float], batch: int, seed: int, rank: int):
        self.sizes, self.batch, self.seed, self.rank = sizes, batch, seed, rank
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perm:
            self._perm = {k: v for k, v in self._perm.items() if k[0] != source}
            rng = np.random.default_rng([self.seed, self.rank, source, epoch])
            self._perm[key] = rng.permutation(self.sizes[source])
        return self._perm[key]

    def batch_items(self, t: int, counters: list[int]) -> list[tuple[int, int]]:
        """Items of batch t; advances `counters` (samples drawn so far per source) in place."""
        rng = np.random.default_rng([self.seed, self.rank, 1_000_003, t])
        choice = rng.choice(len(self.sizes), size=self.batch, p=self.p)
        items = []
        for s in choice.tolist():
            n = self.sizes[s]
            epoch, pos = divmod(counters[s], n)
            items.append((s, int(self._order(s, epoch)[pos])))
            counters[s] += 1
        return items


class _PlanSampler:
    def __init__(self, plan: WeightedPlan, t: int, counters: list[int]):
        self.plan, self.t, self.counters = plan, t, list(counters)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        t, counters = self.t, list(self.counters)
        while True:
            yield self.plan.batch_items(t, counters)
            t += 1


class ReferenceTrainLoader:
    """Endless iterator of (images float32 (b,3,S,S) in [0,1], labels float32 (b,)) on `device`."""

    kind = "reference"

    def __init__(self, sources: list[Source], cfg, rank: int, world_size: int, device: torch.device, batch: int):
        self.sources, self.rank, self.world_size, self.device, self.batch = sources, rank, world_size, device, batch
        self.size, self.on_bad = cfg.data.image_size, cfg.data.on_bad_sample
        self.workers, self.prefetch = cfg.data.num_threads, cfg.data.prefetch
        # data.pin_memory: page-locked batches from the DataLoader's pin thread (then `_to_device` has nothing left
        # to pin). Page-locking serves only copies to a GPU: on the CPU the option is accepted and does nothing.
        self.pin_memory = cfg.data.pin_memory and device.type == "cuda"
        parts = []
        for src in sources:
            flat = [(shard, i) for shard in src.shards for i in range(len(shard))]
            lo, hi = rank_range(len(flat), rank, world_size)
            if hi <= lo:
                raise ShardError(f"shard folder {src.folder}: {len(flat)} samples cannot feed {world_size} ranks")
            parts.append(flat[lo:hi])
        self.dataset = _IndexedSamples(parts, self.size, self.on_bad)
        self.plan = WeightedPlan([len(p) for p in parts], [s.weight for s in sources], batch, cfg.data.seed, rank)
        self.batches = 0  # batches handed out
        self.counters = [0] * len(sources)  # samples drawn per source by those batches
        self.skipped = 0
        self._it: Iterator | None = None
        self._loader: DataLoader | None = None

    def _start(self) -> None:
        self._loader = DataLoader(
            self.dataset,
            batch_sampler=_PlanSampler(self.plan, self.batches, self.counters),
            num_workers=self.workers,
            prefetch_factor=self.prefetch if self.workers > 0 else None,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            timeout=WORKER_TIMEOUT_S if self.workers > 0 else 0,
        )
        self._it = start_workers(self._loader)

    def __iter__(self) -> ReferenceTrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._start()
        images, labels, bad = next(self._it)
        self.plan.batch_items(self.batches, self.counters)  # advance the consumed-state copy of the plan
        self.batches += 1
        if bad:
            self.skipped += len(bad)
            for reason in bad:
                log.warning("skipped bad sample (%d so far): %s", self.skipped, reason)
        images = _to_device(images, self.device).float().div_(255.0)
        return images, _to_device(labels, self.device)

    def state_dict(self) -> dict:
        return {
            **loader_identity(self),
            "batches": self.batches,
            "counters": list(self.counters),
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict) -> None:
        check_state(self, state)
        self.close()
        self.batches, self.counters, self.skipped = state["batches"], list(state["counters"]), state["skipped"]

    def close(self) -> None:
        self._it, self._loader = None, None  # drops the worker processes


# ----------------------------------------------------------------------------------------------------- eval


class _EvalStream(IterableDataset):
    """The rank's contiguous range of samples, streamed from the tars with webdataset; workers split it further."""

    def __init__(self, sources: list[Source], lo: int, hi: int, size: int, on_bad: str, perturb=None):
        self.size, self.on_bad, self.perturb = size, on_bad, perturb
        # (source, shard, first, last) pieces of the rank's range, in the concatenated order
        self.pieces: list[tuple[Source, Shard, int, int]] = []
        start = 0
        for src in sources:
            for shard in src.shards:
                a, b = max(lo - start, 0), min(hi - start, len(shard))
                if a < b:
                    self.pieces.append((src, shard, a, b))
                start += len(shard)
        self.total = hi - lo

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        lo, hi = rank_range(self.total, wid, nw)
        pos = 0
        for src, shard, a, b in self.pieces:
            n = b - a
            wa, wb = max(lo - pos, 0) + a, min(hi - pos, n) + a
            pos += n
            if wa >= wb:
                continue
            wanted = set(shard.keys[wa:wb])
            ds = wds.WebDataset(
                str(shard.tar), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
            )
            found = 0
            for sample in ds:
                if sample["__key__"] not in wanted:
                    continue
                found += 1
                yield self._sample(src, shard, sample)
                if found == len(wanted):
                    break
            if found != len(wanted):
                raise ShardError(f"shard {shard.tar}: {len(wanted) - found} samples of its index are not in the tar")

    def _sample(self, src: Source, shard: Shard, sample: dict) -> tuple:
        key = sample["__key__"]
        where = f"shard {shard.tar} key {key!r}"
        try:
            label = parse_label(sample["cls"], where)
            image = eval_pixels(sample["jpg"], key, where, self.size, self.perturb)
        except ShardError as exc:
            if self.on_bad != "skip":
                raise
            return (None, str(exc))
        key, video, method = sample_ids(sample.get("json"), key, src.folder)
        return (image, label, key, video, method)


def eval_pixels(data: bytes, key: str, where: str, size: int, perturb=None) -> torch.Tensor:
    """An eval sample's uint8 CHW image: decoded, perturbed per crop at its stored size (when `perturb` is given),
    then resized to `size` (only when the stored size differs)."""
    if perturb is None:
        pixels = decode_jpeg(data, size, where)
    else:  # on the crop as stored (prep's size), then the loader's resize
        from ltm.data.perturb import PerturbationError

        try:
            pixels = jpeg.resize(perturb(decode_jpeg(data, 0, where), key), size)
        except PerturbationError as exc:
            raise ShardError(f"{where}: {exc}") from exc
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class _PlanStream(IterableDataset):
    """The rank's share of an eval plan (`ltm.data.plan`), read by the index offsets; workers split it further
    (contiguously, like ranks); with a clip perturbation each worker compresses the videos its part touches."""

    def __init__(self, sources: list[Source], plan: Plan, share: list[Item], size: int, on_bad: str, perturb=None):
        self.folders = [s.folder for s in sources]
        self.plan, self.share, self.size, self.on_bad, self.perturb = plan, share, size, on_bad, perturb

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        lo, hi = rank_range(len(self.share), wid, nw)
        part = self.share[lo:hi]
        reader = MemberReader()
        try:
            if clip_perturbation(self.perturb):
                for it, pixels, error in compressed_frames(part, self.plan, reader, self.perturb, self.on_bad):
                    yield (None, error) if error is not None else self._sample(it, reader, pixels)
            else:
                for it in part:
                    yield self._sample(it, reader, None)
        finally:
            reader.close()

    def _sample(self, it: Item, reader: MemberReader, pixels: np.ndarray | None) -> tuple:
        try:
            label = parse_label(reader.read(it.shard, it.index, "cls"), it.where)
            if pixels is None:
                image = eval_pixels(reader.read(it.shard, it.index, "jpg"), it.key, it.where, self.size,
                                    self.perturb)
            else:
                image = torch.from_numpy(jpeg.resize(pixels, self.size)).permute(2, 0, 1).contiguous()
        except ShardError as exc:
            if self.on_bad != "skip":
                raise
            return (None, str(exc))
        meta = reader.read(it.shard, it.index, "json") if "json" in it.shard.members[it.index] else None
        key, video, method = sample_ids(meta, it.key, self.folders[it.source])
        return (image, label, key, video, method)


def _eval_collate(batch: list) -> dict:
    good = [b for b in batch if b[0] is not None]
    return {
        "images": torch.stack([g[0] for g in good]) if good else torch.empty(0, dtype=torch.uint8),
        "labels": torch.tensor([g[1] for g in good], dtype=torch.float32),
        "keys": [g[2] for g in good],
        "videos": [g[3] for g in good],
        "methods": [g[4] for g in good],
        "bad": [b[1] for b in batch if b[0] is None],
    }


class ReferenceEvalLoader(ShareEvalLoader):
    """Iterable of dicts `images, labels, keys, videos, methods`; each pass reads the rank's samples once."""

    kind = "reference"

    def __init__(self, sources: list[Source], cfg, rank: int, world_size: int, device: torch.device, batch: int):
        self.share = eval_share(sources, cfg.eval, rank, world_size)
        self.sources, self.device, self.batch = sources, device, batch
        self.size, self.on_bad, self.workers = cfg.data.image_size, cfg.data.on_bad_sample, cfg.data.num_threads
        self.skipped = 0

    def __iter__(self) -> Iterator[dict]:
        if self.num_samples == 0:
            return
        if self.share.plan is not None:
            stream = _PlanStream(self.sources, self.share.plan, self.share.items(), self.size, self.on_bad,
                                 self.share.perturb)
        else:
            stream = _EvalStream(self.sources, self.share.lo, self.share.hi, self.size, self.on_bad, self.share.perturb)
        workers = max(0, min(self.workers, self.num_samples // self.batch))  # no idle workers on tiny sets
        loader = DataLoader(
            stream,
            batch_size=self.batch,
            num_workers=workers,
            collate_fn=_eval_collate,
            timeout=WORKER_TIMEOUT_S if workers > 0 else 0,
        )
        for out in start_workers(loader):
            bad = out.pop("bad")
            if bad:
                self.skipped += len(bad)
                for reason in bad:
                    log.warning("skipped bad sample (%d so far): %s", self.skipped, reason)
            if not out["keys"]:
                continue
            out["images"] = _to_device(out["images"], self.device).float().div_(255.0)
            out["labels"] = _to_device(out["labels"], self.device)
            yield out
