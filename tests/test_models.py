"""The method's equations (Sec. 3), each test naming the one it checks, and the paper configuration."""

from __future__ import annotations

import pytest
import torch

from ltm.config import load_config
from ltm.models import BackboneError, Baseline, LearningToMask, build_model
from ltm.models.masking import (
    deep_mixup,
    diversity_loss,
    erase_cells,
    feature_mask,
    masks_from_fakes,
    num_masked,
    occlusion_map,
)
from ltm.models.precision import keep_batchnorm_fp32


def tiny_model_cfg(**overrides):
    overrides = {"pretrained": "null", **overrides}  # random init: these tests exercise shapes and wiring
    cfg = load_config("tiny-cpu", [f"model.{k}={v}" for k, v in overrides.items()])
    return cfg.model


@pytest.fixture(scope="module")
def tiny_ltm() -> LearningToMask:
    torch.manual_seed(0)
    return build_model(tiny_model_cfg(), image_size=64)


@pytest.mark.parametrize("ratio,grid", [(0.25, (7, 7)), (0.25, (4, 4)), (0.5, (3, 5)), (0.1, (7, 7))])
def test_eq4_high_low_random_mask_exactly_k_positions(ratio, grid):
    torch.manual_seed(1)
    attention = torch.rand(5, *grid)
    k = num_masked(ratio, grid)
    assert k == round(ratio * grid[0] * grid[1])
    flat = attention.flatten(1)
    for strategy, expected in (("high", flat.topk(k, 1).indices), ("low", flat.topk(k, 1, largest=False).indices)):
        mask = feature_mask(attention, ratio, strategy).flatten(1)
        for row, idx in zip(mask, expected):
            assert set(torch.nonzero(row == 0).flatten().tolist()) == set(idx.tolist()), strategy
    random_mask = feature_mask(attention, ratio, "random")
    assert random_mask.shape == attention.shape
    assert ((random_mask == 0).flatten(1).sum(1) == k).all()
    assert set(random_mask.unique().tolist()) <= {0.0, 1.0}


def test_eq4_mask_carries_no_gradient():
    attention = torch.rand(2, 4, 4, requires_grad=True)
    mask = feature_mask(attention, 0.25, "high")
    assert not mask.requires_grad


def test_eq3_diversity_zero_for_disjoint_heads_max_for_identical():
    disjoint = torch.zeros(2, 4, 16)
    for head in range(4):
        disjoint[:, head, head * 4:(head + 1) * 4] = 0.25
    assert diversity_loss(disjoint).item() == pytest.approx(0.0, abs=1e-7)
    identical = torch.rand(2, 1, 16).softmax(-1).expand(2, 4, 16)
    assert diversity_loss(identical).item() == pytest.approx(1.0, abs=1e-6)
    partly = torch.rand(2, 4, 16).softmax(-1)
    assert 0.0 < diversity_loss(partly).item() < 1.0


def test_eq3_diversity_has_gradients_into_vit(tiny_ltm):
    tiny_ltm.zero_grad()
    t = tiny_ltm.teacher(torch.rand(2, 3, 64, 64))
    diversity_loss(t["head_maps"]).backward()
    vit_grads = [p.grad for p in tiny_ltm.teacher_vit.blocks[-1].attn.qkv.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in vit_grads)
    assert all(p.grad is None for p in tiny_ltm.student_cnn.parameters())


def test_eq5_eq6_mixup():
    features, labels = torch.randn(8, 16), torch.tensor([0, 1] * 4, dtype=torch.float32)
    torch.manual_seed(0)
    mixed, mixed_labels, lam = deep_mixup(features, labels, alpha=1.0)
    assert ((mixed_labels >= 0) & (mixed_labels <= 1)).all()
    assert ((lam >= 0) & (lam <= 1)).all()
    # with each sample's lambda, F' and y' are the convex combination of i and its partner (Eq. 5-6)
    torch.manual_seed(0)
    perm = torch.randperm(8)
    torch.testing.assert_close(mixed, lam[:, None] * features + (1 - lam[:, None]) * features[perm])
    torch.testing.assert_close(mixed_labels, lam * labels + (1 - lam) * labels[perm])


def test_eq5_mixup_off_student_sees_masked_features(tiny_ltm, monkeypatch):
    import ltm.models.ltm as module

    called = []
    monkeypatch.setattr(module, "deep_mixup", lambda *a, **k: called.append(1) or (a[0], a[1], None))
    monkeypatch.setattr(module, "global_deep_mixup", module.deep_mixup)  # model.mixup_scope=global (the default)
    tiny_ltm.cfg.mixup = False
    try:
        tiny_ltm(torch.rand(2, 3, 64, 64), torch.tensor([0.0, 1.0]))
    finally:
        tiny_ltm.cfg.mixup = True
    assert called == []
    tiny_ltm(torch.rand(2, 3, 64, 64), torch.tensor([0.0, 1.0]))
    assert called == [1]


def test_eq7_total_is_weighted_sum_and_student_loss_leaves_teacher_without_gradient(tiny_ltm):
    torch.manual_seed(0)
    out = tiny_ltm(torch.rand(4, 3, 64, 64), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    losses = out["losses"]
    assert set(losses) == {"cls_t", "vit_t", "div", "student"}
    expected = losses["cls_t"] + losses["vit_t"] + tiny_ltm.cfg.div_weight * losses["div"] + losses["student"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    # backward of L^s alone: recompute the student branch with the graph kept
    tiny_ltm.zero_grad()
    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0.0, 1.0, 1.0, 0.0])
    t = tiny_ltm.teacher(images)
    mask = feature_mask(t["attention"], 0.25, "high")
    student_logits = tiny_ltm.student_head(tiny_ltm.pool(tiny_ltm.student_cnn(images), mask)).squeeze(1)
    torch.nn.functional.binary_cross_entropy_with_logits(student_logits, labels).backward()
    teacher = [*tiny_ltm.teacher_cnn.parameters(), *tiny_ltm.teacher_vit.parameters(),
               *tiny_ltm.teacher_cnn_head.parameters(), *tiny_ltm.teacher_vit_head.parameters()]
    assert all(p.grad is None for p in teacher)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_ltm.student_cnn.parameters())


def test_model_api_shapes_and_predict(tiny_ltm):
    out = tiny_ltm(torch.rand(3, 3, 64, 64), torch.tensor([0.0, 1.0, 1.0]))
    h, w = tiny_ltm.grid
    assert out["logits"].shape == (3,) and out["attention"].shape == (3, h, w) and out["mask"].shape == (3, h, w)
    probs = tiny_ltm.predict(torch.rand(3, 3, 64, 64))
    assert probs.shape == (3,) and ((probs >= 0) & (probs <= 1)).all() and not probs.requires_grad
    for head in ("teacher_cnn", "teacher_vit", "ensemble"):
        tiny_ltm.cfg.inference_head = head
        try:
            assert tiny_ltm.predict(torch.rand(2, 3, 64, 64)).shape == (2,)
        finally:
            tiny_ltm.cfg.inference_head = "student"


@pytest.mark.parametrize("backbone", ["legacy_xception", "resnet18"])
def test_paper_config_builds_and_trains_one_step(backbone):
    cfg = load_config("paper", [f"model.backbone={backbone}", "model.pretrained=null"])
    model = build_model(cfg.model, cfg.data.image_size)
    if backbone == "legacy_xception":
        assert model.teacher_cnn.channels == 2048
    assert model.grid == (7, 7)
    assert len(model.teacher_vit.blocks) == 6 and model.teacher_vit.blocks[0].attn.heads == 6
    out = model(torch.rand(2, 3, 224, 224), torch.tensor([0.0, 1.0]))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.teacher_vit.parameters())


def test_baseline_has_the_same_interface():
    cfg = tiny_model_cfg(kind="baseline")
    model = build_model(cfg, 64)
    assert isinstance(model, Baseline)
    out = model(torch.rand(2, 3, 64, 64), torch.tensor([0.0, 1.0]))
    assert set(out["losses"]) == {"cls"} and out["logits"].shape == (2,)
    out["loss"].backward()
    assert model.predict(torch.rand(2, 3, 64, 64)).shape == (2,)


def test_heterogeneous_backbones_table5_and_grid_mismatch_error():
    model = build_model(tiny_model_cfg(backbone="resnet34", teacher_backbone="resnet18"), 64)
    assert model.grid == (2, 2)
    with pytest.raises(BackboneError, match=r"densenet121.*3x3.*resnet18.*4x4"):
        build_model(tiny_model_cfg(backbone="resnet18", teacher_backbone="densenet121"), 100)


def test_pretrained_weights_load_from_local_file_and_errors_name_the_path(tmp_path):
    source = build_model(tiny_model_cfg(kind="baseline"), 64)
    good = tmp_path / "resnet18.pth"
    torch.save(source.backbone.net.state_dict(), good)
    loaded = build_model(tiny_model_cfg(kind="baseline", pretrained=str(good)), 64)
    for (name, a), b in zip(source.backbone.net.state_dict().items(), loaded.backbone.net.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(BackboneError, match="missing.pth"):
        build_model(tiny_model_cfg(kind="baseline", pretrained=str(tmp_path / "missing.pth")), 64)
    wrong = tmp_path / "resnet34.pth"
    torch.save(build_model(tiny_model_cfg(kind="baseline", backbone="resnet34"), 64).backbone.net.state_dict(), wrong)
    with pytest.raises(BackboneError, match="resnet34.pth"):
        build_model(tiny_model_cfg(kind="baseline", pretrained=str(wrong)), 64)


def test_every_blocks_attention_is_available_and_fused_path_matches(tiny_ltm):
    tiny_ltm.eval()
    images = torch.rand(2, 3, 64, 64)
    full = tiny_ltm.teacher(images, all_attentions=True)
    fast = tiny_ltm.teacher(images)
    tiny_ltm.train()
    n = 1 + tiny_ltm.grid[0] * tiny_ltm.grid[1]
    assert len(full["attentions"]) == len(tiny_ltm.teacher_vit.blocks)
    assert all(a.shape == (2, tiny_ltm.cfg.vit.heads, n, n) for a in full["attentions"])
    torch.testing.assert_close(full["attentions"][-1], fast["attentions"][-1])
    torch.testing.assert_close(full["vit_logits"], fast["vit_logits"])
    torch.testing.assert_close(full["attentions"][-1].sum(-1), torch.ones(2, tiny_ltm.cfg.vit.heads, n))


def test_bf16_buffers_trace_under_torch_compile():
    """train.compile with bf16: DeepSpeed casts each buffer by swapping its `.data` for a bf16 copy. A buffer that is
    a view keeps its fp32 base, and torch.compile refuses to trace it ("float32 != bfloat16"); the backbones'
    normalisation constants are therefore no views. Dynamo's tracing is what fails, so its `eager` backend (no
    inductor code generation) checks it in a second."""
    model = build_model(load_config("tiny-cpu", ["model.backbone=test_resnet", "model.pretrained=null"]).model, 64)
    for buffer in model.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(torch.bfloat16)  # what DeepSpeed's bf16 does to buffers
    model.to(torch.bfloat16)
    keep_batchnorm_fp32(model)  # what the Trainer then does, before compiling
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    out = compiled(torch.rand(2, 3, 64, 64, dtype=torch.bfloat16), torch.tensor([0.0, 1.0]))
    assert torch.isfinite(out["loss"])
    assert all(b.dtype == torch.float32 for name, b in model.named_buffers() if "running_" in name)


# ------------------------------------------------------------------------------------------------ map options


def _map_model(kind: str, mask_at: str = "features", smooth: float = 0.0) -> LearningToMask:
    torch.manual_seed(0)
    cfg = tiny_model_cfg(attention_map=kind, mask_at=mask_at, saliency_smooth=smooth)
    return build_model(cfg, image_size=112)  # a 4x4 grid


def _expected_map(model: LearningToMask, images: torch.Tensor, kind: str) -> torch.Tensor:
    """Each map kind computed here from its definition, outside the model's own code path."""
    x = images.clone().requires_grad_(True)
    x_t = model.teacher_cnn(x)
    cls_out, attentions = model.teacher_vit(x_t, all_attentions=True)
    last = attentions[-1]
    cls_row = last[:, :, 0, 1:].reshape(len(x), last.shape[1], 4, 4)
    if kind == "mean":
        return cls_row.mean(1)
    if kind == "max":
        return cls_row.max(1).values
    if kind == "rollout":
        n = last.shape[-1]
        joint = torch.eye(n).expand(len(x), n, n)
        for a in attentions:
            a = 0.5 * a.mean(1) + 0.5 * torch.eye(n)
            joint = (a / a.sum(-1, keepdim=True)) @ joint
        return joint[:, 0, 1:].reshape(len(x), 4, 4)
    if kind == "cam":
        w = model.teacher_cnn_head.weight[0]
        return (x_t * w[None, :, None, None]).sum(1)
    if kind == "occlusion":  # each 28 px cell painted with the teacher's mean colour, one at a time
        def decision(y: torch.Tensor) -> torch.Tensor:
            y_t = model.teacher_cnn(y)
            vit_logits = model.teacher_vit_head(model.teacher_vit(y_t)[0])[:, 0]
            return model.teacher_cnn_head(y_t.mean((2, 3)))[:, 0] + vit_logits
        full = decision(images)
        drops = torch.zeros(len(x), 4, 4)
        for i in range(4):
            for j in range(4):
                erased = images.clone()
                erased[:, :, 28 * i:28 * i + 28, 28 * j:28 * j + 28] = model.teacher_cnn.mean.view(1, 3, 1, 1)
                drops[:, i, j] = (full - decision(erased)).abs()
        return drops
    if kind == "grad":
        g = torch.autograd.grad(model.teacher_vit_head(cls_out).sum(), last)[0]
        return (g * last).clamp_min(0)[:, :, 0, 1:].mean(1).reshape(len(x), 4, 4)
    logits = model.teacher_cnn_head(x_t.mean((2, 3))).sum() + model.teacher_vit_head(cls_out).sum()
    g = torch.autograd.grad(logits, x)[0]
    per_pixel = ((g * x) if kind == "saliency" else g).abs().sum(1, keepdim=True)
    if model.cfg.saliency_smooth:  # 0.19 x 112 px = 21.3: a window of 21 px
        width = 21  # each pixel: the mean over the window's pixels inside the image
        ones = torch.ones_like(per_pixel)
        pad = width // 2
        window = torch.ones(1, 1, width, width)
        per_pixel = (torch.nn.functional.conv2d(per_pixel, window, padding=pad)
                     / torch.nn.functional.conv2d(ones, window, padding=pad))
    return torch.nn.functional.avg_pool2d(per_pixel, 28)[:, 0]


KINDS = ("mean", "max", "rollout", "grad", "cam", "saliency", "input_grad", "occlusion")


@pytest.mark.parametrize("kind,smooth", [(k, 0.0) for k in KINDS] + [("saliency", 0.19), ("input_grad", 0.19)])
def test_attention_map_option_decides_the_map_eq4_masks(kind, smooth):
    model = _map_model(kind, smooth=smooth)
    model.eval()  # BatchNorm on running statistics: the reference and the forward see the same features
    images, labels = torch.rand(6, 3, 112, 112), torch.tensor([0.0, 1.0] * 3)
    expected = _expected_map(model, images, kind).detach()
    out = model(images, labels)
    assert torch.allclose(out["attention"], expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(out["mask"], feature_mask(expected, model.cfg.mask_ratio, "high"))
    assert torch.equal(model.explain(images)["attention"], out["attention"])
    maps = model.teacher_maps(images)
    assert torch.allclose(maps["mask_map"], expected, rtol=1e-4, atol=1e-6)
    assert not any(p.grad is not None for p in model.parameters())  # the map's backward leaves no gradients
    out["loss"].backward()  # and the loss's own backward still runs through the retained graph


def test_map_kinds_rank_cells_differently():
    """The option is not ignored: on the same weights and images the eight kinds do not all pick the same cells."""
    images = torch.rand(8, 3, 112, 112)
    masks = {}
    for kind in KINDS:
        model = _map_model(kind)
        model.eval()
        masks[kind] = model.explain(images)["mask"]
    distinct = {tuple(m.flatten().tolist()) for m in masks.values()}
    assert len(distinct) >= 6


def test_occlusion_map_ranks_first_the_cell_the_decision_reads():
    """A decision that reads only pixels inside one cell: erasing that cell is the only change it feels."""
    fill = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    images = torch.rand(3, 3, 112, 112)

    def decision(x: torch.Tensor) -> torch.Tensor:  # reads cell (row 2, column 1) of the 4x4 grid only
        return (x[:, :, 60:70, 31:45] - 0.2).pow(2).sum((1, 2, 3))

    drops = occlusion_map(decision, images, (4, 4), fill)
    assert drops.shape == (3, 4, 4)
    assert (drops.flatten(1).argmax(1) == 2 * 4 + 1).all()
    assert (drops.flatten(1).topk(2).values[:, 1] == 0).all()


def test_occlusion_leaves_the_teachers_batchnorm_statistics_and_modes_alone():
    """The h*w erased copies run the teacher in eval mode: a training forward updates the running statistics
    exactly as the same forward with the `mean` map does, and every module's mode is restored."""
    images, labels = torch.rand(4, 3, 112, 112), torch.tensor([0.0, 1.0, 0.0, 1.0])
    stats = {}
    for kind in ("mean", "occlusion"):
        model = _map_model(kind)
        model.train()
        before = {n: m.training for n, m in model.named_modules()}
        model(images, labels)
        assert {n: m.training for n, m in model.named_modules()} == before
        stats[kind] = {n: b.clone() for n, b in model.named_buffers() if "running_" in n}
    assert stats["mean"].keys() == stats["occlusion"].keys() and stats["mean"]
    assert all(torch.equal(stats["mean"][n], stats["occlusion"][n]) for n in stats["mean"])


def test_real_mask_fake_gives_each_real_the_mask_of_a_fake_of_its_batch():
    """`model.real_mask=fake`: in training a real's mask is one of the batch's fakes' masks and a fake keeps its own,
    so the masked positions of the two labels come from one distribution; `own` (and eval) keep each sample's own."""
    images = torch.rand(8, 3, 112, 112)
    labels = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    own = _map_model("saliency")
    own.eval()
    expected = feature_mask(own.explain(images)["attention"], 0.25, "high")
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(attention_map="saliency", real_mask="fake"), image_size=112)
    model.eval()
    assert torch.equal(model(images, labels)["mask"], expected)  # eval: every sample its own
    model.train()
    for module in model.modules():  # BatchNorm on running statistics, so the map equals the eval-mode one
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
    mask = model(images, labels)["mask"]
    fakes = [i for i, y in enumerate(labels) if y == 1]
    assert all(torch.equal(mask[i], expected[i]) for i in fakes)
    for i in (i for i, y in enumerate(labels) if y == 0):
        assert any(torch.equal(mask[i], expected[j]) for j in fakes)
    assert not all(torch.equal(mask[i], expected[i]) for i in range(8) if labels[i] == 0)
    only_reals = torch.zeros(8)
    assert torch.equal(masks_from_fakes(expected, only_reals), expected)


@pytest.mark.parametrize("mask_at", ["features", "input"])
def test_mask_at_input_hides_the_masked_cells_pixels_from_the_student(mask_at):
    """With mask_at=input, pixels inside masked cells cannot change the student's loss; on features they can (the
    student CNN's receptive field reaches them from the kept cells)."""
    model = _map_model("mean", mask_at)
    model.eval()
    torch.manual_seed(3)
    images, labels = torch.rand(4, 3, 112, 112), torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = model(images, labels)
    hidden = torch.nn.functional.interpolate(1 - out["mask"][:, None], size=(112, 112), mode="nearest")
    changed = images * (1 - hidden) + torch.rand_like(images) * hidden  # new pixels only under M = 0
    # the teacher must pick the same cells on the changed images for the comparison to hold: give it the original
    teacher = model.teacher
    model.teacher = lambda x, all_attentions=False, map_kind=None: teacher(images, all_attentions, map_kind)
    again = model(changed, labels)
    assert torch.equal(again["mask"], out["mask"])
    same = torch.allclose(again["losses"]["student"], out["losses"]["student"], atol=1e-6)
    assert same == (mask_at == "input")


def test_soft_mask_attenuates_each_cell_by_its_share_of_the_strongest():
    """`mask_strategy=soft`: M = 1 - A / max(A) from the map Eq. 4 would rank (the strongest cell hidden, none
    zeroed by rank), on the features and, blended toward the mean colour, on the input."""
    torch.manual_seed(4)
    attention = torch.rand(3, 4, 4)
    mask = feature_mask(attention, 0.25, "soft")
    flat = attention.flatten(1)
    assert torch.allclose(mask.flatten(1), 1 - flat / flat.amax(1, keepdim=True))
    assert ((mask == 0).flatten(1).sum(1) == 1).all() and mask.min() >= 0 and mask.max() < 1
    images, fill = torch.rand(3, 3, 8, 8), torch.tensor([0.5, 0.4, 0.3])[:, None, None]
    keep = mask.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]
    assert torch.allclose(erase_cells(images, mask, fill), images * keep + fill * (1 - keep))
    for mask_at in ("features", "input"):
        torch.manual_seed(0)
        model = build_model(tiny_model_cfg(mask_strategy="soft", mask_at=mask_at), image_size=112)
        model.eval()
        x = torch.rand(2, 3, 112, 112)
        a = _expected_map(model, x, "mean").flatten(1)
        out = model(x, torch.tensor([0.0, 1.0]))
        assert torch.allclose(out["mask"].flatten(1), 1 - a / a.amax(1, keepdim=True), atol=1e-5)
