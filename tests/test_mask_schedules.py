"""AttMask's schedules on the teacher's mask (training forwards only): a share of the batch masked, a ratio per image
drawn from a range, and hint cells shown after all. Observed from the mask a forward returns and from what the
student head receives, on the small MobileNetV3 model of test_method (a 4x4 grid)."""

from __future__ import annotations

import pytest
import torch
from test_method import SIZE, Calls, batch, make_model

from ltm.config import ConfigError, load_config
from ltm.models import BackboneError, build_model
from ltm.models.masking import mask_batch_share, peak_boxes, per_image_mask, reveal_hints


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


# --- region-shaped erasing (erase_shape=boxes), noise fill, the ratio annealed ---------------------------------------


def erased(mask: torch.Tensor) -> torch.Tensor:
    return mask < 0.5


def test_boxes_are_centred_on_the_maps_peaks_between_cells_where_the_map_says_so():
    scores = torch.zeros(2, 4, 4)
    scores[0, 1, 2] = 1.0  # one hot cell: its box sits on it
    scores[0, 3, 0] = 0.5  # the second peak
    scores[1, 2, 1] = scores[1, 2, 2] = 1.0  # two equal neighbours: the peak lies on their common edge
    keep = peak_boxes(scores, torch.tensor([1, 2]), (112, 112), scale=(1.0, 1.0))
    box0 = erased(keep[0]).nonzero().float()
    assert abs(len(box0) - 28 * 28) <= 2 * 28  # one cell's area
    assert box0[:, 0].mean().item() == pytest.approx(28 + 14, abs=2)  # the centre of cell (1, 2)
    assert box0[:, 1].mean().item() == pytest.approx(56 + 14, abs=2)
    assert not erased(keep[0, 84:, :28]).any()  # counts[0] = 1: the second peak stays visible
    two = erased(keep[1]).nonzero().float()
    assert abs(len(two) - 2 * 28 * 28) <= 4 * 28  # two boxes that do not overlap
    first = erased(peak_boxes(scores[1:], torch.tensor([1]), (112, 112), scale=(1.0, 1.0))[0]).nonzero().float()
    assert first[:, 1].mean().item() == pytest.approx(56, abs=2)  # straddles cells 1 and 2: not a grid cell
    assert first[:, 0].mean().item() == pytest.approx(56 + 14, abs=2)
    # sizes drawn from U(scale) per box
    areas = {int(erased(peak_boxes(scores[:1], torch.tensor([1]), (112, 112), scale=(0.5, 1.5),
                                   generator=torch.Generator().manual_seed(s))).sum()) for s in range(6)}
    assert len(areas) > 3 and min(areas) >= 14 * 14 - 60 and max(areas) <= 42 * 42 + 90


def box_erasing_forward(n: int, seed: int, **model) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, dict,
                                                             torch.Tensor]:
    """One training forward of a box-erasing model: (the model, images, labels, its output, what the student CNN
    received)."""
    m = make_model(mixup=False, mask_at="input", erase_shape="boxes", **model)
    images, labels = batch(n)
    m.train()
    torch.manual_seed(seed)
    with Calls(m.student_cnn) as seen:
        out = m(images, labels)
    return m, images, labels, out, seen.seen[0]


def test_box_erasing_hides_the_boxes_of_the_masked_cells_from_the_student():
    m, images, _, out, student_in = box_erasing_forward(4, 0, erase_box_scale=[1.0, 1.0])
    mask = out["mask"]
    assert mask.shape == (4, SIZE, SIZE)  # a pixel mask
    mean = m.student_cnn.mean.view(3, 1, 1)
    for i in range(4):
        hidden = erased(mask[i])
        assert torch.allclose(student_in[i][:, hidden], mean.expand(3, SIZE, SIZE)[:, hidden])
        assert torch.equal(student_in[i][:, ~hidden], images[i][:, ~hidden])
        # 4 boxes of a cell each (32 px at 128 px), overlap-free: about 4 cells' area
        assert 3 * 32 * 32 <= int(hidden.sum()) <= 4 * 33 * 33
        # the map's highest cell lies under a box
        top = int(out["attention"][i].flatten().argmax())
        cell = hidden[(top // 4) * 32:(top // 4 + 1) * 32, (top % 4) * 32:(top % 4 + 1) * 32]
        assert cell.float().mean() > 0.5


def test_box_erasing_with_real_mask_fake_gives_each_real_a_fakes_boxes_and_noise_fills_them():
    _, images, labels, out, student_in = box_erasing_forward(6, 1, real_mask="fake", erase_fill="noise")
    mask = out["mask"]
    fakes = [mask[i] for i in range(6) if labels[i] == 1]
    for i in range(6):
        if labels[i] == 0:
            assert any(torch.equal(mask[i], f) for f in fakes)
    hidden = erased(mask[1])
    filled = student_in[1][:, hidden]
    assert filled.std() > 0.2 and 0.0 <= filled.min() and filled.max() <= 1.0  # uniform noise, not one colour
    assert torch.equal(student_in[1][:, ~hidden], images[1][:, ~hidden])


def test_the_ratio_is_annealed_after_the_warm_up_and_the_count_is_in_the_checkpoint():
    m = make_model(mixup=False, mask_ratio=0.5, mask_warmup=2, mask_anneal=4)  # k = 8 of 16 in the end
    images, labels = batch(4)
    m.train()
    masked = []
    for _ in range(8):
        masked.append(zeros_per_image(m(images, labels)["mask"])[0])
    assert masked == [0, 0, 0, 2, 4, 6, 8, 8]  # warm-up, then 0, 1/4 .. 4/4 of k
    assert int(m.state_dict()["forwards"]) == 8
    boxes = make_model(mixup=False, mask_at="input", erase_shape="boxes", mask_ratio=0.5, mask_anneal=2)
    boxes.train()
    assert int(erased(boxes(images, labels)["mask"]).sum()) == 0  # no box at ratio 0
    for bad in ("model.erase_shape=boxes", "model.erase_fill=noise", "model.mask_anneal=-1",
                "model.erase_box_scale=[0,1]"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("tiny-cpu", [bad])  # tiny-cpu masks features: boxes and fills need mask_at=input
    with pytest.raises(ConfigError, match="model.erase_shape"):
        load_config("tiny-cpu", ["model.mask_at=input", "model.erase_shape=boxes", "model.mask_strategy=soft"])


def test_the_flop_count_that_every_training_run_starts_with_takes_the_schedules():
    """`ltm train` counts the model's FLOPs on the meta device before its first step; the forward count of the warm-up
    and the annealing and the boxes per image hold no values there, so they are counted as the plain forward."""
    from ltm.models.flops import model_gflops

    erasing = ["model.mask_at=input", "model.attention_map=saliency"]
    plain = model_gflops(load_config("tiny-cpu", erasing))
    for extra in (["model.mask_warmup=5"], ["model.mask_anneal=5"],
                  ["model.erase_shape=boxes", "model.erase_fill=noise"]):
        assert model_gflops(load_config("tiny-cpu", [*erasing, *extra])) == plain
