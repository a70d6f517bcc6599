"""A run's checkpoints: saving and resuming (`checkpointer`), loading files safely (`safe_load`), and reading a
checkpoint's weights into a model for scoring (`reader`). The layout: docs/run-folder.md, "Checkpoint layout"."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the file or folder."""
