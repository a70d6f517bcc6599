"""Atomic file writes (temp name in the same folder, fsync, rename): a reader never sees half a file; file names
made from keys.

Kept free of heavy imports: `ltm predict --model` uses it without the training stack."""

from __future__ import annotations

import os
import re
from pathlib import Path


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def safe_filename(name: str) -> str:
    """`name` with every character outside [A-Za-z0-9_.-] replaced by `_` (keys and file stems in picture names)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
