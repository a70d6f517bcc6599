"""Attention map (Eq. 2), diversity loss (Eq. 3), feature mask (Eq. 4) and deep mixup (Eq. 5-6)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cls_attention(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-head attention from the CLS token to the h*w patch tokens: (B, heads, N, N) -> (B, heads, h, w)."""
    return attn[:, :, 0, 1:].reshape(attn.shape[0], attn.shape[1], *grid)


def attention_map(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Eq. 2: A = (1/h) sum_i A_i, the last block's heads averaged, CLS -> patches, shape (B, h, w).

    Averaged in fp32 (a bf16 mean would round A back onto a coarse grid that Eq. 4's top-k then ties on)."""
    return cls_attention(attn, grid).float().mean(dim=1)


def head_max_map(attn: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Eq. 2 with the max over heads instead of the mean: a cell counts when any head attends to it, so heads that
    Eq. 3 pushed apart do not flatten each other's peaks. (B, heads, N, N) -> (B, h, w)."""
    return cls_attention(attn, grid).amax(dim=1)


def rollout_map(attentions: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) over every block: each block's head-averaged attention with the
    residual as 0.5 I, rows renormalised, multiplied from the first block to the last; the CLS row to the patches.
    Where Eq. 2 sees only the last block, rollout follows information from the tokens through all of them."""
    joint = None
    for attn in attentions:
        a = attn.float().mean(dim=1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        joint = a if joint is None else a @ joint
    return joint[:, 0, 1:].reshape(joint.shape[0], *grid)


def grad_attention_map(attn: torch.Tensor, grad: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Gradient-weighted attention (after Chefer et al., 2021): the last block's per-head CLS attention times the
    gradient of the ViT's fake logit with respect to it, positive part, averaged over heads. High where attending
    raised P(fake), not merely where the CLS token looked."""
    return cls_attention((grad.float() * attn.float()).clamp_min(0), grid).mean(dim=1)


def class_activation_map(features: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """The teacher CNN head's evidence per position (Zhou et al.'s CAM): its linear weights applied to each feature
    vector, (B, C, h, w) -> (B, h, w); their mean over positions plus the bias is the head's logit."""
    return torch.einsum("bchw,c->bhw", features.float(), head.weight[0].float())


# model.attention_map kinds computed with a backward pass through the teacher, and those of them that differentiate
# with respect to the input image
GRADIENT_MAPS = ("grad", "saliency", "input_grad")
INPUT_GRADIENT_MAPS = ("saliency", "input_grad")


def _smooth_and_pool(contribution: torch.Tensor, grid: tuple[int, int], smooth: float) -> torch.Tensor:
    """(B, 1, H, W) -> (B, h, w): box-averaged over an odd window of `smooth` x the image side (none below 2 px),
    then averaged over each grid cell."""
    width = int(round(smooth * contribution.shape[-1])) // 2 * 2 + 1
    if width > 1:
        contribution = torch.nn.functional.avg_pool2d(contribution, width, 1, width // 2, count_include_pad=False)
    return torch.nn.functional.adaptive_avg_pool2d(contribution, grid)[:, 0]


def saliency_map(grad: torch.Tensor, images: torch.Tensor, grid: tuple[int, int], smooth: float = 0.0) -> torch.Tensor:
    """|input gradient x input| of the teacher's logits summed over colours and averaged over each grid cell:
    the pixels whose change would move the teacher's decision most, (B, 3, H, W) -> (B, h, w)."""
    contribution = (grad.float() * images.float()).abs().sum(dim=1, keepdim=True)
    return _smooth_and_pool(contribution, grid, smooth)


def input_gradient_map(grad: torch.Tensor, grid: tuple[int, int], smooth: float = 0.0) -> torch.Tensor:
    """|input gradient| of the teacher's logits summed over colours, smoothed and averaged over each grid cell:
    without saliency's x input, a dark or flat artefact counts as much as a bright textured one."""
    return _smooth_and_pool(grad.float().abs().sum(dim=1, keepdim=True), grid, smooth)


def decisions_with_each_cell_erased(decision: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                                    grid: tuple[int, int], fill: torch.Tensor) -> torch.Tensor:
    """`decision(images) -> (B,)` on the images with one grid cell erased to `fill` (as `erase_cells` erases it for
    the student under `mask_at: input`), for every cell in turn: (B, 3, H, W) -> (B, h, w), float32. One batch-sized
    forward per cell (h*w in all), without gradient."""
    b, n = images.shape[0], grid[0] * grid[1]
    out = torch.empty(b, n, device=images.device, dtype=torch.float32)
    with torch.no_grad():
        for c in range(n):
            keep = torch.ones(b, n, device=images.device, dtype=images.dtype)
            keep[:, c] = 0
            out[:, c] = decision(erase_cells(images, keep.view(b, *grid), fill)).float()
    return out.view(b, *grid)


def occlusion_map(decision: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, grid: tuple[int, int],
                  fill: torch.Tensor) -> torch.Tensor:
    """Occlusion sensitivity (after Zeiler & Fergus, 2014): how far the teacher's decision moves when one grid cell of
    the input is erased to `fill`, |decision(x) - decision(x with cell c erased)| per cell, (B, 3, H, W) -> (B, h, w).

    `decision(images) -> (B,)` is the teacher's summed logits. The cell is erased exactly as the student's input is
    erased, so the top cells are the ones whose loss the teacher feels most."""
    with torch.no_grad():
        full = decision(images).float()
    return (full[:, None, None] - decisions_with_each_cell_erased(decision, images, grid, fill)).abs()


def diversity_loss(head_maps: torch.Tensor) -> torch.Tensor:
    """Eq. 3, corrected (docs/choices.md): mean over samples of sum_{i != j} d_ij^2 / (h (h - 1)).

    d_ij is the cosine similarity of head i's and head j's attention maps (flattened, per sample). Eq. 3 as
    printed minimises (1 - d_ij) for i != j, which pulls the heads together; the method it cites (DBT) pushes
    them apart, so we penalise the squared similarity of different heads: 0 for disjoint maps, 1 for identical.
    head_maps: (B, heads, ...) with heads >= 2; returns a scalar.
    """
    b, h = head_maps.shape[:2]
    if h < 2:
        return head_maps.new_zeros((), dtype=torch.float32)
    flat = torch.nn.functional.normalize(head_maps.float().reshape(b, h, -1), dim=-1)  # fp32, as every loss
    d = flat @ flat.transpose(1, 2)  # (B, h, h) cosine similarities
    off_diagonal = ~torch.eye(h, dtype=torch.bool, device=d.device)
    return (d.pow(2) * off_diagonal).sum(dim=(1, 2)).div(h * (h - 1)).mean()


def num_masked(ratio: float, grid: tuple[int, int]) -> int:
    """Eq. 4's k = round(ratio * h * w)."""
    return int(round(ratio * grid[0] * grid[1]))


def feature_mask(attention: torch.Tensor, ratio: float, strategy: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 4: M (B, h, w) with 0 at the k positions chosen by `strategy`, 1 elsewhere; carries no gradient.

    high: the k most attended positions (the paper's default); low: the k least attended; random: k at random;
    soft: no position zeroed but each attenuated by its share of the strongest, M = 1 - A / max(A) (the most
    attended hidden, the least kept; `ratio` unused).
    """
    a = attention.detach().float().flatten(1)  # ranked in fp32: bf16 values tie at the k-th cell (vit.py)
    b, n = a.shape
    if strategy == "soft":
        a = a.clamp_min(0)
        top = a.amax(dim=1, keepdim=True)
        return torch.where(top > 0, 1 - a / top.clamp_min(1e-30), torch.ones_like(a)).reshape_as(attention)
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
            raise ValueError(f"mask strategy {strategy!r}: expected high, low, random or soft")
        mask.scatter_(1, idx, 0.0)
    return mask.reshape_as(attention)


def _ranks(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    """Each cell's place in its row's order (0 = first), (B, n) -> (B, n)."""
    order = scores.argsort(dim=1, descending=descending, stable=True)
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))


def per_image_mask(attention: torch.Tensor, ratios: torch.Tensor, strategy: str,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 4 with a ratio per image (`model.mask_ratio_range`, AttMask's U(0.1, 0.5)): image i masks its
    round(ratios[i] * h * w) cells chosen by `strategy` (high / low / random, as `feature_mask`)."""
    a = attention.detach().float().flatten(1)
    if strategy == "random":
        a = torch.rand(a.shape, device=a.device, generator=generator)
    elif strategy not in ("high", "low"):
        raise ValueError(f"mask strategy {strategy!r} with a ratio per image: expected high, low or random")
    k = torch.round(ratios.float().to(a.device) * a.shape[1])
    return (_ranks(a, descending=strategy != "low") >= k[:, None]).float().reshape_as(attention)


def reveal_hints(mask: torch.Tensor, hint: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """AttMask-Hint (`model.mask_hint`): round(hint * k_i) of image i's k_i masked cells, drawn at random, are shown
    after all, so the student still sees a little of the strongest evidence."""
    flat = mask.flatten(1)
    masked = flat == 0
    shown = torch.round(hint * masked.sum(dim=1).float())
    scores = torch.rand(flat.shape, device=flat.device, generator=generator).masked_fill(~masked, 2.0)
    reveal = _ranks(scores, descending=False) < shown[:, None]  # the lowest random scores among the masked cells
    return torch.where(reveal & masked, torch.ones_like(flat), flat).reshape_as(mask)


def mask_batch_share(mask: torch.Tensor, share: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """AttMask's batch share (`model.mask_share`): exactly round(share * B) images of the batch, drawn at random, keep
    their mask; the others are seen whole (M = 1)."""
    b = mask.shape[0]
    chosen = _ranks(torch.rand(b, 1, device=mask.device, generator=generator).T, descending=False)[0]
    keep = (chosen < round(share * b)).view(b, *([1] * (mask.dim() - 1)))
    return torch.where(keep, mask, torch.ones_like(mask))


def masks_from_fakes(mask: torch.Tensor, labels: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """`model.real_mask=fake`: every real sample (label 0) takes the mask of a fake (label > 0) of the batch drawn at
    random, fakes keep their own; a batch without fakes is returned as it is. So the masked positions are
    distributed alike for both labels and cannot stand in for the label themselves.

    Without data-dependent shapes (no nonzero): a random score per (sample, candidate), fakes only, and the argmax,
    so that the FLOP count's fake tensors and a compiled model can trace it."""
    b = labels.shape[0]
    fake = labels > 0.5
    scores = torch.rand(b, b, device=mask.device, generator=generator)
    pick = scores.masked_fill(~fake[None, :], -1.0).argmax(dim=1)  # a uniformly drawn fake per row
    take = (~fake & fake.any())[:, None, None]
    return torch.where(take, mask[pick], mask)


def erase_cells(images: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Eq. 4's mask applied to the input instead of the features (`model.mask_at=input`, as RFM erases): the pixels
    under M = 0 take `fill` (the backbone's mean colour, which its normalisation maps to 0, or noise of the images'
    shape). `mask` is a cell mask (B, h, w), nearest-upsampled, or a pixel mask (B, H, W) such as `peak_boxes`'."""
    keep = mask[:, None].to(images.dtype)
    if keep.shape[-2:] != images.shape[-2:]:
        keep = torch.nn.functional.interpolate(keep, size=images.shape[-2:], mode="nearest")
    return images * keep + fill.to(images.dtype) * (1 - keep)


def peak_boxes(scores: torch.Tensor, counts: torch.Tensor, size: tuple[int, int],
               scale: tuple[float, float] = (0.5, 1.5), generator: torch.Generator | None = None) -> torch.Tensor:
    """Region-shaped erasing (`model.erase_shape=boxes`, after RFM's boxes of random size around the top peaks):
    image i gets up to `counts[i]` boxes, one after another, each centred on the highest point of `scores` (B, h, w)
    upsampled to the image's `size`, away from the boxes before it. Each box's height and width are a cell's times
    factors drawn from U(scale). Returns the pixel mask (B, H, W): 0 inside a box, 1 elsewhere.

    The map is upsampled bicubically, padded by a cell of its minimum first: a lone peak cell puts its box on the
    cell's centre, also at the border, and two equal neighbours put it on their common edge (a bilinear map is flat
    there), so a box follows the evidence between grid cells. The next box's centre must lie outside the last one
    dilated to twice its size, so boxes barely overlap and k boxes erase about as much as k cells; an image whose
    map is used up gets fewer."""
    b, (h, w), (height, width) = scores.shape[0], scores.shape[-2:], size
    low = scores.flatten(1).amin(dim=1).view(b, 1, 1)
    padded = torch.nn.functional.pad((scores - low)[:, None].float(), (1, 1, 1, 1))
    pad_h, pad_w = round(height / h), round(width / w)
    big = torch.nn.functional.interpolate(padded, size=(height + 2 * pad_h, width + 2 * pad_w), mode="bicubic",
                                          align_corners=False)[:, 0]
    peaks = big[:, pad_h:pad_h + height, pad_w:pad_w + width].flatten(1)
    rows = torch.arange(height, device=scores.device).view(1, height, 1)
    cols = torch.arange(width, device=scores.device).view(1, 1, width)
    keep = torch.ones(b, height, width, device=scores.device)
    lo, hi = scale
    for j in range(int(counts.max()) if counts.numel() else 0):
        best, centre = peaks.max(dim=1)
        active = ((j < counts) & torch.isfinite(best)).view(b, 1, 1)
        cy, cx = (centre // width).view(b, 1, 1), (centre % width).view(b, 1, 1)
        factors = torch.rand(b, 2, device=scores.device, generator=generator) * (hi - lo) + lo
        half_h = (factors[:, 0] * height / h / 2).view(b, 1, 1)
        half_w = (factors[:, 1] * width / w / 2).view(b, 1, 1)
        dy, dx = (rows - cy).abs(), (cols - cx).abs()
        keep = keep.masked_fill((dy < half_h) & (dx < half_w) & active, 0.0)
        peaks = peaks.masked_fill(((dy < 2 * half_h) & (dx < 2 * half_w)).flatten(1), float("-inf"))
    return keep


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
    perm, lam = mixup_draw(labels, alpha, same_class, generator)
    lam = lam.to(features.dtype)
    mixed = lam[:, None] * features + (1 - lam[:, None]) * features[perm]
    mixed_labels = lam * labels + (1 - lam) * labels[perm]
    return mixed, mixed_labels, lam


def mixup_draw(labels: torch.Tensor, alpha: float, same_class: bool = False,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5-6's random part for a batch with these labels: (partner index, float32 lambda ~ Beta(alpha, alpha)) per
    sample, the partners first (`deep_mixup` and `global_deep_mixup` draw in this order from the same stream)."""
    perm = mixup_partners(labels, same_class, generator)
    concentration = torch.full((labels.shape[0],), float(alpha), device=labels.device, dtype=torch.float32)
    return perm, torch.distributions.Beta(concentration, concentration).sample()


def global_deep_mixup(features: torch.Tensor, labels: torch.Tensor, alpha: float,
                      same_class: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 5-6 with partners from the global batch (`model.mixup_scope=global`): every rank's features and labels are
    all-gathered, rank 0 draws the partners and lambdas for the whole batch from its stream (`mixup_draw`) and
    broadcasts them, and each rank keeps the mixed rows of its own samples. So the mixing does not depend on how the
    batch is split over ranks: the rows equal `deep_mixup` over the concatenated batch with rank 0's draws, and a
    world of one (or no process group) is `deep_mixup` itself, the same draws from the same stream.

    The gather is autograd's (`torch.distributed.nn.functional.all_gather`): the gradient of a mixed row reaches
    its partner's features on the partner's rank. Every rank must call this with the same per-rank batch size (the
    training loader's fixed `per_rank_batch`). Returns this rank's (F', y', lam).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return deep_mixup(features, labels, alpha, same_class=same_class)
    from torch.distributed.nn.functional import all_gather

    world, rank, b = dist.get_world_size(), dist.get_rank(), features.shape[0]
    everyone = torch.cat(all_gather(features))  # (world * b, C), rank r's rows at r*b .. r*b + b - 1
    label_parts = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(label_parts, labels.contiguous())
    all_labels = torch.cat(label_parts)
    # one broadcast of rank 0's draws: partner indices (exact in float32 below 2**24 samples) and lambdas
    draw = torch.empty(2 * world * b, dtype=torch.float32, device=features.device)
    if rank == 0:
        perm, lam = mixup_draw(all_labels, alpha, same_class)
        draw = torch.cat([perm.to(torch.float32), lam])
    dist.broadcast(draw, src=0)
    own = slice(rank * b, (rank + 1) * b)
    perm = draw[: world * b].long()[own]
    lam = draw[world * b:][own].to(features.dtype)
    mixed = lam[:, None] * features + (1 - lam[:, None]) * everyone[perm]
    mixed_labels = lam * labels + (1 - lam) * all_labels[perm]
    return mixed, mixed_labels, lam
