"""One dataclass tree for every ltm job, loaded from YAML and overridden with `key=value` dotlists.

OmegaConf does the merging and type checking (unknown keys and wrong types are errors that name the key);
`validate` adds the checks OmegaConf cannot express (choices, ranges). Packaged configs live in
`ltm/configs/`; a config may start from another one with a top-level `base: <name or path>` key.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(str(resources.files("ltm") / "configs"))


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


@dataclass
class ViTConfig:
    dim: int = 384  # D: token width after the C -> D projection (the paper's "2048" is C: docs/choices.md)
    heads: int = 6
    depth: int = 6
    mlp_ratio: float = 4.0


@dataclass
class LoraConfig:
    """`model.tune=lora`: low-rank adapters (peft's LoRA) on the backbone's linear layers whose names end in `targets`
    (timm ViT: qkv, proj, fc1, fc2)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "proj"])


@dataclass
class ModelConfig:
    kind: str = "ltm"  # ltm | baseline
    backbone: str = "legacy_xception"  # student CNN (and teacher CNN unless teacher_backbone is set)
    teacher_backbone: str | None = None
    # null (random init) | imagenet (timm's default weights: shipped in a package, or the hub cache) | a local file
    pretrained: str | None = None  # the student backbone's
    teacher_pretrained: str | None = None  # null = the same as `pretrained` when the backbones match
    # extra timm.create_model arguments of the student backbone, e.g. {depth: 4, drop_path_rate: 0.1} for a ViT
    backbone_args: dict[str, Any] = field(default_factory=dict)
    teacher_backbone_args: dict[str, Any] | None = None  # null = `backbone_args` when the backbones match, else none
    input_norm: str = "backbone"  # backbone: each CNN normalises [0, 1] input by its weights' mean/std | none
    # null: the backbone's own total stride (32 for most: 7x7 at 224 px, 4x4 at 112 px) | 16 or 8: the last stages
    # dilated instead of strided (timm `output_stride`), a finer grid for Eq. 4's mask with the same weights
    output_stride: int | None = None
    # true: the CNNs' BatchNorm layers normalise with their pretrained running statistics and never update them
    # (their scale and shift still train); false: batch statistics in training, as the paper's Xception does
    freeze_bn: bool = False
    vit: ViTConfig = field(default_factory=ViTConfig)
    mask_ratio: float = 0.25  # Eq. 4: k = round(mask_ratio * h * w)
    mask_strategy: str = "high"  # high | low | random (Table 4) | soft (M = 1 - A / max A: attenuated, not zeroed)
    # the map whose top cells Eq. 4 masks: mean (Eq. 2, the last block's heads averaged) | max (over the heads) |
    # rollout (attention rollout over every block) | grad (the last block's attention weighted by the ViT logit's
    # gradient, positive part) | cam (the teacher CNN head's class activation map) | saliency (|input gradient x
    # input| of the teacher's two logits, pooled per cell) | input_grad (|input gradient| of the same logits, smoothed,
    # pooled per cell) | occlusion (how far the teacher's two logits move when one cell of the input is erased: h*w
    # extra teacher forwards, no gradient); docs/mask-evidence.md measures each against known regions
    attention_map: str = "mean"
    # saliency / input_grad: the contributions are box-averaged over a window of this share of the image side before
    # the per-cell pooling, so that an artefact straddling cells ranks its main cell (0: no smoothing)
    saliency_smooth: float = 0.0
    # where the mask acts: features (Eq. 4: the student's feature map X_s * M) | input (the image cells under M = 0
    # are erased to the backbone's mean colour before the student CNN sees them) | tokens (ViT students: the patch
    # tokens under M = 0 leave the student's sequence before block `mask_block`; prefix tokens never)
    mask_at: str = "features"
    mask_block: int = 0  # tokens: the student ViT block the masked tokens never enter (0: after patch + pos embedding)
    # tokens: drop (removed from the sequence: the student's forward is that much cheaper) | token (replaced by a
    # learned mask token, as iBOT / AttMask do)
    mask_fill: str = "drop"
    # whose map decides a real sample's mask: own (its own teacher map, as printed) | fake (the mask of a fake drawn at
    # random from the same batch, so that where the mask lands says nothing of the label: with input erasing, a
    # fake-only position of the erased cells becomes a shortcut of its own)
    real_mask: str = "own"
    # training forwards during which the student's features go unmasked (M = 1) while the teacher's attention is
    # still untrained (the paper is silent on a schedule; 0 = masked from the first step, as printed)
    mask_warmup: int = 0
    # AttMask's schedules (training forwards only; evaluation and pictures use mask_ratio on every image):
    # the share of a training batch whose images are masked, exactly round(share * B) drawn at random each forward, the
    # others seen whole (1: every image, as printed)
    mask_share: float = 1.0
    # a mask ratio per image drawn from U(lo, hi) (AttMask: [0.1, 0.5]); null: mask_ratio for every image
    mask_ratio_range: list[float] | None = None
    # AttMask-Hint: this share of each image's masked cells, drawn at random, is shown after all (0: none)
    mask_hint: float = 0.0
    # the mask ratio (or both ends of mask_ratio_range) grows linearly from 0 over this many training forwards, so the
    # student first learns from whole faces (0: the full ratio from the first forward). Counted as mask_warmup's
    # forwards are, after them
    mask_anneal: int = 0
    # mask_at=input: what is erased. cells (the masked grid cells, whole) | boxes (RFM's region-shaped erasing: as
    # many boxes as cells are masked, each centred on the highest point of the map, upsampled to the image, outside
    # the previous box dilated to twice its size; sides a cell's times U(erase_box_scale))
    erase_shape: str = "cells"
    erase_box_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    # mask_at=input: what the erased pixels become. mean (the backbone's mean colour, 0 after its normalisation) |
    # noise (uniform noise in [0, 1] per pixel and channel, as RFM fills its boxes)
    erase_fill: str = "mean"
    pooling: str = "avg"  # avg: mean over all h*w (as printed) | masked_mean: mean over kept positions
    mixup: bool = True  # deep mixup, Eq. 5-6 (Table 3 "w/o mixup")
    mixup_alpha: float = 1.0  # lambda ~ Beta(alpha, alpha); 1.0 is uniform on [0, 1]
    # any: the partner is any sample of the batch, as printed (soft targets across classes) | same_class: a sample of
    # the same label (mixed features, hard targets)
    mixup_partner: str = "any"
    # global: partners drawn from the whole global batch (every rank's features and labels gathered, with gradients
    # reaching the partner's rank), so the method does not change with the number of ranks | rank: partners from
    # this rank's own samples only. A world of one draws the same either way (docs/training.md "Many GPUs").
    mixup_scope: str = "global"
    div_weight: float = 0.1  # alpha of Eq. 7
    student_hidden: int = 0  # Sec. 3.3's "MLP classifier" on F': hidden width (0 = one linear layer)
    inference_head: str = "student"  # student | teacher_cnn | teacher_vit | ensemble
    # what of the student backbone trains (heads, the teacher's ViT and a mask token always do): full | ln (its
    # LayerNorms, GenD's recipe; a CNN's BatchNorms) | lora (low-rank adapters, `lora`) | last_k (its last `tune_last_k`
    # blocks and final norm)
    tune: str = "full"
    teacher_tune: str | None = None  # the teacher backbone's, same choices (null: as `tune`)
    tune_last_k: int = 2
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SourceConfig:
    path: str = MISSING  # shard folder <dataset>/<split>/<method>, relative to data.root unless absolute
    weight: float = 1.0


@dataclass
class DataConfig:
    root: str = "shards"  # base folder for relative shard paths
    train: list[SourceConfig] = field(default_factory=list)
    val: list[str] = field(default_factory=list)  # shard folders scored for validation AUC
    test: list[str] = field(default_factory=list)  # default --data of `ltm eval`
    image_size: int = 224
    loader: str = "dali"  # dali | reference (webdataset + PIL + DataLoader)
    device: str = "auto"  # auto | cpu | gpu: where DALI decodes (auto: "mixed" when CUDA exists)
    shuffle_buffer: int = 1024
    num_threads: int = 2  # DALI CPU threads / reference loader workers per rank
    # batches decoded ahead of the one in use: DALI's prefetch_queue_depth (read and decode pipelines), the reference
    # loader's DataLoader prefetch_factor (per worker). The order of the batches does not depend on it.
    prefetch: int = 2
    # reference training loader: the DataLoader's pin thread copies each batch into page-locked memory, so the
    # host-to-GPU copy is asynchronous without the training thread pinning it; no effect without CUDA
    pin_memory: bool = False
    on_bad_sample: str = "error"  # error | skip (counted and logged)
    seed: int = 0


@dataclass
class ProfileConfig:
    start: int = 0  # first optimizer step traced (1-based); 0 = no profiling
    steps: int = 0  # steps traced from `start`


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    batch_size: int = 32  # global batch (the paper's unit); per rank = batch_size / (world * grad_accum)
    grad_accum: int = 1
    iters_per_epoch: int = 300
    epochs: int = 30
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_gamma: float = 0.9  # ExponentialLR, stepped once per epoch
    # sgd (the paper's: momentum, `weight_decay` on every parameter) | adamw (decoupled `weight_decay`, none on norms,
    # biases, embeddings and tokens: the field's ViT recipes)
    optimizer: str = "sgd"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    # exponential (lr x lr_gamma after each epoch, Sec. 4.1) | cosine (per step from lr after `warmup_steps` of linear
    # warm-up to 0 at the last step)
    schedule: str = "exponential"
    warmup_steps: int = 0
    # LTM only: the student's CNN and classifier train at lr x this (the paper: 1, one lr for both networks)
    student_lr_scale: float = 1.0
    # 0 | 1 | 2 | 3 (3: parameters partitioned over the ranks too, gathered per module as the forward reaches it;
    # docs/large-models.md)
    zero_stage: int = 0
    # false | blocks (every ViT block and CNN stage of the backbones recomputed in the backward instead of keeping its
    # activations) | every_k (only every `checkpoint_every_k`-th one); the same losses either way
    activation_checkpointing: bool | str = False
    checkpoint_every_k: int = 2
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_clip: float = 0.0
    seed: int = 0
    log_every: int = 10
    val_every: int = 300  # steps; 0 = only at epoch ends
    val_batches: int = 0  # 0 = the whole val set
    ckpt_every: int = 300  # steps; epoch ends always save
    keep_last: int = 3
    deterministic: bool = True
    channels_last: bool = False  # NHWC training batches (activations follow; faster convolutions on tensor cores)
    optimizer_impl: str = "default"  # SGD kernels: default (torch's choice) | foreach | fused | for-loop
    # torch.compile of the model inside the DeepSpeed engine (DeepSpeed's engine.compile, inductor):
    # false | default | reduce-overhead | max-autotune (true = default); checkpoints keep the same keys
    compile: bool | str = False
    peak_tflops: float = 0.0  # one device's peak TFLOP/s for the logged MFU (0: PEAK_TFLOPS in ltm.train.metrics_log)
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # torch.profiler trace of steps start..+steps-1
    # BatchNorm statistics over every rank's micro-batch (torch SyncBatchNorm, GPUs only) instead of each rank's own;
    # no effect in a world of one (docs/training.md "Many GPUs")
    sync_bn: bool = False
    # none: train.lr as given | linear: lr x batch_size / 32 (the paper's batch), for a global batch raised with the
    # GPU count (docs/training.md "Many GPUs")
    lr_scaling: str = "none"
    # minutes a rank waits in a collective for the others (the process group's timeout): validation, checkpoint
    # saves and a slow node's data loading all hold the others at the next all-reduce
    timeout_min: int = 30


@dataclass
class EvalConfig:
    batch_size: int = 64
    video_agg: str = "mean"  # mean | max | confident (ltm.eval.metrics.VIDEO_REDUCE)
    attention_samples: int = 4  # per label, pictures under attention/
    # fakes with a known manipulated region (shard member region.png) scored for the mask diagnostics, per method
    # folder (0: off); pictures of the first few under regions/
    region_samples: int = 256
    error_samples: int = 4  # the most confident false positives and false negatives each, pictures under errors/
    threshold: float = 0.5
    perturb: str | None = None  # TYPE:LEVEL, a test-time perturbation of every crop or clip (ltm.data.perturb)
    frames_per_video: int = 0  # N evenly spaced frames scored per video (ltm.data.plan); 0 = all frames in the shards
    # minutes a rank of `ltm eval` / `ltm predict --run` waits in a collective for the others (the process group's
    # timeout): a rank done with its share waits for the slowest, and NCCL's default 10 would abort after scoring
    timeout_min: int = 60


@dataclass
class LaunchConfig:
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU job, one task per node
    cpus_per_task: int = 2
    mem_gb: int = 0  # 0 = cluster default
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ...)
    max_requeue: int = 3
    signal_delay_s: int = 120


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


CHOICES: dict[str, tuple[Any, ...]] = {
    "model.kind": ("ltm", "baseline"),
    "model.mask_strategy": ("high", "low", "random", "soft"),
    "model.attention_map": ("mean", "max", "rollout", "grad", "cam", "saliency", "input_grad", "occlusion"),
    "model.mask_at": ("features", "input", "tokens"),
    "model.mask_fill": ("drop", "token"),
    "model.tune": ("full", "ln", "lora", "last_k"),
    "model.teacher_tune": (None, "full", "ln", "lora", "last_k"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("exponential", "cosine"),
    "model.real_mask": ("own", "fake"),
    "model.erase_shape": ("cells", "boxes"),
    "model.erase_fill": ("mean", "noise"),
    "model.pooling": ("avg", "masked_mean"),
    "model.mixup_partner": ("any", "same_class"),
    "model.mixup_scope": ("global", "rank"),
    "model.input_norm": ("backbone", "none"),
    "model.output_stride": (None, 8, 16, 32),
    "model.inference_head": ("student", "teacher_cnn", "teacher_vit", "ensemble"),
    "data.loader": ("dali", "reference"),
    "data.device": ("auto", "cpu", "gpu"),
    "data.on_bad_sample": ("error", "skip"),
    "train.zero_stage": (0, 1, 2, 3),
    "train.activation_checkpointing": (False, "blocks", "every_k"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.optimizer_impl": ("default", "foreach", "fused", "for-loop"),
    "train.compile": (False, True, "default", "reduce-overhead", "max-autotune"),
    "train.lr_scaling": ("none", "linear"),
    "eval.video_agg": ("mean", "max", "confident"),
}


def packaged_configs() -> list[str]:
    """Names `load_config` accepts besides paths: `paper`, `tiny-cpu`, `experiments/<name>`."""
    names = [p.stem for p in sorted(CONFIG_DIR.glob("*.yaml"))]
    names += [f"experiments/{p.stem}" for p in sorted((CONFIG_DIR / "experiments").glob("*.yaml"))]
    return names


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if packaged.exists():
        return packaged
    if path.exists():
        return path
    names = "\n".join(f"  {name}" for name in packaged_configs())
    raise ConfigError(f"config {str(name_or_path)!r}: no such file and not a packaged config; packaged:\n{names}")


# libyaml's safe loader where PyYAML was built with it: the same documents, read about 8x faster
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (safe loader: no object tags); errors name the file."""
    return _parse_mapping(path, path.read_text())


def _parse_mapping(path: Path, text: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=SAFE_LOADER) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


@functools.lru_cache(maxsize=256)
def _parsed(path: Path, text: str) -> tuple[DictConfig, Any]:
    """One config file's node and its `base:` value, kept per text: sweeps and plans load the same few files for
    every point. Callers only read the node (a merge copies what it takes)."""
    data = _parse_mapping(path, text)
    base = data.pop("base", None)
    return OmegaConf.create(data), base


def _config_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """One YAML file and its `base:` chain, the base-most file first."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    node, base = _parsed(path, path.read_text())
    if base is None:
        return [node]
    try:
        base_path = resolve_config_path(base) if not (path.parent / str(base)).exists() else path.parent / base
    except ConfigError as exc:
        raise ConfigError(f"{path}: key 'base': {exc}") from None
    return [*_config_layers(base_path, (*seen, path.resolve())), node]


def load_config(name_or_path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Structured defaults <- YAML file (and its `base` chain, base-most first) <- `key=value` overrides."""
    if name_or_path is None:
        return _merge("defaults", [], overrides)
    path = resolve_config_path(name_or_path)
    return _merge(str(path), _config_layers(path), overrides)


@functools.cache
def _structured_defaults() -> DictConfig:
    return OmegaConf.structured(Config)


def _fresh_defaults() -> DictConfig:
    """A fresh structured config of the defaults, to merge into in place. Copying the one built per process costs a
    fifth of building it from the dataclasses; sweeps and plans load a config per point."""
    return copy.deepcopy(_structured_defaults())


def _merge(source: str, layers: list[Any], overrides: list[str] | None) -> Config:
    """Structured defaults <- `layers` (read from `source`) <- `key=value` overrides, validated. Each layer merges
    into the one config in place (`OmegaConf.merge` would copy the whole config again for each)."""
    try:
        merged = _fresh_defaults()
        for layer in layers:
            merged.merge_with(layer)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: key {exc.full_key!r}: {_reason(exc)}") from exc
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            merged.merge_with(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {item!r}: key {exc.full_key!r}: {_reason(exc)}") from exc
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{source}: key {exc.full_key!r}: {_reason(exc)}") from exc
    validate(cfg)
    return cfg


def _reason(exc: OmegaConfBaseException) -> str:
    return str(exc).split("\n")[0]


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"key {key!r}: {value!r} is not one of {list(allowed)}")
    checks = {  # key: (valid, the allowed range as said to the user)
        "model.mask_ratio": (0.0 <= cfg.model.mask_ratio < 1.0, "in [0, 1)"),
        "model.saliency_smooth": (0.0 <= cfg.model.saliency_smooth < 1.0, "in [0, 1)"),
        "model.mixup_alpha": (cfg.model.mixup_alpha > 0, "> 0"),
        "model.div_weight": (cfg.model.div_weight >= 0, ">= 0"),
        "model.vit.heads": (cfg.model.vit.heads > 0 and cfg.model.vit.dim % cfg.model.vit.heads == 0,
                            "> 0 and dividing model.vit.dim"),
        "model.vit.depth": (cfg.model.vit.depth > 0, ">= 1"),
        "model.student_hidden": (cfg.model.student_hidden >= 0, ">= 0 (0: a linear head)"),
        "model.mask_warmup": (cfg.model.mask_warmup >= 0, ">= 0"),
        "model.mask_block": (cfg.model.mask_block >= 0, ">= 0"),
        "model.mask_share": (0.0 < cfg.model.mask_share <= 1.0, "in (0, 1]"),
        "model.mask_ratio_range": (cfg.model.mask_ratio_range is None or (
            len(cfg.model.mask_ratio_range) == 2 and 0.0 <= cfg.model.mask_ratio_range[0]
            <= cfg.model.mask_ratio_range[1] < 1.0), "null or [lo, hi] with 0 <= lo <= hi < 1"),
        "model.mask_hint": (0.0 <= cfg.model.mask_hint < 1.0, "in [0, 1)"),
        "model.mask_anneal": (cfg.model.mask_anneal >= 0, ">= 0"),
        "model.erase_box_scale": (len(cfg.model.erase_box_scale) == 2
                                  and 0.0 < cfg.model.erase_box_scale[0] <= cfg.model.erase_box_scale[1],
                                  "[lo, hi] with 0 < lo <= hi (a cell's side times U(lo, hi))"),
        "model.erase_shape": (cfg.model.erase_shape == "cells" or (cfg.model.mask_at == "input"
                                                                    and cfg.model.mask_strategy != "soft"),
                              "cells unless model.mask_at is input and model.mask_strategy high, low or random "
                              "(boxes are erased from the image, one per masked cell)"),
        "model.erase_fill": (cfg.model.erase_fill == "mean" or cfg.model.mask_at == "input",
                             "mean unless model.mask_at is input"),
        "model.tune_last_k": (cfg.model.tune_last_k >= 1, ">= 1"),
        "model.lora.rank": (cfg.model.lora.rank >= 1, ">= 1"),
        "model.lora.targets": (len(cfg.model.lora.targets) > 0, "a non-empty list of module name suffixes"),
        "train.betas": (len(cfg.train.betas) == 2 and all(0 <= b < 1 for b in cfg.train.betas), "two values in [0, 1)"),
        "train.warmup_steps": (cfg.train.warmup_steps >= 0 and (cfg.train.warmup_steps == 0
                                                                 or cfg.train.schedule == "cosine"),
                               ">= 0, and 0 unless train.schedule is cosine (exponential has no warm-up)"),
        "model.teacher_tune": (cfg.model.teacher_tune is None or cfg.model.kind == "ltm",
                               "null unless model.kind is ltm (a baseline has no teacher)"),
        "train.checkpoint_every_k": (cfg.train.checkpoint_every_k >= 1, ">= 1"),
        "train.profile.start": (cfg.train.profile.start >= 0, ">= 0 (0: off)"),
        "train.profile.steps": (cfg.train.profile.steps >= 0 and (cfg.train.profile.steps > 0) ==
                                (cfg.train.profile.start > 0), ">= 1 with train.profile.start, else 0"),
        "data.image_size": (cfg.data.image_size >= 32, ">= 32"),
        "train.batch_size": (cfg.train.batch_size > 0, ">= 1"),
        "train.grad_accum": (cfg.train.grad_accum > 0, ">= 1"),
        "train.iters_per_epoch": (cfg.train.iters_per_epoch > 0, ">= 1"),
        "train.epochs": (cfg.train.epochs > 0, ">= 1"),
        "train.lr": (cfg.train.lr > 0, "> 0"),
        "train.student_lr_scale": (cfg.train.student_lr_scale > 0 and (cfg.train.student_lr_scale == 1.0
                                                                       or cfg.model.kind == "ltm"),
                                   "> 0, and 1.0 unless model.kind is ltm (a baseline has no student)"),
        "train.keep_last": (cfg.train.keep_last > 0, ">= 1"),
        "eval.batch_size": (cfg.eval.batch_size > 0, ">= 1"),
        "eval.frames_per_video": (cfg.eval.frames_per_video >= 0, ">= 0 (0: all frames)"),
        "eval.attention_samples": (cfg.eval.attention_samples >= 0, ">= 0"),
        "eval.region_samples": (cfg.eval.region_samples >= 0, ">= 0 (0: no mask diagnostics)"),
        "eval.error_samples": (cfg.eval.error_samples >= 0, ">= 0"),
        "train.timeout_min": (cfg.train.timeout_min >= 1, ">= 1 (minutes)"),
        "eval.timeout_min": (cfg.eval.timeout_min >= 1, ">= 1 (minutes)"),
    }
    for key, (ok, allowed) in checks.items():
        if not ok:
            raise ConfigError(f"key {key!r}: invalid value {_get(cfg, key)!r}, must be {allowed}")
    for i, source in enumerate(cfg.data.train):
        if source.weight <= 0:
            raise ConfigError(f"key 'data.train[{i}].weight': must be > 0, got {source.weight!r}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


LEGACY_MODEL_DEFAULTS: dict[str, Any] = {"input_norm": "none", "student_hidden": 0}


def upgrade_stored(data: Any) -> Any:
    """A stored (resolved) config from before a model key existed keeps meaning what it meant when it was trained.

    A key added since then takes its default, which keeps the earlier behaviour (`freeze_bn: false`, `pooling: avg`,
    ...), except where the default changed: `model.input_norm` appeared with per-backbone input normalisation (runs
    written before it fed [0, 1] pixels) and `model.student_hidden` with the MLP student classifier (before it: one
    linear layer), `LEGACY_MODEL_DEFAULTS`.
    """
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        return data
    legacy = {key: value for key, value in LEGACY_MODEL_DEFAULTS.items() if key not in model}
    added = {key: value for key, value in _model_defaults().items() if key not in model and key not in legacy}
    return {**data, "model": {**model, **added, **legacy}} if legacy or added else data


def _model_defaults() -> dict[str, Any]:
    return copy.deepcopy(_model_defaults_once())


@functools.cache
def _model_defaults_once() -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(ModelConfig), resolve=True)  # type: ignore[return-value]


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """A run folder's resolved `config.yaml` (as `load_config`), upgraded with `upgrade_stored`."""
    path = resolve_config_path(path)
    stored = OmegaConf.to_container(OmegaConf.merge(*_config_layers(path)))
    return _merge(str(path), [OmegaConf.create(upgrade_stored(stored))], overrides)


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of `to_dict` (checkpoints and run folders store the resolved config this way)."""
    data = upgrade_stored(data)
    try:
        merged = _fresh_defaults()
        merged.merge_with(data)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"stored config: key {exc.full_key!r}: {_reason(exc)}") from exc
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Atomic write of the resolved config (temp name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
