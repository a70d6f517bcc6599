"""Eval plans: which samples an evaluation scores, in which order, and how they are split between ranks.

Without `eval.frames_per_video` and without video compression the loaders score every sample of the folders in
stored order, read by the DALI webdataset reader or streamed by webdataset (no plan). With either, both loaders
follow one plan, built here from the `.idx` files before any pipeline starts:

- Videos. A sample's video and frame number come from its key, `<video>-<frame>` (the shard contract: prep writes
  `<video id>-<frame:06d>`); a key without a numeric `-<frame>` suffix is looked up in its `json` member (`video`,
  `frame`), and a sample with neither is an error naming shard, key and field. Videos are grouped per shard folder
  (a method folder), so one name in two method folders is two videos.
- Frame selection (`eval.frames_per_video` N > 0): per video, its F frames sorted by frame number; all of them when
  F <= N, else those at positions `numpy.linspace(0, F - 1, N)` truncated to integers, the rule of SBI's inference
  code (`np.linspace(0, frame_count - 1, num_frames, endpoint=True, dtype=int)`). N = 1 takes the first frame.
  F is the number of frames the shards hold for the video (prep may already have taken a subset of the video).
- Order: source by source (the order of the folders), videos sorted by name, frames by frame number.
- Rank split: the same contiguous split as without a plan (`rank_range` over the selected samples), applied to the
  whole selection, so every rank's share is disjoint, the shares cover the selection, and the selection does not
  depend on the number of ranks.
- Video compression: a clip is built from *all* frames the shards hold for the video (not only the selected
  ones), so a frame's compressed pixels do not depend on N. A rank (and, in the reference loader, a worker)
  compresses every video that has a frame in its share; a video cut by a share boundary is compressed by both
  sides, with identical results (libx264 with fixed settings is deterministic), so the split costs at most one
  extra clip per boundary and changes no pixel.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from data_prep import jpeg
from ltm.data.perturb import Perturbation, perturbation
from ltm.data.shards import Shard, ShardError, Source, rank_range


# The member decoders both loaders and the clip compression below share (the DALI loader uses them on its CPU path).
def decode_jpeg(data: bytes, size: int, where: str) -> np.ndarray:
    """JPEG bytes -> uint8 (size, size, 3) RGB; resized (bilinear, antialiased) only when the stored size differs."""
    try:
        return jpeg.decode_jpeg(data, size)
    except Exception as exc:  # PIL raises several types for broken files; all mean "not a readable JPEG"
        raise ShardError(f"{where}: corrupt JPEG ({type(exc).__name__}: {exc})") from exc


def parse_label(data: bytes, where: str) -> float:
    text = data.strip()
    if text not in (b"0", b"1"):
        raise ShardError(f"{where}: cls must be ASCII 0 or 1, got {data[:16]!r}")
    return float(text == b"1")


@dataclass(frozen=True)
class Item:
    """One sample of a plan: its source (index into the source list), shard and position in the shard."""

    source: int
    shard: Shard = field(compare=False)
    index: int
    video: str  # the video's name within its source (not yet prefixed with dataset and method)
    frame: int

    @property
    def key(self) -> str:
        return self.shard.keys[self.index]

    @property
    def where(self) -> str:
        return f"shard {self.shard.tar} key {self.key!r}"


@dataclass
class Plan:
    """`items`: the selected samples of all ranks, in plan order; `videos`: every frame of every video, in frame
    order, keyed by (source, video): what a compressed clip is built from."""

    items: list[Item]
    videos: dict[tuple[int, str], list[Item]]
    frames_per_video: int

    def share(self, lo: int, hi: int) -> list[Item]:
        return self.items[lo:hi]


def frame_indices(count: int, n: int) -> list[int]:
    """Positions (0-based, in frame order) of the frames scored from a video of `count` frames with
    `frames_per_video` n: all when n is 0 or n >= count, else `linspace(0, count - 1, n)` truncated."""
    if n < 0:
        raise ValueError(f"eval.frames_per_video must be >= 0, got {n}")
    if n == 0 or n >= count:
        return list(range(count))
    return np.linspace(0, count - 1, n, endpoint=True).astype(int).tolist()


class MemberReader:
    """Reads members of samples by the offsets of their shard's index, keeping the tars open."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}

    def read(self, shard: Shard, index: int, ext: str) -> bytes:
        member = shard.members[index].get(ext)
        if member is None:
            raise ShardError(f"shard {shard.tar} key {shard.keys[index]!r}: no {ext} member")
        f = self._files.get(shard.tar)
        if f is None:
            f = self._files[shard.tar] = open(shard.tar, "rb")  # noqa: SIM115 - closed in close()
        f.seek(member.offset)
        data = f.read(member.size)
        if len(data) != member.size:
            raise ShardError(f"shard {shard.tar} key {shard.keys[index]!r}: {ext} member cut short (truncated tar?)")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __getstate__(self) -> dict:  # a copy sent to a worker process opens its own files
        return {"_files": {}}


def video_and_frame(shard: Shard, index: int, reader: MemberReader) -> tuple[str, int]:
    """(video, frame number) of a sample: from its key `<video>-<frame>`, else from its json member."""
    key = shard.keys[index]
    video, sep, frame = key.rpartition("-")
    if sep and video and frame.isdigit():
        return video, int(frame)
    where = f"shard {shard.tar} key {key!r}"
    if "json" not in shard.members[index]:
        raise ShardError(f"{where}: the key does not end in -<frame number> and the sample has no json member; "
                         "eval.frames_per_video and video compression need each sample's video and frame")
    try:
        meta = json.loads(reader.read(shard, index, "json"))
    except ValueError as exc:
        raise ShardError(f"{where}: json member is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ShardError(f"{where}: json member is not an object")
    for name in ("video", "frame"):
        if name not in meta:
            raise ShardError(f"{where}: the key does not end in -<frame number> and json field {name!r} is missing; "
                             "eval.frames_per_video and video compression need each sample's video and frame")
    try:
        return str(meta["video"]), int(meta["frame"])
    except (TypeError, ValueError):
        raise ShardError(f"{where}: json field 'frame' is {meta['frame']!r}, not an integer") from None


def build_plan(sources: list[Source], frames_per_video: int, whole_videos: bool) -> Plan | None:
    """The plan of an evaluation, or None when the loaders read the folders in stored order (no frame selection,
    no clip perturbation)."""
    if frames_per_video < 0:
        raise ValueError(f"eval.frames_per_video must be >= 0, got {frames_per_video}")
    if frames_per_video == 0 and not whole_videos:
        return None
    reader = MemberReader()
    videos: dict[tuple[int, str], list[Item]] = {}
    try:
        for s, src in enumerate(sources):
            for shard in src.shards:
                for i in range(len(shard)):
                    video, frame = video_and_frame(shard, i, reader)
                    videos.setdefault((s, video), []).append(Item(s, shard, i, video, frame))
    finally:
        reader.close()
    items: list[Item] = []
    for group in sorted(videos):
        frames = sorted(videos[group], key=lambda it: (it.frame, it.key))
        for a, b in zip(frames, frames[1:]):
            if a.frame == b.frame:
                raise ShardError(f"{b.where}: frame {b.frame} of video {b.video!r} also in {a.where}")
        videos[group] = frames
        items += [frames[k] for k in frame_indices(len(frames), frames_per_video)]
    return Plan(items, videos, frames_per_video)


@dataclass
class EvalShare:
    """What one rank of an evaluation scores: the perturbation, the plan (None: stored order), the number of samples
    all ranks score together and this rank's contiguous range [lo, hi) of them. Both eval loaders start here."""

    perturb: Perturbation | None
    plan: Plan | None
    total_samples: int
    lo: int
    hi: int

    @property
    def num_samples(self) -> int:
        return self.hi - self.lo

    @property
    def clips(self) -> bool:
        """Whether the perturbation works on whole videos (compressed as clips) rather than on each crop."""
        return clip_perturbation(self.perturb)

    def items(self) -> list[Item]:
        """The plan's items in this rank's range (there must be a plan)."""
        return self.plan.share(self.lo, self.hi)


class ShareEvalLoader:
    """What both eval loaders answer from their `EvalShare` (`ltm.eval.evaluate` reads the counts); a subclass sets
    `share` and `batch`."""

    share: EvalShare
    batch: int

    @property
    def total_samples(self) -> int:
        """What all ranks score together."""
        return self.share.total_samples

    @property
    def num_samples(self) -> int:
        """This rank's share; the sum over ranks is the whole set."""
        return self.share.num_samples

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch)


def clip_perturbation(perturb: Perturbation | None) -> bool:
    return perturb is not None and not perturb.per_crop


def eval_share(sources: list[Source], eval_cfg, rank: int, world_size: int) -> EvalShare:
    """The rank's share of an evaluation configured by `eval_cfg` (`perturb`, `frames_per_video`)."""
    perturb = perturbation(eval_cfg.perturb)
    # whole clips are built (and so planned) when a perturbation works on videos, not crops
    plan = build_plan(sources, eval_cfg.frames_per_video, whole_videos=clip_perturbation(perturb))
    total = len(plan.items) if plan is not None else sum(len(s) for s in sources)
    return EvalShare(perturb, plan, total, *rank_range(total, rank, world_size))


def by_video(items: list[Item]) -> Iterator[tuple[tuple[int, str], list[Item]]]:
    """Consecutive runs of one video in a share of a plan: ((source, video), its items in the share)."""
    run: list[Item] = []
    for it in items:
        if run and (it.source, it.video) != (run[0].source, run[0].video):
            yield (run[0].source, run[0].video), run
            run = []
        run.append(it)
    if run:
        yield (run[0].source, run[0].video), run


def compressed_frames(
    share: list[Item], plan: Plan, reader: MemberReader, perturb, on_bad: str
) -> Iterator[tuple[Item, np.ndarray | None, str | None]]:
    """(item, its frame after the clip perturbation at the stored size, None) for each item of a share, or
    (item, None, error) for a frame that cannot be decoded when `on_bad` is "skip" (the clip is then built
    without it). Each video touching the share is decoded (PIL) and compressed whole, once."""
    for group, items in by_video(share):
        frames = plan.videos[group]
        pixels: dict[Item, np.ndarray] = {}
        bad: dict[Item, str] = {}
        for it in frames:
            try:
                pixels[it] = decode_jpeg(reader.read(it.shard, it.index, "jpg"), 0, it.where)
            except ShardError as exc:
                if on_bad != "skip":
                    raise
                bad[it] = str(exc)
        good = [it for it in frames if it in pixels]
        name = f"{frames[0].shard.tar.parent}/{group[1]}"
        if good:
            first = good[0]
            for it in good[1:]:
                if pixels[it].shape != pixels[first].shape:
                    raise ShardError(f"video {name!r}: its crops differ in size ({pixels[first].shape[1]}x"
                                     f"{pixels[first].shape[0]} at key {first.key!r}, {pixels[it].shape[1]}x"
                                     f"{pixels[it].shape[0]} at key {it.key!r}); {perturb.name} needs one size")
            clip = dict(zip(good, perturb.clip([pixels[it] for it in good], name)))
        else:
            clip = {}
        for it in items:
            yield it, clip.get(it), bad.get(it)
