"""Backbones: any timm model name, returning its last feature map `X = CNN(img)` of shape (B, C, h, w).

CNNs here; timm Vision Transformers (CLIP, DINOv2, SigLIP) in `ltm.models.foundation`, whose patch tokens are laid
out as the same (B, C, h, w) grid; `ltm.models.foundation.build_backbone` picks the class by the name's timm module.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

import timm
import timm.data
import torch
from torch import nn

from ltm.models.weights import WeightsError, load_pretrained

ACTIVATION_CHECKPOINTING = (False, "blocks", "every_k")  # train.activation_checkpointing
STAGE_NAME = re.compile(r"^(layer|block)\d+$")  # ResNet's layer1.., Xception's block1.. (no `blocks`/`stages` list)


class BackboneError(ValueError):
    """A backbone that cannot be built or a weights file that does not fit; the message names it."""


class Backbone(nn.Module):
    """A timm model cut before its pooling and classifier, normalising its own [0, 1] input.

    `normalize`: subtract the mean and divide by the std of the architecture's pretrained config (timm's
    `resolve_data_config`), so a teacher and a student of different families (Table 5) each get theirs while the
    loaders keep delivering [0, 1] pixels. The constants are non-persistent buffers: they follow `.to()` but are
    not in checkpoints, which keeps old checkpoints loadable.

    `freeze_bn`: every BatchNorm layer stays in eval mode while the module trains, so it normalises by its
    pretrained running statistics and never updates them; its affine scale and shift still learn.
    """

    is_vit = False
    # timm.create_model arguments of the family: a CNN is cut before its pooling (ViTs keep theirs: foundation.py)
    create_kwargs: dict = {"global_pool": ""}

    def __init__(self, name: str, pretrained: str | os.PathLike | None = None, normalize: bool = True,
                 output_stride: int | None = None, freeze_bn: bool = False, **create):
        super().__init__()
        extra = {"output_stride": output_stride} if output_stride else {}
        try:
            self.net = timm.create_model(name, pretrained=False, num_classes=0, **self.create_kwargs, **extra,
                                         **create)
        except RuntimeError as exc:  # timm raises RuntimeError for unknown names
            raise BackboneError(f"backbone {name!r}: {exc}") from exc
        except (TypeError, AssertionError, ValueError) as exc:
            if create and not output_stride:  # an argument of model.backbone_args the family does not take
                raise BackboneError(f"backbone {name!r} with model.backbone_args {create}: {exc}") from exc
            # a family without dilation support
            raise BackboneError(f"backbone {name!r} with model.output_stride={output_stride}: {exc}") from exc
        self.name = name
        if not self.is_vit and hasattr(self.net, "num_prefix_tokens"):
            raise BackboneError(f"backbone {name!r} ({type(self.net).__name__}) gives tokens, not a (B, C, h, w) map: "
                                "of the token models only timm VisionTransformers (CLIP, DINOv2, SigLIP, DeiT) are "
                                "backbones here")
        self.channels: int = self.net.num_features
        self.normalize = normalize
        self.freeze_bn = freeze_bn
        data_cfg = timm.data.resolve_data_config({}, model=self.net)
        # clones, not views: DeepSpeed's bf16 swaps a buffer's `.data` for a bf16 copy, and a view would keep its fp32
        # base, which torch.compile refuses to trace ("float32 != bfloat16")
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1).clone(), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1).clone(), persistent=False)
        self.weights_source = "random"
        if pretrained:
            try:
                self.weights_source = load_pretrained(self.net, name, pretrained)
            except WeightsError as exc:
                raise BackboneError(str(exc)) from exc
        self.train()  # a module starts in training mode without train() being called: apply freeze_bn now

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if self.freeze_bn:
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def normalized(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalized(images))

    def pooled(self, images: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The image's feature vector (B, C): the feature map averaged over its h*w positions. `keep` (token masking)
        is for ViTs only."""
        if keep is not None:
            raise BackboneError(f"backbone {self.name!r} is a CNN: model.mask_at=tokens needs a ViT student")
        return self(images).mean(dim=(2, 3))

    def checkpoint_units(self) -> list[nn.Module]:
        """The modules `train.activation_checkpointing` recomputes in the backward, in forward order: a CNN's stages
        (timm's `blocks` or `stages` sequence, else its `layer<N>` / `block<N>` children)."""
        for attr in ("blocks", "stages"):
            seq = getattr(self.net, attr, None)
            if isinstance(seq, (nn.Sequential, nn.ModuleList)):
                return list(seq)
        return [m for name, m in self.net.named_children() if STAGE_NAME.match(name)]

    @torch.no_grad()
    def grid(self, image_size: int) -> tuple[int, int]:
        """(h, w) of the feature map at this input size (one dry run on a single blank image)."""
        was_training = self.training
        self.eval()
        param = next(self.parameters())
        try:
            out = self(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
        except (RuntimeError, AssertionError) as exc:  # timm asserts a fixed input size
            raise BackboneError(f"backbone {self.name!r} cannot take {image_size} px input: {exc}") from exc
        self.train(was_training)
        if out.dim() != 4:
            raise BackboneError(f"backbone {self.name!r} gives {tuple(out.shape)} features, not a (B, C, h, w) map")
        return int(out.shape[-2]), int(out.shape[-1])



@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of `module` normalise by the batch as in training but leave their running statistics (and
    batch count) as they were: a recomputed forward must not update them a second time. Momentum 0 rather than
    `track_running_stats=False`, which would change the kernel's inputs (checkpointing requires the recomputation to
    save the same tensors as the forward)."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.training and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def checkpointed_forward(module: nn.Module) -> None:
    """Replace `module`'s forward (on the instance: state-dict keys and hooks stay) by one that keeps only its input
    and recomputes its activations in the backward (torch.utils.checkpoint, non-reentrant: DeepSpeed's ZeRO-3 hooks
    and parameters that need no gradient work under it; the CPU and GPU random states are restored for the
    recomputation, so dropout and drop-path draw the same values). Without gradients it runs as it was."""
    forward = module.forward

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        calls = []

        def once_then_quietly(*a, **k):
            # the second call is the backward's recomputation: BatchNorm must not count that batch twice
            calls.append(None)
            if len(calls) == 1:
                return forward(*a, **k)
            with frozen_running_stats(module):
                return forward(*a, **k)

        return torch.utils.checkpoint.checkpoint(once_then_quietly, *args, use_reentrant=False,
                                                 preserve_rng_state=True, **kwargs)

    module.forward = run


def set_activation_checkpointing(model: nn.Module, mode: bool | str, every_k: int = 2) -> int:
    """`train.activation_checkpointing` on every backbone of `model`: `blocks` recomputes each ViT block and CNN stage
    in the backward, `every_k` the 1st, (k+1)-th, ... of each backbone (memory between the two); false leaves the model
    as built. Returns how many modules were wrapped."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing={mode!r}: expected one of {list(ACTIVATION_CHECKPOINTING)}")
    if not mode:
        return 0
    step = every_k if mode == "every_k" else 1
    wrapped = 0
    for backbone in [m for m in model.modules() if isinstance(m, Backbone)]:
        for unit in backbone.checkpoint_units()[::step]:
            checkpointed_forward(unit)
            wrapped += 1
    return wrapped
