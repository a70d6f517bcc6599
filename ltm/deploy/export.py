"""`ltm export`: one inference head of a trained run, alone, as ONNX or TorchScript.

    ltm export --run runs/x --format onnx --out student.onnx                  # the paper's inference head
    ltm export --run runs/x --head teacher_cnn --format torchscript --out t.pt
    ltm predict video.mp4 --model student.onnx                                # no DeepSpeed, DALI or timm needed

The method's point is that inference needs the student only (Sec. 3.3): one CNN and its classifier. The file holds
just the modules the chosen head runs (the student head drops the teacher CNN and the ViT), the backbone's input
normalisation inside (input: RGB float in [0, 1], NCHW), a dynamic batch axis, and metadata: image size, the crop
recipe of the run's training shards (so `ltm predict --model` cuts faces as prep did), detector, decision threshold,
frames per video and video aggregation, run, checkpoint and ltm version. After writing, the file is loaded back
and compared with the PyTorch head on a batch of another size; the largest difference is printed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ltm.deploy.exported import FORMATS, META_KEY, TORCHSCRIPT_META, ExportedModel, ExportError

log = logging.getLogger(__name__)

HEADS = {"ltm": ("student", "teacher_cnn", "teacher_vit", "ensemble"), "baseline": ("baseline",)}
# what each head of LearningToMask.predict does not run: left out of the file
UNUSED = {"student": ("teacher_cnn", "teacher_vit", "teacher_cnn_head", "teacher_vit_head"),
          "teacher_cnn": ("student_cnn", "student_head"), "teacher_vit": ("student_cnn", "student_head"),
          "ensemble": ()}
DEFAULT_OPSET = 18


class InferenceHead(nn.Module):
    """images (B, 3, S, S) RGB float in [0, 1] -> P(fake) (B,): the model's own `predict` for one head, with the
    modules that head does not run removed and (`merge`) a `model.tune=lora` run's adapters folded into their base
    layers, so the file holds plain timm layers and no `lora_` weights."""

    def __init__(self, model: nn.Module, head: str, merge: bool = True) -> None:
        super().__init__()
        model = copy.deepcopy(model).eval()
        if head != "baseline":
            model.cfg = dataclasses.replace(model.cfg, inference_head=head)
            for name in UNUSED[head]:
                delattr(model, name)
            if hasattr(model, "forwards"):  # the mask warm-up's training counter
                del model.forwards
        if merge:
            from ltm.models.tuning import merge_lora  # timm and peft: not for the light `predict --model` path

            merged = merge_lora(model)
            if merged:
                log.info("merged the LoRA adapters of %d layers into their weights", merged)
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict(images)


def choose_head(kind: str, asked: str | None, configured: str) -> str:
    heads = HEADS[kind]
    head = asked or (configured if kind == "ltm" else "baseline")
    if head not in heads:
        raise ExportError(f"--head {head}: a {kind} run has the heads {', '.join(heads)}")
    return head


def metadata(run_dir: str | os.PathLike, source: str, cfg, head: str, fmt: str) -> dict[str, Any]:
    from ltm import __version__
    from ltm.deploy.predict import crop_settings

    crop = crop_settings(cfg)
    return {
        "format": fmt, "head": head, "kind": cfg.model.kind, "backbone": cfg.model.backbone,
        "teacher_backbone": cfg.model.teacher_backbone, "image_size": cfg.data.image_size,
        "input": "images: float32 (batch, 3, image_size, image_size), RGB in [0, 1]; normalisation inside",
        "output": "p_fake: float32 (batch,)",
        "crop": {k: v for k, v in dataclasses.asdict(crop).items() if k != "source"}, "crop_from": crop.source,
        "threshold": cfg.eval.threshold, "threshold_from": "config eval.threshold",
        "video_agg": cfg.eval.video_agg,
        "run": str(Path(run_dir).resolve()), "run_name": Path(run_dir).resolve().name, "checkpoint": source,
        "ltm_version": __version__, "torch_version": torch.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _write_onnx(module: nn.Module, example: torch.Tensor, meta: dict, tmp: Path, opset: int) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():  # an inference graph: the trace records no autograd state, which shortens export by ~40%
        program = torch.onnx.export(module, (example,), input_names=["images"], output_names=["p_fake"],
                                    dynamic_shapes=({0: batch},), dynamo=True, opset_version=opset, verbose=False)
    program.save(str(tmp))
    proto = onnx.load(str(tmp))
    proto.metadata_props.add(key=META_KEY, value=json.dumps(meta, sort_keys=True))
    proto.doc_string = f"ltm {meta['head']} head of {meta['run_name']}: P(fake) from face crops"
    onnx.save(proto, str(tmp))


def _write_torchscript(module: nn.Module, example: torch.Tensor, meta: dict, tmp: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape arithmetic the check below verifies
        traced = torch.jit.trace(module, (example,), check_trace=False)
    torch.jit.save(traced, str(tmp), _extra_files={TORCHSCRIPT_META: json.dumps(meta, sort_keys=True)})


def export(run_dir: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None, head: str | None = None,
           tag: str | None = None, weights: str | os.PathLike | None = None, opset: int = DEFAULT_OPSET) -> dict:
    """Write one head of a run to `out` (format from `fmt` or the suffix) and check it against PyTorch.
    Returns the metadata plus `max_abs_diff` (largest |P(fake)| difference on a check batch)."""
    from ltm.checkpoint.reader import load_model

    out = Path(out)
    fmt = fmt or FORMATS.get(out.suffix.lower())
    if fmt not in ("onnx", "torchscript"):
        raise ExportError(f"--out {out}: say --format onnx|torchscript or use a .onnx / .pt suffix")
    model, cfg, source = load_model(run_dir, tag, weights, None, "cpu")
    head = choose_head(cfg.model.kind, head, getattr(cfg.model, "inference_head", "student"))
    module = InferenceHead(model, head).eval()
    # the reference is the run's own model, adapters unmerged: the check below then covers the merge as well
    reference = InferenceHead(model, head, merge=False).eval()
    meta = metadata(run_dir, source, cfg, head, fmt)
    size = cfg.data.image_size
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=generator)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp{os.getpid()}-{out.name}")  # same suffix: the check below loads it as `out`
    check = torch.rand(3, 3, size, size, generator=generator)  # another batch size: the batch axis is dynamic
    try:
        if fmt == "onnx":
            _write_onnx(module, example, meta, tmp, opset)
        else:
            _write_torchscript(module, example, meta, tmp)
        with torch.no_grad():
            expected = reference(check).float()
        got = ExportedModel(tmp).predict(check)
    except Exception as exc:  # the exporters raise many types; one line naming what failed
        tmp.unlink(missing_ok=True)
        if isinstance(exc, ExportError):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{cfg.model.backbone} ({head} head) cannot be exported to {fmt}: "
                          f"{type(exc).__name__}: {first}") from None
    diff = float((got - expected).abs().max())
    if got.shape != expected.shape or not diff <= 1e-3:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{out}: the exported {head} head disagrees with PyTorch (largest P(fake) difference "
                          f"{diff:.3g} on a batch of 3); nothing written")
    os.replace(tmp, out)
    meta["max_abs_diff"] = diff
    meta["bytes"] = out.stat().st_size
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--tag", help="checkpoint tag (default: checkpoints/latest)")
    parser.add_argument("--weights", help="a consolidated fp32 state-dict file instead of a tag")
    parser.add_argument("--head", help="student | teacher_cnn | teacher_vit | ensemble for LTM runs (default: the "
                        "config's model.inference_head, the student); baseline for Baseline runs")
    parser.add_argument("--format", choices=["onnx", "torchscript"], help="default: from --out's suffix "
                        "(.onnx; .pt or .ts for TorchScript)")
    parser.add_argument("--out", required=True, help="file to write (atomically)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({DEFAULT_OPSET})")


def run(args: argparse.Namespace) -> int:
    meta = export(args.run, args.out, args.format, args.head, args.tag, args.weights, args.opset)
    print(f"{args.out}: {meta['head']} head of {meta['run_name']} ({meta['backbone']}, {meta['image_size']} px), "
          f"{meta['format']}, {meta['bytes'] / 1e6:.1f} MB; largest P(fake) difference to PyTorch "
          f"{meta['max_abs_diff']:.2e}")
    return 0
