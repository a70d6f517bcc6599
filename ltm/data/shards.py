"""Finding and checking shard folders against the shard format (docs/shards.md), before any pipeline starts.

A shard folder `<root>/<dataset>/<split>/<method>/` holds `*.tar` files, each with its DALI index `.idx` (v1.2: one
line per sample listing `ext offset size name` per member). Everything the loaders need to know about a folder
comes from the index files alone: sample counts, keys, member offsets, and which samples lack a member. So a
missing folder, a tar without its index, an empty source or a sample without `cls` is reported here, naming the
shard and key, and never reaches a pipeline where it could hang or fail without a name.

Both loaders split a list of samples between ranks the way DALI's readers do (`shard_id`/`num_shards`): rank k of
W reads the contiguous range [k*N // W, (k+1)*N // W) of the concatenated samples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.keys import video_id
from ltm.config import Config

log = logging.getLogger(__name__)

IDX_VERSION = "v1.2"


class ShardError(ValueError):
    """A shard folder, shard or sample that breaks the shard contract; the message names shard and key."""


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


@dataclass
class Shard:
    tar: Path
    idx: Path
    keys: list[str]
    members: list[dict[str, Member]]  # per sample: ext -> (offset, size) in the tar

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class Source:
    """One shard folder (a method folder) with its shards; `weight` is its training sampling weight."""

    folder: Path
    shards: list[Shard]
    weight: float = 1.0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, reason) dropped at scan time

    @property
    def name(self) -> str:
        return self.folder.name

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)


def split_name(member: str) -> tuple[str, str]:
    """`<key>.<ext>`: the key ends at the first dot of the file name (webdataset's and DALI's rule)."""
    base = member.rsplit("/", 1)[-1]
    dot = base.find(".")
    prefix = member[: len(member) - len(base)]
    return prefix + base[:dot], base[dot + 1 :]


def read_index(tar: Path) -> Shard:
    idx = tar.with_suffix(".idx")
    if not idx.is_file():
        raise ShardError(f"shard {tar}: index {idx.name} is missing (write it with the wds2idx module)")
    lines = idx.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != IDX_VERSION or not head[1].isdigit():
        raise ShardError(f"shard {tar}: index {idx.name} does not start with '{IDX_VERSION} <samples>'")
    keys: list[str] = []
    members: list[dict[str, Member]] = []
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()
        if not parts:
            continue
        if len(parts) % 4:
            raise ShardError(f"shard {tar}: index line {lineno} is not groups of 'ext offset size name'")
        sample: dict[str, Member] = {}
        key = None
        for i in range(0, len(parts), 4):
            ext, offset, size, name = parts[i : i + 4]
            key = split_name(name)[0]
            sample[ext] = Member(int(offset), int(size))
        keys.append(key or "")
        members.append(sample)
    if len(keys) != int(head[1]):
        raise ShardError(f"shard {tar}: index {idx.name} announces {head[1]} samples but lists {len(keys)}")
    if tar.stat().st_size < max((m.offset + m.size for s in members for m in s.values()), default=0):
        raise ShardError(f"shard {tar}: shorter than its index says (truncated copy?)")
    return Shard(tar=tar, idx=idx, keys=keys, members=members)


def list_shards(folder: Path) -> list[Path]:
    # Writers use temp names (`x.tar.tmp<pid>`, dot files) that this glob does not match: only complete shards.
    return sorted(p for p in folder.glob("*.tar") if not p.name.startswith("."))


def scan_source(
    folder: str | Path, required: tuple[str, ...] = ("jpg", "cls"), on_bad: str = "error", weight: float = 1.0
) -> Source:
    """Read every index of one shard folder; samples lacking a required member raise or are dropped and counted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist")
    tars = list_shards(folder)
    if not tars:
        raise ShardError(f"shard folder {folder} holds no .tar shards (empty source)")
    source = Source(folder=folder, shards=[read_index(t) for t in tars], weight=weight)
    for shard in source.shards:
        keep = [i for i, m in enumerate(shard.members) if all(ext in m for ext in required)]
        if len(keep) == len(shard):
            continue
        for i in sorted(set(range(len(shard))) - set(keep)):
            missing = [ext for ext in required if ext not in shard.members[i]]
            reason = f"no {'/'.join(missing)} member"
            if on_bad != "skip":
                raise ShardError(f"shard {shard.tar} key {shard.keys[i]!r}: {reason}")
            source.skipped.append((str(shard.tar), shard.keys[i], reason))
        # DALI's reader with missing_component_behavior="skip" drops these before splitting between ranks;
        # dropping them from the index view here keeps both loaders' rank ranges identical.
        shard.keys = [shard.keys[i] for i in keep]
        shard.members = [shard.members[i] for i in keep]
    for tar, key, reason in source.skipped:
        log.warning("skipping shard %s key %r: %s", tar, key, reason)
    if len(source) == 0:
        raise ShardError(f"shard folder {folder} has no usable samples (empty source)")
    return source


def resolve(cfg: Config, path: str | Path) -> Path:
    """A path as given if it exists, else relative to `cfg.data.root`."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    return Path(cfg.data.root) / p


def method_folders(folder: Path) -> list[Path]:
    """A method folder is itself; a split folder expands to its method subfolders (those holding shards)."""
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist")
    if list_shards(folder):
        return [folder]
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and list_shards(p))
    if not subs:
        raise ShardError(f"shard folder {folder} holds no .tar shards and no method folders with shards")
    return subs


MANIFEST = "manifest.json"


def split_folder(folder: Path) -> Path:
    """The split a shard folder belongs to: a method folder's parent, or the split folder itself."""
    return folder if (folder / MANIFEST).is_file() or not list_shards(folder) else folder.parent


def split_digest(folder: Path) -> str | None:
    """The content digest `ltm prep` recorded for the split of a shard folder (its manifest's `digest`); None for
    shards written before digests were recorded or by another tool."""
    manifest = split_folder(Path(folder)) / MANIFEST
    try:
        return json.loads(manifest.read_text()).get("digest")
    except (OSError, ValueError, AttributeError):
        return None


def data_digests(cfg: Config) -> dict[str, dict[str, str | None]]:
    """{"train" | "val" | "test": {split folder: its content digest}} of the shard folders a config reads: two runs
    (or tables) that read the same data show the same digests, whatever the folders are called or where they lie."""
    roles = {"train": [s.path for s in cfg.data.train], "val": list(cfg.data.val), "test": list(cfg.data.test)}
    out: dict[str, dict[str, str | None]] = {}
    for role, folders in roles.items():
        splits = {split_folder(resolve(cfg, f)) for f in folders}
        out[role] = {str(s): split_digest(s) for s in sorted(splits)}
    return out


def sample_ids(meta_bytes: bytes | None, key: str, folder: Path) -> tuple[str, str, str]:
    """(key, video, method) of an eval sample, its key and video unique across datasets and methods.

    Shards written by prep carry `__key__` `<video id>-<frame:06d>` and the video id in the json. Shards written
    before ids carried dataset and method (`<video>-<frame>` keys, the dataset's own video name in the json) get
    the same ids here from the json's `dataset`/`method`/`video`; a missing field falls back to the shard folder
    `<dataset>/<split>/<method>` and to the key's `<video>-<frame>` form.
    """
    meta: dict = {}
    if meta_bytes:
        try:
            meta = json.loads(meta_bytes)
        except ValueError:
            meta = {}
    if not isinstance(meta, dict):
        meta = {}
    method = str(meta.get("method") or folder.name)
    dataset = str(meta.get("dataset") or folder.parent.parent.name)
    video = video_id(dataset, method, str(meta.get("video") or key.rsplit("-", 1)[0]))
    return video_id(dataset, method, key), video, method


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """DALI's split of n samples between `num_shards` readers: contiguous, sizes differ by at most one."""
    return rank * n // world_size, (rank + 1) * n // world_size
