"""Deployment costs: the exported student against `ltm predict --run`'s PyTorch path, the student head against the
teacher's ViT head, and corpus throughput of `ltm submit predict` with 2 array tasks against 1.

1. Exported head vs PyTorch on the same face crops (real photos, centre-cropped to the config's size): images/s of
   the model call `ltm predict --run` makes (`model.predict`, eval mode) and of the exported student through
   onnxruntime and TorchScript, timed interleaved; the largest P(fake) difference (target <= 1e-4 in fp32).
2. Student vs teacher-ViT head at 224 px with the `paper` model (Xception + the 6-block ViT, random weights: the
   cost does not depend on them): images/s of `predict` per head (target >= 1.8x), and against all three heads
   (`ensemble`: the whole trained model, what inference would cost without the teacher-student split).
3. Corpus throughput on the local SLURM cluster (`slurm/local/start.sh`; skipped with `--no-slurm`): the real
   videos of the shared media scored by `ltm submit predict --array 1` and `--array 2`, from submission to merged
   table (job start-up and the merge job included): videos/minute each, and their ratio.

    python bench/predict.py                          # tiny-cpu student, 112 px; all three parts
    python bench/predict.py --no-slurm --rounds 5

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ltm.cli import main as ltm_main  # noqa: E402
from ltm.config import load_config, save_config  # noqa: E402
from ltm.deploy.exported import ExportedModel  # noqa: E402
from ltm.models import build_model  # noqa: E402

SHARED = Path(os.environ.get("LTM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def face_crops(size: int, n: int) -> torch.Tensor:
    from PIL import Image

    photos = sorted(p for p in (SHARED / "faces").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        raise SystemExit(f"no face photos under {SHARED / 'faces'} (set LTM_SHARED_DATA)")
    crops = []
    for p in photos[:n]:
        img = Image.open(p).convert("RGB")
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        crops.append(np.asarray(img.crop((left, top, left + s, top + s)).resize((size, size))))
    while len(crops) < n:
        crops += crops[: n - len(crops)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255.0)


def images_per_s(fn, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def exported_vs_pytorch(config: str, rounds: int, batch: int, work: Path) -> dict:
    cfg = load_config(config, [f"data.root={work / 'none'}"])
    run = work / "run"
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size).eval()  # ImageNet weights where they ship
    torch.save(model.state_dict(), run / "weights.pt")
    files = {}
    for fmt, suffix in (("onnx", "onnx"), ("torchscript", "pt")):
        files[fmt] = run / f"student.{suffix}"
        ltm_main(["export", "--run", str(run), "--weights", str(run / "weights.pt"), "--out", str(files[fmt])])
    exported = {fmt: ExportedModel(path) for fmt, path in files.items()}
    images = face_crops(cfg.data.image_size, batch * 4)
    batches = list(images.split(batch))
    with torch.inference_mode():
        reference = torch.cat([model.predict(b) for b in batches])
    diffs = {fmt: float((torch.cat([m.predict(b) for b in batches]) - reference).abs().max())
             for fmt, m in exported.items()}
    timings: dict[str, list[float]] = {"pytorch": [], "onnx": [], "torchscript": []}
    for _ in range(rounds):  # interleaved: machine noise hits all three alike
        with torch.inference_mode():
            timings["pytorch"].append(images_per_s(model.predict, batches))
        for fmt, m in exported.items():
            timings[fmt].append(images_per_s(m.predict, batches))
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {"config": config, "image_size": cfg.data.image_size, "batch": batch, "rounds": rounds,
            "images_per_s": med, "onnx_vs_pytorch": med["onnx"] / med["pytorch"],
            "torchscript_vs_pytorch": med["torchscript"] / med["pytorch"], "max_abs_diff": diffs,
            "bytes": {fmt: p.stat().st_size for fmt, p in files.items()}}


def student_vs_teacher_vit(rounds: int, batch: int) -> dict:
    out = {}
    images = torch.rand(batch, 3, 224, 224)
    models = {}
    for head in ("student", "teacher_vit", "ensemble"):
        cfg = load_config("paper", [f"model.inference_head={head}"])
        torch.manual_seed(0)
        models[head] = build_model(cfg.model, 224, load_weights=False).eval()
    timings: dict[str, list[float]] = {h: [] for h in models}
    with torch.inference_mode():
        for m in models.values():
            m.predict(images)  # warm-up
        for _ in range(rounds):
            for head, m in models.items():
                timings[head].append(images_per_s(m.predict, [images]))
    med = {h: statistics.median(v) for h, v in timings.items()}
    out = {"backbone": "legacy_xception + ViT 384x6", "image_size": 224, "batch": batch, "images_per_s": med,
           "student_vs_teacher_vit": med["student"] / med["teacher_vit"],
           "student_vs_whole_model": med["student"] / med["ensemble"], "target": 1.8}
    return out


def corpus_throughput(model_file: Path, work: Path, frames: int, repeat: int) -> dict:
    from launcher.submit import LaunchConfig, submit_predict, wait_for

    videos = sorted((SHARED / "videos").glob("*.mp4"))
    if not videos:
        return {"skipped": f"no videos under {SHARED / 'videos'}"}
    corpus = work / "corpus"
    corpus.mkdir(exist_ok=True)
    for k in range(repeat):  # the same clips under other names: a corpus where scoring outweighs job start-up
        for v in videos:
            (corpus / f"{k}-{v.name}").symlink_to(v)
    videos = sorted(corpus.iterdir())
    result = {"videos": len(videos), "frames_per_video": frames}
    for tasks in (1, 2):
        table = work / f"scores-{tasks}" / "corpus.csv"
        start = time.perf_counter()
        sub = submit_predict([str(corpus), "--model", str(model_file), "--frames", str(frames), "--csv", str(table)],
                             tasks,
                             LaunchConfig(cpus_per_task=1, time_min=30))
        states = wait_for([sub["parts"].job_id, sub["merge"].job_id], timeout_s=1800)
        elapsed = time.perf_counter() - start
        result[f"tasks_{tasks}"] = {"seconds": elapsed, "videos_per_min": len(videos) / elapsed * 60,
                                    "states": states}
    result["two_vs_one"] = result["tasks_2"]["videos_per_min"] / result["tasks_1"]["videos_per_min"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-cpu", help="the exported model's config (tiny-cpu)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--no-slurm", action="store_true", help="skip part 3 (the local SLURM cluster)")
    parser.add_argument("--corpus-frames", type=int, default=64, help="frames scored per video in part 3 (64)")
    parser.add_argument("--corpus-repeat", type=int, default=4,
                        help="part 3 scores the shared clips this many times over (4: 44 videos)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        work = Path(tmp)
        result = {"exported": exported_vs_pytorch(args.config, args.rounds, args.batch, work)}
        e = result["exported"]
        print(f"1. {args.config} student, {e['image_size']} px, batch {e['batch']}: PyTorch "
              f"{e['images_per_s']['pytorch']:.1f} img/s, ONNX Runtime {e['images_per_s']['onnx']:.1f} "
              f"({e['onnx_vs_pytorch']:.2f}x), TorchScript {e['images_per_s']['torchscript']:.1f} "
              f"({e['torchscript_vs_pytorch']:.2f}x); largest |dP| ONNX {e['max_abs_diff']['onnx']:.1e}, "
              f"TorchScript {e['max_abs_diff']['torchscript']:.1e} (target <= 1e-4)")
        result["heads"] = student_vs_teacher_vit(args.rounds, 8)
        h = result["heads"]
        print(f"2. paper model at 224 px, batch 8: student {h['images_per_s']['student']:.1f} img/s, teacher ViT "
              f"head {h['images_per_s']['teacher_vit']:.1f} img/s: {h['student_vs_teacher_vit']:.2f}x (target 1.8x); "
              f"all three heads (the whole model) {h['images_per_s']['ensemble']:.1f} img/s: "
              f"{h['student_vs_whole_model']:.2f}x")
        if not args.no_slurm:
            if subprocess.run(["sinfo"], capture_output=True).returncode != 0:
                subprocess.run(["bash", str(ROOT / "slurm/local/start.sh")], check=True)
                os.environ.setdefault("SLURM_CONF", "/tmp/ltm-slurm/etc/slurm.conf")
            result["corpus"] = corpus_throughput(work / "run" / "student.onnx", work, args.corpus_frames,
                                                 args.corpus_repeat)
            c = result["corpus"]
            if "skipped" not in c:
                one, two = c["tasks_1"]["videos_per_min"], c["tasks_2"]["videos_per_min"]
                print(f"3. ltm submit predict, {c['videos']} videos x {c['frames_per_video']} frames: 1 task {one:.1f} "
                      f"videos/min, "
                      f"2 tasks {two:.1f}: {c['two_vs_one']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
