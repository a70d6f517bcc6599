"""A run's checkpoints: saving and resuming (`checkpointer`), loading files safely (`safe_load`), and reading a
checkpoint's weights into a model for scoring (`reader`). The layout: docs/run-folder.md, "Checkpoint layout"."""

import re


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
