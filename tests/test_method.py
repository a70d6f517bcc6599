"""The method as `forward()` and `predict()` run it (Sec. 3), observed from outside the model.

What the student head receives is read with forward hooks on `student_cnn` / `student_head`; every expected value is
computed here from those observations, independently of the model's own helpers, so a forward pass that pools
without the mask, leaks L^s into the teacher, mixes labels with another lambda, or scores with the wrong head fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from ltm.config import load_config
from ltm.models import build_model
from ltm.models.masking import deep_mixup, feature_mask

SIZE = 128  # MobileNetV3-small at 128 px: a 4x4 feature grid, so Eq. 4 masks k = 4 of 16 positions


def make_model(size: int = SIZE, **model):
    overrides = {"backbone": "mobilenetv3_small_050", "pretrained": "null", "vit.dim": 32, "vit.heads": 4,
                 "vit.depth": 1, "vit.mlp_ratio": 2.0, **model}
    cfg = load_config("tiny-cpu", [f"model.{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(0)
    return build_model(cfg.model, image_size=size)


@pytest.fixture(scope="module")
def model():
    m = make_model(mixup=False)
    assert m.grid == (4, 4)
    return m


def batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g), torch.tensor([0.0, 1.0] * (n // 2))


class Calls:
    """Records a module's inputs (pre-hook) or outputs (hook), optionally replacing the output."""

    def __init__(self, module: torch.nn.Module, output: bool = False, replace=None):
        self.seen: list[torch.Tensor] = []
        if output:
            def hook(_m, _inp, out):
                self.seen.append(out.detach().clone())
                return replace(out) if replace is not None else None
            self.handle = module.register_forward_hook(hook)
        else:
            self.handle = module.register_forward_pre_hook(lambda _m, inp: self.seen.append(inp[0].detach().clone()))

    def __enter__(self) -> Calls:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_eq4_student_head_receives_features_pooled_with_the_mask(model):
    """F = AvgPool(X_s * M) inside forward(): the student loss is BCE of the head on exactly that, not on X_s pooled."""
    images, labels = batch()
    model.train()
    with Calls(model.student_cnn, output=True) as x_s, Calls(model.student_head) as head_in:
        out = model(images, labels)
    features, mask = x_s.seen[0], out["mask"].float()
    assert ((mask == 0).flatten(1).sum(1) == 4).all()  # k = round(0.25 * 16)
    masked = (features * mask[:, None]).mean(dim=(2, 3))  # over all h*w positions, as printed
    unmasked = features.mean(dim=(2, 3))
    assert not torch.allclose(masked, unmasked, atol=1e-4)  # the mask changes what the student sees
    assert any(torch.allclose(x, masked, atol=1e-5) for x in head_in.seen), "student head never saw X_s * M pooled"
    with torch.no_grad():
        expected = F.binary_cross_entropy_with_logits(model.student_head(masked).squeeze(1).float(), labels)
        unmasked_loss = F.binary_cross_entropy_with_logits(model.student_head(unmasked).squeeze(1).float(), labels)
    torch.testing.assert_close(out["losses"]["student"], expected, atol=1e-6, rtol=1e-5)
    assert abs(unmasked_loss - expected) > 1e-4


def test_eq7_student_loss_sends_no_gradient_into_the_teacher_through_forward(model):
    """Perturbing only the student leaves the teacher's gradients of the total loss (Eq. 7) exactly as they were."""
    images, labels = batch()
    model.train()
    teacher = {n: p for n, p in model.named_parameters() if n.startswith("teacher")}
    student = [p for n, p in model.named_parameters() if n.startswith("student")]
    assert teacher and student

    def teacher_grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same random draws in both passes
        model(images, labels)["loss"].backward()
        return {n: p.grad.clone() for n, p in teacher.items() if p.grad is not None}

    before = teacher_grads()
    saved = [p.detach().clone() for p in student]
    try:
        with torch.no_grad():
            for p in student:
                p.add_(torch.randn_like(p) * 0.5)
        after = teacher_grads()
        student_grads = [p.grad for p in student]
    finally:
        with torch.no_grad():
            for p, s in zip(student, saved):
                p.copy_(s)
        model.zero_grad(set_to_none=True)
    assert before.keys() == after.keys() and len(before) > len(teacher) // 2  # (unused timm layers get none)
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-7, rtol=1e-6, msg=name)
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in student_grads) > len(student) // 2  # L^s trains it


def test_eq4_random_mask_is_random_with_exactly_k_zeros():
    attention = torch.rand(64, 4, 4, generator=torch.Generator().manual_seed(1234))
    high = feature_mask(attention, 0.25, "high")
    masks = [feature_mask(attention, 0.25, "random", generator=torch.Generator().manual_seed(s)) for s in range(50)]
    for m in masks:
        assert set(m.unique().tolist()) <= {0.0, 1.0} and ((m == 0).flatten(1).sum(1) == 4).all()
    assert not torch.equal(masks[0], high)  # not the attention ranking
    assert not torch.equal(masks[0], masks[1])  # another generator state, another mask
    again = feature_mask(attention, 0.25, "random", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, masks[0])
    # every position is masked about k/n = 1/4 of the time, whatever its attention
    rate = torch.stack([(m == 0).float() for m in masks]).mean(dim=(0, 1)).flatten()
    assert ((rate - 0.25).abs() < 0.06).all(), rate  # 3200 draws per position: sigma 0.008
    top = (high == 0).float()
    assert ((torch.stack(masks) == 0).float() * top).sum() / (len(masks) * top.sum()) < 0.35


def test_eq4_random_strategy_in_forward_draws_from_the_torch_generator():
    m = make_model(mixup=False, mask_strategy="random")
    images, labels = batch(4)
    masks = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        masks.append(m(images, labels)["mask"])
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[1])
    assert all(((x == 0).flatten(1).sum(1) == 4).all() for x in masks)


def test_forward_traces_with_a_dynamic_batch_and_draws_what_eager_draws():
    """train.compile marks the batch dynamic after the first shape change (the last, shorter batch): every random
    op of Eq. 4-6 must trace with a symbolic batch size (dynamic=True: from the first call) and draw the same
    numbers as eager mode."""
    m = make_model(mixup=True, mask_strategy="random")
    compiled = torch.compile(m, dynamic=True, backend="eager")
    images, labels = batch(6)
    torch.manual_seed(6)
    expected = m(images, labels)
    torch.manual_seed(6)
    traced = compiled(images, labels)
    assert torch.equal(traced["mask"], expected["mask"])
    torch.testing.assert_close(traced["loss"], expected["loss"])


@pytest.mark.parametrize("alpha", [0.4, 3.0])
def test_eq5_mixup_lambda_follows_beta_alpha_alpha(alpha):
    torch.manual_seed(0)
    lam = torch.cat([deep_mixup(torch.zeros(4000, 1), torch.zeros(4000), alpha)[2] for _ in range(5)]).double()
    n = lam.numel()
    var = 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert abs(lam.mean().item() - 0.5) < 4 * (var / n) ** 0.5
    assert abs(lam.var().item() - var) < 0.05 * var  # uniform (alpha 1) would be 1/12: off by > 40% for both
    assert stats.kstest(lam.numpy(), stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_eq5_eq6_mixup_labels_use_the_features_lambda_and_partner():
    b = 32
    features = torch.eye(b)  # one-hot rows: each mixed row shows lambda and the partner it was mixed with
    labels = torch.rand(b, generator=torch.Generator().manual_seed(3))  # distinct: a wrong partner shows
    torch.manual_seed(0)
    mixed, mixed_labels, lam = deep_mixup(features, labels, 0.7)
    moved = 0
    for i in range(b):
        row = mixed[i].clone()
        torch.testing.assert_close(row.sum(), torch.tensor(1.0))
        own = row[i].item()
        row[i] = 0
        if row.abs().max() == 0:  # its own partner: F' = F, y' = y
            assert mixed_labels[i].item() == pytest.approx(labels[i].item())
            continue
        moved += 1
        j = int(row.argmax())
        assert own == pytest.approx(lam[i].item(), abs=1e-6)
        assert row[j].item() == pytest.approx(1 - lam[i].item(), abs=1e-6)
        assert mixed_labels[i].item() == pytest.approx(own * labels[i].item() + (1 - own) * labels[j].item(),
                                                       abs=1e-6)
    assert moved >= b // 2


def test_same_class_mixup_mixes_each_sample_with_one_of_its_own_label():
    """`mixup_partner: same_class`: partners share the label (hard targets kept), are random, and cover the class."""
    b = 48
    features = torch.eye(b)
    labels = (torch.arange(b) % 3 == 0).float()  # 16 fake, 32 real: unequal classes
    partners_seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, mixed_labels, lam = deep_mixup(features, labels, 1.0, same_class=True)
        torch.testing.assert_close(mixed_labels, labels)  # y' = y, exactly
        for i in range(b):
            row = mixed[i].clone()
            row[i] = 0
            if row.abs().max() == 0:
                continue
            j = int(row.argmax())
            assert labels[j] == labels[i], f"sample {i} mixed with {j} of the other class"
            assert mixed[i, i].item() == pytest.approx(lam[i].item(), abs=1e-6)
            partners_seen.add((i, j))
    fakes = int(labels.sum())
    assert len(partners_seen) > 0.5 * (fakes * (fakes - 1) + (b - fakes) * (b - fakes - 1)) / 2  # not a fixed pairing
    torch.manual_seed(0)
    _, across, _ = deep_mixup(features, labels, 1.0)  # the paper's partner: soft targets across classes
    assert ((across > 0) & (across < 1)).any()


def test_same_class_mixup_in_forward_trains_the_student_on_hard_targets():
    m = make_model(64, mixup=True, mixup_partner="same_class")
    m.train()
    labels = torch.tensor([0.0, 1.0] * 8)
    images = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with Calls(m.student_head) as head_in:
        out = m(images, labels)
    with torch.no_grad():
        expected = F.binary_cross_entropy_with_logits(m.student_head(head_in.seen[0]).squeeze(1), labels)
    torch.testing.assert_close(out["losses"]["student"], expected, atol=1e-5, rtol=1e-5)


def test_eq5_eq6_forward_mixes_student_labels_with_the_features_lambda_and_beta_alpha():
    """In forward(): the student's features and labels are mixed with one lambda ~ Beta(mixup_alpha) and partner.

    The student CNN's output is replaced (forward hook) by spatially constant one-hot features, so each row the
    student head receives names its lambda and partner; the student loss must be BCE against labels mixed alike.
    """
    alpha, b, size = 0.4, 64, 64  # 64 px: a 2x2 grid, k = 1 masked, the same kept share 3/4
    m = make_model(size, mixup=True, mixup_alpha=alpha)
    m.train()
    labels = torch.rand(b, generator=torch.Generator().manual_seed(1))  # soft, distinct: a wrong partner shows
    images = torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(2))
    kept = 3 / 4  # avg pooling over all positions of a constant map with 1 of 4 masked

    def one_hot(out):
        code = torch.zeros_like(out)
        code[torch.arange(b), torch.arange(b)] = 1.0
        return code

    lams = []
    for seed in range(4):
        torch.manual_seed(seed)
        with Calls(m.student_cnn, output=True, replace=one_hot), Calls(m.student_head) as head_in:
            out = m(images, labels)
        rows = head_in.seen[0] / kept
        target = torch.empty(b)
        for i in range(b):
            row = rows[i].clone()
            own = row[i].item()
            row[i] = 0
            if row.abs().max() < 1e-6:
                target[i] = labels[i]
                continue
            j = int(row.argmax())
            assert own + row[j].item() == pytest.approx(1.0, abs=1e-5)
            target[i] = own * labels[i] + (1 - own) * labels[j]
            lams.append(own)
        with torch.no_grad():
            expected = F.binary_cross_entropy_with_logits(m.student_head(head_in.seen[0]).squeeze(1).float(), target)
        torch.testing.assert_close(out["losses"]["student"], expected, atol=1e-5, rtol=1e-5)
    assert len(lams) > 200
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert stats.kstest(lams, stats.uniform().cdf).pvalue < 1e-3  # the configured alpha, not the default 1


def test_inference_head_returns_the_matching_heads_probability():
    m = make_model(mixup=False)
    m.eval()
    images, labels = batch(4, seed=5)
    with torch.no_grad():
        t = m.teacher(images)
        expected = {
            "student": torch.sigmoid(m.student_head(m.student_cnn(images).mean(dim=(2, 3))).squeeze(1)),  # M = 1
            "teacher_cnn": torch.sigmoid(t["cls_logits"]),
            "teacher_vit": torch.sigmoid(t["vit_logits"]),
        }
    expected["ensemble"] = torch.stack(list(expected.values())).mean(dim=0)
    names = list(expected)
    for i, a in enumerate(names):  # the heads disagree, so returning another head's probability shows
        for b_ in names[i + 1:]:
            assert (expected[a] - expected[b_]).abs().max() > 1e-3, (a, b_)
    all_heads = m.head_probabilities(images)
    assert set(all_heads) == {"student", "teacher_cnn", "teacher_vit"}
    for head, probs in all_heads.items():
        torch.testing.assert_close(probs, expected[head], atol=1e-5, rtol=1e-5, msg=head)
    try:
        for head, probs in expected.items():
            m.cfg.inference_head = head
            got = m.predict(images)
            torch.testing.assert_close(got, probs, atol=1e-5, rtol=1e-5, msg=head)
            with torch.no_grad():
                logits = m(images, labels)["logits"]  # forward's logits are the same head's, before mixup
            torch.testing.assert_close(torch.sigmoid(logits.float()), probs, atol=1e-5, rtol=1e-5, msg=head)
    finally:
        m.cfg.inference_head = "student"


def test_mask_warmup_leaves_the_student_unmasked_for_its_first_forwards_then_masks():
    """`model.mask_warmup: N`: the first N training forwards pool X_s unmasked; from forward N + 1, Eq. 4's mask."""
    m = make_model(mixup=False, mask_warmup=2)
    images, labels = batch()
    m.train()
    seen = []
    for _ in range(3):
        with Calls(m.student_cnn, output=True) as x_s, Calls(m.student_head) as head_in:
            out = m(images, labels)
        unmasked = x_s.seen[0].mean(dim=(2, 3))
        seen.append((torch.allclose(head_in.seen[0], unmasked, atol=1e-5), int((out["mask"] == 0).sum())))
    assert seen == [(True, 0), (True, 0), (False, 6 * 4)]  # then k = 4 of 16 positions per sample
    assert int(m.state_dict()["forwards"]) == 3  # in checkpoints: a resumed run keeps its place in the schedule
    m.eval()
    with torch.no_grad():
        m(images, labels)
    assert int(m.forwards) == 3  # evaluation forwards do not count


def test_output_stride_gives_a_finer_mask_grid_with_the_same_weights():
    """`model.output_stride: 16` dilates the last stage instead of striding: 8x8 instead of 4x4 at 128 px, Eq. 4's
    k grows with the grid, and the CNNs' parameters keep their shapes (ImageNet weights still fit)."""
    coarse = make_model(backbone="tf_efficientnet_lite0")
    fine = make_model(backbone="tf_efficientnet_lite0", output_stride=16)
    assert coarse.grid == (4, 4) and fine.grid == (8, 8)
    def cnn_shapes(m):
        return {k: v.shape for k, v in m.state_dict().items() if "_cnn." in k}

    assert cnn_shapes(coarse) == cnn_shapes(fine)  # the ViT's position embeddings follow the grid, the CNNs do not
    images, labels = batch()
    fine.train()
    out = fine(images, labels)
    assert out["mask"].shape == (6, 8, 8)
    assert ((out["mask"] == 0).flatten(1).sum(1) == 16).all()  # k = round(0.25 * 64)


def test_freeze_bn_keeps_the_running_statistics_and_trains_the_affine_parameters():
    """`model.freeze_bn`: in training the CNNs normalise by their running statistics (train-mode features equal
    eval-mode ones) and leave them as they were, from the first forward of a freshly built model on (no `train()`
    call needed) and after `eval()`/`train()`; BatchNorm's scale and shift still get gradients. Without it the
    statistics move (the default, as the paper trains). For the Baseline as for LTM's two CNNs."""
    def bn_stats(m):
        return {k: v.clone() for k, v in m.state_dict().items() if "running_" in k}

    images, labels = batch()
    for kind in ("ltm", "baseline"):
        for freeze in (True, False):
            m = make_model(kind=kind, freeze_bn=freeze)
            cnn = m.student_cnn if kind == "ltm" else m.backbone
            before = bn_stats(m)
            assert before and m.training and cnn.net.training
            m(images, labels)["loss"].backward()  # the first forward of a fresh model, as a training loop does
            moved = [k for k, v in bn_stats(m).items() if not torch.equal(v, before[k])]
            bn_weights = [p for n, p in m.named_parameters() if ".bn" in n and n.endswith("weight")]
            assert bn_weights and all(p.grad is not None and p.grad.abs().sum() > 0 for p in bn_weights)
            m.eval()
            with torch.no_grad():
                eval_features = cnn(images)
            m.train()
            with torch.no_grad():
                train_features = cnn(images)
            if freeze:
                assert moved == [], kind
                assert torch.allclose(train_features, eval_features, atol=1e-6), kind
            else:
                assert len(moved) == len(before), kind
                assert not torch.allclose(train_features, eval_features, atol=1e-3), kind


def test_output_stride_on_a_backbone_without_dilation_names_the_backbone_and_key():
    from ltm.models.backbone import BackboneError

    with pytest.raises(BackboneError, match="mobilenetv3_small_050.*model.output_stride=16"):
        make_model(output_stride=16)
