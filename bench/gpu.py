"""The GPU check: DALI nvJPEG decode, bf16 DeepSpeed training, exact resume and evaluation on one CUDA GPU, measured.

One command runs every step of the product's GPU path and prints a table, then one JSON line of figures:

  1. data     a shard root (`--data <split folder>` holding method folders), or shards it writes itself with
              data_prep's shard writer from photos that scikit-image ships (no face detector, no video decoder).
  2. decode   DALI `mixed` (nvJPEG) against `cpu` on the same shards: images/s of each (steady state, first batch
              excluded), the same keys and labels in the same order, the largest pixel difference (0-255).
  3. train    the `paper` config (Xception 224, ViT 384x6x6, 32 per GPU, bf16, ZeRO-1) through ltm.engine's
              Trainer: steady-state images/s, peak GPU memory, data stall (time in the loader / step time), the
              LTM / Baseline step-time ratio against their FLOP ratio; beside it the same model in a plain PyTorch
              autocast loop fed by the reference (PIL + DataLoader) loader. Headline ratio: ltm / plain images/s.
  4. resume   N steps, a real SIGUSR1 (the preemption signal) at step N, resume to 2N, against an uninterrupted
              2N run: bitwise equal weights in fp32 deterministic mode; the largest weight difference in bf16.
  5. eval     `ltm eval`'s scoring path against forward-only images/s (bench/eval.py's measurement).
  6. options  each speed option against the default, the same steps of the same config: train.channels_last,
              train.compile, train.optimizer_impl=fused and data.prefetch=4 through the engine, data.pin_memory
              through the plain loop (its reference loader); figure: option images/s over default images/s.

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
"""

from __future__ import annotations

import os

# cuBLAS reads this when CUDA initialises: deterministic GEMMs for the bitwise resume check (ltm.engine sets the
# same value, but only when a Trainer starts, which is after the decode and eval steps have used CUDA)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, also when it is only on PYTHONPATH

from ltm import distributed  # noqa: E402,F401  (sets DS_ACCELERATOR=cpu without CUDA before DeepSpeed loads)
from ltm.config import Config, load_config  # noqa: E402

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
             "decode_batch": 256, "eval_batch": 256, "passes": 3, "rounds": 3}
CPU_SIZES = {"config": "tiny-cpu", "image_size": 64, "samples": 32, "steps": 4, "warmup": 1, "option_steps": 2,
             "resume_steps": 2,
             "decode_batch": 16, "eval_batch": 16, "passes": 1, "rounds": 1, "batch": 8}
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


# ------------------------------------------------------------------------------------------------ 1. data


def packaged_photos() -> list[np.ndarray]:
    """RGB photos that scikit-image ships in its wheel (no download), and its LFW faces (grey, enlarged)."""
    import skimage.data

    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                 "colorwheel"):
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception as exc:  # noqa: BLE001 - a photo missing from this scikit-image build is only skipped
            log.debug("skimage.data.%s: %s", name, exc)
            continue
        if img.ndim == 3 and img.shape[2] >= 3:
            photos.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    faces = skimage.data.lfw_subset()[:100]  # the first 100 are faces
    photos += [np.repeat((f * 255).astype(np.uint8)[..., None], 3, axis=2) for f in faces[:20]]
    if len(photos) < 3:
        raise SystemExit("scikit-image ships fewer than 3 usable photos here; pass --data <shard split folder>")
    return photos


def write_check_shards(root: Path, samples: int, size: int) -> Path:
    """`<root>/gpucheck/train/{real,fake}/` shards (+ .idx, manifest.json) of random square crops of the photos,
    `size` px, written by data_prep's shard writer (DESIGN.md shard contract). Returns the split folder."""
    from PIL import Image

    from data_prep.shards import jpeg_bytes, write_json_atomic, write_shards

    photos = packaged_photos()
    rng = np.random.default_rng(0)
    by_method: dict[str, list[dict]] = {"real": [], "fake": []}
    for i in range(samples):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        method = "fake" if i % 2 else "real"
        video = f"{method}{i // 8:04d}"
        by_method[method].append({
            "__key__": f"{video}-{i:06d}", "jpg": jpeg_bytes(np.asarray(crop)), "cls": i % 2,
            "json": {"dataset": "gpucheck", "split": "train", "video": video, "frame": i, "label": i % 2,
                     "method": method, "compression": "raw", "bbox": [left, top, left + side, top + side],
                     "source": "skimage.data"}})
    split = root / "gpucheck" / "train"
    shards = []
    for method, items in by_method.items():
        records = write_shards(items, split / method, f"gpucheck-train-{method}", max_samples=256)
        shards += [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} | {"method": method} for r in records]
    write_json_atomic(split / "manifest.json", {
        "format": 1, "settings": {"size": size, "quality": 95}, "source": "bench/gpu.py: scikit-image photos",
        "shards": shards, "totals": {m: len(v) for m, v in by_method.items()}, "skipped": []})
    return split


def method_folders(split: Path) -> list[Path]:
    from ltm.data.shards import method_folders as folders

    return folders(split)


# ------------------------------------------------------------------------------------------------ helpers


def configure(base: str, split: Path, run_dir: Path, overrides: list[str]) -> Config:
    train = ", ".join(f"{{path: {m}, weight: 1}}" for m in method_folders(split))
    return load_config(base, [f"data.train=[{train}]", "data.val=[]", f"data.test=[{split}]",
                              f"train.run_dir={run_dir}", *overrides])


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with more key=value overrides, through a YAML file (the config's own loading and checks)."""
    from ltm.config import save_config

    with tempfile.TemporaryDirectory(prefix="ltm-gpu-check-cfg-") as folder:
        path = Path(folder) / "config.yaml"
        save_config(cfg, path)
        return load_config(path, overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_determinism(on: bool) -> None:
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = not on


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


# ------------------------------------------------------------------------------------------------ 2. decode


def decode_pass(loader, device: torch.device) -> tuple[float, int, list[str], list[float]]:
    """(steady seconds, images after the first batch, keys, labels) of one pass over an eval loader."""
    keys, labels, n, first = [], [], 0, None
    for batch in loader:
        sync(device)
        if first is None:
            first = time.perf_counter()
        else:
            n += len(batch["keys"])
        keys += batch["keys"]
        labels += batch["labels"].cpu().tolist()
    sync(device)
    return time.perf_counter() - (first or time.perf_counter()), n, keys, labels


def decode_check(cfg: Config, split: Path, cuda: bool, batch: int, passes: int) -> dict:
    from ltm.data import build_eval_loader

    device = torch.device("cuda") if cuda else torch.device("cpu")
    kinds = {"mixed": ["data.loader=dali", "data.device=gpu"], "cpu": ["data.loader=dali", "data.device=cpu"]}
    if not cuda:  # no nvJPEG: DALI's CPU decode is compared with the reference loader's PIL decode instead
        kinds = {"cpu": kinds["cpu"], "reference": ["data.loader=reference"]}
    out: dict[str, Any] = {}
    loaders = {}
    for kind, over in kinds.items():
        c = with_overrides(cfg, over)
        loaders[kind] = build_eval_loader(c, [split], 0, 1, device, batch)
        runs = [decode_pass(loaders[kind], device) for _ in range(passes)]
        out[f"decode_{kind}_images_per_s"] = round(statistics.median(n / s for s, n, _, _ in runs if s > 0), 1)
        out[f"_{kind}_order"] = (runs[-1][2], runs[-1][3])
    a, b = list(kinds)
    out["decode_pair"] = f"{a} vs {b}"
    out["decode_same_keys_and_labels"] = out.pop(f"_{a}_order") == out.pop(f"_{b}_order")
    diff_max, diff_sum, count = 0.0, 0.0, 0
    for x, y in zip(loaders[a], loaders[b]):
        if x["keys"] != y["keys"]:
            out["decode_same_keys_and_labels"] = False
            break
        d = (x["images"].float() - y["images"].float().to(x["images"].device)).abs() * 255.0
        diff_max, diff_sum, count = max(diff_max, float(d.max())), diff_sum + float(d.sum()), count + d.numel()
    out["decode_max_pixel_diff"] = round(diff_max, 3)
    out["decode_mean_pixel_diff"] = round(diff_sum / max(count, 1), 4)
    out["decode_images"] = sum(len(src) for src in loaders[a].sources)
    if not cuda:
        out["decode_mixed_images_per_s"] = SKIP_CUDA
    return out


# ------------------------------------------------------------------------------------------------ 3. train


def engine_steps(cfg: Config, steps: int, warmup: int, cuda: bool) -> dict:
    """`steps` optimizer steps of ltm.engine's Trainer (the DeepSpeed engine `ltm train` runs), timed per step."""
    from ltm.engine import Trainer

    trainer = Trainer(cfg, resume="never")
    ok = False
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
        ok = True
    finally:
        trainer.close(ok)
    steady, waits = step_s[warmup:], wait_s[warmup:]
    return {"images_per_s": round(trainer.micro_batch * len(steady) / sum(steady), 2),
            "step_s": statistics.median(steady), "data_stall": round(sum(waits) / sum(steady), 4),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else SKIP_CUDA,
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
    from ltm.engine import Trainer

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

    from ltm.evaluate import scoring_accelerator
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

    from ltm.data import dali_package

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
    for name, (op, target) in TARGETS.items():
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
    for key, value in fig.items():
        if key == "train_note":  # a sentence, printed under the table
            continue
        op, target = TARGETS.get(key, ("", ""))
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<34}{shown:>22}  {op} {target}".rstrip())
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    if fig.get("train_note"):
        print(f"note: {fig['train_note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="shard split folder holding method folders (default: write "
                                                     "shards from scikit-image photos)")
    parser.add_argument("--work", default=None, help="folder for shards and run folders (default: a temp folder)")
    parser.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA exists")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps per timed run (options too)")
    parser.add_argument("--resume-steps", type=int, default=None, help="N of the resume check (N, signal, 2N)")
    parser.add_argument("--threads", type=int, default=None, help="DALI threads / DataLoader workers")
    parser.add_argument("--options", default=None,
                        help=f"comma-separated speed options to measure, of {','.join(OPTIONS)}; 'none' for none "
                             f"(default: all with CUDA, all but compile in CPU mode)")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides for the training steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cuda = torch.cuda.is_available() and not args.cpu
    sizes = dict(GPU_SIZES if cuda else CPU_SIZES)
    options = list(OPTIONS) if cuda else CPU_DEFAULT_OPTIONS
    if args.options is not None:
        options = [] if args.options == "none" else [o.strip() for o in args.options.split(",") if o.strip()]
        unknown = [o for o in options if o not in OPTIONS]
        if unknown:
            parser.error(f"--options: unknown {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    for key in ("samples", "steps", "resume_steps"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    if args.steps is not None:
        sizes["option_steps"] = args.steps
    threads = args.threads or (min(8, max(1, (os.cpu_count() or 2) // 2)) if cuda else 1)
    if not cuda and "OMP_NUM_THREADS" not in os.environ:
        # CPU mode: one intra-op thread unless OMP_NUM_THREADS says otherwise. With one thread per core on a machine
        # other jobs share, every OpenMP region waits for a descheduled thread: toy steps then vary 15-50x and the
        # training ratios measure the other jobs (ltm.engine's Trainer reads the variable, so set it too).
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    env = environment(cuda)
    tmp = tempfile.TemporaryDirectory(prefix="ltm-gpu-check-")
    work = Path(args.work or tmp.name)
    phases: dict[str, float] = {}
    fig: dict[str, Any] = {}

    start = time.perf_counter()
    split = Path(args.data) if args.data else write_check_shards(work / "shards", sizes["samples"],
                                                                 sizes["image_size"])
    # random initial weights: throughput and resume need no ImageNet weights (and the GPU machine has no hub)
    base = ["model.pretrained=null", f"data.num_threads={threads}",
            f"data.shuffle_buffer={min(1024, sizes['samples'])}"]
    if not cuda:
        base += CPU_OVERRIDES + [f"data.image_size={sizes['image_size']}", f"train.batch_size={sizes['batch']}"]
    cfg = configure(sizes["config"], split, work / "runs" / "ltm", base + list(args.overrides))
    phases["data"] = time.perf_counter() - start

    start = time.perf_counter()
    fig.update(decode_check(cfg, split, cuda, sizes["decode_batch"], sizes["passes"]))
    phases["decode"] = time.perf_counter() - start

    start = time.perf_counter()
    fig.update(eval_check(cfg, split, cuda, sizes["eval_batch"], sizes["rounds"]))
    phases["eval"] = time.perf_counter() - start

    start = time.perf_counter()
    ltm_run = engine_steps(cfg, sizes["steps"], sizes["warmup"], cuda)
    base_cfg = with_overrides(cfg, ["model.kind=baseline", f"train.run_dir={work / 'runs' / 'baseline'}"])
    base_run = engine_steps(base_cfg, sizes["steps"], sizes["warmup"], cuda)
    plain = plain_steps(cfg, sizes["steps"], sizes["warmup"], cuda)
    flops = flop_ratio(cfg, cuda)
    time_ratio = ltm_run["step_s"] / base_run["step_s"]
    fig.update({"train_loader": ltm_run["loader"], "train_images_per_s": ltm_run["images_per_s"],
                "train_data_stall": ltm_run["data_stall"], "peak_gpu_memory_gib": ltm_run["peak_gpu_memory_gib"],
                "baseline_images_per_s": base_run["images_per_s"], "ltm_baseline_time_ratio": round(time_ratio, 4),
                "ltm_baseline_flop_ratio": round(flops, 4), "step_time_over_flop_ratio": round(time_ratio / flops, 4),
                "plain_images_per_s": plain["images_per_s"], "plain_data_stall": plain["data_stall"],
                "ltm_over_plain": round(ltm_run["images_per_s"] / plain["images_per_s"], 4),
                "deterministic": cfg.train.deterministic})
    fig.update(steadiness([ltm_run, base_run], sizes["warmup"]))
    phases["train"] = time.perf_counter() - start

    start = time.perf_counter()
    # CPU mode: the options' steps only prove they run (one timed step each; the figures say warm-up-dominated)
    fig.update(options_check(cfg, options, {"engine": ltm_run, "plain": plain}, sizes["option_steps"],
                             sizes["warmup"], cuda, work / "runs" / "options"))
    if "compile" not in options:
        fig["option_compile_over_default"] = ("skipped: CPU mode (inductor's first compile takes minutes on a few "
                                              "cores; --options compile runs it)" if not cuda else "skipped")
    phases["options"] = time.perf_counter() - start

    start = time.perf_counter()
    for precision in ("fp32", "bf16"):
        fig.update(resume_check(cfg, sizes["resume_steps"], precision, work / "runs" / "resume"))
    phases["resume"] = time.perf_counter() - start

    if not cuda:
        fig["peak_gpu_memory_gib"] = SKIP_CUDA
    print_table(fig, env, phases)
    ratio = fig["ltm_over_plain"]
    print(json.dumps({"bench": "gpu", "cuda": cuda, **env, "image_size": cfg.data.image_size,
                      "batch": cfg.train.batch_size, "steps": sizes["steps"], "warmup": sizes["warmup"],
                      "resume_steps": sizes["resume_steps"], "threads": threads,
                      "torch_threads": torch.get_num_threads(), **fig,
                      "phases_s": {k: round(v, 1) for k, v in phases.items()},
                      "wall_s": round(sum(phases.values()), 1), "targets": verdicts(fig),
                      "ratio": ratio, "target": TARGETS["ltm_over_plain"][1]}))
    tmp.cleanup()


if __name__ == "__main__":
    main()
