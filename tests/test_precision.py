"""What stays fp32 in a bf16 model: the losses, the attention map and mask of Eq. 2-4, and BatchNorm's running
statistics (through DeepSpeed's real bf16 engine on the CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ltm.config import load_config
from ltm.models import build_model
from ltm.models.masking import attention_map, cls_attention, feature_mask, num_masked
from ltm.models.precision import keep_batchnorm_fp32
from ltm.models.vit import TokenViT

sys.path.insert(0, str(Path(__file__).parent))
from test_train import shards, write_config  # noqa: E402, F401 - the train tests' tiny run and synthetic shards

BF16 = torch.bfloat16


def tiny_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = load_config("tiny-cpu", [f"model.kind={kind}", "model.pretrained=null"])
    return build_model(cfg.model, image_size=64)


@pytest.mark.parametrize("kind", ["baseline", "ltm"])
def test_losses_are_fp32_in_a_bf16_model(kind):
    """Every loss in fp32 whatever the module's dtype: a Baseline cast to bf16 returns the fp32 BCE of its bf16
    logits (the bf16 BCE and mean round it), as LTM's terms of Eq. 7 (the diversity loss of Eq. 3 included) are."""
    model = tiny_model(kind).to(BF16)
    torch.manual_seed(1)
    images = torch.rand(8, 3, 64, 64).to(BF16)
    labels = torch.tensor([0.0, 1.0] * 4)
    out = model(images, labels)
    assert out["loss"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in out["losses"].values()), {k: v.dtype for k, v in out["losses"].items()}
    if kind == "baseline":
        logits = out["logits"]
        assert logits.dtype == BF16
        fp32_bce = F.binary_cross_entropy_with_logits(logits.float(), labels)
        torch.testing.assert_close(out["loss"], fp32_bce, rtol=1e-6, atol=0)
        bf16_bce = F.binary_cross_entropy_with_logits(logits, labels.to(BF16))
        assert bf16_bce.float() != fp32_bce  # what the loss was: rounded to bf16
    out["loss"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def _ties_at_k(attention: torch.Tensor, k: int) -> float:
    """Share of samples whose k-th and (k+1)-th largest cells are equal: Eq. 4's top-k is then decided by a tie."""
    ranked = attention.flatten(1).sort(dim=1, descending=True).values
    return float((ranked[:, k - 1] == ranked[:, k]).float().mean())


def test_eq2_eq4_attention_and_mask_in_fp32_without_ties():
    """A bf16 teacher ViT gives an fp32 attention map (Eq. 1's softmax and Eq. 2's head mean in fp32): its 49 cells
    all differ, so no sample ties at Eq. 4's k-th cell, where the same maps in bf16 tie for a good share of the
    samples. The mask of a bf16 map is ranked in fp32."""
    torch.manual_seed(0)
    grid, k = (7, 7), num_masked(0.25, (7, 7))
    vit = TokenViT(64, grid, dim=32, heads=2, depth=1, mlp_ratio=2.0).to(BF16)
    _, attentions = vit(torch.randn(64, 64, *grid).to(BF16))
    last = attentions[-1]
    assert last.dtype == torch.float32
    a = attention_map(last, grid)
    assert a.dtype == torch.float32
    assert _ties_at_k(a, k) == 0.0
    assert all(len(row.unique()) == 49 for row in a.flatten(1))
    torch.testing.assert_close(last.sum(-1), torch.ones(last.shape[:-1]))  # rows of an fp32 softmax
    bf16_map = cls_attention(last.to(BF16), grid).mean(dim=1)  # softmax output and head mean in bf16
    assert _ties_at_k(bf16_map, k) > 0.1
    mask = feature_mask(a.to(BF16), 0.25, "high")
    assert mask.dtype == torch.float32
    assert torch.equal(mask, feature_mask(a.to(BF16).float(), 0.25, "high"))


def test_ltm_in_bf16_masks_with_an_fp32_map():
    """The whole LTM model cast to bf16: Eq. 2's map and Eq. 4's mask come out in fp32, k cells masked each."""
    model = tiny_model("ltm").to(BF16)
    out = model(torch.rand(4, 3, 64, 64).to(BF16), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert out["attention"].dtype == torch.float32 and out["mask"].dtype == torch.float32
    k = num_masked(model.cfg.mask_ratio, model.grid)
    assert ((out["mask"] == 0).flatten(1).sum(1) == k).all()


@pytest.mark.parametrize("layer", ["BatchNorm2d", "BatchNormAct2d"])
def test_keep_batchnorm_fp32_moves_statistics_by_less_than_a_bf16_step(layer):
    """A bf16 BatchNorm whose running mean is 1.0 sees batches of mean 1.02: each update (0.1 x 0.02) is under half
    the bf16 spacing at 1.0 (2^-8), so in bf16 the mean never moves; after keep_batchnorm_fp32 it converges to 1.02.
    The layer (torch's or timm's BatchNormAct2d) keeps bf16 parameters, bf16 in and out, gradients into its weight."""
    from timm.layers import BatchNormAct2d

    def make() -> nn.Module:
        bn = nn.BatchNorm2d(4) if layer == "BatchNorm2d" else BatchNormAct2d(4, act_layer=nn.ReLU)
        bn.running_mean.fill_(1.0)
        return bn.to(BF16)

    plain, kept = make(), make()
    assert keep_batchnorm_fp32(kept) == 1 and keep_batchnorm_fp32(kept) == 0
    assert isinstance(kept, type(plain)) and kept.state_dict().keys() == plain.state_dict().keys()
    torch.manual_seed(0)
    for _ in range(50):
        x = torch.randn(8, 4, 5, 5)
        x = (x - x.mean(dim=(0, 2, 3), keepdim=True) + 1.02).to(BF16)
        plain(x)
        y = kept(x)
    assert plain.running_mean.dtype == BF16 and torch.equal(plain.running_mean, torch.ones(4, dtype=BF16))
    assert kept.running_mean.dtype == torch.float32 and kept.running_var.dtype == torch.float32
    assert (kept.running_mean - 1.02).abs().max() < 2e-3  # x rounds to bf16: its batch mean is within 1e-3 of 1.02
    assert y.dtype == BF16 and kept._parameters["weight"].dtype == BF16
    y.float().sum().backward()
    assert kept._parameters["weight"].grad.dtype == BF16
    kept.eval()
    assert kept(x).dtype == BF16


def test_bf16_training_keeps_batchnorm_statistics_fp32_and_eval_loads_them(shards, tmp_path):  # noqa: F811
    """`ltm train` in bf16 on DeepSpeed's CPU engine (ZeRO-1, the pretrained EfficientNet-Lite0 of the train tests):
    the BatchNorm running statistics stay fp32 (the parameters bf16), some move by less than a bf16 step could hold,
    validation runs, and `ltm eval`'s loader and a resumed Trainer read the checkpoint's fp32 statistics back
    exactly."""
    from ltm.checkpoint.reader import load_model
    from ltm.train.trainer import Trainer

    run_dir = tmp_path / "bf16"
    cfg = load_config(write_config(tmp_path, shards, run_dir, iters_per_epoch=2, epochs=1, log_every=1, val_every=2,
                                   ckpt_every=2), ["train.precision=bf16"])
    trainer = Trainer(cfg)
    module = trainer.engine.module
    stats = {k: v for k, v in module.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert len(stats) > 50 and all(v.dtype == torch.float32 for v in stats.values())
    assert all(p.dtype == BF16 for p in module.parameters())
    before = {k: v.clone() for k, v in stats.items()}
    result = trainer.fit()
    after = {k: v.detach().clone() for k, v in module.state_dict().items() if k in stats}
    trainer.close()
    assert all(v.dtype == torch.float32 for v in after.values())
    # updates that bf16 storage rounds away: nonzero, under half the bf16 spacing at the old value
    small = 0
    for k in stats:
        step = after[k] - before[k]
        half_spacing = torch.finfo(BF16).eps / 2 * 2.0 ** torch.floor(torch.log2(before[k].abs().clamp_min(1e-30)))
        small += int(((step != 0) & (step.abs() < half_spacing)).sum())
    assert small > 100, small
    assert 0.0 <= result["last_val_auc"] <= 1.0  # validation ran on the model with fp32 statistics
    model, _, _ = load_model(run_dir)
    loaded = model.state_dict()
    for k, v in after.items():
        assert torch.equal(loaded[k], v), k
    resumed = Trainer(cfg)  # resume=auto: the checkpoint's fp32 statistics back into the fp32 buffers, bit for bit
    try:
        state = resumed.engine.module.state_dict()
        assert resumed.state.step == 2 and all(torch.equal(state[k], v) for k, v in after.items())
    finally:
        resumed.close()
