"""Foundation-model ViTs as ltm backbones (ltm.models.foundation): the patch-token grid, each weights' own input
normalisation, the teacher's mask as dropped (or replaced) student tokens, and a token-masking LTM model that trains.
Random-init timm ViTs of one or two blocks at small sizes: seconds on 2 cores."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ltm.config import load_config
from ltm.models import BackboneError, build_model
from ltm.models.foundation import ViTBackbone, is_vit_name, resample_map, token_attention_mask
from ltm.models.masking import feature_mask

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's preprocessing (openai/CLIP, clip.py)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def vit(name: str = "vit_small_patch14_reg4_dinov2", size: int = 56, **kwargs) -> ViTBackbone:
    """A random-init ViT; the default has 4 register tokens besides CLS (5 prefix tokens), 14 px patches, and its
    LayerScale at 1 (DINOv2's 1e-5 at init would leave the blocks next to no say in the output)."""
    torch.manual_seed(0)
    return ViTBackbone(name, image_size=size, **{"depth": 2, "init_values": 1.0, **kwargs}).eval()


def full_forward_with_attention_mask(backbone: ViTBackbone, images: torch.Tensor, keep: torch.Tensor,
                                     block: int) -> torch.Tensor:
    """The reference for token dropping: every token stays in the sequence, and from block `block` on no token may
    attend to a dropped patch. The kept tokens' outputs then equal the dropping forward's."""
    net = backbone.net
    x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(backbone.normalized(images)))))
    mask = token_attention_mask(keep, backbone.num_prefix_tokens)
    for i, blk in enumerate(net.blocks):
        x = blk(x, attn_mask=mask if i >= block else None)
    return net.norm(x)


def random_keep(batch: int, grid: tuple[int, int], dropped: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return feature_mask(torch.rand(batch, *grid, generator=g), dropped / (grid[0] * grid[1]), "high")


# ------------------------------------------------------------------------------------------------ the backbone


def test_vit_names_are_recognised_and_cnns_are_not():
    assert is_vit_name("vit_large_patch14_clip_224.openai") and is_vit_name("vit_base_patch14_dinov2.lvd142m")
    assert is_vit_name("vit_base_patch16_siglip_224.webli")
    assert not is_vit_name("legacy_xception") and not is_vit_name("tf_efficientnet_lite0")


def test_the_grid_is_the_patch_tokens_in_raster_order_without_prefix_tokens():
    backbone = vit()
    images = torch.rand(2, 3, 56, 56)
    tokens = backbone.net.forward_features(backbone.normalized(images))  # (B, 5 + 16, D)
    grid = backbone(images)
    assert backbone.num_prefix_tokens == 5 and backbone.grid(56) == (4, 4)
    assert grid.shape == (2, backbone.channels, 4, 4)
    for i in range(4):
        for j in range(4):
            assert torch.equal(grid[:, :, i, j], tokens[:, 5 + i * 4 + j])


def test_each_weights_own_mean_and_std_normalise_the_input():
    clip = ViTBackbone("vit_base_patch16_clip_224.openai", image_size=32, depth=1)
    assert clip.mean.flatten().tolist() == pytest.approx(OPENAI_CLIP_MEAN)
    assert clip.std.flatten().tolist() == pytest.approx(OPENAI_CLIP_STD)
    dino = ViTBackbone("vit_small_patch14_dinov2.lvd142m", image_size=28, depth=1)
    assert dino.mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    image = torch.full((1, 3, 32, 32), 0.5)
    assert clip.normalized(image)[0, :, 0, 0].tolist() == pytest.approx(
        [(0.5 - m) / s for m, s in zip(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])


def test_position_embeddings_are_sized_for_the_run_not_the_default():
    dino = ViTBackbone("vit_small_patch14_dinov2.lvd142m", image_size=224, depth=1)  # default 518 px
    assert dino.grid(224) == (16, 16) and dino.net.pos_embed.shape[1] == 1 + 16 * 16
    with pytest.raises(BackboneError, match="built for 224 px, not 112"):
        dino.grid(112)


# ------------------------------------------------------------------------------------------------ token masking


@pytest.mark.parametrize("block", [0, 1, 2])
def test_dropping_tokens_equals_a_full_forward_that_cannot_attend_to_them(block):
    """Position embeddings stay with their tokens, prefix tokens stay, and nothing attends to a dropped patch."""
    backbone = vit()
    images = torch.rand(3, 3, 56, 56)
    keep = random_keep(3, (4, 4), dropped=4)
    with torch.no_grad():
        reference = full_forward_with_attention_mask(backbone, images, keep, block)
        pooled = backbone.pooled(images, keep, block)
        assert torch.allclose(pooled, reference[:, 0], atol=1e-5)  # the CLS token, the model's pooling
        # every kept token too: the sequence the blocks ran on
        net = backbone.net
        x = net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(backbone.normalized(images)))))
        for i, blk in enumerate(net.blocks):
            if i == block:
                x = backbone.mask_tokens(x, keep.flatten(1).bool(), None, replace=True)
            x = blk(x)
        if block == len(net.blocks):
            x = backbone.mask_tokens(x, keep.flatten(1).bool(), None, replace=True)
        x = net.norm(x)
    assert x.shape[1] == 5 + 12
    kept = keep.flatten(1).bool()
    expected = torch.stack([torch.cat([reference[b, :5], reference[b, 5:][kept[b]]]) for b in range(3)])
    assert torch.allclose(x, expected, atol=1e-5)
    if block < len(net.blocks):  # after the last block the CLS token has seen all it will
        assert not torch.allclose(pooled, backbone.pooled(images), atol=1e-3)  # the mask changed what the CLS saw


def test_average_pooling_models_average_only_the_kept_tokens():
    backbone = vit(global_pool="avg")
    images = torch.rand(2, 3, 56, 56)
    keep = random_keep(2, (4, 4), dropped=6, seed=1)
    with torch.no_grad():
        reference = full_forward_with_attention_mask(backbone, images, keep, 0)
        patches = reference[:, 5:]
        w = keep.flatten(1)[..., None]
        expected = backbone.net.fc_norm((patches * w).sum(1) / w.sum(1))
        assert torch.allclose(backbone.pooled(images, keep), expected, atol=1e-5)


def test_a_batch_whose_rows_keep_different_counts_is_refused():
    backbone = vit()
    keep = torch.ones(2, 4, 4)
    keep[0, 0, 0] = 0
    with pytest.raises(ValueError, match="as many tokens"):
        backbone.pooled(torch.rand(2, 3, 56, 56), keep)


def test_the_mask_token_replaces_the_masked_patch_embeddings():
    torch.manual_seed(0)
    backbone = ViTBackbone("vit_small_patch14_reg4_dinov2", image_size=56, mask_token=True, depth=2,
                           init_values=1.0).eval()
    images = torch.rand(2, 3, 56, 56)
    keep = random_keep(2, (4, 4), dropped=4)
    with torch.no_grad():
        a = backbone.pooled(images, keep)
        # the masked positions' pixels no longer matter; the kept ones' do
        other = images.clone()
        cells = (1 - torch.nn.functional.interpolate(keep[:, None], size=(56, 56), mode="nearest")).bool()
        other[cells.expand_as(other)] = torch.rand(int(cells.sum()) * 3)
        assert torch.allclose(backbone.pooled(other, keep), a, atol=1e-5)
        backbone.mask_token.add_(torch.randn_like(backbone.mask_token))  # (a constant shift LayerNorm removes)
        assert not torch.allclose(backbone.pooled(images, keep), a, atol=1e-3)


def test_the_teachers_map_is_resampled_to_the_students_grid():
    teacher_map = torch.zeros(1, 4, 4)
    teacher_map[0, 0, 3] = 1.0  # top-right cell of a 4x4 grid
    on_8x8 = resample_map(teacher_map, (8, 8))
    assert on_8x8.shape == (1, 8, 8) and on_8x8[0, :2, 6:].min() > on_8x8[0, 4:, :4].max()
    on_2x2 = resample_map(teacher_map, (2, 2))
    assert on_2x2[0].argmax() == 1 and on_2x2[0, 0, 1] == pytest.approx(0.25)  # the area mean
    assert resample_map(teacher_map, (4, 4)) is teacher_map


# ------------------------------------------------------------------------------------------------ the LTM model


def vit_config(*overrides: str):
    return load_config("vit-tiny-cpu", ["model.backbone_args={depth: 2}", "model.vit.depth=1", *overrides])


def test_ltm_drops_the_students_most_attended_tokens():
    cfg = vit_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, 112)
    assert model.student_grid == (7, 7) and model.grid == (7, 7)
    images, labels = torch.rand(4, 3, 112, 112), torch.tensor([0, 1, 0, 1])
    seen = {}

    def count_tokens(module, inputs, output) -> None:
        seen.setdefault("tokens", inputs[0].shape[1])

    model.student_cnn.net.blocks[0].register_forward_hook(count_tokens)
    out = model(images, labels)
    assert seen["tokens"] == 1 + 49 - 12  # CLS + the 37 patches of 49 that the mask keeps (k = round(0.25 * 49))
    assert out["mask"].shape == (4, 7, 7) and (out["mask"] == 0).sum(dim=(1, 2)).tolist() == [12] * 4
    top = out["attention"].flatten(1).topk(12).indices
    assert (out["mask"].flatten(1).gather(1, top) == 0).all()  # Eq. 4: the most attended are the dropped ones
    out["loss"].backward()
    assert model.student_cnn.net.patch_embed.proj.weight.grad.abs().sum() > 0


def test_a_cnn_teacher_masks_a_vit_student_on_its_own_grid():
    cfg = vit_config("model.teacher_backbone=tf_efficientnet_lite0", "model.teacher_pretrained=null")
    model = build_model(cfg.model, 112)
    assert model.grid == (4, 4) and model.student_grid == (7, 7)
    out = model(torch.rand(2, 3, 112, 112), torch.tensor([0, 1]))
    assert out["mask"].shape == (2, 7, 7) and (out["mask"] == 0).sum().item() == 2 * 12


def test_token_dropping_costs_the_kept_share_of_the_students_forward():
    """The student's FLOPs with 25% of its tokens dropped at block 0, against unmasked: about 37/49 (attention is
    quadratic in the tokens, the rest linear)."""
    cfg = vit_config("model.backbone_args={depth: 4}")
    with torch.device("meta"):
        model = build_model(cfg.model, 112, load_weights=False)
        images = torch.empty(2, 3, 112, 112)
        keep = torch.ones(2, 7, 7)
        keep.view(2, -1)[:, :12] = 0
        flops = []
        for k in (None, keep):
            with FlopCounterMode(display=False) as counter:
                model.student_cnn.pooled(images, k, 0, None if k is None else 37)
            flops.append(counter.get_total_flops())
    assert 0.70 < flops[1] / flops[0] < 0.78


def test_token_masking_needs_a_vit_student_and_a_hard_mask():
    with pytest.raises(BackboneError, match="mask_at=tokens.*CNN"):
        build_model(load_config("tiny-cpu", ["model.mask_at=tokens", "model.pretrained=null"]).model, 112)
    with pytest.raises(BackboneError, match="soft"):
        build_model(vit_config("model.mask_strategy=soft").model, 112)
    with pytest.raises(BackboneError, match="output_stride"):
        build_model(vit_config("model.output_stride=16").model, 112)


def test_the_baseline_on_a_vit_classifies_its_cls_token():
    cfg = vit_config("model.kind=baseline")
    torch.manual_seed(0)
    model = build_model(cfg.model, 112).eval()
    images = torch.rand(2, 3, 112, 112)
    tokens = model.backbone.net.forward_features(model.backbone.normalized(images))
    with torch.no_grad():
        assert torch.allclose(model.predict(images), torch.sigmoid(model.head(tokens[:, 0]).squeeze(1)), atol=1e-6)


def test_inference_sees_every_token():
    cfg = vit_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, 112).eval()
    images = torch.rand(2, 3, 112, 112)
    with torch.no_grad():
        expected = torch.sigmoid(model.student_head(model.student_cnn.pooled(images)).squeeze(1))
        assert torch.allclose(model.predict(images), expected, atol=1e-6)


def test_a_token_model_that_is_not_a_vision_transformer_is_refused_by_name():
    """timm's Eva family (EVA-02, PE) returns tokens, not a map, and is not a `VisionTransformer`."""
    with pytest.raises(BackboneError, match="eva02_tiny_patch14_224.*Eva.*gives tokens"):
        build_model(vit_config("model.backbone=eva02_tiny_patch14_224", "model.backbone_args={depth: 1}",
                               "model.mask_at=features").model, 112)
