"""One method at any number of ranks: what splitting the global batch over GPUs changes, and what keeps it the same.

`train.batch_size` is the global batch, so `--nodes 2 --ntasks-per-node 8` runs the paper's 32 images as 2 per rank.
Three parts of the method would then see 2 images instead of 32: BatchNorm's batch statistics (`train.sync_bn`:
torch's SyncBatchNorm, through timm's converter so that timm's BatchNorm+activation layers keep their activation),
deep mixup's partners (`model.mixup_scope=global`, `ltm.models.masking.global_deep_mixup`) and the gradient
all-reduce's precision (fp32 communication in `ltm.train.trainer.deepspeed_config`). What these cannot cover is said
as a warning at `ltm train` and `ltm submit train`, with the fix in the line (`batch_warnings`).
`train.lr_scaling=linear` scales the learning rate with a global batch raised beyond the paper's 32 (`scaled_lr`).
docs/training.md "Many GPUs".
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ltm.config import Config, ModelConfig

log = logging.getLogger(__name__)

REFERENCE_BATCH = 32  # the paper's global batch (Sec. 4.1), the batch at which train.lr is meant
MIN_BN_BATCH = 8  # images a BatchNorm layer's batch statistics should be taken over
# images a sample's mixup partner should be drawn among: 1 in 8 samples then mixes with itself (any partner), or
# about 1 in 8 with same_class, where only half of the pool shares a sample's label
MIN_MIXUP_POOL = {"any": 8, "same_class": 16}


def scaled_lr(cfg: Config) -> float:
    """`train.lr`, or with `train.lr_scaling=linear` the linear scaling rule lr x batch_size / 32 (Goyal et al.):
    the same lr per image when the global batch grows with the GPU count."""
    t = cfg.train
    return t.lr * t.batch_size / REFERENCE_BATCH if t.lr_scaling == "linear" else t.lr


def batchnorm_layers(module: nn.Module) -> int:
    """BatchNorm layers of a module (SyncBatchNorm and timm's BatchNormAct included)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def backbone_batchnorm_layers(cfg: ModelConfig) -> int:
    """BatchNorm layers of the CNNs the model is built from, counted on the meta device (no weights, no memory)."""
    import timm

    names = [cfg.backbone] if cfg.kind == "baseline" else [cfg.backbone, cfg.teacher_backbone or cfg.backbone]
    count = 0
    with torch.device("meta"):
        for name in names:
            try:
                count += batchnorm_layers(timm.create_model(name, pretrained=False, num_classes=0, global_pool=""))
            except RuntimeError:  # an unknown name: building the model says so with its own message
                continue
    return count


def sync_batchnorm(model: nn.Module, cfg: Config, world_size: int, device: torch.device) -> tuple[nn.Module, bool]:
    """(model, synced): with `train.sync_bn` and several ranks on GPUs, every BatchNorm layer converted to
    SyncBatchNorm (timm's converter: its BatchNormAct layers keep their activation, which torch's own converter
    drops). Parameters and buffers are moved, not copied, so the optimizer and checkpoints see the same tensors
    under the same keys.

    A world of one keeps its BatchNorm layers (SyncBatchNorm would compute the same). On the CPU nothing is
    converted: torch's SyncBatchNorm has no CPU kernels (it refuses CPU input whenever a process group exists), so
    each rank normalises over its own images and a warning says so.
    """
    if not cfg.train.sync_bn or world_size == 1 or not batchnorm_layers(model):
        return model, False
    if device.type == "cpu":
        log.warning("train.sync_bn=true needs GPUs (torch's SyncBatchNorm has no CPU kernels): on the CPU each of the "
                    "%d ranks normalises BatchNorm over its own images", world_size)
        return model, False
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model), True


def batch_warnings(cfg: Config, world_size: int, sync_bn: bool, bn_layers: int, gpus: bool = True) -> list[str]:
    """What splitting the global batch over `world_size` ranks changes in the method and the options do not cover,
    one line each with the fix: BatchNorm statistics over fewer than MIN_BN_BATCH images (`sync_bn`: whether they
    are synchronised), deep mixup partners among fewer than MIN_MIXUP_POOL images. Only what the split changes is
    said: a world of one, or a global micro-batch that is itself small, gives no line. `gpus`: SyncBatchNorm can
    run (it is offered as a fix only then). Raises ValueError when the batch does not divide over the ranks."""
    from ltm.data import per_rank_batch

    t, m = cfg.train, cfg.model
    micro = per_rank_batch(cfg, world_size)
    whole = micro * world_size  # one micro-batch of every rank: what a world of one sees per forward
    split = (f"train.batch_size={t.batch_size} over {world_size} ranks"
             + (f" x train.grad_accum={t.grad_accum}" if t.grad_accum > 1 else "") + f" is {micro} images per rank")
    bigger = MIN_BN_BATCH * world_size * t.grad_accum
    more = (f"train.batch_size={bigger} with train.lr_scaling=linear (lr x {bigger / REFERENCE_BATCH:g})"
            if t.lr_scaling == "none" else f"train.batch_size={bigger}")
    out = []
    norm_batch = whole if sync_bn else micro
    if bn_layers and not m.freeze_bn and norm_batch < min(MIN_BN_BATCH, whole):
        fixes = ([f"train.sync_bn=true (statistics over all {whole})"] if gpus else []) + [
            "model.freeze_bn=true (the pretrained statistics)", more, "fewer ranks"]
        out.append(f"{split}: BatchNorm ({bn_layers} layers) normalises over {micro} images where a world of one "
                   f"uses {whole}; set {' or '.join(fixes)}")
    if m.kind == "ltm" and m.mixup:
        need = MIN_MIXUP_POOL[m.mixup_partner]
        pool = whole if m.mixup_scope == "global" else micro
        if pool < min(need, whole):
            out.append(f"{split}: deep mixup (model.mixup_scope=rank, model.mixup_partner={m.mixup_partner}) draws "
                       f"each sample's partner among {micro} images, so many samples mix with themselves; set "
                       f"model.mixup_scope=global (partners among all {whole}) or {more}")
    if t.precision == "bf16" and t.grad_accum > 1 and t.zero_stage != 2:
        out.append(f"train.grad_accum={t.grad_accum} with train.precision=bf16 and train.zero_stage={t.zero_stage}: "
                   "the micro-batches' gradients are summed in bf16; set train.zero_stage=2 (fp32 accumulation) or "
                   "train.grad_accum=1")
    return out
