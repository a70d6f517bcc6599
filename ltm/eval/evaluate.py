"""`ltm eval`: score shard folders with a run's checkpoint and write frame/video AUC reports with plots.

Weights come from the DeepSpeed checkpoint through DeepSpeed's own zero-to-fp32 helpers, without an engine, so
any number of ranks can evaluate a checkpoint trained on any other number. Each rank scores the share of samples
the eval loader gives it (every sample exactly once over all ranks, no padding); the (key, video, method, label,
score) rows are gathered once, and every rank computes the same metrics; rank 0 writes
`<run>/eval/<dataset>-<split>/{report.json, report.md, scores.csv, roc.png, attention/*.png}`.

accelerate's `Accelerator` provides what scoring needs from the environment: this rank's device, bf16 autocast on
CUDA for a run trained in bf16, `gather_object` across ranks and the main process. It reads the ranks that
`accelerate launch`, torchrun, SLURM/submitit or `ltm eval --nproc N` describe (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from ltm import distributed  # sets DS_ACCELERATOR=cpu without CUDA before DeepSpeed's zero_to_fp32 is imported
from ltm.checkpoint.reader import load_model
from ltm.config import Config, EvalConfig
from ltm.data.shards import split_digest
from ltm.eval.metrics import compute_metrics
from ltm.launch import DIST_VARS

log = logging.getLogger(__name__)


@dataclass
class Row:
    key: str
    video: str
    method: str
    label: int
    score: float


# ---------------------------------------------------------------------------------------------------------------
# The ranks: accelerate
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def scoring_accelerator(precision: str = "fp32", device: str = "auto",
                        timeout_min: int = EvalConfig.timeout_min) -> Iterator:
    """An `accelerate.Accelerator` for scoring (eval, predict) in the world the environment describes.

    bf16 autocast only on CUDA and only for a run trained in bf16 (on the CPU bf16 would only cost accuracy).
    `device`: auto | cpu | cuda | cuda:N (N picks the GPU of a single process; ranks take their LOCAL_RANK's).
    `timeout_min` (config `eval.timeout_min`): how long a collective waits, for the process group made here. A rank
    that has scored its share waits in the final gather for the slowest one; accelerate's default (torch's: 10
    minutes for NCCL) would abort the job then, after all the scoring.
    A process group and accelerate state made here are dropped on the way out, so a later job in the same process
    (another eval, `ltm train`) starts from a clean slate, as after a process exit.
    """
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (use auto or cpu)")
        if ":" in device and "LOCAL_RANK" not in os.environ:
            torch.cuda.set_device(torch.device(device))
    fresh = not is_initialized() and not dist.is_initialized()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda and precision == "bf16" else "no",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_min))])
    ok = False
    try:
        yield accelerator
        ok = True
    finally:
        if fresh:
            if ok:
                # not accelerate's wait_for_everyone: it names cuda:LOCAL_RANK as the NCCL barrier's device, which a
                # task that sees only its own GPU lacks; a plain barrier runs on the device accelerate set
                distributed.barrier()
            accelerator.state.destroy_process_group()
            AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's own way to start over


# ---------------------------------------------------------------------------------------------------------------
# Data folders
# ---------------------------------------------------------------------------------------------------------------


def resolve_folder(folder: str | os.PathLike, cfg: Config) -> Path:
    """A shard folder as given when it exists, else relative to `cfg.data.root` (the loader's rule)."""
    path = Path(folder)
    if not path.exists() and not path.is_absolute():
        path = Path(cfg.data.root) / path
    if not path.is_dir():
        raise FileNotFoundError(f"shard folder {str(folder)!r}: no such folder (also looked in {str(path)!r})")
    if not any(path.rglob("*.tar")):
        raise ValueError(f"shard folder {str(path)!r}: holds no .tar shards")
    return path


def dataset_name(folder: Path) -> str:
    """`<dataset>-<split>` for a split folder, `<dataset>-<split>-<method>` for one method folder."""
    method_folder = any(folder.glob("*.tar"))
    parts = folder.resolve().parts
    return "-".join(parts[-3:] if method_folder else parts[-2:])


# ---------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Kept:
    """Images held back from scoring for the report's pictures: the first `keep_per_label` of each label (attention
    gallery), and this rank's most confident mistakes at the threshold, as (P(fake), key, image): the reals scored
    highest at or above it (false positives) and the fakes scored lowest below it (false negatives)."""

    by_label: dict[int, list[tuple[str, torch.Tensor]]]
    false_positives: list[tuple[float, str, torch.Tensor]]
    false_negatives: list[tuple[float, str, torch.Tensor]]


def _most_confident(candidates: list[tuple[float, str, torch.Tensor]], k: int, fakes: bool) -> list:
    """The k most confident mistakes, ties broken by key so that every rank split picks the same ones: reals with
    the highest P(fake), fakes with the lowest."""
    order = sorted(candidates, key=lambda c: (c[0] if fakes else -c[0], c[1]))
    return order[:k]


def score_folder(
    model: nn.Module, cfg: Config, folder: Path, accelerator, batch_size: int, keep_per_label: int = 0,
    keep_errors: int = 0, threshold: float = 0.5,
) -> tuple[list[Row], Kept, dict[str, int]]:
    """Score this rank's share of a folder; also keep up to `keep_per_label` (key, image) pairs per label and this
    rank's `keep_errors` most confident false positives and false negatives at `threshold`.

    Returns (rows of this rank, kept images, counts `{"total", "share", "skipped"}`: samples in the folder,
    samples given to this rank, bad samples this rank dropped).
    """
    from ltm.data import build_eval_loader

    loader = build_eval_loader(cfg, [folder], accelerator.process_index, accelerator.num_processes,
                               accelerator.device, batch_size)
    rows: list[Row] = []
    kept = Kept({0: [], 1: []}, [], [])
    with torch.inference_mode(), accelerator.autocast():
        for batch in loader:
            probs = model.predict(batch["images"]).float().cpu().tolist()
            labels = batch["labels"].cpu().round().int().tolist()
            for i, (key, video, method, label, p) in enumerate(
                zip(batch["keys"], batch["videos"], batch["methods"], labels, probs)
            ):
                rows.append(Row(key, video, method, label, p))
                if len(kept.by_label[label]) < keep_per_label:
                    kept.by_label[label].append((key, batch["images"][i].detach().float().cpu().clone()))
                wrong = (label == 0 and p >= threshold) or (label == 1 and p < threshold)
                if keep_errors > 0 and wrong:
                    errors = kept.false_negatives if label else kept.false_positives
                    errors.append((p, key, batch["images"][i].detach().float().cpu().clone()))
                    if len(errors) > 4 * keep_errors:  # bounded memory: trim to the k most confident now and then
                        errors[:] = _most_confident(errors, keep_errors, fakes=bool(label))
    kept.false_positives = _most_confident(kept.false_positives, keep_errors, fakes=False)
    kept.false_negatives = _most_confident(kept.false_negatives, keep_errors, fakes=True)
    counts = {"total": loader.total_samples, "share": loader.num_samples, "skipped": loader.skipped}
    if len(rows) + counts["skipped"] != counts["share"]:
        raise RuntimeError(f"shard folder {str(folder)!r}: rank {accelerator.process_index} was given "
                           f"{counts['share']} samples but scored {len(rows)} and skipped {counts['skipped']}")
    return rows, kept, counts


def gather_errors(kept: Kept, k: int) -> tuple[list, list]:
    """The k most confident false positives and false negatives over all ranks (every rank gets the same)."""
    from accelerate.utils import gather_object

    parts = gather_object([(kept.false_positives, kept.false_negatives)])
    return (_most_confident([e for fp, _ in parts for e in fp], k, fakes=False),
            _most_confident([e for _, fn in parts for e in fn], k, fakes=True))


def gather_rows(rows: list[Row], counts: dict[str, int] | None = None) -> list[Row]:
    """All ranks' rows, once each (one `gather_object` of plain tuples), sorted by (method, key).

    With this rank's `counts` from `score_folder`, also checks that the ranks' shares cover the folder: no sample
    dropped by the rank split, none scored twice.
    """
    from accelerate.utils import gather_object

    parts = gather_object([([(r.key, r.video, r.method, r.label, r.score) for r in rows], counts)])
    merged = [Row(*t) for part, _ in parts for t in part]
    if counts is not None:
        shares, skipped = sum(c["share"] for _, c in parts), sum(c["skipped"] for _, c in parts)
        if shares != counts["total"] or len(merged) + skipped != counts["total"]:
            raise RuntimeError(f"the eval loader broke its contract: {counts['total']} samples, ranks were given "
                               f"{shares}, scored {len(merged)} and skipped {skipped}")
    seen: set[tuple[str, str]] = set()
    for r in merged:
        if (r.method, r.key) in seen:
            raise RuntimeError(f"sample {r.key!r} ({r.method}) was scored twice: the eval loader broke its contract")
        seen.add((r.method, r.key))
    return sorted(merged, key=lambda r: (r.method, r.key))


def attention_maps(model: nn.Module, items: list[tuple[str, int, torch.Tensor]], device: torch.device,
                   crops_without_attention: bool = False) -> list:
    """[(key, label, image (3,H,W), attention (h,w) | None, mask (h,w) | None, P(fake))] for (key, label, image)
    items. A model without teacher attention (Baseline) gives [] , or the crops alone with
    `crops_without_attention` (the report's mistakes are shown for every model)."""
    explains = hasattr(model, "explain")
    if not items or not (explains or crops_without_attention):
        return []
    images = torch.stack([img for _, _, img in items]).to(device)
    probs = model.predict(images).float().cpu()
    if not explains:
        return [(key, label, img, None, None, float(probs[i])) for i, (key, label, img) in enumerate(items)]
    out = model.explain(images)
    return [(key, label, img, out["attention"][i].float().cpu(), out["mask"][i].float().cpu(), float(probs[i]))
            for i, (key, label, img) in enumerate(items)]


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------


def evaluate(
    run_dir: str | os.PathLike,
    data: list[str] | None = None,
    tag: str | None = None,
    cfg_overrides: list[str] | None = None,
    weights: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    threshold_from: str | os.PathLike | None = None,
    protocol: str | None = None,
) -> list[dict]:
    """Score each data folder (default: the config's `data.test`); one report dict per folder (docs/evaluation.md).

    `threshold_from`: a validation folder scored first; its EER threshold replaces `eval.threshold` for the
    accuracy of every report (which names the folder).
    `protocol`: the `ltm.eval.report.crossdata.PROTOCOLS` preset the overrides came from, named in the cross-dataset
    table.

    Runs on the ranks the environment describes (a world of one without it); every rank returns the same list,
    the main process writes `<out_dir or run/eval>/<dataset>-<split>/` (its reports carry `report_dir`).
    """
    saved_env = {k: os.environ.get(k) for k in DIST_VARS}
    model, cfg, source = load_model(run_dir, tag, weights, cfg_overrides, "cpu")
    try:
        with scoring_accelerator(cfg.train.precision, timeout_min=cfg.eval.timeout_min) as accelerator:
            return _score_folders(accelerator, model, cfg, source, run_dir, data, out_dir, threshold_from, protocol)
    finally:
        for k, v in saved_env.items():  # variables set for this world must not leak into later jobs of the process
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def score_and_report(accelerator, model: nn.Module, cfg: Config, source: str, run_dir, folder: Path,
                     folder_out: Path, threshold: float, threshold_folder: Path | None = None,
                     cross_dataset: bool = False) -> dict:
    """Score one folder and (main process) write its report folder `folder_out`: report.json, report.md,
    report.html, scores.csv, roc.png, the attention gallery, the most confident mistakes and, for a model with
    teacher maps, the mask diagnostics. Every rank returns the report dict (`report_dir` on the main process)."""
    from ltm.eval.report import files as report_files

    name = folder_out.name
    start = time.perf_counter()
    rows, kept, counts = score_folder(model, cfg, folder, accelerator, cfg.eval.batch_size,
                                      cfg.eval.attention_samples if accelerator.is_main_process else 0,
                                      cfg.eval.error_samples, threshold)
    rows = gather_rows(rows, counts)
    false_positives, false_negatives = gather_errors(kept, cfg.eval.error_samples)
    seconds = time.perf_counter() - start
    if not rows:
        raise ValueError(f"shard folder {str(folder)!r}: the loader yielded no samples")
    metrics = compute_metrics([r.video for r in rows], [r.method for r in rows], [r.label for r in rows],
                              [r.score for r in rows], cfg.eval.video_agg, threshold)
    report = {
        "name": name,
        **metrics,
        "threshold_from": str(threshold_folder) if threshold_folder is not None else None,
        "perturbation": cfg.eval.perturb,
        "frames_per_video": cfg.eval.frames_per_video,
        "checkpoint": source,
        "data": str(folder),
        "data_digest": split_digest(folder),  # the split's content digest from its prep manifest
        "run": str(run_dir),
        "model": {"kind": cfg.model.kind, "backbone": cfg.model.backbone,
                  "inference_head": cfg.model.inference_head, "image_size": cfg.data.image_size},
        "world_size": accelerator.num_processes,
        "cross_dataset": cross_dataset,  # the eval root holds the table
        "seconds": round(seconds, 3),
        "images_per_s": round(len(rows) / seconds, 2) if seconds > 0 else None,
    }
    if accelerator.is_main_process:
        if not hasattr(model, "explain"):
            log.info("model kind %s has no teacher attention: no attention pictures", type(model).__name__)
        gallery = [(key, label, img) for label in (0, 1) for key, img in kept.by_label[label]]
        pictures = attention_maps(model, gallery, accelerator.device)
        mistakes = attention_maps(model, [(key, 0, img) for _, key, img in false_positives]
                                  + [(key, 1, img) for _, key, img in false_negatives],
                                  accelerator.device, crops_without_attention=True)
        region_pictures: list = []
        if hasattr(model, "teacher_maps") and cfg.eval.region_samples > 0 and not cfg.eval.perturb:
            from ltm.eval.mask_diagnostics import diagnose

            report["mask_diagnostics"], region_pictures = diagnose(
                model, folder, cfg.data.image_size, cfg.eval.region_samples, accelerator.device)
        report_files.write_report(folder_out, report, rows, pictures, mistakes, region_pictures)
        report["report_dir"] = str(folder_out)
        log.info("%s: %d frames, %d videos, frame AUC %s, %.1f images/s on %d rank(s) -> %s",
                 name, report["n_frames"], report["n_videos"], report_files.fmt(report["frame_auc"]),
                 report["images_per_s"] or 0.0, accelerator.num_processes, folder_out)
    return report


def _score_folders(accelerator, model: nn.Module, cfg: Config, source: str, run_dir, data, out_dir,
                   threshold_from=None, protocol: str | None = None) -> list[dict]:
    from ltm.eval.metrics import eer_threshold

    model = accelerator.prepare_model(model, evaluation_mode=True)  # this rank's device, no DDP wrapper
    folders = [resolve_folder(f, cfg) for f in (data or cfg.data.test)]
    if not folders:
        raise ValueError(f"{Path(run_dir) / 'config.yaml'}: data.test is empty and no --data was given")
    threshold, threshold_folder = cfg.eval.threshold, None
    if threshold_from is not None:
        threshold_folder = resolve_folder(threshold_from, cfg)
        rows, _, counts = score_folder(model, cfg, threshold_folder, accelerator, cfg.eval.batch_size, 0)
        rows = gather_rows(rows, counts)
        threshold = eer_threshold([r.label for r in rows], [r.score for r in rows])
        if threshold is None:
            raise ValueError(f"--threshold-from {str(threshold_folder)!r}: needs real and fake samples to place a "
                             "threshold")
        log.info("threshold %.4g: the EER point of %s (%d frames)", threshold, threshold_folder, len(rows))
    out_root = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"
    reports = []
    for folder in folders:
        report = score_and_report(accelerator, model, cfg, source, run_dir, folder, out_root / dataset_name(folder),
                                  threshold, threshold_folder, cross_dataset=len(folders) > 1 or protocol is not None)
        reports.append(report)
    if accelerator.is_main_process and (len(reports) > 1 or protocol is not None):
        from ltm.eval.report import crossdata
        from ltm.eval.report.html import write_html

        crossdata.write(out_root, reports, protocol)
        for folder in crossdata.report_folders(out_root, reports):  # each set's page shows the table too
            if (folder / "report.json").is_file():
                write_html(folder)
    return reports


def robustness(run_dir: str | os.PathLike, data: list[str] | None = None, tag: str | None = None,
               cfg_overrides: list[str] | None = None, weights: str | os.PathLike | None = None,
               out_dir: str | os.PathLike | None = None) -> list[dict]:
    """Each data folder clean and under every perturbation type at levels 1-5 (the model loaded once, one scoring
    pass per setting): frame and video AUC per setting in `<out>/<dataset>-<split>/robustness.{json,md,png}`, and
    the clean pass's report (report.json, report.md, ...) as a plain `ltm eval` writes it, in the same folder."""
    import dataclasses

    from ltm.data.perturb import LEVELS
    from ltm.eval.report import files as report_files

    model, cfg, source = load_model(run_dir, tag, weights, cfg_overrides, "cpu")
    out_root = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"
    results = []
    with scoring_accelerator(cfg.train.precision, timeout_min=cfg.eval.timeout_min) as accelerator:
        model = accelerator.prepare_model(model, evaluation_mode=True)
        for folder in [resolve_folder(f, cfg) for f in (data or cfg.data.test)]:
            name = dataset_name(folder)
            result: dict = {"name": name, "data": str(folder), "checkpoint": source,
                            "frames_per_video": cfg.eval.frames_per_video, "auc": {}}
            started = time.perf_counter()
            for spec in [None] + [f"{kind}:{level}" for kind in LEVELS for level in range(1, 6)]:
                if spec is None:  # the clean pass is a plain `ltm eval` of the folder: its report beside the curves
                    clean = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, perturb=None))
                    m = score_and_report(accelerator, model, clean, source, run_dir, folder, out_root / name,
                                         cfg.eval.threshold)
                else:
                    setting = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, perturb=spec))
                    rows, _, counts = score_folder(model, setting, folder, accelerator, cfg.eval.batch_size, 0)
                    rows = gather_rows(rows, counts)
                    m = compute_metrics([r.video for r in rows], [r.method for r in rows], [r.label for r in rows],
                                        [r.score for r in rows], cfg.eval.video_agg, cfg.eval.threshold)
                point = {"frame_auc": m["frame_auc"], "video_auc": m["video_auc"], "n_frames": m["n_frames"]}
                if spec is None:
                    result["clean"] = point
                else:
                    kind, level = spec.split(":")
                    result["auc"].setdefault(kind, {})[level] = point
                if accelerator.is_main_process:
                    log.info("%s %s: frame AUC %s", name, spec or "clean", report_files.fmt(m["frame_auc"]))
            result["seconds"] = round(time.perf_counter() - started, 3)
            if accelerator.is_main_process:
                report_files.write_robustness(out_root / name, result)
                result["report_dir"] = str(out_root / name)
            results.append(result)
    return results
