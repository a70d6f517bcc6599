"""The Learning-to-Mask teacher-student detector (Sec. 3) and the plain backbone baseline."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ltm.config import CHOICES, ModelConfig
from ltm.models.backbone import Backbone, BackboneError
from ltm.models.foundation import build_backbone, resample_map
from ltm.models.masking import (
    GRADIENT_MAPS,
    INPUT_GRADIENT_MAPS,
    attention_map,
    class_activation_map,
    cls_attention,
    deep_mixup,
    diversity_loss,
    erase_cells,
    feature_mask,
    global_deep_mixup,
    grad_attention_map,
    head_max_map,
    input_gradient_map,
    mask_batch_share,
    masks_from_fakes,
    num_masked,
    occlusion_map,
    peak_boxes,
    per_image_mask,
    reveal_hints,
    rollout_map,
    saliency_map,
)
from ltm.models.vit import TokenViT
from ltm.models.weights import backbone_weights


def build_cnn(cfg: ModelConfig, role: str, load_weights: bool = True, image_size: int = 224) -> Backbone:
    """The `student` or `teacher` backbone (a CNN, or a ViT: ltm.models.foundation) with the weights
    `backbone_weights` assigns it (none: random init); the student ViT gets a mask token for `mask_fill=token`."""
    name, weights = backbone_weights(cfg)[role]
    args = cfg.backbone_args if role == "student" else cfg.teacher_backbone_args
    if args is None:
        args = cfg.backbone_args if name == cfg.backbone else {}
    mask_token = role == "student" and cfg.kind == "ltm" and cfg.mask_at == "tokens" and cfg.mask_fill == "token"
    return build_backbone(name, weights if load_weights else None, normalize=cfg.input_norm == "backbone",
                          output_stride=cfg.output_stride, freeze_bn=cfg.freeze_bn, image_size=image_size,
                          mask_token=mask_token, **args)


def student_classifier(channels: int, hidden: int) -> nn.Module:
    """Sec. 3.3: "a MLP classifier takes as input F'" (hidden = 0: one linear layer)."""
    if hidden == 0:
        return nn.Linear(channels, 1)
    return nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, 1))


class Baseline(nn.Module):
    """The paper's "Xception [11]" rows: backbone + global average pooling + a linear head, BCE."""

    def __init__(self, cfg: ModelConfig, image_size: int = 224, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_cnn(cfg, "student", load_weights, image_size)
        self.head = nn.Linear(self.backbone.channels, 1)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.pooled(images)).squeeze(1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        logits = self.logits(images)
        # fp32 loss whatever the module's dtype, as LearningToMask's: a bf16 BCE and mean would round the loss and
        # its per-sample gradients (small ones to 0), and the Baseline-vs-LTM comparison would not be like for like
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return {"loss": loss, "losses": {"cls": loss.detach()}, "logits": logits.detach()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(images).float())


class LearningToMask(nn.Module):
    """Teacher (CNN + ViT over its tokens, two heads) masks the student CNN's features by attention.

    Training forward: L = L_cls^t + L_vit^t + alpha_div * L_div + L^s (Eq. 7). The mask is computed from the
    detached attention and the student is a separate CNN, so L^s sends no gradient into the teacher.

    Either backbone may be a foundation ViT (ltm.models.foundation): its patch tokens are the teacher's "CNN tokens",
    or the student's masked tokens (`mask_at=tokens`). Where the student's token grid differs from the teacher's
    feature grid, the teacher's map is resampled to the student's grid before Eq. 4 (`resample_map`).
    """

    def __init__(self, cfg: ModelConfig, image_size: int = 224, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.teacher_cnn = build_cnn(cfg, "teacher", load_weights, image_size)
        self.student_cnn = build_cnn(cfg, "student", load_weights, image_size)
        self.grid = self.teacher_cnn.grid(image_size)
        self.student_grid = student_grid = self.student_cnn.grid(image_size)
        if cfg.mask_ratio_range is not None and cfg.mask_strategy == "soft":
            raise BackboneError("model.mask_ratio_range: mask_strategy=soft has no ratio (high, low or random)")
        if cfg.mask_at == "tokens":
            if not self.student_cnn.is_vit:
                raise BackboneError(f"model.mask_at=tokens: student {cfg.backbone!r} is a CNN; it needs a ViT "
                                    "(mask_at=features or input masks a CNN)")
            if cfg.mask_strategy == "soft":
                raise BackboneError("model.mask_at=tokens: mask_strategy=soft zeroes no token (high, low or random)")
            uneven = [key for key, on in (("mask_share", cfg.mask_share < 1), ("mask_ratio_range",
                      cfg.mask_ratio_range is not None), ("mask_hint", cfg.mask_hint > 0)) if on]
            if uneven and cfg.mask_fill == "drop":
                raise BackboneError(f"model.{uneven[0]} with model.mask_at=tokens drops a different number of tokens "
                                    "per image: set model.mask_fill=token")
        elif student_grid != self.grid and cfg.mask_at == "features":
            raise BackboneError(
                f"teacher {self.teacher_cnn.name!r} gives a {self.grid[0]}x{self.grid[1]} feature grid but student "
                f"{cfg.backbone!r} gives {student_grid[0]}x{student_grid[1]} at {image_size} px: the mask of "
                "Eq. 4 needs the same grid (pick backbones with the same total stride, or a ViT student with "
                "model.mask_at=tokens, whose mask is resampled to its grid)"
            )
        v = cfg.vit
        self.teacher_vit = TokenViT(self.teacher_cnn.channels, self.grid, v.dim, v.heads, v.depth, v.mlp_ratio)
        self.teacher_cnn_head = nn.Linear(self.teacher_cnn.channels, 1)
        self.teacher_vit_head = nn.Linear(v.dim, 1)
        self.student_head = student_classifier(self.student_cnn.channels, cfg.student_hidden)
        if cfg.mask_warmup > 0 or cfg.mask_anneal > 0:
            # counts training forwards; in checkpoints, so a resumed run keeps its schedule
            self.register_buffer("forwards", torch.zeros((), dtype=torch.long))

    def teacher(self, images: torch.Tensor, all_attentions: bool = False, map_kind: str | None = None) -> dict:
        """The teacher's two logits, its attention maps and the map A that Eq. 4 masks, of kind `map_kind`
        (default `model.attention_map`; `mean` is Eq. 2). The gradient-based kinds (GRADIENT_MAPS) take one
        extra backward pass through the teacher, with the parameters' gradients untouched."""
        kind = self.cfg.attention_map if map_kind is None else map_kind
        needs_grad = kind in GRADIENT_MAPS
        with torch.enable_grad() if needs_grad else nullcontext():
            if needs_grad:
                # a fresh tensor: images made under inference mode (eval pictures) cannot enter autograd
                images = images.clone().requires_grad_(kind in INPUT_GRADIENT_MAPS)
            x_t = self.teacher_cnn(images)
            cls_out, attentions = self.teacher_vit(x_t, all_attentions or kind == "rollout")
            last = attentions[-1]
            cls_logits = self.teacher_cnn_head(x_t.mean(dim=(2, 3))).squeeze(1)
            vit_logits = self.teacher_vit_head(cls_out).squeeze(1)
            if kind == "mean":
                attention = attention_map(last, self.grid)  # A, Eq. 2
            elif kind == "max":
                attention = head_max_map(last, self.grid)
            elif kind == "rollout":
                attention = rollout_map(attentions, self.grid)
            elif kind == "cam":
                attention = class_activation_map(x_t, self.teacher_cnn_head)
            elif kind == "grad":
                (grad,) = torch.autograd.grad(vit_logits.sum(), last, retain_graph=True)
                attention = grad_attention_map(last, grad, self.grid)
            elif kind in INPUT_GRADIENT_MAPS:
                (grad,) = torch.autograd.grad(cls_logits.sum() + vit_logits.sum(), images, retain_graph=True)
                smooth = self.cfg.saliency_smooth
                attention = (saliency_map(grad, images, self.grid, smooth) if kind == "saliency"
                             else input_gradient_map(grad, self.grid, smooth))
            elif kind == "occlusion":
                attention = self._occlusion(images)
            else:
                raise ValueError(f"model.attention_map {kind!r}: expected one of "
                                 f"{', '.join(CHOICES['model.attention_map'])}")
        return {
            "cls_logits": cls_logits,
            "vit_logits": vit_logits,
            "attentions": attentions,
            "head_maps": cls_attention(last, self.grid),  # (B, heads, h, w), Eq. 1
            "attention": attention.detach(),  # A: the mask carries no gradient (Eq. 4)
            "features": x_t,
        }

    def _occlusion(self, images: torch.Tensor) -> torch.Tensor:
        """The `occlusion` map: the teacher's two logits summed, on the input and with each cell erased. Measured with
        the teacher in eval mode, so that its BatchNorm running statistics never see the h*w erased copies."""
        def decision(x: torch.Tensor) -> torch.Tensor:
            x_o = self.teacher_cnn(x)
            return (self.teacher_cnn_head(x_o.mean(dim=(2, 3))).squeeze(1)
                    + self.teacher_vit_head(self.teacher_vit(x_o)[0]).squeeze(1))

        modes = [(m, m.training) for m in (*self.teacher_cnn.modules(), *self.teacher_vit.modules())]
        self.teacher_cnn.eval()
        self.teacher_vit.eval()
        try:
            return occlusion_map(decision, images.detach(), self.grid, self.teacher_cnn.mean)
        finally:
            for module, training in modes:
                module.training = training

    def pool(self, features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """F = AvgPool(X_s * M) over all h*w positions (as printed), or over the kept ones (`masked_mean`)."""
        if mask is None:
            return features.mean(dim=(2, 3))
        masked = features * mask[:, None].to(features.dtype)
        if self.cfg.pooling == "masked_mean":
            return masked.sum(dim=(2, 3)) / mask.sum(dim=(1, 2)).clamp_min(1)[:, None].to(features.dtype)
        return masked.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict:
        labels = labels.float()
        t = self.teacher(images)
        tokens = self.cfg.mask_at == "tokens"
        attention = resample_map(t["attention"], self.student_grid) if tokens else t["attention"]
        step = None
        if self.training and hasattr(self, "forwards"):
            step = int(self.forwards)
            self.forwards += 1
        factor = self.anneal_factor(step)
        mask = self.training_mask(attention, factor) if self.training else feature_mask(
            attention, self.cfg.mask_ratio, self.cfg.mask_strategy)  # Eq. 4
        keep_count = (self.student_grid[0] * self.student_grid[1]
                      - num_masked(self.cfg.mask_ratio * factor, self.student_grid))
        if self.cfg.erase_shape == "boxes":  # from here on a pixel mask (B, H, W)
            mask = self.box_mask(attention, mask, tuple(images.shape[-2:]))
        if self.cfg.real_mask == "fake" and self.training:
            mask = masks_from_fakes(mask, labels)
        if self.cfg.mask_share < 1 and self.training:  # after real_mask: the share is drawn blind to the labels
            mask = mask_batch_share(mask, self.cfg.mask_share)
        if step is not None and step < self.cfg.mask_warmup:
            mask = torch.ones_like(mask)
            keep_count = mask[0].numel()
        if self.cfg.mask_at == "input":  # the cells' pixels are hidden, so no receptive field reaches them
            fill = torch.rand_like(images) if self.cfg.erase_fill == "noise" else self.student_cnn.mean
            features = seen = self.student_cnn.pooled(erase_cells(images, mask, fill))
        elif tokens:  # the masked tokens leave the student's sequence (or become the mask token)
            features = seen = self.student_cnn.pooled(images, mask, self.cfg.mask_block, keep_count)
        else:
            x_s = self.student_cnn(images)
            features, seen = self.pool(x_s, mask), self.pool(x_s, None)
        student_labels = labels
        if self.cfg.mixup:
            # Eq. 5-6; `global`: partners from every rank's batch, so the mixing does not change with the world size
            mixup = global_deep_mixup if self.cfg.mixup_scope == "global" else deep_mixup
            features, student_labels, _ = mixup(features, labels, self.cfg.mixup_alpha,
                                                same_class=self.cfg.mixup_partner == "same_class")
        student_logits = self.student_head(features).squeeze(1)

        def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(logits.float(), target)

        losses = {
            "cls_t": bce(t["cls_logits"], labels),
            "vit_t": bce(t["vit_logits"], labels),
            "div": diversity_loss(t["head_maps"].float()),  # Eq. 3, last block
            "student": bce(student_logits, student_labels),
        }
        total = losses["cls_t"] + losses["vit_t"] + self.cfg.div_weight * losses["div"] + losses["student"]  # Eq. 7
        with torch.no_grad():
            logits = self._inference_logits(t, seen)  # what the student saw, unmixed
        return {
            "loss": total,
            "losses": {k: v.detach() for k, v in losses.items()},
            "logits": logits,
            "attention": t["attention"].detach(),
            "mask": mask,
        }

    def anneal_factor(self, step: int | None) -> float:
        """`mask_anneal`: the share of the mask ratio in force at training forward `step` (counted from the first,
        warm-up included): 0 right after `mask_warmup`, growing linearly to 1 over `mask_anneal` forwards."""
        if step is None or self.cfg.mask_anneal == 0:
            return 1.0
        return min(1.0, max(0, step - self.cfg.mask_warmup) / self.cfg.mask_anneal)

    def training_mask(self, attention: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        """Eq. 4's mask in a training forward: `mask_ratio` on every image, or a ratio per image drawn from
        `mask_ratio_range`, either times `factor` (`anneal_factor`), with `mask_hint` of each image's masked cells
        shown after all (AttMask's schedules)."""
        cfg = self.cfg
        if cfg.mask_ratio_range is None:
            mask = feature_mask(attention, cfg.mask_ratio * factor, cfg.mask_strategy)
        else:
            lo, hi = (end * factor for end in cfg.mask_ratio_range)
            ratios = torch.rand(attention.shape[0], device=attention.device) * (hi - lo) + lo
            mask = per_image_mask(attention, ratios, cfg.mask_strategy)
        return reveal_hints(mask, cfg.mask_hint) if cfg.mask_hint > 0 else mask

    def box_mask(self, attention: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """`erase_shape=boxes`: as many boxes per image as its cell mask has masked cells, around the map's peaks
        (`high`), its troughs (`low`) or random points (`random`); a pixel mask (B, H, W). Box sizes are drawn in
        training and the middle of `erase_box_scale` otherwise."""
        strategy = self.cfg.mask_strategy
        scores = {"high": attention, "low": -attention}.get(strategy)
        if scores is None:
            scores = torch.rand_like(attention, dtype=torch.float32)
        counts = (mask.flatten(1) < 0.5).sum(dim=1)
        lo, hi = self.cfg.erase_box_scale
        return peak_boxes(scores, counts, size, (lo, hi) if self.training else ((lo + hi) / 2,) * 2)

    def student_features(self, images: torch.Tensor) -> torch.Tensor:
        """The student's feature vector F (B, C) of whole images, as inference sees them (M = 1): its feature map
        averaged as Eq. 4's pooling does (`mask_at=features`), else the backbone's own pooling (a ViT's CLS token)."""
        if self.cfg.mask_at == "features":
            return self.pool(self.student_cnn(images), None)
        return self.student_cnn.pooled(images)

    def _head_logits(self, t: dict | None, features: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Each head's logits, for the heads whose inputs were computed: the student from its feature vector
        `features` (B, C), the teacher's two from its outputs `t`."""
        logits = {}
        if features is not None:
            logits["student"] = self.student_head(features).squeeze(1)
        if t is not None:
            logits["teacher_cnn"], logits["teacher_vit"] = t["cls_logits"], t["vit_logits"]
        return logits

    def _inference_logits(self, t: dict | None, features: torch.Tensor | None) -> torch.Tensor:
        head = self.cfg.inference_head
        logits = self._head_logits(t, features)
        if head != "ensemble":
            return logits[head]
        probs = torch.stack([torch.sigmoid(x.float()) for x in logits.values()])
        return torch.logit(probs.mean(dim=0), eps=1e-6)  # ensemble: mean probability, as a logit

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """P(fake) per image from the configured head, on unmasked features (M = 1), without mixup."""
        head = self.cfg.inference_head
        t = self.teacher(images, map_kind="mean") if head != "student" else None
        features = self.student_features(images) if head in ("student", "ensemble") else None
        return torch.sigmoid(self._inference_logits(t, features).float())

    @torch.no_grad()
    def head_probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """P(fake) per image from each of the three heads at once (what `predict` gives for each `inference_head`
        but the ensemble), for comparing them on one pass over the data."""
        logits = self._head_logits(self.teacher(images, map_kind="mean"), self.student_features(images))
        return {name: torch.sigmoid(x.float()) for name, x in logits.items()}

    @torch.no_grad()
    def explain(self, images: torch.Tensor) -> dict:
        """The map A that Eq. 4 masks (`model.attention_map`; Eq. 2 by default) and the mask M it induces, for
        pictures."""
        t = self.teacher(images)
        mask = feature_mask(t["attention"], self.cfg.mask_ratio, self.cfg.mask_strategy)
        return {"attention": t["attention"], "mask": mask, "head_maps": t["head_maps"]}

    @torch.no_grad()
    def teacher_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every map the teacher can rank cells by, (B, h, w) each: its ViT heads one by one (`head0`...), their mean
        (Eq. 2), max and rollout, gradient-weighted attention, the CNN head's CAM, input saliency and input gradient;
        `mask_map` is the configured one (what Eq. 4 masks). For measuring which of them finds a known manipulated
        region."""
        maps: dict[str, torch.Tensor] = {}
        for kind in CHOICES["model.attention_map"]:
            t = self.teacher(images, map_kind=kind)
            maps[kind] = t["attention"].float()
        for i in range(t["head_maps"].shape[1]):
            maps[f"head{i}"] = t["head_maps"][:, i].float()
        maps["mask_map"] = maps[self.cfg.attention_map]
        return maps
