"""Attention map (Eq. 2), diversity loss (Eq. 3), feature mask (Eq. 4) and deep mixup (Eq. 5-6)."""

from __future__ import annotations

import torch


def cls_attention(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-head attention from the CLS token to the h*w patch tokens: (B, heads, N, N) -> (B, heads, h, w)."""
    return attn[:, :, 0, 1:].reshape(attn.shape[0], attn.shape[1], *grid)


def attention_map(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Eq. 2: A = (1/h) sum_i A_i, the last block's heads averaged, CLS -> patches, shape (B, h, w)."""
    return cls_attention(attn, grid).mean(dim=1)


def diversity_loss(head_maps: torch.Tensor) -> torch.Tensor:
    """Eq. 3, as DESIGN.md corrects it: mean over samples of sum_{i != j} d_ij^2 / (h (h - 1)).

    d_ij is the cosine similarity of head i's and head j's attention maps (flattened, per sample). Eq. 3 as
    printed minimises (1 - d_ij) for i != j, which pulls the heads together; the method it cites (DBT) pushes
    them apart, so we penalise the squared similarity of different heads: 0 for disjoint maps, 1 for identical.
    head_maps: (B, heads, ...) with heads >= 2; returns a scalar.
    """
    b, h = head_maps.shape[:2]
    if h < 2:
        return head_maps.new_zeros(())
    flat = torch.nn.functional.normalize(head_maps.reshape(b, h, -1), dim=-1)
    d = flat @ flat.transpose(1, 2)  # (B, h, h) cosine similarities
    off_diagonal = ~torch.eye(h, dtype=torch.bool, device=d.device)
    return (d.pow(2) * off_diagonal).sum(dim=(1, 2)).div(h * (h - 1)).mean()


def num_masked(ratio: float, grid: tuple[int, int]) -> int:
    """Eq. 4's k = round(ratio * h * w)."""
    return int(round(ratio * grid[0] * grid[1]))


def feature_mask(attention: torch.Tensor, ratio: float, strategy: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 4: M (B, h, w) with 0 at the k positions chosen by `strategy`, 1 elsewhere; carries no gradient.

    high: the k most attended positions (the paper's default); low: the k least attended; random: k at random.
    """
    a = attention.detach().flatten(1)
    b, n = a.shape
    k = num_masked(ratio, tuple(attention.shape[-2:]))
    mask = torch.ones_like(a)
    if k > 0:
        if strategy == "high":
            idx = a.topk(k, dim=1).indices
        elif strategy == "low":
            idx = a.topk(k, dim=1, largest=False).indices
        elif strategy == "random":
            # rand_like, not rand(b, n): a compiled model with a dynamic batch traces b as a symbol, which
            # torch.rand cannot take; both draw the same numbers from the same generator
            noise = (torch.rand_like(a, dtype=torch.float32) if generator is None
                     else torch.rand(b, n, device=a.device, generator=generator))
            idx = noise.topk(k, dim=1).indices
        else:
            raise ValueError(f"mask strategy {strategy!r}: expected high, low or random")
        mask.scatter_(1, idx, 0.0)
    return mask.reshape_as(attention)


def mixup_partners(labels: torch.Tensor, same_class: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Each sample's mixing partner: a random permutation of the batch, or one within each label's samples."""
    if not same_class:
        return torch.randperm(labels.shape[0], device=labels.device, generator=generator)
    partners = torch.empty(labels.shape[0], dtype=torch.long, device=labels.device)
    for value in labels.unique():
        members = (labels == value).nonzero().squeeze(1)
        partners[members] = members[torch.randperm(members.numel(), device=labels.device, generator=generator)]
    return partners


def deep_mixup(features: torch.Tensor, labels: torch.Tensor, alpha: float, generator: torch.Generator | None = None,
               same_class: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 5-6: F' = lam F_i + (1 - lam) F_j and y' likewise, j a random partner, lam ~ Beta(alpha, alpha).

    `same_class` draws j among the samples with i's label (y' = y: mixed features, hard targets); the paper's
    partner is any sample of the batch. Returns (F', y', lam) with one lambda per sample.
    """
    b = features.shape[0]
    perm = mixup_partners(labels, same_class, generator)
    concentration = torch.full((b,), float(alpha), device=features.device, dtype=torch.float32)
    lam = torch.distributions.Beta(concentration, concentration).sample().to(features.dtype)
    mixed = lam[:, None] * features + (1 - lam[:, None]) * features[perm]
    mixed_labels = lam * labels + (1 - lam) * labels[perm]
    return mixed, mixed_labels, lam
