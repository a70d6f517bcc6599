"""What of a backbone trains: `model.tune` (student) and `model.teacher_tune` (teacher), one of

    full    every parameter (the paper's)
    ln      the norm layers' scale and shift only: LayerNorms (GenD's recipe), a CNN's BatchNorms / GroupNorms
    lora    low-rank adapters (peft's LoRA, `model.lora`) on the layers whose names end in `model.lora.targets`
    last_k  the last `model.tune_last_k` entries of the timm model's `blocks` and its final `norm`

Only each backbone's timm model (`Backbone.net`) is restricted: the heads, the teacher's small ViT and a student mask
token always train, since they start from random weights. `apply_tuning` runs inside `build_model`, so training,
evaluation and export all build the same modules (a LoRA run's checkpoints hold the adapters' keys);
`merge_lora` folds the adapters back into their base layers for export.
"""

from __future__ import annotations

import logging

import timm.layers
from torch import nn

from ltm.config import ModelConfig

log = logging.getLogger(__name__)

TUNE_MODES = ("full", "ln", "lora", "last_k")
# Norm layers whose affine parameters `ln` trains. nn.LayerNorm covers timm's LayerNorm / LayerNorm2d, _BatchNorm
# timm's BatchNormAct2d; timm's RMS norms derive from nn.Module directly and are listed by name.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.RMSNorm,
    *(getattr(timm.layers, n) for n in ("RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d")
      if hasattr(timm.layers, n)),
)


class TuningError(ValueError):
    """A `model.tune` that the backbone cannot take; the message names the config key."""


def backbones(model: nn.Module) -> dict[str, nn.Module]:
    """The timm models that `model.tune` restricts, by role: a Baseline's backbone is the student."""
    found = {}
    for role, attr in (("student", "student_cnn"), ("teacher", "teacher_cnn"), ("student", "backbone")):
        if hasattr(model, attr):
            found[role] = getattr(model, attr).net
    return found


def _norm_parameters(net: nn.Module) -> list[nn.Parameter]:
    return [p for m in net.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)]


def _last_k_parameters(net: nn.Module, k: int, key: str) -> list[nn.Parameter]:
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        raise TuningError(f"{key}=last_k: the backbone {type(net).__name__} has no `blocks` sequence to take the last "
                          "blocks of; use full, ln or lora")
    if k > len(blocks):
        raise TuningError(f"model.tune_last_k={k}: the backbone {type(net).__name__} has {len(blocks)} blocks")
    params = [p for block in list(blocks)[-k:] for p in block.parameters()]
    norm = getattr(net, "norm", None)
    if isinstance(norm, nn.Module):  # the final norm that the last block's output passes through
        params += list(norm.parameters())
    return params


def lora_targets(net: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the layers that LoRA adapts: those whose names end in a target (peft's suffix rule) and are
    linear layers; a CNN has none in its trunk, so there its ungrouped convolutions (peft cannot merge grouped ones).
    The explicit names keep a ViT's `proj` target on the attention projections, not the patch embedding's conv."""
    def matches(name: str) -> bool:
        return any(name == t or name.endswith("." + t) for t in targets)

    named = [(n, m) for n, m in net.named_modules() if n and matches(n)]
    linear = [n for n, m in named if isinstance(m, nn.Linear)]
    if linear:
        return linear
    return [n for n, m in named if isinstance(m, nn.Conv2d) and m.groups == 1]


def _inject_lora(net: nn.Module, cfg: ModelConfig, key: str) -> list[nn.Parameter]:
    import peft

    names = lora_targets(net, list(cfg.lora.targets))
    if not names:
        raise TuningError(f"{key}=lora: model.lora.targets {list(cfg.lora.targets)} match no linear layer or "
                          f"ungrouped convolution of the backbone {type(net).__name__} (timm ViTs: qkv, proj, fc1, "
                          "fc2)")
    lora = peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=names)
    peft.inject_adapter_in_model(lora, net)
    return [p for n, p in net.named_parameters() if "lora_" in n]


def _restrict(net: nn.Module, mode: str, cfg: ModelConfig, key: str) -> None:
    if mode == "full":
        return
    if mode == "ln":
        trainable = _norm_parameters(net)
        if not trainable:
            raise TuningError(f"{key}=ln: the backbone {type(net).__name__} has no norm layer with parameters")
    elif mode == "last_k":
        trainable = _last_k_parameters(net, cfg.tune_last_k, key)
    elif mode == "lora":
        trainable = _inject_lora(net, cfg, key)
    else:
        raise TuningError(f"{key} {mode!r}: expected one of {', '.join(TUNE_MODES)}")
    keep = {id(p) for p in trainable}
    for p in net.parameters():
        p.requires_grad_(id(p) in keep)


def parameter_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """Trainable and total parameters per role (student, teacher: their timm backbones) and of the whole model."""
    def count(module: nn.Module) -> dict[str, int]:
        params = list(module.parameters())
        return {"trainable": sum(p.numel() for p in params if p.requires_grad),
                "total": sum(p.numel() for p in params)}

    return {**{role: count(net) for role, net in backbones(model).items()}, "model": count(model)}


def apply_tuning(model: nn.Module, cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """Restrict what trains in the model's backbones per `model.tune` / `model.teacher_tune` (LoRA adapters are
    injected in place); returns `parameter_counts`."""
    modes = {"student": ("model.tune", cfg.tune),
             "teacher": ("model.teacher_tune", cfg.teacher_tune or cfg.tune)}
    for role, net in backbones(model).items():
        key, mode = modes[role]
        if role == "teacher" and cfg.teacher_tune is None:
            key = "model.tune"  # the teacher follows the student's setting: the error names the key that was set
        _restrict(net, mode, cfg, key)
    return parameter_counts(model)


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter in `module` into its base layer's weights and put the plain base layer back in the
    wrapper's place, so the state dict has timm's own key names and no `lora_` entries. Returns how many layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = []
    for name, child in module.named_modules():
        # a wrapper's own submodules (base_layer, lora_A) are not wrappers: no nesting to handle
        if isinstance(child, BaseTunerLayer) and name:
            wrapped.append((name, child))
    for name, layer in wrapped:
        layer.merge()
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, layer.get_base_layer())
    if wrapped:
        log.debug("merged %d LoRA layers", len(wrapped))
    return len(wrapped)


__all__ = ["NORM_TYPES", "TUNE_MODES", "TuningError", "apply_tuning", "backbones", "lora_targets", "merge_lora",
           "parameter_counts"]
