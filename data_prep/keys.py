"""Sample and video names of the shard contract, shared by the writer (prep) and the readers (`ltm.data.shards`).

A module of its own, without the tar and index writers' dependencies, because both layers need the one rule: prep
names what it writes with it, and the loaders give shards written before prep used it the same names.
"""

from __future__ import annotations


def video_id(dataset: str, method: str, video: str) -> str:
    """A video's id, unique across datasets and methods: `<dataset>-<method>-<video>`.

    FF++ names every manipulated video `<target>_<source>` in each method folder, so `Deepfakes/000_003` and
    `Face2Face/000_003` are different videos with one name; the prefix keeps them apart. Prep's names are key-safe
    (`[A-Za-z0-9_]`), so the `-` separators are unambiguous, and an id that already carries its prefix is kept.
    """
    prefix = "-".join(p for p in (dataset, method) if p) + "-"
    return video if video.startswith(prefix) else prefix + video


def sample_key(video: str, frame: int) -> str:
    """A sample's `__key__`: `<video id>-<frame:06d>` (the frame number as prep sampled it)."""
    return f"{video}-{frame:06d}"
