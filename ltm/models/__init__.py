"""Model factory: `build_model(cfg.model)` gives LearningToMask or Baseline by `cfg.model.kind`."""

from __future__ import annotations

from torch import nn

from ltm.config import ModelConfig
from ltm.models.backbone import Backbone, BackboneError
from ltm.models.ltm import Baseline, LearningToMask
from ltm.models.tuning import apply_tuning

MODELS: dict[str, type[nn.Module]] = {"ltm": LearningToMask, "baseline": Baseline}


def build_model(cfg: ModelConfig, image_size: int = 224, load_weights: bool = True) -> nn.Module:
    """`image_size` fixes the feature grid (h, w) that the ViT's position embeddings are sized for.

    `load_weights=False` skips `pretrained` (random init): for models whose weights a checkpoint then provides.
    `model.tune` / `model.teacher_tune` then restrict what trains (ltm.models.tuning); a LoRA model carries its
    adapters from here on, so a checkpoint's keys fit the model that every reader builds.
    """
    try:
        model_cls = MODELS[cfg.kind]
    except KeyError:
        raise ValueError(f"model.kind {cfg.kind!r}: expected one of {sorted(MODELS)}") from None
    model = model_cls(cfg, image_size=image_size, load_weights=load_weights)
    apply_tuning(model, cfg)
    return model


__all__ = ["Backbone", "BackboneError", "Baseline", "LearningToMask", "MODELS", "build_model"]
