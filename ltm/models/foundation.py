"""Foundation-model Vision Transformers (CLIP, DINOv2, SigLIP, any timm `VisionTransformer`) as ltm backbones.

A ViT backbone fits where a CNN does: its patch tokens after the final norm are laid out as the (B, D, h, w) grid
that Eq. 2-4, the teacher's small ViT and the pictures use, its prefix tokens (CLS, registers) kept aside. Its input
is normalised with its own weights' mean and std (OpenAI CLIP's are not ImageNet's), and its position embeddings are
sized for the run's image size (DINOv2's default is 518 px; timm resamples pretrained ones when they are loaded).

The student's mask acts on its token sequence (`model.mask_at=tokens`): the patch tokens under M = 0 are dropped
before block `model.mask_block` (`mask_fill=drop`, as MAE and timm's PatchDropout drop random ones, so every later
block runs on (1 - mask_ratio) of the patches) or replaced by a learned mask token (`mask_fill=token`, as iBOT and
AttMask do). Prefix tokens are never dropped. The image's feature vector is the model's own pooling (CLIP and DINOv2:
the CLS token) over what remains.
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
from torch import nn

from ltm.models.backbone import Backbone, BackboneError

VIT_MODULES = ("vision_transformer",)  # timm modules whose models are `VisionTransformer`s


def is_vit_name(name: str) -> bool:
    """Whether timm builds `name` (with or without its `.tag`) as a `VisionTransformer`."""
    try:
        return bool(timm.models.is_model_in_modules(name.split(".")[0], VIT_MODULES))
    except Exception:  # noqa: BLE001 - an unknown name: the CNN path reports it
        return False


class ViTBackbone(Backbone):
    """A timm Vision Transformer: `forward` gives the patch-token grid (B, D, h, w); `pooled` the image's feature
    vector with optional token masking."""

    is_vit = True
    create_kwargs: dict = {}  # the model's own pooling is kept: `pooled` uses it

    def __init__(self, name: str, pretrained: str | os.PathLike | None = None, normalize: bool = True,
                 image_size: int = 224, mask_token: bool = False, **create: Any):
        super().__init__(name, pretrained, normalize, img_size=image_size, **create)
        net = self.net
        if not isinstance(net, timm.models.vision_transformer.VisionTransformer):
            raise BackboneError(f"backbone {name!r}: not a timm VisionTransformer ({type(net).__name__})")
        if getattr(net, "dynamic_img_size", False):
            raise BackboneError(f"backbone {name!r}: dynamic image sizes are not supported (pass a fixed img_size)")
        self.num_prefix_tokens: int = net.num_prefix_tokens
        self.token_grid: tuple[int, int] = tuple(net.patch_embed.grid_size)
        # iBOT's learned [MASK] embedding; zeros at init, as timm's DINOv2 mask_token
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.channels)) if mask_token else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.net.forward_features(self.normalized(images))
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *self.token_grid)

    def grid(self, image_size: int) -> tuple[int, int]:
        size = tuple(self.net.patch_embed.img_size)
        if size != (image_size, image_size):
            raise BackboneError(f"backbone {self.name!r} was built for {size[0]} px, not {image_size}")
        return self.token_grid

    def pooled(self, images: torch.Tensor, keep: torch.Tensor | None = None, block: int = 0,
               keep_count: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D): the model's pooling (CLS token, or the mean of the patch tokens that remain).

        `keep` (B, h, w), 1 for the patch tokens the student sees: the others are dropped from the sequence (or, with
        a mask token, replaced) before block `block` (0: after the patch and position embedding; `len(blocks)`: before
        the final norm). Every row must keep the same number of tokens, `keep_count` (counted from `keep` if not
        given), so the batch stays one tensor.
        """
        net = self.net
        x = net.patch_embed(self.normalized(images))  # (B, h*w, D)
        keep_flat = None if keep is None else keep.flatten(1).to(torch.bool)
        if keep_flat is not None and block == 0 and self.mask_token is not None:
            # iBOT: the mask token replaces the patch embedding, then takes the position's embedding like any token
            x = torch.where(keep_flat[..., None], x, self.mask_token.to(x.dtype))
        x = net.norm_pre(net.patch_drop(net._pos_embed(x)))
        depth = len(net.blocks)
        if keep_flat is not None and not 0 <= block <= depth:
            raise BackboneError(f"model.mask_block={block}: backbone {self.name!r} has blocks 0..{depth}")
        for i, blk in enumerate(net.blocks):
            if keep_flat is not None and i == block:
                x = self.mask_tokens(x, keep_flat, keep_count, replace=i > 0)
            x = blk(x)
        if keep_flat is not None and block == depth:
            x = self.mask_tokens(x, keep_flat, keep_count, replace=True)
        return net.forward_head(net.norm(x), pre_logits=True)

    def checkpoint_units(self) -> list[nn.Module]:
        """`train.activation_checkpointing`'s units of a ViT: its blocks (`forward` and `pooled` both call each one)."""
        return list(self.net.blocks)

    def mask_tokens(self, x: torch.Tensor, keep: torch.Tensor, keep_count: int | None, replace: bool) -> torch.Tensor:
        """x (B, P + h*w, D) -> the sequence without the patch tokens where `keep` is False (kept in grid order), or
        with them replaced by the mask token (`replace`, when there is one; at block 0 it was put in before the
        position embedding)."""
        prefix, patches = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]
        if self.mask_token is not None:
            if replace:
                patches = torch.where(keep[..., None], patches, self.mask_token.to(patches.dtype))
            return torch.cat([prefix, patches], dim=1)
        if keep_count is None:
            counts = keep.sum(dim=1)
            keep_count = int(counts[0])
            if bool((counts != keep_count).any()):
                raise ValueError("token masking: every image of a batch must keep as many tokens as the others")
        # a stable sort of (dropped?) puts the kept positions first, in their grid order
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :keep_count]
        kept = patches.gather(1, order[..., None].expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, kept], dim=1)


def token_attention_mask(keep: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The attention mask (B, 1, N, N), True where attending is allowed, under which a full forward equals the
    dropping one for the kept tokens: no token attends to a dropped patch. For tests and checks."""
    b = keep.shape[0]
    allowed = torch.cat([torch.ones(b, num_prefix_tokens, dtype=torch.bool, device=keep.device),
                         keep.flatten(1).to(torch.bool)], dim=1)
    return allowed[:, None, None, :].expand(-1, 1, allowed.shape[1], -1)


def resample_map(attention: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The teacher's map A (B, h_t, w_t) on the student's token grid (B, h_s, w_s): bilinear, as the mean over each
    student cell's area where the student's grid is coarser. Eq. 4's top-k then counts the student's tokens."""
    if tuple(attention.shape[-2:]) == tuple(grid):
        return attention
    src = attention[:, None].float()
    if grid[0] <= attention.shape[-2] and grid[1] <= attention.shape[-1]:
        return torch.nn.functional.adaptive_avg_pool2d(src, grid)[:, 0]
    return torch.nn.functional.interpolate(src, size=grid, mode="bilinear", align_corners=False)[:, 0]


def build_backbone(name: str, pretrained: str | os.PathLike | None = None, normalize: bool = True,
                   output_stride: int | None = None, freeze_bn: bool = False, image_size: int = 224,
                   mask_token: bool = False, **create: Any) -> Backbone:
    """A `ViTBackbone` for a timm Vision Transformer (sized for `image_size`, with a learned mask token when asked),
    a CNN `Backbone` for anything else."""
    if is_vit_name(name):
        if output_stride:
            raise BackboneError(f"backbone {name!r}: model.output_stride is for CNNs (a ViT's grid is its patch size)")
        return ViTBackbone(name, pretrained, normalize, image_size=image_size, mask_token=mask_token, **create)
    if mask_token:
        raise BackboneError(f"backbone {name!r} is a CNN: model.mask_at=tokens needs a ViT student")
    return Backbone(name, pretrained, normalize, output_stride=output_stride, freeze_bn=freeze_bn, **create)
