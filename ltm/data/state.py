"""What a saved loader state must match to be restored: the loader's kind, sources, rank split and batch size.

Both loaders (`ltm.data.dali`, `ltm.data.reference`) save it with their position and check it on restore, so a
checkpoint taken over one set of shards is never resumed over another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def loader_identity(loader: Any) -> dict:
    """What a saved loader state must match: the same kind, sources, rank split and batch size."""
    return {
        "kind": loader.kind,
        "rank": loader.rank,
        "world_size": loader.world_size,
        "batch": loader.batch,
        # resolved: the same folder named relatively in one run and absolutely in the next is the same source
        "sources": [(str(Path(s.folder).resolve()), s.weight, len(s)) for s in loader.sources],
    }


def check_state(loader: Any, state: dict) -> None:
    """A loader state fits only a loader over the same sources, rank split and batch size."""
    for k, v in loader_identity(loader).items():
        got = state.get(k)
        if k == "sources" and got is not None:  # states saved before paths were resolved: resolve them here
            got = [(str(Path(x[0]).resolve()), *x[1:]) for x in got]
        if got != v:
            raise ValueError(f"loader state does not fit this loader: {k} is {got!r} in the state, {v!r} here")
