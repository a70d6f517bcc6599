"""Weights for scoring: a run's DeepSpeed tag folder (ZeRO 0/1/2/3, any saved world size) or a consolidated fp32 file,
read without an engine through DeepSpeed's own zero-to-fp32 helpers and loaded into the model the run's config builds.
`ltm eval`, `ltm predict`, `ltm export`, the sweep and the launcher's pre-flight checks read checkpoints here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from ltm import distributed  # noqa: F401  (sets DS_ACCELERATOR=cpu without CUDA before DeepSpeed's zero_to_fp32 loads)
from ltm.checkpoint import CheckpointError, resolve_tag, run_config
from ltm.checkpoint.safe_load import load_file, weights_only_loads
from ltm.config import Config

log = logging.getLogger(__name__)


def _find_corrupt(files: list[Path]) -> Path | None:
    """The first file that is not a readable torch zip archive (truncated, overwritten, not a checkpoint)."""
    for f in files:
        try:
            with zipfile.ZipFile(f) as zf:
                if zf.testzip() is not None:
                    return f
        except (zipfile.BadZipFile, OSError):
            return f
    return None


def _quietly(fn, *args, **kwargs):
    """DeepSpeed's zero_to_fp32 prints progress to stdout; keep `ltm eval`'s output to the table and paths."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):  # its tqdm bar goes to stderr
        out = fn(*args, **kwargs)
    for line in buf.getvalue().splitlines():
        log.debug("zero_to_fp32: %s", line)
    return out


def _frozen_from_module(model_files: list[Path]) -> dict[str, torch.Tensor]:
    """The full tensors of the saved module: at ZeRO-1 DeepSpeed leaves frozen parameters (model.tune) out of
    `frozen_param_shapes`, so its zero-to-fp32 helper returns none of them; they never change, and the module saved
    beside the partitions holds them whole (in the training dtype). ZeRO-2 and 3 store them with the partitions
    (ZeRO-3's module holds empty placeholders, skipped here); the helper's values take precedence."""
    if len(model_files) != 1:  # ZeRO-3: one model-states file per rank, its parameters partitioned
        return {}
    module = load_file(model_files[0]).get("module") or {}
    return {k: v for k, v in module.items() if torch.is_tensor(v) and v.numel() > 0}


def load_checkpoint_weights(tag_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """fp32 state dict of the model saved in a DeepSpeed tag folder, on CPU.

    ZeRO 1/2/3 keep the fp32 master weights partitioned over the ranks' `*_optim_states.pt`; DeepSpeed's
    `get_fp32_state_dict_from_zero_checkpoint` stitches them (any saved world size), and frozen parameters missing
    from its answer (ZeRO-1) come from the saved module (`_frozen_from_module`). ZeRO stage 0 writes no
    partitioned optimizer files and the helper does not apply: the full model is `module` in
    `mp_rank_00_model_states.pt` (fp32 unless the run trained in bf16/fp16, then the half-precision copy).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint


    tag_dir = Path(tag_dir)
    model_files = sorted(tag_dir.glob("*_model_states.pt"))
    optim_files = sorted(tag_dir.glob("*_optim_states.pt"))
    if not model_files:
        raise CheckpointError(f"{tag_dir / 'mp_rank_00_model_states.pt'}: no such file (no *_model_states.pt in "
                              f"the tag folder: an incomplete or foreign checkpoint)")
    try:
        if optim_files:
            with weights_only_loads(model_files + optim_files):  # the helper itself unpickles everything
                state = _quietly(get_fp32_state_dict_from_zero_checkpoint, str(tag_dir.parent), tag=tag_dir.name)
            state = {**_frozen_from_module(model_files), **state}
        else:
            saved = load_file(model_files[0])
            if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
                raise CheckpointError(f"{model_files[0]}: no 'module' state dict (not a DeepSpeed model state file)")
            state = saved["module"]
            precision = {k for k in ("bf16", "fp16") if (saved.get("ds_config") or {}).get(k, {}).get("enabled")}
            if precision:
                log.warning("%s: ZeRO stage 0 %s run: evaluating its %s weights (no fp32 master copy is stored "
                            "in a form DeepSpeed's helpers read)", model_files[0], *precision, *precision)
    except CheckpointError:  # also a refused (unsafe) file, with its own message
        raise
    except Exception as exc:  # noqa: BLE001 - torch/DeepSpeed raise many kinds for a damaged checkpoint
        bad = _find_corrupt(model_files + optim_files)
        if bad is not None:
            raise CheckpointError(f"checkpoint file {str(bad)!r}: corrupt or truncated ({exc})") from exc
        raise CheckpointError(f"checkpoint {str(tag_dir)!r}: cannot be read: {exc}") from exc
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A consolidated state dict (`torch.save(model.state_dict())`, zero_to_fp32's output, or {'module': ...})."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r}: no such file")
    try:
        state = load_file(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"weights file {str(path)!r}: corrupt or not a torch state dict ({exc})") from exc
    for key in ("module", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {str(path)!r}: not a state dict of tensors")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def fit_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, config_path: str) -> None:
    """`load_state_dict(strict=True)`, with a message that names both files when they do not belong together."""
    from ltm.models.weights import state_mismatch

    parts = state_mismatch(model.state_dict(), state)
    if parts:
        raise CheckpointError(f"weights {source!r} do not fit the model built from {config_path!r} "
                              f"(model/config mismatch): {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def load_model(
    run_dir: str | os.PathLike,
    tag: str | None = None,
    weights: str | os.PathLike | None = None,
    cfg_overrides: list[str] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, Config, str]:
    """(model in eval mode on `device`, the run's config, the checkpoint it came from)."""
    from ltm.models import build_model

    run = Path(run_dir)
    cfg = run_config(run, cfg_overrides)
    if weights is not None:
        source = str(Path(weights))
        state = load_weights_file(weights)
    else:
        tag_dir = resolve_tag(run, tag)
        source = str(tag_dir)
        state = load_checkpoint_weights(tag_dir)
    model = build_model(cfg.model, cfg.data.image_size, load_weights=False)  # the checkpoint's weights follow
    fit_weights(model, state, source, str(run / "config.yaml"))
    model.to(device).eval()
    return model, cfg, source
