"""Checkpoints of a run: save, verify, resume, keep the last K, universal conversion (docs/run-folder.md,
"Checkpoint layout").

Layout of `<run>/checkpoints/`:

    step00000300/                       one tag per save, written by every rank together
        mp_rank_00_model_states.pt      DeepSpeed: module weights, client_state (epoch, step, config, ...)
        [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   DeepSpeed: each rank's ZeRO optimizer partition
        rank00000_state.pt              ours: that rank's loader state and RNG states
        complete.json                   ours, written last: every file of the tag with its size
    latest                              the newest complete tag (one line, DeepSpeed's format)
    universal/step00000300/             a tag converted for loading at another world size

A save is complete only once `complete.json` exists, and `latest` moves only after that. DeepSpeed's own
`save_latest` writes `latest` on rank 0 as soon as rank 0's files are written — before the other ranks' optimizer
partitions are, and not atomically — so it is turned off and `latest` is replaced here by a rename after a barrier.
A process killed in the middle of a save therefore leaves `latest` naming the previous, loadable checkpoint.

Rank state and universal conversion read files weights-only (`ltm.checkpoint.safe_load`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltm.checkpoint import CheckpointError
from ltm.checkpoint.safe_load import UnsafeCheckpointError, load_file
from ltm.distributed import barrier

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step(\d{8})$")
COMPLETE = "complete.json"
LATEST = "latest"
UNIVERSAL = "universal"
# Lets DeepSpeed's universal loader accept the checkpoint (Megatron-DeepSpeed stores the same key).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}



def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    if not m:
        raise CheckpointError(f"checkpoint tag {tag!r}: expected step<8 digits>, e.g. {tag_for(300)}")
    return int(m.group(1))


def rank_state_name(rank: int) -> str:
    return f"rank{rank:05d}_state.pt"


# ------------------------------------------------------------------------------------------------ atomic writes


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def free_space(folder: Path) -> str:
    """How much room the filesystem holding `folder` has left, as a sentence part for error messages."""
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return f"free space on {folder} unknown"
    return f"{usage.free / 2**20:,.0f} MiB free of {usage.total / 2**30:,.1f} GiB on the filesystem of {folder}"


def torch_save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ RNG states


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator a training step draws from: torch (mask `random`, mixup permutation and Beta), numpy, python,
    and on a GPU the generator of the rank's own `device` only.

    Only the rank's own GPU: a rank draws from no other, and a list of every visible GPU's state indexed by device
    number does not survive a resume on another layout (1x8 -> 2x4: the same rank on another device index).
    """
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore `rng_state`'s generators; the saved GPU stream goes to this rank's `device`, whatever its index.

    Checkpoints written before per-device saving hold a list with every visible GPU's state: the entry at this
    device's index is restored (the stream the old code restored for this device, right when the layout has not
    changed). A stream that cannot be restored (a checkpoint saved on the CPU resumed on a GPU, a missing key, an
    old list without this device's entry) is logged and restarts from the rank's seed.
    """
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type != "cuda":
        return  # a CPU rank draws from no GPU generator; a GPU-saved stream has nowhere to go
    saved = state.get("cuda")
    if isinstance(saved, (list, tuple)):
        if device.index is not None and device.index < len(saved):
            log.warning("checkpoint RNG state holds all %d GPUs of the saving rank (the old format): restoring entry "
                        "%d to %s, which is this rank's stream only if the GPU layout is unchanged",
                        len(saved), device.index, device)
            saved = saved[device.index]
        else:
            log.warning("checkpoint RNG state holds %d GPUs' states (the old format) and none for %s: this rank's "
                        "GPU random stream restarts from its seed", len(saved), device)
            return
    if saved is None:
        log.warning("checkpoint RNG state has no GPU stream (saved on the CPU?): the random stream of %s restarts "
                    "from the rank's seed", device)
        return
    torch.cuda.set_rng_state(saved, device)


# ------------------------------------------------------------------------------------------------ the checkpointer


class Checkpointer:
    """Saves and finds the tags of one run's `checkpoints/` folder; every rank holds one and calls `save` together."""

    def __init__(self, ckpt_dir: str | os.PathLike, rank: int = 0, world_size: int = 1, keep_last: int = 3):
        self.dir = Path(ckpt_dir)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    # --- finding tags
    def tags(self) -> list[str]:
        """Complete tags, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p.name for p in self.dir.iterdir() if TAG_RE.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(found, key=step_of)

    def latest(self) -> str | None:
        path = self.dir / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not TAG_RE.match(tag):
            raise CheckpointError(f"{path}: names {tag!r}, not a checkpoint tag")
        return tag

    def resolve(self, resume: str) -> str | None:
        """`auto`: the tag `latest` names, or None for a fresh run; `never`: None; else that tag (it must exist)."""
        if resume == "never":
            return None
        if resume == "auto":
            tag = self.latest()
            if tag is not None:
                self.verify(tag)
            return tag
        step_of(resume)
        if not (self.dir / resume).is_dir():
            have = ", ".join(self.tags()) or "none"
            raise CheckpointError(f"checkpoint {self.dir / resume}: no such tag (complete tags: {have})")
        self.verify(resume)
        return resume

    def verify(self, tag: str) -> dict:
        """The tag's `complete.json`, after checking that every file it lists is there with its recorded size."""
        folder = self.dir / tag
        marker = folder / COMPLETE
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint {folder}: no such folder (named by {self.dir / LATEST})")
        if not marker.is_file():
            raise CheckpointError(f"checkpoint {folder}: incomplete, {COMPLETE} is missing (a save was interrupted)")
        try:
            info = json.loads(marker.read_text())
        except ValueError as exc:
            raise CheckpointError(f"checkpoint file {marker}: not valid JSON ({exc})") from exc
        for name, size in info["files"].items():
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path}: missing (listed in {marker})")
            if path.stat().st_size != size:
                raise CheckpointError(
                    f"checkpoint file {path}: corrupt, {path.stat().st_size} bytes where {size} were written"
                )
        return info

    # --- saving
    def save(self, engine: Any, step: int, client_state: dict, rank_state: dict) -> str:
        """Every rank calls this at the same step: per-rank state, DeepSpeed's files, then the marker and `latest`."""
        tag = tag_for(step)
        folder = self.dir / tag
        if self.rank == 0:
            if folder.exists():  # a save interrupted earlier, or a later tag of a run resumed from an older one
                shutil.rmtree(folder)
            shutil.rmtree(self.dir / UNIVERSAL / tag, ignore_errors=True)
            folder.mkdir(parents=True)
        barrier()
        try:
            torch_save_atomic(rank_state, folder / rank_state_name(self.rank))
            engine.save_checkpoint(str(self.dir), tag=tag, client_state={**client_state, **UNIVERSAL_INFO},
                                   save_latest=False)  # ends with a barrier: every rank's files are written
        except (OSError, RuntimeError) as exc:  # torch's C++ writer says "iostream error" for a full disk
            raise CheckpointError(
                f"checkpoint {folder}: saving failed on rank {self.rank} ({type(exc).__name__}: {exc}); "
                f"{free_space(self.dir)}; {LATEST} still names {self.latest() or 'no checkpoint'}, which a rerun "
                f"resumes from"
            ) from exc
        if self.rank == 0:
            files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
            info = {"tag": tag, "step": step, "world_size": self.world_size, "files": files,
                    "zero_stage": engine.zero_optimization_stage(), "time": time.time()}
            write_text_atomic(folder / COMPLETE, json.dumps(info, indent=1))
            write_text_atomic(self.dir / LATEST, tag)
            self.prune()
        barrier()
        return tag

    def prune(self) -> None:
        """Keep the last `keep_last` complete tags (and always the one `latest` names); drop older ones."""
        tags = self.tags()
        keep = set(tags[-self.keep_last:]) | {self.latest()}
        for tag in tags:
            if tag not in keep:
                shutil.rmtree(self.dir / tag, ignore_errors=True)
                shutil.rmtree(self.dir / UNIVERSAL / tag, ignore_errors=True)
                log.info("removed old checkpoint %s (train.keep_last=%d)", tag, self.keep_last)

    def drop_incomplete(self) -> None:
        """Remove tag folders without a marker: the leftovers of saves killed midway (rank 0, before training)."""
        if self.rank != 0 or not self.dir.is_dir():
            return
        for p in self.dir.iterdir():
            if TAG_RE.match(p.name) and p.is_dir() and not (p / COMPLETE).is_file():
                log.warning("removing incomplete checkpoint %s (its save was interrupted)", p)
                shutil.rmtree(p)

    # --- loading
    def needs_universal(self, tag: str) -> bool:
        """ZeRO partitions (and bf16 stage 0's) are per rank: another world size loads them only after conversion."""
        info = self.verify(tag)
        partitioned = any("zero_pp_rank_" in name for name in info["files"])
        return partitioned and info["world_size"] != self.world_size

    def to_universal(self, tag: str) -> Path:
        """Rank 0 converts the tag into DeepSpeed's universal layout (once; atomic), the others wait for it."""
        out = self.dir / UNIVERSAL / tag
        if self.rank == 0 and not (out / COMPLETE).is_file():
            log.info("converting %s to a universal checkpoint at %s", self.dir / tag, out)
            tmp = out.with_name(f".{tag}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            convert_to_universal(self.dir / tag, tmp)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        barrier()
        return out

    def load(self, engine: Any, tag: str, universal: bool = False) -> tuple[dict, dict | None]:
        """Weights, optimizer and client_state into `engine`; this rank's saved state (None if it has none)."""
        load_dir = self.dir / UNIVERSAL if universal else self.dir
        try:
            path, client_state = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=False)
        except Exception as exc:  # DeepSpeed and torch.load raise many kinds; name the file that is broken
            raise CheckpointError(f"checkpoint {load_dir / tag}: cannot be loaded: {describe_damage(load_dir / tag)}"
                                  f" ({type(exc).__name__}: {exc})") from exc
        if path is None:
            raise CheckpointError(f"checkpoint {load_dir / tag}: DeepSpeed found nothing to load")
        if universal:
            # The universal loader restores parameters from zero/ and skips the module state dict, buffers and
            # all (it was built for models without any); BatchNorm running statistics come from the saved module.
            saved = load_file(path)["module"]
            with torch.no_grad():
                for name, buf in engine.module.named_buffers():
                    if name in saved:
                        buf.copy_(saved[name])
        own = self.dir / tag / rank_state_name(self.rank)
        if not own.is_file():
            return client_state, None
        try:
            rank_state = load_file(own)
        except UnsafeCheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"checkpoint file {own}: cannot be read ({type(exc).__name__}: {exc})") from exc
        return client_state, rank_state


def describe_damage(folder: Path) -> str:
    """Which `.pt` files of a tag folder are not readable zip archives (torch.save's format), for the error text."""
    bad = []
    for p in sorted(folder.glob("*.pt")):
        try:
            with zipfile.ZipFile(p) as z:
                if z.testzip() is not None:
                    bad.append(str(p))
        except (zipfile.BadZipFile, OSError):
            bad.append(str(p))
    return f"corrupt file(s): {', '.join(bad)}" if bad else "no file is damaged"


# ------------------------------------------------------------------------------------------------ universal format


def convert_to_universal(src: Path, dst: Path) -> None:
    """Write DeepSpeed's universal checkpoint layout for a ZeRO-1/2 (or bf16) checkpoint of data-parallel ranks.

    `deepspeed.checkpoint.ds_to_universal` extracts only Adam's `exp_avg`/`exp_avg_sq` and fails on SGD, whose
    state is `momentum_buffer`; its loader (`load_universal` in the DeepSpeed config) takes whatever state files
    a parameter folder holds. So this writes that same layout for every optimizer state: `zero/<param>/<state>.pt`
    holding `{"param": full tensor}` (the ranks' flat fragments joined in rank order), `zero/optimizer_state.pt`
    (the shared optimizer fields and param groups) and the model-states file copied as is.
    """
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM,
        PARAM_GROUPS,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    files = sorted(src.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))
    if not files:
        raise CheckpointError(f"checkpoint {src}: no ZeRO optimizer partitions to convert")
    model_file = src / "mp_rank_00_model_states.pt"
    model_state = load_file(model_file)
    shapes: dict[str, torch.Size] = {}
    for group in model_state["param_shapes"]:
        shapes.update(group)

    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    steps: dict[str, Any] = {}
    first: dict | None = None
    for f in files:
        osd = load_file(f)[OPTIMIZER_STATE_DICT]
        first = first or osd
        for g, mapping in enumerate(osd[PARAM_SLICE_MAPPINGS]):
            group_state = osd[BASE_OPTIMIZER_STATE]["state"].get(g, {})
            flat = {"fp32": osd[SINGLE_PARTITION_OF_FP32_GROUPS][g]}
            flat.update({k: v for k, v in group_state.items() if torch.is_tensor(v) and v.dim() == 1})
            for name, frag in mapping.items():
                for key, tensor in flat.items():
                    pieces.setdefault(name, {}).setdefault(key, []).append(tensor.narrow(0, frag.start, frag.numel))
                if "step" in group_state:
                    steps[name] = group_state["step"]

    zero = dst / "zero"
    for name, states in pieces.items():
        (zero / name).mkdir(parents=True, exist_ok=True)
        for key, parts in states.items():
            torch.save({PARAM: torch.cat(parts).clone().view(shapes[name])}, zero / name / f"{key}.pt")
        if name in steps:
            torch.save(steps[name], zero / name / "step.pt")
    # Parameters that no rank holds an optimizer fragment of still need their values.
    for name, tensor in model_state["module"].items():
        if name in shapes and name not in pieces:
            (zero / name).mkdir(parents=True, exist_ok=True)
            torch.save({PARAM: tensor.float()}, zero / name / "fp32.pt")

    assert first is not None
    shared = {k: v for k, v in first.items()
              if k not in (BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)}
    shared[PARAM_GROUPS] = first[BASE_OPTIMIZER_STATE][PARAM_GROUPS]
    torch.save(shared, zero / "optimizer_state.pt")
    shutil.copy2(model_file, dst / model_file.name)
    files_written = {p.relative_to(dst).as_posix(): p.stat().st_size for p in dst.rglob("*") if p.is_file()}
    write_text_atomic(dst / COMPLETE, json.dumps({"source": str(src), "files": files_written}, indent=1))
