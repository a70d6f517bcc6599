"""A run's checkpoints: saving and resuming (`checkpointer`), loading files safely (`safe_load`), and reading a
checkpoint's weights into a model for scoring (`reader`). The layout: docs/run-folder.md, "Checkpoint layout"."""

import os
import re
from pathlib import Path

from ltm.config import Config, load_run_config


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the file or folder."""


# Tags name a save by its optimizer step. Here, apart from the checkpointer (which imports torch), so a process that
# only checks a `--resume` tag before starting its ranks imports nothing heavy.
TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    if not m:
        raise CheckpointError(f"checkpoint tag {tag!r}: expected step<8 digits>, e.g. {tag_for(300)}")
    return int(m.group(1))


def resolve_tag(run_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """`<run>/checkpoints/<tag>`; tag None or "latest" = the tag named in `<run>/checkpoints/latest`."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run folder {str(run)!r}: no such folder")
    ckpt_root = run / "checkpoints"
    if tag in (None, "latest"):
        latest = ckpt_root / "latest"
        if not latest.is_file():
            raise CheckpointError(f"{latest}: no such file (the run has no finished checkpoint; pass --tag)")
        tag = latest.read_text().strip()
        if not tag:
            raise CheckpointError(f"{latest}: empty (a checkpoint save was interrupted?)")
    folder = ckpt_root / str(tag)
    if not folder.is_dir():
        tags = sorted(p.name for p in ckpt_root.glob("*") if p.is_dir()) if ckpt_root.is_dir() else []
        raise CheckpointError(f"checkpoint tag folder {str(folder)!r}: no such folder (tags here: {tags or 'none'})")
    return folder


def run_config(run_dir: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """A run folder's `config.yaml` with `overrides`; a missing folder or file is an error that names it."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run folder {str(run)!r}: no such folder")
    config_path = run / "config.yaml"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: no such file (not a run folder written by `ltm train`)")
    return load_run_config(config_path, overrides or [])


def checked_run(run_dir: str | os.PathLike, overrides: list[str] | None = None, tag: str | None = None,
                weights: str | os.PathLike | None = None) -> Config:
    """`run_config`, after checking without torch what a process scoring the run would reject first: the run folder,
    its config with the overrides, and the checkpoint tag unless `weights` names a consolidated weights file."""
    cfg = run_config(run_dir, overrides)
    if weights is None:
        resolve_tag(run_dir, tag)
    elif not Path(weights).is_file():  # worded as the reader's load_weights_file, which the scoring process calls
        raise CheckpointError(f"weights file {str(weights)!r}: no such file")
    return cfg
