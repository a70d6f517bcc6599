"""Loading checkpoint files without running code: weights-only `torch.load` with the few types ltm's files hold.

Every checkpoint file ltm reads itself (eval and predict weights, universal conversion, rank state) goes through
`load_file`, and DeepSpeed's zero_to_fp32 runs inside `weights_only_loads`, so a run folder from elsewhere cannot
run code on loading; DeepSpeed's own engine loader (resuming training) reads its files as it does.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltm.checkpoint import CheckpointError

# torch.load runs whatever callable a pickle names unless it loads weights only (tensors, plain containers and
# allow-listed types). These are the only other types ltm's own checkpoint files hold: DeepSpeed's ZeRO optimizer
# state (loss scaler, stage enum, parameter fragment addresses) and numpy's RNG state in our rank files.
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file whose pickle names something other than tensors, plain data and the allow-listed types."""


def safe_types() -> list:
    """The non-tensor types that `torch.load(weights_only=True)` may rebuild from ltm's checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [
        LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
        # np.random.get_state(): ('MT19937', uint32 array, pos, has_gauss, cached_gaussian)
        np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),  # the name numpy 1.x pickles it under
        (reconstruct, "numpy._core.multiarray._reconstruct"),
    ]


def refused_names(path: str | os.PathLike) -> list[str]:
    """What a checkpoint file's pickle names beyond tensors, plain data and `safe_types()` (read, never run)."""
    try:
        with torch.serialization.safe_globals(safe_types()):
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: torch.load reports what is wrong with it
        return []


def _refused(path: str | os.PathLike, exc: BaseException) -> UnsafeCheckpointError | None:
    """The refusal of a file whose pickle names a global outside the allow-list; None for other unpickling errors
    (a damaged file), which the callers report as such."""
    found = refused_names(path)
    if not found and "Unsupported global" not in str(exc):
        return None
    names = ", ".join(found) or next(
        (line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "a global")
    return UnsafeCheckpointError(
        f"checkpoint file {path}: refused, its pickle names {names}: code that would run on loading (ltm loads "
        f"checkpoints weights-only: tensors, plain data and the few types DeepSpeed's and ltm's own files hold)")


def load_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU with `safe_types()` allowed; a file that names any other
    callable is refused (UnsafeCheckpointError naming it) before anything of it runs."""
    try:
        with torch.serialization.safe_globals(safe_types()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = _refused(path, exc)
        if refused is None:
            raise
        raise refused from exc


@contextlib.contextmanager
def weights_only_loads(files: list[Path]) -> Iterator[None]:
    """Every `torch.load` inside loads weights only, also those of library code that asks for full unpickling
    (DeepSpeed's zero_to_fp32 passes weights_only=False): torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD switch, with
    `safe_types()` allowed. A refusal names the first of `files` that holds anything else."""
    saved = {k: os.environ.pop(k, None) for k in (FORCE_WEIGHTS_ONLY, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(safe_types()):
            yield
    except pickle.UnpicklingError as exc:
        bad = next((f for f in files if refused_names(f)), None)
        if bad is None:  # not a refusal, or a file outside `files`: the library's own error
            raise
        raise _refused(bad, exc) from exc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
