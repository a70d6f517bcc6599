"""`ltm train`: DeepSpeed training of the Learning-to-Mask detector (or the baseline), with exact resume.

The Trainer declares its parts and builds them in the order data flows through them — config and run folder,
device and process group, seeds, data, model (whose forward returns the Eq. 7 loss), optimizer and DeepSpeed engine,
checkpointer, validator, logs — and `train_one_epoch` reads as the loop it is. `train(cfg)` runs in the calling
process and takes the distributed layout from the environment (docs/scaling.md, "Distributed environment"), so the
same function serves `ltm train`, `ltm train --nproc N`, sbatch+srun and submitit jobs.

Exact resume: every random draw of a step comes from generators whose states are checkpointed per rank (torch for
the `random` mask strategy and the mixup permutation and lambda, numpy, python), the loader state is saved beside
them, and anything else that draws (the loader's iterator start-up, validation) runs under `torch.random.fork_rng`,
so it leaves the training stream where it was. On the CPU a resumed run ends bitwise equal to one never stopped.

Its components live beside it: checkpoints in `ltm.checkpoint`, validation in `ltm.train.validate`, the metrics
log and throughput figures in `ltm.train.metrics_log`, the stop flag and its signals in `ltm.train.preemption`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ltm.checkpoint import CheckpointError
from ltm.checkpoint.checkpointer import Checkpointer, rng_state, set_rng_state, tag_for
from ltm.config import Config, ConfigError, load_run_config, save_config, to_dict, upgrade_stored
from ltm.distributed import DistEnv, all_reduce_sum, init_distributed, teardown
from ltm.files import atomic_write_text
from ltm.models.backbone import set_activation_checkpointing
from ltm.models.flops import train_flops_per_step
from ltm.models.tuning import parameter_counts
from ltm.train import batch_scaling, preemption
from ltm.train.metrics_log import MetricsLog, peak_tflops
from ltm.train.validate import Validator

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ pieces


def deepspeed_config(cfg: Config, micro_batch: int, world_size: int, load_universal: bool) -> dict:
    """The DeepSpeed config dict, all of it from cfg.train (the paper's schedule lives outside DeepSpeed)."""
    t = cfg.train
    config = {
        "train_batch_size": micro_batch * t.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        # ZeRO-3's memory-efficient linear replaces torch.nn.functional.linear for the whole process, for good: a later
        # export (TorchScript traces F.linear) or any other model in the process would run DeepSpeed's autograd
        # function. The saving it buys is one input copy per linear layer, which activation checkpointing covers.
        "zero_optimization": {"stage": t.zero_stage, "memory_efficient_linear": False},
        "zero_allow_untested_optimizer": True,  # SGD is fine with ZeRO-1/2; DeepSpeed only lists Adam-likes
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        # The buffers in the parameters' dtype (DeepSpeed casts only parameters), but BatchNorm's running statistics,
        # which Trainer puts back in fp32 after the cast (ltm.models.precision.keep_batchnorm_fp32).
        "data_types": {"buffer_dtype": t.precision} if t.precision != "fp32" else {},
        # Gradients are all-reduced in fp32 whatever the training dtype: a bf16 sum over 16 ranks keeps 8 bits of
        # mantissa at each partial sum. (fp32 is DeepSpeed's default only for fp32 training.)
        "communication_data_type": "fp32",
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # our own logs
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16" and t.zero_stage == 2:
        # ZeRO-2 then sums the micro-batches' gradients (grad_accum > 1) in fp32 buffers. ZeRO-0 refuses this setting
        # and ZeRO-1 would swap in DeepSpeed's BF16_Optimizer (another checkpoint layout): there they add up in bf16,
        # which ltm.train.batch_scaling.batch_warnings says when grad_accum > 1.
        config["data_types"] = {**config["data_types"], "grad_accum_dtype": "fp32"}
    return config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# what a Baseline is built from: its LTM-only keys (mask, mixup, ViT, heads) change nothing in it
BASELINE_MODEL_KEYS = ("kind", "backbone", "pretrained", "input_norm", "output_stride", "freeze_bn", "tune",
                       "tune_last_k", "lora")


def model_differences(stored: dict, mine: dict) -> list[str]:
    """`model.<key>: <stored> there, <mine> here` for each model setting a run was trained with and this one lacks."""
    keys = [k for k in mine if k in BASELINE_MODEL_KEYS] if stored.get("kind") == mine.get("kind") == "baseline" \
        else list(mine)
    return [f"model.{k}: {stored.get(k)!r} there, {mine[k]!r} here" for k in keys if stored.get(k) != mine[k]]


def check_run_folder(run_dir: Path, cfg: Config) -> None:
    """A run folder holds one model: refuse a config whose model differs from the one trained there."""
    stored_path = run_dir / "config.yaml"
    if not stored_path.is_file():
        return
    try:
        stored = to_dict(load_run_config(stored_path))
    except ConfigError as exc:
        raise ConfigError(f"{stored_path}: the run folder's config cannot be read: {exc}") from exc
    mine = to_dict(cfg)
    diff = model_differences(stored["model"], mine["model"])
    if stored["data"]["image_size"] != mine["data"]["image_size"]:
        diff.append(f"data.image_size: {stored['data']['image_size']} there, {mine['data']['image_size']} here")
    if diff:
        raise ConfigError(f"{stored_path}: this run folder trained a different model ({'; '.join(diff)}); "
                          "pick another train.run_dir or the same model settings")


@dataclass
class TrainState:
    """What the loop counts; saved in every checkpoint's client_state."""

    step: int = 0  # optimizer steps done
    samples: int = 0  # training images seen, all ranks
    best_val_auc: float = float("nan")
    last_val_auc: float = float("nan")
    window: dict[str, float] = field(default_factory=dict)  # per-term sums since the last log line
    window_steps: int = 0


def compile_model(engine: Any, mode: bool | str, deterministic: bool) -> None:
    """`train.compile`: torch.compile the model inside the DeepSpeed engine, in place.

    DeepSpeed's `engine.compile` calls `nn.Module.compile`, which compiles the module's `__call__` without wrapping
    it, so the state-dict keys (and so checkpoints, resume and `ltm eval`) stay those of the eager model: no
    `_orig_mod.` prefix. Methods other than `forward` (`predict` in validation) run eagerly.
    """
    if deterministic:
        # Inductor would draw the `random` mask strategy's and mixup's numbers with its own kernels: other values
        # than eager's from the same generator. With eager's random ops a compiled run draws what an eager one does.
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
    engine.compile(compile_kwargs={} if mode in (True, "default") else {"mode": mode})


# ------------------------------------------------------------------------------------------------ the trainer


# AdamW's no-decay parameters besides those of ndim <= 1 (norms, biases): position embeddings and learned tokens, which
# weight decay would pull towards zero for no regularising gain (the ViT recipes of timm, DeiT, GenD)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "embeddings")


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim <= 1 or any(part in name for part in NO_DECAY_NAMES)


def optimizer_groups(model: torch.nn.Module, lr: float, student_lr_scale: float,
                     weight_decay: float | None = None) -> list[dict]:
    """The optimizer's parameter groups, of the parameters that train (`requires_grad`: model.tune freezes the rest,
    and a frozen parameter in a group would still be decayed by SGD). One group (the paper's single learning rate),
    or with `train.student_lr_scale` != 1 the LTM student's CNN and classifier in a second group at lr x scale; both
    schedules scale every group alike.

    `weight_decay` given (AdamW): each of those groups splits in two, decayed and not (`no_weight_decay`), with the
    group's `weight_decay` set; None (SGD): the optimizer's one weight_decay applies to every parameter."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lr_groups: list[tuple[list, dict]] = [(named, {})]
    if student_lr_scale != 1.0:  # any other value was checked against model.kind with the config
        ids = {id(p) for p in (*model.student_cnn.parameters(), *model.student_head.parameters())}
        lr_groups = [([(n, p) for n, p in named if id(p) not in ids], {}),
                     ([(n, p) for n, p in named if id(p) in ids], {"lr": lr * student_lr_scale})]
    groups = []
    for members, options in lr_groups:
        if weight_decay is None:
            parts = [([p for _, p in members], {})]
        else:
            parts = [([p for n, p in members if not no_weight_decay(n, p)], {"weight_decay": weight_decay}),
                     ([p for n, p in members if no_weight_decay(n, p)], {"weight_decay": 0.0})]
        groups += [{"params": params, **options, **extra} for params, extra in parts if params]
    return groups


def cosine_factor(step: int, warmup: int, total: int) -> float:
    """The cosine schedule's lr multiplier after `step` optimizer steps: (step + 1) / (warmup + 1) during the
    warm-up (no step at lr 0, and lr itself at step `warmup`), then half a cosine from 1 to 0 at step `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def record_data(run_dir: Path, cfg: Config) -> None:
    """`<run>/data.json`: the content digest of every shard split the run reads (`ltm prep` records one per split),
    beside the config snapshot, so two runs can be told apart by their data. A resumed run whose training data
    changed since it started is warned about; the file then holds the data of the latest session."""
    from ltm.data.shards import data_digests

    path = run_dir / "data.json"
    digests = data_digests(cfg)
    if path.is_file():
        try:
            before = json.loads(path.read_text()).get("digests", {})
        except ValueError:
            before = {}
        changed = sorted(s for s, d in digests["train"].items() if s in before.get("train", {})
                         and before["train"][s] != d)
        if changed:
            log.warning("%s: the training data changed since this run started (split %s: digest %s then, %s now)",
                        path, changed[0], before["train"][changed[0]], digests["train"][changed[0]])
    atomic_write_text(path, json.dumps({"digests": digests}, indent=2) + "\n")


def resume_tag(run_dir: Path, cfg: Config, resume: str) -> str | None:
    """The checkpoint tag this run resumes from (None: a fresh start), after checking that the run folder trained
    the same model; `resume` never refuses a folder that holds checkpoints rather than overwrite them."""
    check_run_folder(run_dir, cfg)
    checkpoints = Checkpointer(run_dir / "checkpoints", keep_last=cfg.train.keep_last)
    if resume == "never" and checkpoints.tags():
        raise CheckpointError(f"{checkpoints.dir}: holds checkpoints ({checkpoints.tags()[-1]} is the newest) "
                              "and --resume never would overwrite them; use another train.run_dir")
    return checkpoints.resolve(resume)


def use_deterministic_kernels() -> None:
    """`train.deterministic`: kernels that give the same result at every run, so a resumed run matches."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every torch.empty with NaN: DeepSpeed allocates its gradient buckets (hundreds of
    # MB) each step, which made CPU steps seconds slower. Correct code never reads that memory.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False


def build_optimizer(model: torch.nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over the parameters that train, and its schedule; `train.optimizer_impl` picks torch's kernels.

    sgd: momentum, `weight_decay` on every parameter (Sec. 4.1). adamw: decoupled `weight_decay` on the weights only
    (`optimizer_groups`). exponential: ExponentialLR, stepped once per epoch (Sec. 4.1). cosine: a LambdaLR of
    `cosine_factor`, stepped after every optimizer step (`Trainer.step_per_optimizer_step`)."""
    t = cfg.train
    kernels = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True},
               "for-loop": {"foreach": False}}[t.optimizer_impl]
    lr = batch_scaling.scaled_lr(cfg)  # train.lr, or with train.lr_scaling=linear lr x batch_size / 32
    if t.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            optimizer_groups(model, lr, t.student_lr_scale, t.weight_decay), lr=lr, betas=tuple(t.betas),
            weight_decay=t.weight_decay, **kernels)
    else:
        optimizer = torch.optim.SGD(optimizer_groups(model, lr, t.student_lr_scale), lr=lr, momentum=t.momentum,
                                    weight_decay=t.weight_decay, **kernels)
    if t.schedule == "cosine":
        total, warmup = t.epochs * t.iters_per_epoch, t.warmup_steps
        # a closure, not a callable object: LambdaLR's state_dict then holds no function state, only the step count
        # and base rates, and a resumed run rebuilds the same function from its config
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, warmup, total))
    return optimizer, torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=t.lr_gamma)


def build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, micro_batch: int,
                 world_size: int, load_universal: bool) -> Any:
    """The DeepSpeed engine around the model and optimizer; BatchNorm statistics kept in fp32, compiled on request."""
    import deepspeed

    from ltm.models.precision import keep_batchnorm_fp32

    ds_config = deepspeed_config(cfg, micro_batch, world_size, load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if cfg.train.precision != "fp32":
        # BatchNorm's running statistics in fp32: bf16 in-place updates would round small steps away
        # (docs/training.md); before compiling, and before the Trainer lists the buffers
        keep_batchnorm_fp32(engine.module)
    if cfg.train.compile:
        compile_model(engine, cfg.train.compile, cfg.train.deterministic)
    return engine


class Trainer:
    """One rank's training run. Its components, built in the order data flows through them:"""

    cfg: Config  # config and run folder
    run_dir: Path
    resume_tag: str | None
    env: DistEnv  # device and distributed
    checkpointer: Checkpointer
    loader: Any  # data: this rank's endless batches (ltm.data: DALI or the reference loader)
    engine: Any  # model, optimizer and DeepSpeed engine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # ExponentialLR per epoch, or the cosine LambdaLR per step
    state: TrainState  # what the loop counts, restored with the rest of a checkpoint
    validator: Validator
    metrics: MetricsLog  # logs

    def __init__(self, cfg: Config, resume: str = "auto", universal: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.train.run_dir).resolve()
        self.total_steps = cfg.train.epochs * cfg.train.iters_per_epoch
        self.resume_tag = resume_tag(self.run_dir, cfg, resume)
        self.env = env = init_distributed(cfg.train.timeout_min)
        try:
            self.is_main = env.is_main
            self.build_checkpointer(universal)
            # seeds: one stream per rank for the model's random draws
            seed_everything(cfg.train.seed + env.rank)
            if cfg.train.deterministic:
                use_deterministic_kernels()
            self.build_data()
            model = self.build_model()
            self.optimizer, self.scheduler = build_optimizer(model, cfg)
            self.step_per_optimizer_step = cfg.train.schedule == "cosine"
            if self.universal:
                self.checkpointer.to_universal(self.resume_tag)
            self.engine = build_engine(model, self.optimizer, cfg, self.micro_batch, env.world_size, self.universal)
            self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
            self.buffers = [b for b in self.engine.module.buffers() if b.is_floating_point()]
            self.buffer_sizes = [b.numel() for b in self.buffers]
            # resume weights, optimizer, counters, loader position and RNG states
            self.state = TrainState()
            if self.resume_tag is not None:
                self.load(self.resume_tag)
            self.validator = Validator(cfg, env)  # frame AUC on the val shards
            self.build_logs()
        except BaseException:
            teardown(env, wait_for_others=False)  # a later train() in this process must find no stale group
            raise

    def build_checkpointer(self, universal: bool) -> None:
        """This rank's checkpointer; rank 0 writes the run's config and drops a save a crash left incomplete."""
        env, cfg = self.env, self.cfg
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", env.rank, env.world_size, cfg.train.keep_last)
        self.universal = self.resume_tag is not None and (
            universal or self.checkpointer.needs_universal(self.resume_tag))
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            record_data(self.run_dir, cfg)
            self.checkpointer.drop_incomplete()

    def build_data(self) -> None:
        """This rank's endless batches of `per_rank_batch` images."""
        from ltm.data import build_train_loader, per_rank_batch

        self.micro_batch = per_rank_batch(self.cfg, self.env.world_size)
        self.loader = build_train_loader(self.cfg, self.env.rank, self.env.world_size, self.env.device)

    def build_model(self) -> torch.nn.Module:
        """The same initial weights on every rank, whatever the rank streams drew; its forward returns Eq. 7's loss.
        SyncBatchNorm (train.sync_bn) goes in before DeepSpeed wraps the model, and what splitting the global batch
        over the ranks still changes is warned about (ltm.train.batch_scaling)."""
        from ltm.models import build_model

        env, cfg = self.env, self.cfg
        # torch.manual_seed also reseeds every CUDA generator: fork the rank's GPU too, or all ranks would draw the
        # same mixup partners, lambdas and random masks on the GPU
        cuda_rng = [env.device.index] if env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_rng):
            torch.manual_seed(cfg.train.seed)
            # a resumed run takes every weight from its checkpoint: no pretrained file (or hub) is needed
            model = build_model(cfg.model, cfg.data.image_size, load_weights=self.resume_tag is None)
        model, synced = batch_scaling.sync_batchnorm(model, cfg, env.world_size, env.device)
        # after SyncBatchNorm's swap (the recomputation must see the layers that train), before DeepSpeed wraps it
        wrapped = set_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.checkpoint_every_k)
        if wrapped and self.is_main:
            log.info("activation checkpointing (%s): %d backbone blocks/stages recomputed in the backward",
                     cfg.train.activation_checkpointing, wrapped)
        self.parameter_counts = parameter_counts(model)
        if self.is_main:
            m = cfg.model
            log.info("trainable parameters (model.tune=%s, teacher %s): %s", m.tune, m.teacher_tune or m.tune,
                     ", ".join(f"{role} {c['trainable']:,} of {c['total']:,}"
                               for role, c in self.parameter_counts.items()))
            for line in batch_scaling.batch_warnings(cfg, env.world_size, synced, batch_scaling.batchnorm_layers(model),
                                                     gpus=env.device.type == "cuda"):
                log.warning("%s", line)
        return model

    def build_logs(self) -> None:
        """metrics.jsonl + TensorBoard + a progress bar on rank 0; throughput against the model's FLOPs."""
        self.metrics = MetricsLog(self.run_dir, self.state.step, self.is_main)
        # what trains, once per session (a resumed run's record carries the step it resumed at)
        m = self.cfg.model
        teacher = {"teacher_tune": m.teacher_tune or m.tune} if m.kind == "ltm" else {}
        self.metrics.write({"type": "params", "step": self.state.step, "tune": m.tune, **teacher,
                            **self.parameter_counts, "time": time.time()})
        # only rank 0's records are written (MetricsLog): the count takes seconds on a CPU, which other ranks skip
        self.flops_per_step = train_flops_per_step(self.cfg) if self.is_main else 0.0
        self.peak_tflops = peak_tflops(self.cfg, self.env.device)
        self._window_wait = 0.0  # seconds this window spent waiting for the loader
        self.profiler = None
        self.saved_step = self.state.step if self.resume_tag else -1
        self._window_start = time.perf_counter()
        self.progress = None

    # --- checkpoints
    def client_state(self) -> dict:
        return {
            "epoch": self.state.step // self.cfg.train.iters_per_epoch,
            "step": self.state.step,
            "samples": self.state.samples,
            "best_val_auc": self.state.best_val_auc,
            "last_val_auc": self.state.last_val_auc,
            "window": self.state.window,
            "window_steps": self.state.window_steps,
            "lr_scheduler": self.scheduler.state_dict(),
            "world_size": self.env.world_size,
            "config": to_dict(self.cfg),
        }

    def save(self) -> str:
        started = time.perf_counter()
        rank_state = {"loader": self.loader.state_dict(), "rng": rng_state(self.env.device)}
        tag = self.checkpointer.save(self.engine, self.state.step, self.client_state(), rank_state)
        self.saved_step = self.state.step
        self.metrics.write({"type": "checkpoint", "step": self.state.step, "tag": tag, "time": time.time()})
        self._window_start += time.perf_counter() - started
        return tag

    def load(self, tag: str) -> None:
        client, rank_state = self.checkpointer.load(self.engine, tag, self.universal)
        stored = client.get("config")
        if stored:
            diff = model_differences(upgrade_stored(stored)["model"], to_dict(self.cfg)["model"])
            if diff:
                raise ConfigError(f"checkpoint {self.checkpointer.dir / tag}: was trained with a different model "
                                  f"config ({'; '.join(diff)})")
        s = self.state
        s.step, s.samples = int(client["step"]), int(client["samples"])
        s.best_val_auc, s.last_val_auc = float(client["best_val_auc"]), float(client["last_val_auc"])
        s.window, s.window_steps = dict(client["window"]), int(client["window_steps"])
        self.scheduler.load_state_dict(client["lr_scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        same_world = int(client["world_size"]) == self.env.world_size
        if rank_state is not None and same_world:
            try:
                self.loader.load_state_dict(rank_state["loader"])
            except ValueError as exc:  # e.g. another batch size or other shard folders than the saved run's
                raise CheckpointError(f"checkpoint {self.checkpointer.dir / tag}: the loader state of rank "
                                      f"{self.env.rank} does not fit this config: {exc}") from exc
            set_rng_state(rank_state["rng"], self.env.device)
        else:
            # Loader positions and RNG streams belong to ranks of the old world; this one starts fresh streams
            # (offset by the step, so it does not replay the first batches' random draws).
            log.warning("resuming %s saved by %s ranks on %d: data order and random streams restart",
                        tag, client["world_size"], self.env.world_size)
            seed_everything(self.cfg.train.seed + self.env.rank + 100_003 * s.step)
        log.info("resumed from %s (step %d, epoch %d)", self.checkpointer.dir / tag, s.step, client["epoch"])

    # --- the loop
    def fit(self) -> dict:
        preemption.clear_stop()
        from tqdm.auto import tqdm

        self.progress = tqdm(total=self.total_steps, initial=self.state.step, unit="step", dynamic_ncols=True,
                             disable=None if self.is_main else True)
        with preemption.stop_signal_handlers():
            while self.state.step < self.total_steps:
                if self.train_one_epoch():
                    return self.finish("preempted")
        return self.finish("completed")

    def train_one_epoch(self) -> bool:
        """Steps to the end of the current epoch (or to a stop); True when the ranks agreed to stop."""
        t = self.cfg.train
        while True:
            stop = self.train_step()
            step = self.state.step
            epoch_end = step % t.iters_per_epoch == 0
            if step % t.log_every == 0 or epoch_end:
                self.log_train()
            if self.validator.loader is not None and ((t.val_every and step % t.val_every == 0) or
                                                      (not t.val_every and epoch_end) or step == self.total_steps):
                self.validate()
            if epoch_end or self.step_per_optimizer_step:
                # ExponentialLR: lr * gamma^epoch (Sec. 4.1); cosine: after every step. After the step's log line,
                # which so shows the rate the step used, and before a save, so a resumed run takes the next one.
                self.scheduler.step()
            if stop or epoch_end or step % t.ckpt_every == 0:
                self.save()
            if stop:
                return True
            if epoch_end:
                return False

    def profile(self) -> None:
        """`train.profile`: a torch.profiler trace of steps start .. start+steps-1 on rank 0, written under
        `<run>/profile/` (TensorBoard's profiler plugin or Perfetto read it). It only observes: the step is the same."""
        p, next_step = self.cfg.train.profile, self.state.step + 1
        if not self.is_main or not p.steps:
            return
        if next_step == p.start and self.profiler is None:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.env.device.type == "cuda" else [])
            self.profiler = profile(activities=activities, record_shapes=True, with_stack=False,
                                    on_trace_ready=tensorboard_trace_handler(str(self.run_dir / "profile")))
            self.profiler.__enter__()
            log.info("profiling steps %d..%d into %s", p.start, p.start + p.steps - 1, self.run_dir / "profile")
        elif next_step == p.start + p.steps and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None

    def train_step(self) -> bool:
        """One optimizer step over grad_accum micro-batches; returns whether any rank asked to stop."""
        self.profile()
        keys: list[str] = []
        sums: torch.Tensor | None = None  # the loss terms of the step's micro-batches, summed in float64
        for _ in range(self.cfg.train.grad_accum):
            waited = time.perf_counter()
            with torch.random.fork_rng(devices=[]):  # the loader's own draws must not shift the model's
                images, labels = next(self.loader)
            self._window_wait += time.perf_counter() - waited
            if self.cfg.train.channels_last:
                # NHWC batches: convolutions follow their input's layout, so activations stay NHWC. The weights
                # keep the standard layout: DeepSpeed broadcasts parameters viewed as bytes, which needs it.
                images = images.contiguous(memory_format=torch.channels_last)
            out = self.engine(images.to(self.dtype), labels)
            self.engine.backward(out["loss"])
            self.engine.step()  # DeepSpeed updates at the accumulation boundary only
            terms = {"loss": out["loss"].detach(), **out["losses"]}
            keys = list(terms)
            # one stack and one cast for all terms (a kernel each on the GPU, not one per term)
            stacked = torch.stack(list(terms.values())).double()
            sums = stacked if sums is None else sums + stacked
        # One collective per step: the stop flag (summed), the loss terms and, with several ranks, the float buffers
        # (averaged). DeepSpeed averages gradients but not buffers, so each rank's BatchNorm running statistics would
        # drift apart while only rank 0's are checkpointed; averaging keeps every rank's model equal to the checkpoint.
        # A world of one has nothing to average: its buffers stay out of the step.
        world = self.env.world_size
        flag = torch.tensor([float(preemption.stop_requested())], dtype=torch.float64, device=self.env.device)
        parts = [flag, (sums / self.cfg.train.grad_accum).to(self.env.device)]
        if world > 1:
            # one concatenation, then one cast: two kernels however many buffers the model has
            parts.append(torch.cat([b.detach().reshape(-1) for b in self.buffers]).double())
        packed = all_reduce_sum(torch.cat(parts))
        if world > 1:
            averaged = (packed[1 + len(keys):] / world).split(self.buffer_sizes)
            torch._foreach_copy_(self.buffers, [a.view_as(b) for a, b in zip(averaged, self.buffers)])
        packed = packed[:1 + len(keys)].cpu()
        self.state.step += 1
        self.state.samples += self.cfg.train.batch_size
        for key, value in zip(keys, packed[1:].tolist()):
            self.state.window[key] = self.state.window.get(key, 0.0) + value / world
        self.state.window_steps += 1
        if self.progress is not None:
            self.progress.update(1)
        return bool(packed[0] > 0)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def log_train(self) -> None:
        s = self.state
        elapsed = time.perf_counter() - self._window_start
        record = {"type": "train", "step": s.step, "epoch": (s.step - 1) // self.cfg.train.iters_per_epoch}
        record.update({k: v / max(1, s.window_steps) for k, v in s.window.items()})
        record.update({"lr": self.lr(), "images_per_s": s.window_steps * self.cfg.train.batch_size / elapsed,
                       "samples": s.samples, "time": time.time()})
        # rank 0's view: the share of step time spent waiting for the next batch, and the job's achieved FLOP rate
        record["data_stall"] = min(1.0, self._window_wait / elapsed)
        record["tflops"] = s.window_steps * self.flops_per_step / elapsed / 1e12
        if self.peak_tflops:
            record["mfu"] = record["tflops"] / (self.peak_tflops * self.env.world_size)
        if self.env.device.type == "cuda":
            record["max_memory_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.metrics.write(record)
        if self.progress is not None and not self.progress.disable:
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                      img_s=f"{record['images_per_s']:.1f}")
        elif self.is_main:
            log.info("step %d/%d loss %.4f lr %.2e %.1f img/s", s.step, self.total_steps, record["loss"],
                     record["lr"], record["images_per_s"])
        s.window, s.window_steps = {}, 0
        self._window_start, self._window_wait = time.perf_counter(), 0.0

    def validate(self) -> dict:
        started = time.perf_counter()
        result = self.validator(self.engine.module, self.dtype)
        s = self.state
        s.last_val_auc = result["val_auc"]
        if math.isfinite(result["val_auc"]) and not result["val_auc"] <= s.best_val_auc:
            s.best_val_auc = result["val_auc"]
        record = {"type": "val", "step": s.step, "epoch": (s.step - 1) // self.cfg.train.iters_per_epoch,
                  **result, "best_val_auc": s.best_val_auc, "time": time.time()}
        self.metrics.write(record)
        if self.is_main:
            log.info("step %d: val AUC %.4f (best %.4f), val loss %.4f on %d frames", s.step, result["val_auc"],
                     s.best_val_auc, result["val_loss"], result["val_frames"])
        self._window_start += time.perf_counter() - started  # images/s counts training time only
        return result

    def finish(self, status: str) -> dict:
        if self.profiler is not None:  # the run ended (or was stopped) inside the profiled steps
            self.profiler.__exit__(None, None, None)
            self.profiler = None
        if self.saved_step != self.state.step:
            self.save()
        result = {
            "status": status,
            "step": self.state.step,
            "epoch": self.state.step // self.cfg.train.iters_per_epoch,
            "total_steps": self.total_steps,
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.checkpointer.dir / tag_for(self.state.step)),
            "best_val_auc": self.state.best_val_auc,
            "last_val_auc": self.state.last_val_auc,
            "samples": self.state.samples,
            "world_size": self.env.world_size,
        }
        self.metrics.write({"type": "end", **{k: v for k, v in result.items() if k != "run_dir"}, "time": time.time()})
        if self.is_main:
            if status == "preempted":
                log.warning("stopped at step %d and saved %s; the same command resumes", self.state.step,
                            result["checkpoint"])
            else:
                log.info("finished %d steps; best val AUC %.4f", self.state.step, self.state.best_val_auc)
        return result

    def close(self, ok: bool = True) -> None:
        if self.progress is not None:
            self.progress.close()
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "loader") and hasattr(self.loader, "close"):
            self.loader.close()
        teardown(self.env, wait_for_others=ok)


def train(cfg: Config, resume: str = "auto", universal: bool = False) -> dict:
    """Train in this process as one rank of the world the environment describes; see the module docstring.

    resume: "auto" (from `latest` when the run folder has one), "never", or a tag such as "step00000300".
    universal: load the tag through DeepSpeed's universal checkpoint even at the same world size (another world
    size converts automatically). Returns status ("completed" | "preempted"), step, run_dir, best_val_auc, ...
    """
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(max(logging.WARNING, logging.getLogger().level))
    deepspeed.utils.logger.setLevel(max(logging.WARNING, logging.getLogger().level))
    trainer = None
    ok = False
    try:
        trainer = Trainer(cfg, resume, universal)
        result = trainer.fit()
        ok = True
        return result
    finally:
        if trainer is not None:
            trainer.close(ok)


__all__ = ["Trainer", "TrainState", "deepspeed_config", "train"]
