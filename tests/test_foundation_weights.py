"""Foundation-model weights for timm Vision Transformers, offline: local files in OpenAI CLIP's, Hugging Face CLIP's
and DINOv2's layouts (converted, position embeddings resampled to the net's grid), timm's own weights from the hub
cache at the net's image size (`pretrained: timm`, a synonym of `imagenet`), errors that name keys and shapes, and
`ltm weights list` / `fetch` for tagged names that are not cached.

Every source model is real: transformers' CLIPVisionModel / CLIPModel / Dinov2Model at random init (perturbed, so
that a LayerNorm or layer-scale tensor put in the wrong place changes the features), and OpenAI's CLIP vision tower
assembled below from the same torch modules and names as OpenAI's `clip/model.py`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from ltm.config import load_config
from ltm.models.weights import WeightsError, is_timm_default, load_pretrained, required_imagenet

WIDTH, HEADS, LAYERS, PATCH, SIZE = 64, 4, 3, 16, 32


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter moved off its init (LayerNorms are ones/zeros, DINOv2's layer scales all equal)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


def small_vit(name: str, img_size: int, depth: int = LAYERS, **kwargs) -> nn.Module:
    """A timm ViT as the model code creates it (num_classes=0, the run's image size), shrunk to test size."""
    return timm.create_model(name, pretrained=False, num_classes=0, embed_dim=WIDTH, depth=depth, num_heads=HEADS,
                             img_size=img_size, **kwargs).eval()


# ------------------------------------------------------------------------------------------------ OpenAI CLIP


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's block: the same modules under the same names, so its state dict has OpenAI's keys."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, N, D), as OpenAI's
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])


class VisionTransformer(nn.Module):
    """OpenAI CLIP's `VisionTransformer` (clip/model.py); `tokens` gives every token after `ln_post`, before `proj`."""

    def __init__(self, size: int, patch: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x)


class OpenAICLIP(nn.Module):
    """A whole CLIP model's file: the vision tower under `visual.` and a text tower beside it."""

    def __init__(self):
        super().__init__()
        self.visual = VisionTransformer(SIZE, PATCH, WIDTH, LAYERS, HEADS, output_dim=16)
        self.transformer = Transformer(32, 1, 2)  # the text tower: its `transformer.resblocks.0.*` must be ignored
        self.token_embedding = nn.Embedding(100, 32)
        self.logit_scale = nn.Parameter(torch.ones([]))


def openai_file(tmp_path: Path) -> tuple[OpenAICLIP, Path]:
    torch.manual_seed(0)
    clip = perturbed(OpenAICLIP(), seed=1)
    path = tmp_path / "ViT-B-16.pt"
    torch.save({k: v.clone() for k, v in clip.state_dict().items()}, path)
    return clip, path


def test_openai_clip_file_gives_the_same_features_and_each_block_its_own_tensors(tmp_path):
    clip, path = openai_file(tmp_path)
    state = clip.state_dict()
    assert {"visual.class_embedding", "visual.transformer.resblocks.2.attn.in_proj_weight", "visual.proj",
            "visual.transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.ln_1.weight"} <= set(state)
    net = small_vit("vit_base_patch16_clip_quickgelu_224", SIZE)
    assert load_pretrained(net, "vit_base_patch16_clip_quickgelu_224", path) == f"file {path} (OpenAI CLIP)"
    own = net.state_dict()
    for i in range(LAYERS):
        theirs = f"visual.transformer.resblocks.{i}."
        for timm_key, openai_key in (("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
                                     ("attn.proj.weight", "attn.out_proj.weight"), ("norm1.weight", "ln_1.weight"),
                                     ("norm2.bias", "ln_2.bias"), ("mlp.fc1.weight", "mlp.c_fc.weight"),
                                     ("mlp.fc2.bias", "mlp.c_proj.bias")):
            assert torch.equal(own[f"blocks.{i}.{timm_key}"], state[theirs + openai_key]), (i, timm_key)
    assert torch.equal(own["norm_pre.weight"], state["visual.ln_pre.weight"])  # CLIP's pre-norm
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(net.forward_features(images), clip.visual.tokens(images), atol=1e-5)


# ------------------------------------------------------------------------------------------------ Hugging Face CLIP


def clip_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=WIDTH * 4, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH)


def test_hugging_face_clip_files_give_the_same_features(tmp_path):
    """A CLIPVisionModel (transformers 5 saves it without `vision_model.`) and a whole CLIPModel (`vision_model.*`
    beside the text tower): timm's tokens after `norm` are HF's last hidden state after `post_layernorm`, its CLS
    token HF's pooler output."""
    torch.manual_seed(0)
    vision = perturbed(CLIPVisionModel(clip_vision_config()), seed=2)
    vision.save_pretrained(tmp_path / "vision")
    full = perturbed(CLIPModel(CLIPConfig(vision_config=clip_vision_config().to_dict(), projection_dim=16,
                                          text_config={"hidden_size": 32, "intermediate_size": 64, "vocab_size": 100,
                                                       "num_hidden_layers": 1, "num_attention_heads": 2,
                                                       "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1})),
                     seed=3)
    full.save_pretrained(tmp_path / "full")
    images = torch.randn(2, 3, SIZE, SIZE)
    for tower, folder, layout in ((vision, "vision", "Hugging Face CLIPVisionModel"),
                                  (full.vision_model, "full", "Hugging Face CLIPModel")):
        path = tmp_path / folder / "model.safetensors"
        net = small_vit("vit_base_patch16_clip_quickgelu_224", SIZE)
        assert load_pretrained(net, "vit_base_patch16_clip_quickgelu_224", path) == f"file {path} ({layout})"
        with torch.no_grad():
            out = tower(pixel_values=images)
            tokens = net.forward_features(images)
            assert torch.allclose(tokens, tower.post_layernorm(out.last_hidden_state), atol=1e-5), folder
            assert torch.allclose(tokens[:, 0], out.pooler_output, atol=1e-5), folder


# ------------------------------------------------------------------------------------------------ DINOv2


def dinov2(image_size: int, seed: int, registers: int = 0) -> Dinov2Model | Dinov2WithRegistersModel:
    torch.manual_seed(seed)
    size = {"hidden_size": WIDTH, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "image_size": image_size,
            "patch_size": 14}
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **size))
    else:
        model = Dinov2Model(Dinov2Config(**size))
    return perturbed(model, seed=seed + 1)


@pytest.mark.parametrize("registers, name", [(0, "vit_base_patch14_dinov2"), (4, "vit_small_patch14_reg4_dinov2")])
def test_hugging_face_dinov2_file_gives_the_same_features(tmp_path, registers, name):
    """Dinov2Model, and Dinov2WithRegistersModel into timm's register variant (its CLS token takes the CLS position
    embedding, its position table covers the patches only: timm's `_convert_dinov2`)."""
    model = dinov2(56, seed=4, registers=registers)
    model.save_pretrained(tmp_path / "dinov2")
    path = tmp_path / "dinov2" / "model.safetensors"
    net = small_vit(name, 56)
    assert load_pretrained(net, name, path) == f"file {path} (Hugging Face Dinov2Model)"
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():  # HF's last hidden state is after its final layernorm, as timm's features
        assert torch.allclose(net.forward_features(images), model(pixel_values=images).last_hidden_state, atol=1e-5)


def test_meta_dinov2_file_loads_into_a_net_of_another_size(tmp_path):
    """Meta's DINOv2 checkpoints are timm's names plus `mask_token` (timm's names follow Meta's)."""
    source = perturbed(small_vit("vit_base_patch14_dinov2", 56), seed=10)
    torch.save({**source.state_dict(), "mask_token": torch.zeros(1, WIDTH)}, tmp_path / "dinov2_vitb14_pretrain.pth")
    net = small_vit("vit_base_patch14_dinov2", 28)
    source_str = load_pretrained(net, "vit_base_patch14_dinov2", tmp_path / "dinov2_vitb14_pretrain.pth")
    assert source_str.endswith("(Meta DINOv2)") and net.pos_embed.shape == (1, 1 + 2 * 2, WIDTH)
    assert torch.equal(net.state_dict()["blocks.2.ls2.gamma"], source.state_dict()["blocks.2.ls2.gamma"])


def test_dinov2_file_at_518_px_is_resampled_into_a_224_px_net(tmp_path):
    model = dinov2(518, seed=6)
    model.save_pretrained(tmp_path / "dinov2")
    net = small_vit("vit_base_patch14_dinov2", 224, depth=LAYERS)
    load_pretrained(net, "vit_base_patch14_dinov2", tmp_path / "dinov2" / "model.safetensors")
    pos = model.embeddings.position_embeddings.detach()
    assert pos.shape == (1, 1 + 37 * 37, WIDTH) and net.pos_embed.shape == (1, 1 + 16 * 16, WIDTH)
    expected = resample_abs_pos_embed(pos, new_size=(16, 16), old_size=(37, 37), num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=True)
    assert torch.equal(net.pos_embed.detach(), expected)
    assert torch.equal(net.pos_embed[0, 0].detach(), pos[0, 0])  # the CLS token's own embedding is kept


def hub_snapshot(hub: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """timm weights where `ltm weights fetch` leaves them: the Hugging Face cache layout of `timm/<name>.<tag>`."""
    snapshot = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_timm_weights_of_a_518_px_dinov2_load_offline_into_a_224_px_net(tmp_path, monkeypatch, capsys):
    """`pretrained: timm` (as `imagenet`): timm's DINOv2 file (518 px) from the hub cache, with HF_HUB_OFFLINE=1,
    into the net the model code builds at 224 px; `ltm weights list` names the tagged and the bare name."""
    import huggingface_hub.constants

    from ltm.cli import main

    name = "vit_small_patch14_dinov2.lvd142m"
    torch.manual_seed(8)
    reference = timm.create_model(name, pretrained=False, num_classes=0)  # its default size: 518 px
    assert tuple(reference.patch_embed.img_size) == (518, 518)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = hub_snapshot(tmp_path / "hub", timm.models.get_pretrained_cfg(name).hf_hub_id, reference.state_dict())
    net = timm.create_model(name, pretrained=False, num_classes=0, img_size=224)
    assert load_pretrained(net, name, "timm") == f"cache {cached}"
    own, theirs = net.state_dict(), reference.state_dict()
    assert torch.equal(own["blocks.11.mlp.fc2.weight"], theirs["blocks.11.mlp.fc2.weight"])
    assert torch.equal(own["pos_embed"], resample_abs_pos_embed(theirs["pos_embed"], new_size=(16, 16),
                                                                num_prefix_tokens=1, antialias=True))
    assert is_timm_default("timm") and is_timm_default("imagenet") and not is_timm_default(str(cached))
    assert required_imagenet(load_config("tiny-cpu", ["model.pretrained=timm"]).model) == ["tf_efficientnet_lite0"]
    assert main(["weights", "list"]) == 0
    rows = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    assert rows[name].startswith("cache ") and rows["vit_small_patch14_dinov2"].startswith("cache ")


def test_the_copy_timm_loads_for_a_vit_has_the_nets_pooling_and_size():
    """`imagenet` / `timm` weights come through a copy of the model that timm builds and loads: it must be built like
    the net (SigLIP pools with an attention head that has weights; a 32 px net has a 2x2 grid, not 14x14), or its
    tensors do not fit. (Through the whole path with SigLIP-B's real size this takes 10 s; DINOv2 covers that above.)"""
    from ltm.models.weights import _like_net

    name = "vit_base_patch16_siglip_224.webli"
    small = {"embed_dim": WIDTH, "depth": 1, "num_heads": HEADS}
    net = timm.create_model(name, pretrained=False, num_classes=0, img_size=SIZE, **small)
    assert net.global_pool == "map" and any(k.startswith("attn_pool.") for k in net.state_dict())
    copy = timm.create_model(name, pretrained=False, **_like_net(net), **small)
    assert {k: v.shape for k, v in copy.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


# ------------------------------------------------------------------------------------------------ errors and CLI


def test_a_file_that_does_not_fit_names_layout_keys_and_both_shapes(tmp_path):
    clip, _ = openai_file(tmp_path)
    state = {k: v.clone() for k, v in clip.state_dict().items()}
    state["visual.transformer.resblocks.1.mlp.c_fc.weight"] = torch.zeros(3 * WIDTH, WIDTH)
    del state["visual.transformer.resblocks.2.ln_2.bias"]
    torch.save(state, tmp_path / "bad.pt")
    net = small_vit("vit_base_patch16_clip_quickgelu_224", SIZE)
    with pytest.raises(WeightsError) as caught:
        load_pretrained(net, "vit_base_patch16_clip_quickgelu_224", tmp_path / "bad.pt")
    message = str(caught.value)
    assert "bad.pt" in message and "(OpenAI CLIP)" in message
    assert "blocks.2.norm2.bias" in message  # missing, in timm's name
    assert "blocks.1.mlp.fc1.weight (192, 64) in the file vs (256, 64) in the backbone" in message
    # a file of no known layout: named as such, with its first keys and the backbone's
    torch.save({"encoder.stem.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(WeightsError, match=r"foreign\.pt.*no known layout.*'encoder\.stem\.weight'.*'cls_token'"):
        load_pretrained(net, "vit_base_patch16_clip_quickgelu_224", tmp_path / "foreign.pt")


def test_weights_list_and_fetch_say_a_tagged_name_is_not_cached(tmp_path, monkeypatch, capsys, caplog):
    import huggingface_hub.constants

    from ltm.cli import main

    name = "vit_base_patch16_clip_224.openai"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert main(["weights", "list", name]) == 0
    rows = dict(line.split("\t") for line in capsys.readouterr().out.strip().splitlines())
    assert rows[name].startswith("not cached here") and f"ltm weights fetch {name}" in rows[name]
    with caplog.at_level(logging.ERROR):
        assert main(["weights", "fetch", name]) == 1
    assert f"{name!r}" in caplog.text and "not in the cache" in caplog.text and "HF_HUB_OFFLINE" in caplog.text
