"""The distributed environment: ranks from environment variables, gloo/NCCL through DeepSpeed (local launches:
`ltm.launch`).

Every entry point reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (docs/scaling.md, "Distributed
environment"): submitit, sbatch+srun, `deepspeed`, `torchrun` and `ltm train --nproc N` all set them. A process without
them runs as a world of one. Without CUDA, DeepSpeed must run its CPU accelerator, which it picks from
`DS_ACCELERATOR` at import time, so this module sets that variable before anything imports deepspeed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch.distributed as dist  # noqa: E402

from ltm.launch import free_port  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    owns_group: bool  # True when this process initialised the process group (and so tears it down)
    set_vars: tuple[str, ...] = ()  # environment variables this module set for a world of one
    replaced_vars: dict[str, str | None] = field(default_factory=dict)  # changed here: their old values

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(timeout_min: int = 30) -> DistEnv:
    """Join (or create) the process group described by the environment; a world of one when it says nothing."""
    import deepspeed
    import deepspeed.ops

    set_vars: tuple[str, ...] = ()
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        single = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
        set_vars = tuple(k for k in single if k not in os.environ)
        os.environ.update({k: single[k] for k in set_vars})
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", _env_int("SLURM_NTASKS_PER_NODE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")

    replaced_vars: dict[str, str | None] = {}
    if torch.cuda.is_available():
        index = gpu_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
        replaced_vars = point_local_rank_at(index)
    else:
        device, backend = torch.device("cpu"), "gloo"
        # Ranks sharing a machine split its cores instead of each starting one thread per core.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))
        # DeepSpeed's CPU backend builds a shared-memory all-reduce extension on first use (a ~1 min g++ build)
        # that serves only inference all-reduce; training collectives go through gloo, so it is not built.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    owns_group = not dist.is_initialized()
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_min),
                               rank=rank, world_size=world_size, verbose=False)
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend, owns_group, set_vars,
                   replaced_vars)


def gpu_index(local_rank: int, device_count: int) -> int:
    """The visible GPU a rank uses: its local rank, wrapped when the task sees fewer GPUs (`--gpus-per-task=1` or
    GPU binding shows each task only its own, as cuda:0)."""
    if device_count < 1:
        raise ValueError("CUDA is available but no GPU is visible (CUDA_VISIBLE_DEVICES?)")
    return local_rank % device_count


def point_local_rank_at(index: int) -> dict[str, str | None]:
    """Make LOCAL_RANK name GPU `index` for DeepSpeed; returns the variables changed with their previous values.

    DeepSpeed reads LOCAL_RANK as the index of the rank's GPU, not as a rank: `deepspeed.init_distributed` binds the
    NCCL group to cuda:LOCAL_RANK, and `deepspeed.initialize` sets that device and moves the model there (the
    engine's `_set_distributed_vars`). In a task that sees only its own GPU, every local rank but 0 would ask for a
    device that does not exist ("invalid device ordinal"). The variable is changed for the life of the process group
    rather than passing `args.device_rank` to `deepspeed.initialize`, because that reaches the engine only, while the
    variable reaches every DeepSpeed reader (the group's device_id, the engine, ZeRO's helpers) at once. The true
    local rank stays in `DistEnv.local_rank`, and `teardown` puts the variable back.
    """
    old = os.environ.get("LOCAL_RANK")
    if old == str(index):
        return {}
    os.environ["LOCAL_RANK"] = str(index)
    return {"LOCAL_RANK": old}


def teardown(env: DistEnv, wait_for_others: bool = True) -> None:
    """Leave the process group if this process created it, so that a later `train()` in the process starts clean.

    `wait_for_others=False` after an error: a barrier would hang when the other ranks failed too.
    """
    if env.owns_group and dist.is_initialized():
        if wait_for_others:
            barrier()
        dist.destroy_process_group()
        import deepspeed.comm.comm as ds_comm

        ds_comm.cdb = None  # DeepSpeed keeps its own handle on the destroyed group
        import deepspeed.utils.groups as ds_groups

        ds_groups._WORLD_GROUP = None  # and its clone of the world group, which a later engine would broadcast over
    for name in env.set_vars:
        os.environ.pop(name, None)
    for name, value in env.replaced_vars.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


