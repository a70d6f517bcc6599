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
import math
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

from ltm.checkpoint import TAG_RE, CheckpointError, step_of, tag_for  # noqa: F401  (tags: the package's)
from ltm.checkpoint.safe_load import UnsafeCheckpointError, load_file
from ltm.distributed import barrier

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
LATEST = "latest"
UNIVERSAL = "universal"
# Lets DeepSpeed's universal loader accept the checkpoint (Megatron-DeepSpeed stores the same key).
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}



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
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO's
        settings = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
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
            # all (it was built for models without any); BatchNorm running statistics come from the saved module,
            # frozen parameters (model.tune) from the files `convert_to_universal` wrote for them.
            saved = load_file(path)["module"]
            with torch.no_grad():
                for name, buf in engine.module.named_buffers():
                    if name in saved:
                        buf.copy_(saved[name])
            restore_frozen(engine, load_dir / tag / "zero")
            # DeepSpeed's ZeRO-3 universal loader gives every group the first group's settings: AdamW's no-decay
            # group would be decayed, the student's lr scale lost; the run's own settings stand (its lr follows the
            # restored schedule in Trainer.load)
            for group, mine in zip(base.param_groups, settings):
                group.update(mine)
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


def restore_frozen(engine: Any, zero: Path) -> None:
    """Frozen parameters (requires_grad False: no optimizer state, so DeepSpeed's universal loader leaves them as
    built) from `zero/<name>/fp32.pt`; under ZeRO-3 through a gather, each rank then keeping its partition."""
    import deepspeed

    frozen = [(n, p) for n, p in engine.module.named_parameters() if not p.requires_grad]
    missing = [n for n, _ in frozen if not (zero / n / "fp32.pt").is_file()]
    if missing:
        raise CheckpointError(f"universal checkpoint {zero.parent}: no values for {len(missing)} frozen parameters, "
                              f"e.g. {missing[0]} (converted before frozen parameters were written: delete "
                              f"{zero.parent} and resume again)")
    for name, param in frozen:
        value = load_file(zero / name / "fp32.pt")[PARAM_KEY]
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            param.copy_(value.view_as(param).to(param.dtype))


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
    """Write DeepSpeed's universal checkpoint layout for a ZeRO-1/2/3 (or bf16) checkpoint of data-parallel ranks.

    `deepspeed.checkpoint.ds_to_universal` extracts only Adam's `exp_avg`/`exp_avg_sq` and fails on SGD, whose
    state is `momentum_buffer`; its loader (`load_universal` in the DeepSpeed config) takes whatever state files
    a parameter folder holds. So this writes that same layout for every optimizer state: `zero/<param>/<state>.pt`
    holding `{"param": full tensor}` (the ranks' fragments joined in rank order), `zero/optimizer_state.pt`
    (the shared optimizer fields and param groups) and the model-states file(s) copied as they are.

    Frozen parameters (model.tune) get a `zero/<param>/fp32.pt` too, from the saved module (ZeRO-1/2) or the ranks'
    `frozen_param_fragments` (ZeRO-3): DeepSpeed's universal loader restores only what the optimizer holds, and
    `Checkpointer.load` puts these back.
    """
    files = sorted(src.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda p: int(re.search(r"zero_pp_rank_(\d+)_", p.name).group(1)))
    if not files:
        raise CheckpointError(f"checkpoint {src}: no ZeRO optimizer partitions to convert")
    model_files = sorted(src.glob("*mp_rank_00_model_states.pt"),
                         key=lambda p: int(re.sub(r"\D", "", p.name.split("_mp_rank")[0]) or 0))
    if not model_files:
        raise CheckpointError(f"checkpoint {src}: no mp_rank_00_model_states.pt")
    states = [load_file(f) for f in files]
    if any(f.name.startswith("zero_pp_rank_") for f in model_files):  # ZeRO-3: a model-states file per rank
        params, frozen, shared = _zero3_pieces(states, [load_file(f) for f in model_files], src)
    else:
        params, frozen, shared = _zero12_pieces(states, load_file(model_files[0]))
    zero = dst / "zero"
    for name, tensors in {**frozen, **params}.items():
        (zero / name).mkdir(parents=True, exist_ok=True)
        for key, tensor in tensors.items():
            torch.save(tensor if key == "step" else {PARAM_KEY: tensor}, zero / name / f"{key}.pt")
    torch.save(shared, zero / "optimizer_state.pt")
    for f in model_files:
        shutil.copy2(f, dst / f.name)
    files_written = {p.relative_to(dst).as_posix(): p.stat().st_size for p in dst.rglob("*") if p.is_file()}
    write_text_atomic(dst / COMPLETE, json.dumps({"source": str(src), "files": files_written,
                                                  "frozen": sorted(frozen)}, indent=1))


PARAM_KEY = "param"  # deepspeed.checkpoint.constants.PARAM


def _zero12_pieces(states: list[dict], model_state: dict) -> tuple[dict, dict, dict]:
    """ZeRO-1/2: each rank's flat fp32 partition and optimizer state, cut by its `param_slice_mappings`."""
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM_GROUPS,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    shapes: dict[str, torch.Size] = {}
    for group in model_state["param_shapes"]:
        shapes.update(group)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    steps: dict[str, Any] = {}
    for state in states:
        osd = state[OPTIMIZER_STATE_DICT]
        for g, mapping in enumerate(osd[PARAM_SLICE_MAPPINGS]):
            group_state = osd[BASE_OPTIMIZER_STATE]["state"].get(g, {})
            flat = {"fp32": osd[SINGLE_PARTITION_OF_FP32_GROUPS][g]}
            flat.update({k: v for k, v in group_state.items() if torch.is_tensor(v) and v.dim() == 1})
            for name, frag in mapping.items():
                for key, tensor in flat.items():
                    pieces.setdefault(name, {}).setdefault(key, []).append(tensor.narrow(0, frag.start, frag.numel))
                if "step" in group_state:
                    steps[name] = group_state["step"]
    params = {name: {key: torch.cat(parts).clone().view(shapes[name]) for key, parts in keys.items()}
              for name, keys in pieces.items()}
    for name, step in steps.items():
        params[name]["step"] = step
    module = model_state["module"]
    buffers = set(model_state.get("buffer_names") or [])
    # a trainable parameter that no rank holds a fragment of, and every frozen one (not in param_shapes): the saved
    # module holds it whole at ZeRO-1/2
    for name in shapes:
        if name not in params and name in module:
            params[name] = {"fp32": module[name].float()}
    frozen = {name: {"fp32": tensor.float()} for name, tensor in module.items()
              if name not in shapes and name not in buffers and tensor.is_floating_point()}
    first = states[0][OPTIMIZER_STATE_DICT]
    shared = {k: v for k, v in first.items()
              if k not in (BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)}
    shared[PARAM_GROUPS] = first[BASE_OPTIMIZER_STATE][PARAM_GROUPS]
    return params, frozen, shared


def _zero3_pieces(states: list[dict], model_states: list[dict], src: Path) -> tuple[dict, dict, dict]:
    """ZeRO-3: each rank's flat groups hold, parameter after parameter in `param_shapes` order, its
    ceil(numel / world) elements of each (the last rank's padded); the optimizer's state tensors are laid out as the
    flat groups. Frozen parameters are the ranks' `frozen_param_fragments`, cut the same way."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT

    world = len(states)
    shapes: dict[str, torch.Size] = {}
    for group in model_states[0]["param_shapes"]:
        shapes.update(group)
    flats: dict[str, list[torch.Tensor]] = {}  # state key -> each rank's groups joined into one flat tensor
    step = None
    for state in states:
        osd = state[OPTIMIZER_STATE_DICT]
        groups = osd[FP32_FLAT_GROUPS]
        base = osd[OPTIMIZER_STATE_DICT]["state"]
        keys = {k for g in base.values() for k, v in g.items() if torch.is_tensor(v) and v.dim() == 1}
        flats.setdefault("fp32", []).append(torch.cat([g.reshape(-1) for g in groups]))
        for key in keys:
            flats.setdefault(key, []).append(torch.cat([base[i][key].reshape(-1) for i in range(len(groups))]))
        step = next((g["step"] for g in base.values() if "step" in g), step)
    unsupported = sorted(set(flats) - {"fp32", "exp_avg", "exp_avg_sq"})
    if unsupported:
        # DeepSpeed's ZeRO-3 universal loader reads these three files per parameter and nothing else
        raise CheckpointError(f"checkpoint {src}: ZeRO-3 optimizer state {unsupported} cannot be converted for "
                              "another world size (DeepSpeed's ZeRO-3 universal loader takes Adam's state only: "
                              "train.optimizer=adamw)")
    params: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, shape in shapes.items():
        part = math.ceil(shape.numel() / world)
        params[name] = {key: torch.cat([r.narrow(0, offset, part) for r in per_rank])[:shape.numel()].clone()
                        .view(shape) for key, per_rank in flats.items()}
        if step is not None:
            params[name]["step"] = step
        offset += part
    if offset != flats["fp32"][0].numel():
        raise CheckpointError(f"checkpoint {src}: the ZeRO-3 partitions hold {flats['fp32'][0].numel()} elements per "
                              f"rank where the parameter shapes need {offset}")
    frozen = {}
    for name, shape in (model_states[0].get("frozen_param_shapes") or {}).items():
        parts = [m["frozen_param_fragments"][name].reshape(-1) for m in model_states]
        frozen[name] = {"fp32": torch.cat(parts)[:shape.numel()].float().clone().view(shape)}
    first = states[0][OPTIMIZER_STATE_DICT]
    shared = {k: v for k, v in first.items() if k not in (FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT)}
    inner = first[OPTIMIZER_STATE_DICT]
    shared[OPTIMIZER_STATE_DICT] = {"state": {i: {"step": g["step"]} for i, g in inner["state"].items() if "step" in g},
                                    "param_groups": inner["param_groups"]}
    return params, frozen, shared
