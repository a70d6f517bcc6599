"""AttMask's schedules on the teacher's mask (training forwards only): a share of the batch masked, a ratio per image
drawn from a range, and hint cells shown after all. Observed from the mask a forward returns and from what the
student head receives, on the small MobileNetV3 model of test_method (a 4x4 grid)."""

from __future__ import annotations

import pytest
import torch
from test_method import Calls, batch, make_model

from ltm.config import ConfigError, load_config
from ltm.models import BackboneError, build_model
from ltm.models.masking import mask_batch_share, per_image_mask, reveal_hints


def zeros_per_image(mask: torch.Tensor) -> list[int]:
    return (mask.flatten(1) == 0).sum(dim=1).tolist()


def test_a_batch_share_masks_exactly_that_many_images_and_shows_the_others_whole():
    m = make_model(mixup=False, mask_share=0.5)
    images, labels = batch(8)
    m.train()
    masked_sets = set()
    for seed in range(4):
        torch.manual_seed(seed)
        with Calls(m.student_cnn, output=True) as x_s, Calls(m.student_head) as head_in:
            out = m(images, labels)
        zeros = zeros_per_image(out["mask"])
        assert sorted(zeros) == [0] * 4 + [4] * 4  # k = 4 of 16 in half the batch, none in the other half
        whole = torch.tensor([z == 0 for z in zeros])
        # the unmasked images' features are pooled over every position, the masked ones' are not
        assert torch.allclose(head_in.seen[0][whole], x_s.seen[0][whole].mean(dim=(2, 3)), atol=1e-6)
        assert not torch.allclose(head_in.seen[0][~whole], x_s.seen[0][~whole].mean(dim=(2, 3)), atol=1e-4)
        masked_sets.add(tuple(whole.tolist()))
    assert len(masked_sets) > 1  # drawn anew each forward


def test_a_ratio_range_draws_each_images_ratio_and_masks_its_most_attended_cells():
    m = make_model(mixup=False, mask_ratio_range=[0.1, 0.5])
    images, labels = batch(8)
    m.train()
    counts = set()
    for seed in range(5):
        torch.manual_seed(seed)
        out = m(images, labels)
        for row_mask, row_att in zip(out["mask"].flatten(1), out["attention"].flatten(1)):
            k = int((row_mask == 0).sum())
            assert 2 <= k <= 8  # round(0.1 * 16) .. round(0.5 * 16)
            top = row_att.topk(k).indices
            assert (row_mask[top] == 0).all()  # the k most attended
            counts.add(k)
    assert len(counts) >= 3
    m.eval()
    with torch.no_grad():
        assert zeros_per_image(m(images, labels)["mask"]) == [4] * 8  # evaluation: mask_ratio on every image


def test_hints_show_a_share_of_the_masked_cells_drawn_at_random():
    m = make_model(mixup=False, mask_ratio=0.5, mask_hint=0.25)  # k = 8 of 16, 2 of them shown
    images, labels = batch(6)
    m.train()
    shown = set()
    for seed in range(4):
        torch.manual_seed(seed)
        out = m(images, labels)
        assert zeros_per_image(out["mask"]) == [6] * 6
        for row_mask, row_att in zip(out["mask"].flatten(1), out["attention"].flatten(1)):
            top8 = set(row_att.topk(8).indices.tolist())
            hidden = set((row_mask == 0).nonzero().flatten().tolist())
            assert hidden <= top8  # every masked cell is one of the 8 most attended
            shown.add(tuple(sorted(top8 - hidden)))
    assert len(shown) > 1


def test_the_functions_alone():
    attention = torch.arange(16.0).view(1, 4, 4).repeat(3, 1, 1)
    mask = per_image_mask(attention, torch.tensor([0.0, 0.25, 0.5]), "high")
    assert zeros_per_image(mask) == [0, 4, 8]
    assert (mask[2].flatten()[8:] == 0).all()  # the highest 8
    low = per_image_mask(attention, torch.tensor([0.25] * 3), "low")
    assert (low[0].flatten()[:4] == 0).all()
    assert zeros_per_image(reveal_hints(mask, 0.5)) == [0, 2, 4]
    shared = mask_batch_share(torch.zeros(10, 4, 4), 0.3)
    assert sorted(zeros_per_image(shared)) == [0] * 7 + [16] * 3


def test_schedules_that_would_drop_uneven_token_counts_are_refused():
    base = ["model.backbone=vit_tiny_patch16_224", "model.backbone_args={depth: 1}", "model.vit.depth=1",
            "model.pretrained=null", "model.mask_at=tokens"]
    with pytest.raises(BackboneError, match="mask_share.*mask_fill=token"):
        build_model(load_config("tiny-cpu", [*base, "model.mask_share=0.5"]).model, 112)
    model = build_model(load_config("tiny-cpu", [*base, "model.mask_share=0.5", "model.mask_hint=0.25",
                                                 "model.mask_fill=token"]).model, 112)
    out = model(torch.rand(4, 3, 112, 112), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert sorted(zeros_per_image(out["mask"])) == [0, 0, 9, 9]  # 12 of 49 masked, round(0.25 * 12) = 3 shown
    with pytest.raises(BackboneError, match="soft"):
        make_model(mask_ratio_range=[0.1, 0.5], mask_strategy="soft")
    for bad in ("model.mask_share=0", "model.mask_ratio_range=[0.5,0.1]", "model.mask_hint=1.0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("tiny-cpu", [bad])
