"""CNN backbones: any timm model name, returning its last feature map `X = CNN(img)` of shape (B, C, h, w)."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn


class BackboneError(ValueError):
    """A backbone that cannot be built or a weights file that does not fit; the message names it."""


class Backbone(nn.Module):
    """A timm model cut before its pooling and classifier."""

    def __init__(self, name: str, pretrained: str | os.PathLike | None = None):
        super().__init__()
        try:
            self.net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        except RuntimeError as exc:  # timm raises RuntimeError for unknown names
            raise BackboneError(f"backbone {name!r}: {exc}") from exc
        self.name = name
        self.channels: int = self.net.num_features
        if pretrained:
            load_pretrained(self.net, pretrained)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(images)

    @torch.no_grad()
    def grid(self, image_size: int) -> tuple[int, int]:
        """(h, w) of the feature map at this input size (one dry run on a single blank image)."""
        was_training = self.training
        self.eval()
        param = next(self.parameters())
        try:
            out = self(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
        except RuntimeError as exc:
            raise BackboneError(f"backbone {self.name!r} cannot take {image_size} px input: {exc}") from exc
        self.train(was_training)
        return int(out.shape[-2]), int(out.shape[-1])


def load_pretrained(net: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state dict (timm/torchvision layout; a checkpoint dict with `state_dict`/`model` works too).

    Classifier weights are ignored (the backbone has none); any other missing or mis-shaped tensor is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"pretrained weights {str(path)!r}: no such file (no hub downloads are made)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise BackboneError(f"pretrained weights {str(path)!r}: cannot be read: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"pretrained weights {str(path)!r}: not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    head_prefixes = ("fc.", "classifier.", "head.", "last_linear.")
    state = {k: v for k, v in state.items() if not k.startswith(head_prefixes) or k in own}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shape:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
        if shape:
            detail.append(f"shape mismatch for {shape[:3]}")
        raise BackboneError(f"pretrained weights {str(path)!r} do not fit the backbone: {'; '.join(detail)}")
    net.load_state_dict(state)
