"""The GPU check: DALI nvJPEG decode, bf16 DeepSpeed training, exact resume and evaluation on one CUDA GPU, measured.

One command runs every step of the product's GPU path and prints a table, then one JSON line of figures:

  1. data     a shard root (`--data <split folder>` holding method folders), or shards it writes itself with
              data_prep's shard writer from photos that scikit-image ships (no face detector, no video decoder).
  2. decode   DALI `mixed` (nvJPEG) against `cpu` on the same shards: images/s of each (steady state, first batch
              excluded) at the config's DALI threads (and at 8 when that differs), the same keys and labels in the
              same order, the largest pixel difference (0-255).
     agree    the same comparison per perturbation type (clean, each per-crop type of ltm.data.perturb at levels 1 and
              5, and clean 4:2:0 JPEGs such as other tools write) against stated tolerances (AGREE_TOLERANCE: the
              largest and the mean absolute difference in levels 0-255); without CUDA, DALI's CPU pipeline against
              the reference loader (PIL, OpenCV) with that pair's tolerances.
  3. train    the `paper` config (Xception 224, ViT 384x6x6, 32 per GPU, bf16, ZeRO-1) through ltm.train.trainer's
              Trainer: steady-state images/s, peak GPU memory, data stall (time in the loader / step time), the
              LTM / Baseline step-time ratio against their FLOP ratio; beside it the same model in a plain PyTorch
              autocast loop fed by the reference (PIL + DataLoader) loader. Headline ratio: ltm / plain images/s.
  4. resume   N steps, a real SIGUSR1 (the preemption signal) at step N, resume to 2N, against an uninterrupted
              2N run: bitwise equal weights in fp32 deterministic mode; the largest weight difference in bf16.
  5. eval     `ltm eval`'s scoring path against forward-only images/s (bench/eval.py's measurement).
  6. vitl     the ViT-L/14 recipe (clip-l14, random init) as LTM at batch 32, bf16, through the Trainer at ZeRO-2,
              ZeRO-3 and ZeRO-2 with activation checkpointing: images/s, MFU, peak GPU memory, and `ltm plan`'s
              prediction of that peak beside it. GPU only (with --legs vitl on the CPU: vit-tiny-cpu at toy sizes).
  7. options  each speed option against the default, the same steps of the same config: train.channels_last,
              train.compile, train.optimizer_impl=fused and data.prefetch=4 through the engine, data.pin_memory
              through the plain loop (its reference loader); figure: option images/s over default images/s.

Legs: decode, agree, eval, train, vitl, options, resume (the data step runs for any of them). One GPU command may
run 10 minutes and the whole check takes an estimated 6-10 at GPU sizes, so `--quick` runs decode, agree, eval,
train and vitl with fewer training steps (estimated 3-4 minutes on an H100/H200) and `--legs options` /
`--legs resume` run the rest as separate calls. A leg whose packages are missing (DALI for decode and agree;
DeepSpeed for the engine's runs in train, vitl, options and resume; webdataset for the shards every leg reads) is
skipped with the reason printed, not a crash. Every timed leg runs with the same cuDNN settings
(`train.deterministic`: deterministic kernels and cudnn.benchmark off, else benchmark on), set again at the start of
each leg.

Without CUDA the same steps run on the CPU at tiny sizes (tiny-cpu model, 64 px, a few steps) and every GPU-only
figure reads "skipped: no CUDA" (tests/test_gpu_check.py runs it so). There the training figures come from a few
steps after one warm-up step, which the start-up costs still dominate: the check says so, and `bench/step.py --engine`
measures the engine against a plain loop in steady state instead. Targets (one H100): mixed decode >= 8000
images/s at 224 px, data stall < 5 %, ltm / plain >= 1.2, LTM/Baseline time ratio <= 1.1 x FLOP ratio,
eval >= 0.9 x forward-only.

    python bench/gpu.py                                # GPU sizes with CUDA, tiny CPU sizes without
    python bench/gpu.py --data shards/ffpp_c23/train   # on prepared shards
    python bench/gpu.py train.deterministic=false      # config overrides for the training steps
    python bench/gpu.py --options compile,fused        # only these options (CPU mode: all but compile)
    python bench/gpu.py --quick                        # decode, agree, eval, train, vitl: under 4 minutes on a GPU
    python bench/gpu.py --legs options --options channels_last,fused,prefetch4,pin_memory
    python bench/gpu.py --legs options --options compile
    python bench/gpu.py --legs resume

The check's shards and config come from bench/checkdata.py (bench/step.py measures on the same ones), the decode and
agree legs from bench/decode.py; this module holds the training, resume, eval and option legs and the table.
"""

from __future__ import annotations

import os

# cuBLAS reads this when CUDA initialises: deterministic GEMMs for the bitwise resume check (ltm.train.trainer sets the
# same value, but only when a Trainer starts, which is after the decode and eval steps have used CUDA)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, also when it is only on PYTHONPATH

# bench/'s own modules (bench/ is on sys.path when a script there runs): the check's shards, its decode legs
from checkdata import configure, with_overrides, write_check_shards  # noqa: E402
from decode import AGREE_SAMPLES, agreement_targets, decode_agreement, decode_check  # noqa: E402

from ltm import distributed  # noqa: E402,F401  (sets DS_ACCELERATOR=cpu without CUDA before DeepSpeed loads)
from ltm.config import Config  # noqa: E402

log = logging.getLogger("bench.gpu")
SKIP_CUDA = "skipped: no CUDA"
TARGETS = {  # figure: (comparison, target)
    "decode_mixed_images_per_s": (">=", 8000.0),
    "train_data_stall": ("<", 0.05),
    "ltm_over_plain": (">=", 1.2),
    "step_time_over_flop_ratio": ("<=", 1.1),
    "eval_over_forward": (">=", 0.9),
}

GPU_SIZES = {"config": "paper", "image_size": 224, "samples": 2048, "steps": 100, "warmup": 20, "option_steps": 100,
             "resume_steps": 10,
             "vitl_steps": 30, "vitl_warmup": 10,
             "decode_batch": 256, "eval_batch": 256, "passes": 3, "rounds": 3}
CPU_SIZES = {"config": "tiny-cpu", "image_size": 64, "samples": 32, "steps": 4, "warmup": 1, "option_steps": 2,
             "resume_steps": 2,
             "vitl_steps": 2, "vitl_warmup": 1,
             "decode_batch": 16, "eval_batch": 16, "passes": 1, "rounds": 1, "batch": 8}
# --quick at GPU sizes: 40 timed steps after 10 (a steady state by STEADY_STEPS), 2 decode passes, 2 eval rounds.
# Estimated on an H100/H200 from these sizes: start-up and shards 20-30 s, decode 15 s, agree 30-40 s (16 pairs of
# pipelines over 256 crops), eval 20 s, train 60-90 s (two DeepSpeed start-ups, 150 steps, the FLOP count): 2.5-3.5
# minutes, under the 4 minutes that leave one rerun inside a GPU command's 10.
# The vitl leg adds three DeepSpeed start-ups with two ViT-L/14 each (random init) and 15 steps of each (10 timed, about
# 0.1 s each at 40% MFU): an estimated 45-60 s.
QUICK_SIZES = {"steps": 50, "warmup": 10, "option_steps": 50, "passes": 2, "rounds": 2, "vitl_steps": 15,
               "vitl_warmup": 5}
# Legs, in the order they run, and the packages each needs besides torch. webdataset: the shard writer and the
# reference loader; DALI: the decode pipelines compared; DeepSpeed: ltm.train.trainer's Trainer (train runs its plain
# loop and FLOP count without it, options its pin_memory option).
LEGS = {"decode": ("webdataset", "dali"), "agree": ("webdataset", "dali"), "eval": ("webdataset",),
        "train": ("webdataset",), "vitl": ("webdataset", "deepspeed"), "options": ("webdataset",),
        "resume": ("webdataset", "deepspeed")}
QUICK_LEGS = ("decode", "agree", "eval", "train", "vitl")
GPU_ONLY_LEGS = ("vitl",)  # left out of the CPU mode's default legs (--legs names them)
# the vitl leg's runs: name -> overrides of the recipe
VITL_VARIANTS = {"zero2": ["train.zero_stage=2"], "zero3": ["train.zero_stage=3"],
                 "zero2_ckpt": ["train.zero_stage=2", "train.activation_checkpointing=blocks"]}
DECODE_THREADS_ALSO = 8  # the decode leg also measures this many DALI threads where the config's count differs

# Speed options: (config overrides, the loop that uses them), each run against that loop's default run.
OPTIONS = {
    "channels_last": (["train.channels_last=true"], "engine"),
    "compile": (["train.compile=default"], "engine"),
    "fused": (["train.optimizer_impl=fused"], "engine"),
    "prefetch4": (["data.prefetch=4"], "engine"),  # the default depth is 2
    "pin_memory": (["data.pin_memory=true"], "plain"),  # the reference loader's option; the engine reads DALI
}
# inductor's first compile of even the toy model takes minutes on 2 cores: CPU mode runs it only when asked
CPU_DEFAULT_OPTIONS = [name for name in OPTIONS if name != "compile"]
STEADY_STEPS, STEADY_SPREAD = 10, 1.5  # timed steps and slowest/fastest step below which a figure is steady
# tiny-cpu with timm's smallest ResNet, set up like the paper config where it matters for the GPU path: ZeRO-1, bf16
CPU_OVERRIDES = ["model.backbone=test_resnet", "train.zero_stage=1", "train.precision=bf16"]


# ------------------------------------------------------------------------------------------------ helpers


def set_determinism(on: bool) -> None:
    """The cuDNN and kernel settings of every timed leg: `train.deterministic` on gives deterministic kernels and
    cudnn.benchmark off (what ltm.train.trainer sets), off gives benchmark on. Set again at the start of each leg, so an
    option is never timed under another setting than the default it is divided by (ltm.train.trainer turns benchmark off
    in deterministic runs and the resume leg forces those)."""
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = not on


def device_memory_used(release_dali: bool = False) -> int:
    """Bytes in use on the current CUDA device, by anyone (torch's pool, DALI's, nvJPEG's and NCCL's buffers, CUDA
    contexts). `release_dali`: first hand back what DALI's pools hold unused (an earlier leg's), so that a leg
    measured from here counts what it allocates itself."""
    if release_dali:
        try:
            from nvidia.dali.backend import ReleaseUnusedMemory

            ReleaseUnusedMemory()
        except Exception:  # noqa: BLE001 - no DALI, or a build without it: its idle pool stays in the baseline
            pass
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


def gib(n: float) -> float:
    return round(n / 2**30, 2)


class TimedLoader:
    """A train loader that records the time spent waiting in `next()` and can send a signal at batch N."""

    def __init__(self, loader: Any, signal_at: int | None = None):
        self.loader, self.signal_at, self.wait, self.handed = loader, signal_at, 0.0, 0

    def __iter__(self) -> TimedLoader:
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.loader)
        self.wait += time.perf_counter() - start
        self.handed += 1
        if self.signal_at is not None and self.handed == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends before a preemption; the engine's handler runs
        return batch

    def __getattr__(self, name: str) -> Any:  # state_dict, load_state_dict, close, kind, skipped
        return getattr(self.loader, name)


# ------------------------------------------------------------------------------------------------ 3. train


def engine_steps(cfg: Config, steps: int, warmup: int, cuda: bool) -> dict:
    """`steps` optimizer steps of the Trainer (ltm.train.trainer: the DeepSpeed engine `ltm train` runs), timed
    per step."""
    from ltm.train.trainer import Trainer

    set_determinism(cfg.train.deterministic)
    if cuda:
        torch.cuda.empty_cache()
        used0, reserved0 = device_memory_used(release_dali=True), torch.cuda.memory_reserved()
    trainer = Trainer(cfg, resume="never")
    ok = False
    memory: dict[str, Any] = {}
    try:
        loader = trainer.loader = TimedLoader(trainer.loader)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step_s, wait_s = [], []
        for _ in range(steps):
            loader.wait = 0.0
            start = time.perf_counter()
            trainer.train_step()  # ends with a device-to-host copy of the step's losses: the GPU work is done
            step_s.append(time.perf_counter() - start)
            wait_s.append(loader.wait)
        if cuda:
            # torch's peak covers its own tensors only. What the leg added on the device outside torch's pool (the
            # device's used memory now, DALI's pools still held, minus torch's growth) is DALI's decode memory
            # (pools, nvJPEG buffers) with NCCL's and the CUDA libraries' buffers; torch's reserved memory only
            # grows without empty_cache, so its peak plus that is the leg's peak footprint on the device.
            outside = (device_memory_used() - used0) - (torch.cuda.memory_reserved() - reserved0)
            memory = {"outside_torch": gib(max(outside, 0)),
                      "device_peak": gib(torch.cuda.max_memory_reserved() + max(outside, 0))}
        ok = True
    finally:
        trainer.close(ok)
    steady, waits = step_s[warmup:], wait_s[warmup:]
    return {"images_per_s": round(trainer.micro_batch * len(steady) / sum(steady), 2),
            "step_s": statistics.median(steady), "data_stall": round(sum(waits) / sum(steady), 4),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else SKIP_CUDA,
            "gpu_memory_outside_torch_gib": memory.get("outside_torch", SKIP_CUDA),
            "peak_gpu_memory_device_gib": memory.get("device_peak", SKIP_CUDA),
            "loader": trainer.loader.kind, "micro_batch": trainer.micro_batch,
            "first_step_s": step_s[0], "spread": max(steady) / min(steady), "timed_steps": len(steady)}


def plain_steps(cfg: Config, steps: int, warmup: int, cuda: bool) -> dict:
    """The same model in a plain PyTorch loop: reference loader (PIL + DataLoader), autocast, torch SGD."""
    from ltm.data import build_train_loader, per_rank_batch
    from ltm.models import build_model

    device = torch.device("cuda") if cuda else torch.device("cpu")
    c = with_overrides(cfg, ["data.loader=reference"])
    set_determinism(c.train.deterministic)  # the engine run's setting, so both loops run the same kernels
    loader = TimedLoader(build_train_loader(c, 0, 1, device))
    torch.manual_seed(c.train.seed)
    model = build_model(c.model, c.data.image_size).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=c.train.lr, momentum=c.train.momentum)
    bf16 = c.train.precision == "bf16"
    step_s, wait_s = [], []
    try:
        for _ in range(steps):
            loader.wait = 0.0
            start = time.perf_counter()
            images, labels = next(loader)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(images, labels)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()  # one sync per step, as the engine's loss read-out
            step_s.append(time.perf_counter() - start)
            wait_s.append(loader.wait)
    finally:
        loader.close()
    steady, waits = step_s[warmup:], wait_s[warmup:]
    return {"images_per_s": round(per_rank_batch(c, 1) * len(steady) / sum(steady), 2),
            "step_s": statistics.median(steady), "data_stall": round(sum(waits) / sum(steady), 4)}


def flop_ratio(cfg: Config, cuda: bool) -> float:
    """FLOPs of one LTM train step over one Baseline step (forward + backward, torch's FlopCounterMode)."""
    from step import step_flops  # bench/step.py

    from ltm.models import build_model

    device = torch.device("cuda") if cuda else torch.device("cpu")
    b = cfg.train.batch_size
    images = torch.rand(b, 3, cfg.data.image_size, cfg.data.image_size, device=device)
    labels = (torch.arange(b, device=device) % 2).float()
    flops = {}
    for kind in ("ltm", "baseline"):
        c = with_overrides(cfg, [f"model.kind={kind}"])
        model = build_model(c.model, c.data.image_size).to(device).train()
        flops[kind] = step_flops(model, images, labels)
        del model
    return flops["ltm"] / flops["baseline"]


# ------------------------------------------------------------------------------------------------ 4. resume


def final_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in trainer.engine.module.state_dict().items()}


def fit(cfg: Config, resume: str, signal_at: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    from ltm.train.trainer import Trainer

    trainer = Trainer(cfg, resume=resume)
    ok = False
    try:
        trainer.loader = TimedLoader(trainer.loader, signal_at)
        result = trainer.fit()
        weights = final_weights(trainer)
        ok = True
    finally:
        trainer.close(ok)
    return result, weights


def resume_check(cfg: Config, n: int, precision: str, root: Path) -> dict:
    over = [f"train.precision={precision}", "train.deterministic=true", f"train.iters_per_epoch={2 * n}",
            "train.epochs=1", f"train.ckpt_every={10 * n}", f"train.log_every={10 * n}", "train.val_every=0",
            "train.keep_last=1"]
    full_cfg = with_overrides(cfg, over + [f"train.run_dir={root / f'{precision}-full'}"])
    cut_cfg = with_overrides(cfg, over + [f"train.run_dir={root / f'{precision}-cut'}"])
    full, w_full = fit(full_cfg, "never")
    cut, _ = fit(cut_cfg, "never", signal_at=n)
    resumed, w_resumed = fit(cut_cfg, "auto")
    if cut["status"] != "preempted" or cut["step"] != n:
        raise RuntimeError(f"{precision}: the signal at step {n} did not stop the run there: {cut}")
    if full["step"] != 2 * n or resumed["step"] != 2 * n:
        raise RuntimeError(f"{precision}: runs ended at steps {full['step']} and {resumed['step']}, not {2 * n}")
    bitwise = set(w_full) == set(w_resumed) and all(torch.equal(w_full[k], w_resumed[k]) for k in w_full)
    max_diff = max(float((w_full[k] - w_resumed[k]).abs().max()) if w_full[k].numel() else 0.0 for k in w_full)
    return {f"resume_{precision}_bitwise": bitwise, f"resume_{precision}_max_weight_diff": max_diff}


# ------------------------------------------------------------------------------------------------ 5. eval


def eval_check(cfg: Config, split: Path, cuda: bool, batch: int, rounds: int) -> dict:
    from eval import eval_throughput  # bench/eval.py

    from ltm.eval.evaluate import scoring_accelerator
    from ltm.models import build_model

    c = with_overrides(cfg, ["data.loader=dali", "eval.attention_samples=0"])
    with scoring_accelerator(c.train.precision, "cuda" if cuda else "cpu") as accelerator:
        torch.manual_seed(0)
        model = build_model(c.model, c.data.image_size).to(accelerator.device).eval()
        r = eval_throughput(model, c, split, accelerator, batch, rounds)
    return {"eval_images_per_s": r["eval_images_per_s"], "forward_images_per_s": r["forward_images_per_s"],
            "eval_over_forward": r["ratio"], "eval_images": r["images"]}


# ------------------------------------------------------------------------------------------------ 6. options


def options_check(cfg: Config, names: list[str], default: dict[str, dict], steps: int, warmup: int, cuda: bool,
                  runs: Path) -> dict:
    """Each option's images/s over the default's, the same steps of the same config and loop. An option that
    fails (a kernel this GPU or torch build lacks) reads "failed: ..." instead of stopping the check."""
    out: dict[str, Any] = {}
    for name in names:
        overrides, loop = OPTIONS[name]
        if isinstance(default.get(loop), str):  # the default could not run here (a package missing): nor can this
            out[f"option_{name}_over_default"] = default[loop]
            continue
        try:
            c = with_overrides(cfg, [*overrides, f"train.run_dir={runs / name}"])
            r = engine_steps(c, steps, warmup, cuda) if loop == "engine" else plain_steps(c, steps, warmup, cuda)
        except Exception as exc:  # noqa: BLE001 - reported as the option's figure; the other options still run
            log.warning("option %s failed", name, exc_info=True)
            out[f"option_{name}_over_default"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        out[f"option_{name}_images_per_s"] = r["images_per_s"]
        out[f"option_{name}_over_default"] = round(r["images_per_s"] / default[loop]["images_per_s"], 4)
    return out


def vitl_check(split: Path, cuda: bool, sizes: dict, root: Path, threads: int | None) -> dict:
    """The ViT-L/14 LTM recipe (clip-l14, random init, batch 32, bf16) through the Trainer at each of
    VITL_VARIANTS: images/s, MFU, peak GPU memory, and `ltm plan`'s predicted peak for the same config. On the CPU
    (only when --legs asks) vit-tiny-cpu at the CPU sizes stands in: it checks the leg's code, not ViT-L."""
    from ltm.models.flops import model_gflops
    from ltm.train.metrics_log import peak_tflops
    from ltm.train.plan import Hardware, make_plan

    base = ["model.pretrained=null", "model.teacher_pretrained=null", "train.precision=bf16",
            f"data.shuffle_buffer={min(1024, sizes['samples'])}", f"data.image_size={sizes['image_size']}"]
    if cuda:
        name, base = "clip-l14", base + ["train.batch_size=32"]
    else:
        name, base = "vit-tiny-cpu", base + [f"train.batch_size={sizes['batch']}", "data.num_threads=1"]
    if threads:
        base.append(f"data.num_threads={threads}")
    device = torch.device("cuda" if cuda else "cpu")
    gpu_mem = torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 80.0
    out: dict[str, Any] = {}
    for variant, overrides in VITL_VARIANTS.items():
        cfg = configure(name, split, root / variant, base + overrides)
        run = engine_steps(cfg, sizes["vitl_steps"], sizes["vitl_warmup"], cuda)
        peak = peak_tflops(cfg, device)
        flops_per_image = 3 * model_gflops(cfg)[0] * 1e9  # forward + backward
        stage = make_plan(cfg, 1, 1, Hardware(gpu_mem_gib=gpu_mem)).current
        key = f"vitl_{variant}"
        out[f"{key}_images_per_s"] = run["images_per_s"]
        mfu = run["images_per_s"] * flops_per_image / (peak * 1e12) if peak else None
        out[f"{key}_mfu"] = round(mfu, 4) if mfu is not None else "skipped: no peak TFLOP/s known"
        out[f"{key}_peak_gib"] = run["peak_gpu_memory_gib"]
        out[f"{key}_plan_gib"] = round(stage.peak(stage.config_micro) / 2**30, 2)
    return out


def steadiness(runs: list[dict], warmup: int) -> dict:
    """Whether the engine runs' timed steps are a steady state: enough of them, and no step far slower than the
    fastest. The first step (DeepSpeed's and the loader's start-up, first kernel choices) is never timed."""
    timed = min(r["timed_steps"] for r in runs)
    spread = max(r["spread"] for r in runs)
    first = max(r["first_step_s"] / r["step_s"] for r in runs)
    steady = timed >= STEADY_STEPS and spread <= STEADY_SPREAD
    why = []
    if timed < STEADY_STEPS:
        why.append(f"warm-up-dominated: {timed} timed steps after {warmup} warm-up step(s), the first step "
                   f"{first:.1f}x the timed median")
    if spread > STEADY_SPREAD:
        why.append(f"unsteady: the slowest timed step {spread:.1f}x the fastest (other jobs on the cores; with "
                   f"{torch.get_num_threads()} OpenMP threads each step also waits for descheduled ones)")
    note = "" if steady else (
        f"the training figures (images/s, ltm_over_plain, the LTM/Baseline time ratio, the option ratios) are not "
        f"a steady state, {'; '.join(why)}. `python bench/step.py --engine` measures the engine against a plain "
        f"loop in steady state")
    return {"train_steady": steady, "train_step_spread": round(spread, 3), "train_first_over_median": round(first, 3),
            "train_note": note}


# ------------------------------------------------------------------------------------------------ main


def environment(cuda: bool) -> dict:
    import importlib.metadata as md

    from ltm.env import dali_package

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    dali = dali_package()
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "dali_package": dali["package"], "dali_version": dali["version"],
            "dali_cuda": dali["cuda"], "deepspeed": version("deepspeed"), "accelerate": version("accelerate"),
            "python": sys.version.split()[0]}


def verdicts(fig: dict) -> dict:
    out = {}
    for name, (op, target) in {**TARGETS, **agreement_targets(fig)}.items():
        value = fig.get(name)
        ok = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ok = {"<": value < target, "<=": value <= target, ">=": value >= target}[op]
        out[name] = {"value": value, "target": f"{op} {target}", "ok": ok}
    return out


def print_table(fig: dict, env: dict, phases: dict) -> None:
    print(f"device {env['device']}, torch {env['torch']} (CUDA {env['torch_cuda']}), DALI {env['dali_package']} "
          f"{env['dali_version']}, deepspeed {env['deepspeed']}, accelerate {env['accelerate']}")
    print(f"{'figure':<34}{'value':>22}  target")
    targets = {**TARGETS, **agreement_targets(fig)}
    for key, value in fig.items():
        if key == "train_note":  # a sentence, printed under the table
            continue
        op, target = targets.get(key, ("", ""))
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<34}{shown:>22}  {op} {target}".rstrip())
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    if fig.get("train_note"):
        print(f"note: {fig['train_note']}")


def missing(packages: tuple[str, ...]) -> str | None:
    """Why something that needs `packages` cannot run here (the first one absent), or None."""
    for name in packages:
        if name == "dali":
            from ltm.env import dali_available

            if not dali_available():
                return ("needs DALI: nvidia.dali is not importable here (`make install`, or the wheelhouse's "
                        "install.sh: docs/install.md)")
            continue
        try:  # imported, not only found: a broken install counts as missing, as for DALI
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - ImportError, or an install raising at import
            return (f"needs {name}: not importable here ({type(exc).__name__}: {str(exc)[:120]}; `make install`, "
                    f"or the wheelhouse's install.sh: docs/install.md)")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="shard split folder holding method folders (default: write "
                                                     "shards from scikit-image photos)")
    parser.add_argument("--work", default=None, help="folder for shards and run folders (default: a temp folder)")
    parser.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA exists")
    parser.add_argument("--quick", action="store_true",
                        help=f"the legs {','.join(QUICK_LEGS)} with {QUICK_SIZES['steps']} training steps (under 4 "
                             f"minutes on one H100/H200); without CUDA (or with --cpu) at the CPU mode's tiny sizes")
    parser.add_argument("--legs", default=None,
                        help=f"comma-separated legs to run, of {','.join(LEGS)} (default: all of them; with "
                             f"--quick: {','.join(QUICK_LEGS)})")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps per timed run (options too)")
    parser.add_argument("--resume-steps", type=int, default=None, help="N of the resume check (N, signal, 2N)")
    parser.add_argument("--threads", type=int, default=None,
                        help="DALI threads / DataLoader workers (default: the config's data.num_threads, 2 in "
                             "paper; 1 in CPU mode)")
    parser.add_argument("--options", default=None,
                        help=f"comma-separated speed options to measure, of {','.join(OPTIONS)}; 'none' for none "
                             f"(default: all with CUDA, all but compile in CPU mode)")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides for the training steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available() and not args.cpu
    sizes = dict(GPU_SIZES if cuda else CPU_SIZES)
    if args.quick and cuda:
        sizes.update(QUICK_SIZES)
    options = list(OPTIONS) if cuda else CPU_DEFAULT_OPTIONS
    if args.options is not None:
        options = [] if args.options == "none" else [o.strip() for o in args.options.split(",") if o.strip()]
        unknown = [o for o in options if o not in OPTIONS]
        if unknown:
            parser.error(f"--options: unknown {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    legs = [leg for leg in (QUICK_LEGS if args.quick else LEGS) if cuda or leg not in GPU_ONLY_LEGS]
    if args.legs is not None:
        asked = [x.strip() for x in args.legs.split(",") if x.strip()]
        unknown = [x for x in asked if x not in LEGS]
        if unknown or not asked:
            parser.error(f"--legs: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(LEGS)}")
        legs = [x for x in LEGS if x in asked]  # always in LEGS' order
    for key in ("samples", "steps", "resume_steps"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if args.steps is not None:
        sizes["option_steps"] = args.steps
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        # CPU mode: one intra-op thread unless OMP_NUM_THREADS says otherwise. With one thread per core on a machine
        # other jobs share, every OpenMP region waits for a descheduled thread: toy steps then vary 15-50x and the
        # training ratios measure the other jobs (ltm.train.trainer's Trainer reads the variable, so set it too).
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    env = environment(cuda)
    tmp = tempfile.TemporaryDirectory(prefix="ltm-gpu-check-")
    work = Path(args.work or tmp.name)
    phases: dict[str, float] = {}
    fig: dict[str, Any] = {}

    skipped = {leg: why for leg in legs if (why := missing(LEGS[leg]))}
    for leg, why in skipped.items():
        print(f"skipped leg {leg}: {why}", flush=True)
        fig[f"leg_{leg}"] = f"skipped: {why.split(':')[0]}"  # the table's short form; the JSON has the whole reason
    run = [leg for leg in legs if leg not in skipped]
    cfg = None
    if run:
        start = time.perf_counter()
        split = Path(args.data) if args.data else write_check_shards(work / "shards", sizes["samples"],
                                                                     sizes["image_size"])
        # random initial weights: throughput and resume need no ImageNet weights (and the GPU machine has no hub).
        # DALI threads: the config's own count (paper trains with 2) unless --threads; 1 on the shared CPU machine
        base = ["model.pretrained=null", f"data.shuffle_buffer={min(1024, sizes['samples'])}"]
        if args.threads or not cuda:
            base.append(f"data.num_threads={args.threads or 1}")
        if not cuda:
            base += CPU_OVERRIDES + [f"data.image_size={sizes['image_size']}", f"train.batch_size={sizes['batch']}"]
        cfg = configure(sizes["config"], split, work / "runs" / "ltm", base + list(args.overrides))
        # every timed leg runs under this one setting (set again at each leg's start: see set_determinism)
        fig["cudnn_benchmark"] = not cfg.train.deterministic
        phases["data"] = time.perf_counter() - start

    if "decode" in run:
        start = time.perf_counter()
        fig.update(decode_check(cfg, split, cuda, sizes["decode_batch"], sizes["passes"],
                                DECODE_THREADS_ALSO if cuda else None))
        if not cuda:
            fig["decode_mixed_images_per_s"] = SKIP_CUDA
        phases["decode"] = time.perf_counter() - start

    if "agree" in run:
        start = time.perf_counter()
        n = min(AGREE_SAMPLES, sizes["samples"])
        splits = {chroma: write_check_shards(work / "shards", n, sizes["image_size"], f"gpucheck-agree{chroma}", chroma)
                  for chroma in ("444", "420")}
        # the agreement is no throughput figure: decode it with as many DALI threads as the decode leg's second count
        agree_cfg = with_overrides(cfg, [f"data.num_threads={max(cfg.data.num_threads, DECODE_THREADS_ALSO)}"]
                                   ) if cuda else cfg
        fig.update(decode_agreement(agree_cfg, splits, cuda, sizes["decode_batch"]))
        phases["agree"] = time.perf_counter() - start

    if "eval" in run:
        start = time.perf_counter()
        fig.update(eval_check(cfg, split, cuda, sizes["eval_batch"], sizes["rounds"]))
        phases["eval"] = time.perf_counter() - start

    defaults: dict[str, Any] = {}
    no_engine = missing(("deepspeed",)) if {"train", "options"} & set(run) else None
    engine_skipped = f"skipped: {no_engine.split(':')[0]}" if no_engine else None
    if "train" in run:
        start = time.perf_counter()
        plain = plain_steps(cfg, sizes["steps"], sizes["warmup"], cuda)
        flops = flop_ratio(cfg, cuda)
        fig.update({"plain_images_per_s": plain["images_per_s"], "plain_data_stall": plain["data_stall"],
                    "ltm_baseline_flop_ratio": round(flops, 4), "deterministic": cfg.train.deterministic})
        defaults = {"plain": plain, "engine": engine_skipped}
        if no_engine:
            print(f"train leg: the Trainer's runs skipped ({no_engine}); the plain loop and FLOP count ran", flush=True)
            for key in ("train_images_per_s", "train_data_stall", "peak_gpu_memory_gib", "ltm_over_plain"):
                fig[key] = engine_skipped
        else:
            ltm_run = engine_steps(cfg, sizes["steps"], sizes["warmup"], cuda)
            base_cfg = with_overrides(cfg, ["model.kind=baseline", f"train.run_dir={work / 'runs' / 'baseline'}"])
            base_run = engine_steps(base_cfg, sizes["steps"], sizes["warmup"], cuda)
            time_ratio = ltm_run["step_s"] / base_run["step_s"]
            defaults["engine"] = ltm_run
            fig.update({"train_loader": ltm_run["loader"], "train_images_per_s": ltm_run["images_per_s"],
                        "train_data_stall": ltm_run["data_stall"],
                        "peak_gpu_memory_gib": ltm_run["peak_gpu_memory_gib"],
                        "gpu_memory_outside_torch_gib": ltm_run["gpu_memory_outside_torch_gib"],
                        "peak_gpu_memory_device_gib": ltm_run["peak_gpu_memory_device_gib"],
                        "baseline_images_per_s": base_run["images_per_s"],
                        "ltm_baseline_time_ratio": round(time_ratio, 4),
                        "step_time_over_flop_ratio": round(time_ratio / flops, 4),
                        "ltm_over_plain": round(ltm_run["images_per_s"] / plain["images_per_s"], 4)})
            fig.update(steadiness([ltm_run, base_run], sizes["warmup"]))
        phases["train"] = time.perf_counter() - start

    if "vitl" in run:
        start = time.perf_counter()
        fig.update(vitl_check(split, cuda, sizes, work / "runs" / "vitl", args.threads))
        phases["vitl"] = time.perf_counter() - start

    if "options" in run:
        start = time.perf_counter()
        # run alone (--legs options), the leg measures the defaults it divides by itself, under the same settings
        loops = {OPTIONS[name][1] for name in options}
        if "engine" in loops and no_engine:
            print(f"options leg: the engine's options skipped ({no_engine})", flush=True)
        if "engine" in loops and "engine" not in defaults:
            defaults["engine"] = engine_skipped or engine_steps(
                cfg, sizes["option_steps"], sizes["warmup"], cuda)
        if "plain" in loops and "plain" not in defaults:
            defaults["plain"] = plain_steps(cfg, sizes["option_steps"], sizes["warmup"], cuda)
        # CPU mode: the options' steps only prove they run (one timed step each; the figures say warm-up-dominated)
        fig.update(options_check(cfg, options, defaults, sizes["option_steps"], sizes["warmup"], cuda,
                                 work / "runs" / "options"))
        if "compile" not in options:
            fig["option_compile_over_default"] = ("skipped: CPU mode (inductor's first compile takes minutes on a "
                                                  "few cores; --options compile runs it)" if not cuda else "skipped")
        phases["options"] = time.perf_counter() - start

    if "resume" in run:
        start = time.perf_counter()
        for precision in ("fp32", "bf16"):
            fig.update(resume_check(cfg, sizes["resume_steps"], precision, work / "runs" / "resume"))
        phases["resume"] = time.perf_counter() - start

    if not cuda:
        for key in ("peak_gpu_memory_gib", "gpu_memory_outside_torch_gib", "peak_gpu_memory_device_gib"):
            if key in fig:
                fig[key] = SKIP_CUDA
    print_table(fig, env, phases)
    ratio = fig.get("ltm_over_plain")
    print(json.dumps({"bench": "gpu", "cuda": cuda, **env, "quick": args.quick, "legs": run,
                      "legs_skipped": skipped, "image_size": cfg.data.image_size if cfg else None,
                      "batch": cfg.train.batch_size if cfg else None, "steps": sizes["steps"],
                      "warmup": sizes["warmup"], "resume_steps": sizes["resume_steps"],
                      "threads": cfg.data.num_threads if cfg else None, "torch_threads": torch.get_num_threads(),
                      **fig, "phases_s": {k: round(v, 1) for k, v in phases.items()},
                      "wall_s": round(sum(phases.values()), 1), "targets": verdicts(fig),
                      # the headline needs the train leg's engine run; null (with why) when it did not run
                      "ratio": ratio if isinstance(ratio, float) else None,
                      "ratio_note": None if isinstance(ratio, float) else "ltm_over_plain comes from the train leg "
                                                                          "with DeepSpeed, which did not run",
                      "target": TARGETS["ltm_over_plain"][1]}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
