"""`ltm plan`: will a config train on N GPUs of M GiB, with which micro-batch, and how fast?

Per GPU: the model states (parameters, gradients, optimizer states, the fp32 master copy) by ZeRO stage, cross-checked
against DeepSpeed's own estimators where those apply (AdamW, 16-bit training, every parameter trained); the
activation memory per image, measured once on the CPU (`activation_bytes`) and scaled with the micro-batch; the
largest micro-batch that fits and the `train.grad_accum` it implies for the config's global batch; the bytes each
GPU sends per optimizer step; and a step time from the model's FLOPs at a stated MFU. `ltm submit train` and
`ltm sweep --submit` refuse a config this plan does not fit (`check_fits`).

    ltm plan --config clip-l14 --nodes 8 --gpus-per-node 8 --gpu-mem 80
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from ltm.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

GiB = 2**30
# DeepSpeed's default (the trainer does not set it): ZeRO-1/2/3 stage gradients in one contiguous bucket of this many
# elements, allocated whole (`reduce_bucket_size`)
REDUCE_BUCKET = 500_000_000
# ZeRO-3 keeps parameters of up to this many elements gathered on every rank (`stage3_param_persistence_threshold`)
PERSISTENCE = 100_000
# ZeRO-3 gathers the next modules' parameters ahead of the forward and backward up to this many elements
# (`stage3_prefetch_bucket_size`): with the module being run, what is gathered whole at once
PREFETCH = 50_000_000
# gradients travel in fp32 whatever the training dtype (`communication_data_type` in ltm.train.trainer)
COMM_BYTES = 4
# What a GPU cannot give to tensors: the CUDA context and kernels (about 1 GiB) and the caching allocator's
# fragmentation (10% of the card is the usual margin)
CONTEXT_BYTES = 1 * GiB
ALLOCATOR_MARGIN = 0.10


def element_bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def optimizer_states(cfg: Config) -> int:
    """fp32 tensors the optimizer keeps per trained parameter: AdamW 2 (moments), SGD 1 with momentum, else 0."""
    if cfg.train.optimizer == "adamw":
        return 2
    return 1 if cfg.train.momentum else 0


def checkpointing(cfg: Config) -> tuple[bool | str, int]:
    """(`train.activation_checkpointing`, `train.checkpoint_every_k`): false | blocks | every_k, and its k."""
    return cfg.train.activation_checkpointing, cfg.train.checkpoint_every_k


# --------------------------------------------------------------------------------------------- model states

_COUNTS: dict[tuple, ParamCounts] = {}
_ACTIVATIONS: dict[tuple, Activations] = {}


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of what the model states occupy at one ZeRO stage."""

    stage: int
    params: float  # the training-dtype parameters (all of them, trained or frozen)
    master: float  # the fp32 copy of the trained parameters the optimizer steps
    grads: float  # gradients of the trained parameters (training dtype and fp32 accumulators)
    optimizer: float  # momentum / Adam moments, fp32
    gathered: float  # ZeRO-3: the largest layer gathered whole, in fp32 as DeepSpeed's estimator counts it
    prefetched: float  # ZeRO-3: the parameters gathered ahead of the forward and backward (training dtype)
    bucket: float  # DeepSpeed's contiguous gradient bucket, allocated whole at ZeRO-1/2/3

    @property
    def total(self) -> float:
        return self.params + self.master + self.grads + self.optimizer + self.gathered + self.prefetched + self.bucket


def model_states(total: int, trainable: int, stage: int, world: int, precision: str, n_states: int,
                 largest_layer: int = 0, bucket: int = REDUCE_BUCKET, persistent: int = 0) -> ModelStates:
    """Model-state bytes per GPU as DeepSpeed lays them out. For a 16-bit, AdamW, all-trained model they are
    `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (no offload) plus what those
    leave out: the gradient bucket, and at ZeRO-3 the prefetched parameters and the 16-bit gradient partition.

    Stage 0 replicates everything; 1 shards the master copy and the optimizer states over the `world` ranks; 2 also
    the gradients; 3 also the parameters (but the `persistent` ones, small tensors it keeps whole), gathering one
    layer at a time. bf16 at stage 1 is DeepSpeed's
    BF16_Optimizer (fp32 gradients whole, no bucket); the ZeRO optimizers stage gradients in a bucket of `bucket`
    elements of the parameters' dtype, allocated whole."""
    w = element_bytes(precision)
    half = w == 2
    shard = world if stage >= 1 else 1
    params = w * (persistent + (total - persistent) / world) if stage == 3 else w * total
    # DeepSpeed's ZeRO optimizers copy the trained partition to fp32 even for fp32 training; stage 0 steps the
    # parameters in place unless a 16-bit wrapper keeps fp32 masters
    master = 4 * trainable / shard if (half or stage >= 1) else 0.0
    bf16_optimizer = stage == 1 and precision == "bf16"
    if stage == 0 or bf16_optimizer:
        grads = w * trainable + (4 * trainable if half else 0)  # 16-bit grads and the wrapper's fp32 copy
    elif stage == 1:
        grads = w * trainable + 4 * trainable / world  # full grads, the fp32 partition the optimizer reads
    elif stage == 2:
        grads = (w + 4 if half else 4) * trainable / world
    else:  # the partition's gradients in the parameters' dtype (which the estimator leaves out) and in fp32
        grads = (w + 4) * trainable / world
    optimizer = 4 * n_states * trainable / shard
    gathered = 4 * largest_layer if stage == 3 else 0.0
    prefetched = w * min(total - persistent, PREFETCH + largest_layer) if stage == 3 else 0.0  # small: all of it
    staged = w * bucket if stage >= 1 and not bf16_optimizer else 0.0
    return ModelStates(stage, params, master, grads, optimizer, gathered, prefetched, staged)


def deepspeed_estimate(total: int, largest_layer: int, stage: int, nodes: int, gpus_per_node: int) -> float | None:
    """DeepSpeed's own per-GPU model-state estimate (no offload) for stages 2 and 3, which it models (AdamW, 16-bit,
    every parameter trained); None for stages 0 and 1. Pure arithmetic: no GPU needed."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return float(estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=False)[1])
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return float(estimate_zero3_model_states_mem_needs(total, largest_layer, gpus_per_node, nodes,
                                                           cpu_offload=False, cpu_offload_params=False)[1])
    return None


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    largest_layer: int  # parameters of the largest module (its own, not its children's), as DeepSpeed counts
    modules: int = 0  # modules holding parameters of their own: ZeRO-3 gathers each one separately
    persistent: int = 0  # parameters in tensors of <= PERSISTENCE elements, which ZeRO-3 keeps whole on every rank


def _param_counts(cfg: Config) -> ParamCounts:
    image_size = cfg.data.image_size
    import torch

    from ltm.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, image_size, load_weights=False)
    params = {id(p): p for p in model.parameters()}.values()  # shared parameters once
    own = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return ParamCounts(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
                       max(own, default=0), sum(1 for n in own if n),
                       sum(p.numel() for p in params if p.numel() <= PERSISTENCE))


def param_counts(cfg: Config) -> ParamCounts:
    """Parameter counts of the config's model, built on the meta device (no memory, no weights)."""
    key = (repr(cfg.model), cfg.data.image_size)
    if key not in _COUNTS:  # a sweep checks many points of one model
        _COUNTS[key] = _param_counts(cfg)
    return _COUNTS[key]


# --------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Activations:
    """Bytes per image kept for the backward, at the training dtype's element size: outside the backbones'
    checkpoint units (`Backbone.checkpoint_units`: ViT blocks, CNN stages), and per unit (saved, input)."""

    outside: float
    units: tuple[tuple[tuple[float, float], ...], ...]  # per backbone, per unit in forward order: (saved, input)
    measured_depths: tuple[tuple[int, int], ...]  # per backbone: (units measured, units of the config)

    def per_image(self, mode: bool | str = False, every_k: int = 2) -> float:
        """Without checkpointing everything saved; `blocks`: each unit keeps its input only, and the unit being
        recomputed in the backward holds its tensors again; `every_k`: units 0, k, 2k, ... so, the others whole."""
        if not mode:
            return self.outside + sum(saved for units in self.units for saved, _ in units)
        step = every_k if mode == "every_k" else 1
        kept = sum(inp if i % step == 0 else saved for units in self.units for i, (saved, inp) in enumerate(units))
        recompute = max((saved for units in self.units for i, (saved, _) in enumerate(units) if i % step == 0),
                        default=0.0)
        return self.outside + kept + recompute


def is_vit(name: str) -> bool:
    """A timm VisionTransformer name (CLIP, DINOv2, ViT-Tiny): its `depth` can be set at build time."""
    return name.startswith(("vit_", "eva", "deit"))


def _units(model: Any) -> list[list[Any]]:
    from ltm.models.backbone import Backbone

    return [b.checkpoint_units() for b in model.modules() if isinstance(b, Backbone)]


def _activation_bytes(cfg: Config) -> Activations:
    import torch

    from ltm.models import build_model

    image_size = cfg.data.image_size
    with torch.device("meta"):
        depths = [len(u) for u in _units(build_model(cfg.model, image_size, load_weights=False))]
    # ViT backbones measured with 2 blocks each and scaled by depth: every block of a ViT keeps the same tensors, so
    # the count stays exact, and ViT-L/14 measures in seconds on a CPU
    model_cfg = cfg.model
    teacher = model_cfg.teacher_backbone or model_cfg.backbone
    if max(depths, default=0) > 2 and (is_vit(model_cfg.backbone) or is_vit(teacher)):
        teacher_args = model_cfg.teacher_backbone_args
        if teacher_args is None:
            teacher_args = model_cfg.backbone_args if teacher == model_cfg.backbone else {}
        model_cfg = replace(
            model_cfg,
            backbone_args={**model_cfg.backbone_args, "depth": 2} if is_vit(model_cfg.backbone)
            else model_cfg.backbone_args,
            teacher_backbone_args={**teacher_args, "depth": 2} if is_vit(teacher) else teacher_args)
    # mixup draws partners from a distributed batch and adds one image's worth of tensors: left out
    model_cfg = replace(model_cfg, mixup=False)
    torch.manual_seed(0)
    model = build_model(model_cfg, image_size, load_weights=False).train()
    units = _units(model)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    w = element_bytes(cfg.train.precision)
    seen: set[int] = set()
    current: list[tuple[int, int] | None] = [None]
    saved = [[0.0] * len(u) for u in units]
    inputs = [[0.0] * len(u) for u in units]
    total = [0.0]

    def scaled(t: torch.Tensor) -> float:
        # measured in fp32; a bf16/fp16 run keeps its floating tensors at half the size
        nbytes = t.untyped_storage().nbytes()
        return nbytes * w / t.element_size() if t.is_floating_point() else nbytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in param_ptrs:  # each storage once; weights are model states
            seen.add(ptr)
            size = scaled(t)
            total[0] += size
            if current[0] is not None:
                saved[current[0][0]][current[0][1]] += size
        return t

    def enter(b: int, i: int):
        def hook(_module: Any, args: tuple) -> None:
            current[0] = (b, i)
            if args and isinstance(args[0], torch.Tensor):
                inputs[b][i] += scaled(args[0])
        return hook

    def leave(_module: Any, _args: Any, _out: Any) -> None:
        current[0] = None

    handles = [h for b, us in enumerate(units) for i, u in enumerate(us)
               for h in (u.register_forward_pre_hook(enter(b, i)), u.register_forward_hook(leave))]
    batch = 2  # BatchNorm needs two images in training mode
    images = torch.rand(batch, 3, image_size, image_size)
    labels = torch.tensor([0.0, 1.0])
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(images, labels)
    finally:
        for h in handles:
            h.remove()
    outside = total[0] - sum(map(sum, saved))
    per_backbone = []
    for b, depth in enumerate(depths):
        pairs = [(saved[b][i] / batch, inputs[b][i] / batch) for i in range(len(units[b]))]
        if len(pairs) != depth:  # a shortened ViT: its mean block, depth times
            mean = (sum(p[0] for p in pairs) / len(pairs), sum(p[1] for p in pairs) / len(pairs))
            pairs = [mean] * depth
        per_backbone.append(tuple(pairs))
    return Activations(outside / batch, tuple(per_backbone),
                       tuple((len(u), d) for u, d in zip(units, depths)))


def activation_bytes(cfg: Config) -> Activations:
    """Activation bytes per image of the config's training forward (random init, 2 images, on the CPU): the bytes
    of the tensors autograd saves for the backward (`saved_tensors_hooks`, each storage once, parameters excluded),
    at the element size of `train.precision`, split by the backbones' checkpoint units so that
    `Activations.per_image` gives them under each `train.activation_checkpointing` mode."""
    key = (repr(cfg.model), cfg.data.image_size, cfg.train.precision)
    if key not in _ACTIVATIONS:  # seconds for ViT-L: once per model in a process
        _ACTIVATIONS[key] = _activation_bytes(cfg)
    return _ACTIVATIONS[key]


# --------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Hardware:
    gpu_mem_gib: float = 80.0
    tflops: float = 989.0  # H100 SXM dense bf16
    mfu: float = 0.40
    nvlink_gbs: float = 450.0  # per GPU and direction (H100 NVLink 4)
    ib_gbs: float = 50.0  # per GPU: one 400 Gb/s InfiniBand NDR port each
    nvlink_latency_us: float = 3.0  # per ring step of a collective
    ib_latency_us: float = 8.0

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gib * GiB * (1 - ALLOCATOR_MARGIN) - CONTEXT_BYTES


@dataclass(frozen=True)
class StagePlan:
    states: ModelStates
    deepspeed: float | None  # DeepSpeed's estimator where it applies (see `model_states` for what it leaves out)
    act_per_image: float
    max_micro: int  # largest micro-batch that fits (0: none)
    micro: int  # largest divisor of the per-rank batch that fits (0: none)
    grad_accum: int  # per-rank batch / micro
    config_micro: int  # the micro-batch the config's grad_accum gives
    comm_bytes: float  # bytes each GPU sends per optimizer step
    comm_s: float
    compute_s: float

    def peak(self, micro: int) -> float:
        return self.states.total + self.act_per_image * micro

    @property
    def fits_config(self) -> bool:
        return self.config_micro > 0 and self.peak(self.config_micro) <= self._usable

    _usable: float = 0.0


@dataclass(frozen=True)
class Plan:
    cfg: Config
    nodes: int
    gpus_per_node: int
    hw: Hardware
    counts: ParamCounts
    acts: Activations
    checkpoint: tuple[bool | str, int]  # train.activation_checkpointing, train.checkpoint_every_k
    stages: dict[int, StagePlan]

    @property
    def world(self) -> int:
        return self.nodes * max(1, self.gpus_per_node)

    @property
    def current(self) -> StagePlan:
        return self.stages[self.cfg.train.zero_stage]


def communication_bytes(counts: ParamCounts, stage: int, world: int, precision: str, grad_accum: int) -> float:
    """Bytes one GPU sends per optimizer step in ring collectives ((N-1)/N of the buffer per pass): ZeRO-0 an fp32
    all-reduce of the gradients (two passes); ZeRO-1 a reduce-scatter of them and an all-gather of the updated
    parameters; ZeRO-2 the reduce-scatter at every micro-step; ZeRO-3 also all-gathers every parameter twice per
    micro-step (forward and backward)."""
    if world == 1:
        return 0.0
    ring = (world - 1) / world
    t, w = counts.trainable, element_bytes(precision)
    if stage == 0:
        return 2 * ring * COMM_BYTES * t
    if stage == 1:
        return ring * (COMM_BYTES * t + w * t)
    if stage == 2:
        return ring * (grad_accum * COMM_BYTES * t + w * t)
    return ring * grad_accum * (COMM_BYTES * t + 2 * w * counts.total)


def ring_steps(counts: ParamCounts, stage: int, world: int, grad_accum: int) -> int:
    """Sequential ring steps per optimizer step, each paying the link's latency: N-1 per reduce-scatter or
    all-gather, 2(N-1) per all-reduce, one collective per gradient bucket, per parameter all-gather bucket
    (DeepSpeed's 5e8 elements) and, at ZeRO-3, per module gathered (forward and backward)."""
    if world == 1:
        return 0
    buckets = math.ceil(counts.trainable / REDUCE_BUCKET)
    if stage == 0:
        return 2 * (world - 1) * buckets
    if stage in (1, 2):
        return (world - 1) * (buckets * (grad_accum if stage == 2 else 1) + buckets)
    return (world - 1) * grad_accum * (2 * counts.modules + buckets)


def _divisor_at_most(n: int, limit: int) -> int:
    return max((d for d in range(1, n + 1) if n % d == 0 and d <= limit), default=0)


def make_plan(cfg: Config, nodes: int, gpus_per_node: int, hw: Hardware = Hardware(),
              bucket: int | None = None) -> Plan:
    """The plan of `cfg` on `nodes` x `gpus_per_node` GPUs (0 GPUs: one CPU rank per node) for every ZeRO stage;
    `bucket`: the gradient bucket's elements (DeepSpeed's `reduce_bucket_size`)."""
    from ltm.models.flops import model_gflops

    world = nodes * max(1, gpus_per_node)
    counts = param_counts(cfg)
    acts = activation_bytes(cfg)
    ckpt = checkpointing(cfg)
    per_image = acts.per_image(*ckpt)
    t = cfg.train
    per_rank = t.batch_size // world if t.batch_size % world == 0 else 0
    config_micro = per_rank // t.grad_accum if per_rank and per_rank % t.grad_accum == 0 else 0
    flops = 3 * model_gflops(cfg)[0] * 1e9 * max(per_rank, 1)  # per GPU and step: forward + backward
    compute_s = flops / (hw.tflops * 1e12 * hw.mfu)
    bandwidth = (hw.nvlink_gbs if nodes == 1 else hw.ib_gbs) * 1e9
    latency = (hw.nvlink_latency_us if nodes == 1 else hw.ib_latency_us) * 1e-6
    stages: dict[int, StagePlan] = {}
    for stage in (0, 1, 2, 3):
        states = model_states(counts.total, counts.trainable, stage, world, t.precision, optimizer_states(cfg),
                              counts.largest_layer, REDUCE_BUCKET if bucket is None else bucket, counts.persistent)
        exact = t.optimizer == "adamw" and element_bytes(t.precision) == 2 and counts.trainable == counts.total
        ds = deepspeed_estimate(counts.total, counts.largest_layer, stage, nodes, max(1, gpus_per_node)) \
            if exact else None
        free = hw.usable_bytes - states.total
        max_micro = max(0, int(free // per_image)) if per_image > 0 else per_rank
        micro = _divisor_at_most(per_rank, max_micro) if per_rank else 0
        accum = per_rank // micro if micro else 0
        comm = communication_bytes(counts, stage, world, t.precision, accum or t.grad_accum)
        comm_s = comm / bandwidth + ring_steps(counts, stage, world, accum or t.grad_accum) * latency
        stages[stage] = StagePlan(states, ds, per_image, max_micro, micro, accum, config_micro, comm,
                                  comm_s, compute_s, _usable=hw.usable_bytes)
    return Plan(cfg, nodes, gpus_per_node, hw, counts, acts, ckpt, stages)


def fix_for(plan: Plan) -> str | None:
    """None when the config as given fits; else the smallest change that makes it fit, as key=value overrides (or
    a sentence when no setting of these GPUs does)."""
    cur = plan.current
    if cur.fits_config:
        return None
    t = plan.cfg.train
    if plan.cfg.train.batch_size % plan.world:
        return f"train.batch_size={plan.world * math.ceil(t.batch_size / plan.world)} (a multiple of the " \
               f"{plan.world} ranks)"
    if cur.micro:
        return f"train.grad_accum={cur.grad_accum}"
    for stage in range(t.zero_stage + 1, 4):
        s = plan.stages[stage]
        if s.micro:
            return f"train.zero_stage={stage}" + (f" train.grad_accum={s.grad_accum}" if s.grad_accum != t.grad_accum
                                                  else "")
    if t.activation_checkpointing != "blocks":
        ck = make_plan(dataclasses.replace(plan.cfg, train=replace(t, activation_checkpointing="blocks")),
                       plan.nodes, plan.gpus_per_node, plan.hw)
        for stage in range(t.zero_stage, 4):
            s = ck.stages[stage]
            if s.micro:
                extra = (f" train.zero_stage={stage}" if stage != t.zero_stage else "") + \
                        (f" train.grad_accum={s.grad_accum}" if s.grad_accum != t.grad_accum else "")
                return "train.activation_checkpointing=blocks" + extra
    return (f"nothing fits {plan.world} GPUs of {plan.hw.gpu_mem_gib:g} GiB (model states alone need "
            f"{min(s.states.total for s in plan.stages.values()) / GiB:.1f} GiB at ZeRO-3): more GPUs or a larger "
            "card")


def check_fits(cfg: Config, gpu_mem_gib: float) -> None:
    """Raise ConfigError naming the change that makes `cfg` fit its launch's GPUs of `gpu_mem_gib` GiB."""
    launch = cfg.launch
    if launch.gpus_per_node < 1:
        return  # CPU jobs: host memory is --mem's business
    plan = make_plan(cfg, launch.nodes, launch.gpus_per_node, Hardware(gpu_mem_gib=gpu_mem_gib))
    fix = fix_for(plan)
    if fix is None:
        return
    cur = plan.current
    head = f"--gpu-mem {gpu_mem_gib:g}: {cfg.train.precision}, ZeRO-{cfg.train.zero_stage}"
    if cur.config_micro:
        head += (f", micro-batch {cur.config_micro} needs {cur.peak(cur.config_micro) / GiB:.1f} GiB per GPU of "
                 f"{plan.hw.usable_bytes / GiB:.1f} usable")
    raise ConfigError(f"{head}; it fits with {fix}" if "=" in fix else f"{head}: {fix}")


# --------------------------------------------------------------------------------------------- report


def _gib(x: float) -> str:
    return f"{x / GiB:7.2f}"


def report(plan: Plan) -> str:
    cfg, hw, c = plan.cfg, plan.hw, plan.counts
    t = cfg.train
    lines = [
        f"plan: {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) = {plan.world} ranks, {hw.gpu_mem_gib:g} GiB each "
        f"({hw.usable_bytes / GiB:.1f} usable: {CONTEXT_BYTES / GiB:g} GiB context, {ALLOCATOR_MARGIN:.0%} "
        "allocator margin)",
        f"model: {c.total / 1e6:.1f}M parameters, {c.trainable / 1e6:.2f}M trained (model.tune={cfg.model.tune}); "
        f"{t.precision}, {t.optimizer} ({optimizer_states(cfg)} fp32 state(s) per trained parameter)",
        f"batch: global {t.batch_size}, per rank {t.batch_size / plan.world:g}, config grad_accum {t.grad_accum}",
        f"activations per image (activation_checkpointing={plan.checkpoint[0]}): "
        f"{plan.acts.per_image(*plan.checkpoint) / 2**20:.1f} MiB (false {plan.acts.per_image(False) / 2**20:.1f}, "
        f"blocks {plan.acts.per_image('blocks') / 2**20:.1f}; measured on the CPU"
        + ("; ViT blocks measured " + ", ".join(f"{m} of {d}" for m, d in plan.acts.measured_depths if m != d)
           + " and scaled by depth" if any(m != d for m, d in plan.acts.measured_depths) else "") + ")",
        "",
        "GiB per GPU   params  master   grads   optim  gather  bucket  states | DeepSpeed | max micro  micro x accum  "
        "comm/step  comm s  compute s",
    ]
    for stage, s in plan.stages.items():
        st = s.states
        mark = "*" if stage == t.zero_stage else " "
        ds = f"{s.deepspeed / GiB:9.2f}" if s.deepspeed is not None else "        -"
        fit = f"{s.micro:5d} x {s.grad_accum:<5d}" if s.micro else \
            ("does not fit" if t.batch_size % plan.world == 0 else "batch/ranks")
        lines.append(f"{mark}ZeRO-{stage}      {_gib(st.params)} {_gib(st.master)} {_gib(st.grads)} "
                     f"{_gib(st.optimizer)} {_gib(st.gathered + st.prefetched)} {_gib(st.bucket)} "
                     f"{_gib(st.total)} | {ds} | {s.max_micro:9d}  "
                     f"{fit:>13}  {s.comm_bytes / GiB:6.2f} GiB {s.comm_s:7.3f} {s.compute_s:9.3f}")
    cur = plan.current
    if all(s.deepspeed is None for s in plan.stages.values()):
        lines.append("DeepSpeed: its estimators (ZeRO-2/3) model AdamW and 16-bit training with every parameter "
                     "trained; this config is not that")
    lines += [
        "",
        f"step time (ZeRO-{t.zero_stage}): {cur.compute_s:.3f} s compute at {hw.mfu:.0%} MFU of {hw.tflops:g} "
        f"TFLOP/s, {cur.comm_s:.3f} s communication over {'NVLink' if plan.nodes == 1 else 'InfiniBand'} "
        f"({hw.nvlink_gbs if plan.nodes == 1 else hw.ib_gbs:g} GB/s per GPU, "
        f"{hw.nvlink_latency_us if plan.nodes == 1 else hw.ib_latency_us:g} us per ring step): "
        f"{max(cur.compute_s, cur.comm_s):.3f} s overlapped, {cur.compute_s + cur.comm_s:.3f} s serial",
    ]
    fix = fix_for(plan)
    if fix is None:
        lines.append(f"fits: ZeRO-{t.zero_stage} at micro-batch {cur.config_micro} x grad_accum {t.grad_accum} "
                     f"peaks at {cur.peak(cur.config_micro) / GiB:.1f} GiB")
    else:
        lines.append(f"does not fit as configured; change: {fix}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="paper", help="packaged config name or YAML path")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (default: launch.nodes)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: launch.gpus_per_node)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (80)")
    parser.add_argument("--tflops", type=float, default=989.0, help="peak TFLOP/s per GPU in the training dtype "
                        "(989: H100 SXM dense bf16)")
    parser.add_argument("--mfu", type=float, default=0.40, help="model FLOP utilisation the step time assumes (0.4)")
    parser.add_argument("--nvlink", type=float, default=450.0, help="GB/s per GPU within a node (450)")
    parser.add_argument("--ib", type=float, default=50.0, help="GB/s per GPU between nodes (50: 400 Gb/s each)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.zero_stage=2")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    nodes = cfg.launch.nodes if args.nodes is None else args.nodes
    gpus = cfg.launch.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    if nodes < 1 or gpus < 0:
        raise ConfigError("--nodes must be >= 1 and --gpus-per-node >= 0")
    hw = Hardware(gpu_mem_gib=args.gpu_mem, tflops=args.tflops, mfu=args.mfu, nvlink_gbs=args.nvlink, ib_gbs=args.ib)
    print(report(make_plan(cfg, nodes, gpus, hw)))
    return 0
