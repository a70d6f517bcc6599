"""Prep throughput: face crops per second per CPU core, ltm prep's path vs a DeepfakeBench-style path, same clip.

    ltm prep path:   PyAV decode of the N sampled frames only (seeking where the GOP allows, no colour conversion
                     of skipped frames), MTCNN batched over the frames (on a copy scaled to `--detect-side`),
                     1.3x square crop, resize, JPEG q95.
    DeepfakeBench:   OpenCV VideoCapture reads (decodes and converts) every frame, the N evenly spaced frames go
                     through dlib's HOG detector with one upsampling (as DeepfakeBench's preprocess.py calls it),
                     the same crop, resize and JPEG q95 (cv2.imencode).

Each path runs in this process with one intra-op thread; its CPU time (process_time: all of the process's threads)
gives frames per core-second, so the figures hold on a busy machine. Wall-clock figures are printed beside them.

    .venv/bin/python bench/prep.py [--video PATH] [--frames 32] [--repeats 3]

Last line: one JSON object with the raw figures, "ratio" (ltm frames per core-second / baseline's) and "target" (3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_VIDEO = "/work/shared/data/ffpp-sample/original_sequences/youtube/c23/videos/519.mp4"


def ltm_path(video: str, n: int, detector, size: int = 224) -> int:
    from data_prep.shards import jpeg_bytes
    from data_prep.video import sample_frames

    frames = sample_frames(video, n)
    faces = detector.crop([f for _, f in frames], size, 1.3)
    return sum(1 for f in faces if f is not None and jpeg_bytes(f.crop, 95))


def deepfakebench_path(video: str, n: int, dlib_detector, size: int = 224) -> int:
    from data_prep.faces import square_box

    cap = cv2.VideoCapture(video)
    frames = []
    while True:
        ok, frame = cap.read()  # every frame decoded and converted to BGR
        if not ok:
            break
        frames.append(frame)
    cap.release()
    idx = np.linspace(0, len(frames) - 1, n, dtype=int)
    made = 0
    for i in idx:
        rgb = cv2.cvtColor(frames[i], cv2.COLOR_BGR2RGB)
        dets = dlib_detector(rgb, 1)  # DeepfakeBench: face_detector(rgb, 1)
        if len(dets) == 0:
            continue
        d = max(dets, key=lambda r: r.width() * r.height())
        h, w = rgb.shape[:2]
        x0, y0, x1, y1 = square_box((d.left(), d.top(), d.right(), d.bottom()), 1.3, w, h)
        crop = cv2.resize(frames[i][y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_CUBIC)
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
        made += int(ok)
    return made


def measure(fn, repeats: int) -> dict:
    fn()  # warm-up (model load, page cache)
    best_cpu, best_wall, made = float("inf"), float("inf"), 0
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        made = fn()
        best_cpu = min(best_cpu, time.process_time() - c0)
        best_wall = min(best_wall, time.perf_counter() - w0)
    return {"faces": made, "cpu_s": round(best_cpu, 3), "wall_s": round(best_wall, 3),
            "fps_per_core": round(made / best_cpu, 2), "fps_wall": round(made / best_wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", default=DEFAULT_VIDEO)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--detect-side", type=int, default=320, help="as `ltm prep --detect-side` (320)")
    ap.add_argument("--min-face", type=int, default=32, help="as `ltm prep --min-face` (32)")
    args = ap.parse_args()
    if not Path(args.video).is_file():
        sys.exit(f"benchmark video not found: {args.video} (pass --video)")

    import dlib
    import torch

    from data_prep.faces import build_detector
    from data_prep.video import probe

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    info = probe(args.video)
    mtcnn = build_detector("mtcnn", "cpu", detect_side=args.detect_side, min_face=args.min_face)
    hog = dlib.get_frontal_face_detector()
    ours = measure(lambda: ltm_path(args.video, args.frames, mtcnn), args.repeats)
    base = measure(lambda: deepfakebench_path(args.video, args.frames, hog), args.repeats)
    ratio = ours["fps_per_core"] / base["fps_per_core"]

    print(f"video {args.video}: {info.frames} frames {info.width}x{info.height} @ {info.fps:g} fps; "
          f"{args.frames} crops per pass, best of {args.repeats}")
    print(f"{'pipeline':<34}{'faces':>6}{'cpu s':>8}{'wall s':>8}{'crops/core-s':>14}{'crops/s wall':>14}")
    for name, r in (("ltm prep (PyAV seek + MTCNN)", ours), ("DeepfakeBench (OpenCV all + dlib)", base)):
        print(f"{name:<34}{r['faces']:>6}{r['cpu_s']:>8}{r['wall_s']:>8}{r['fps_per_core']:>14}{r['fps_wall']:>14}")
    print(f"ratio (crops per core-second): {ratio:.2f}x, target >= 3x")
    print(json.dumps({"bench": "prep", "video": args.video, "video_frames": info.frames, "frames": args.frames,
                      "ltm": ours, "deepfakebench": base, "ratio": round(ratio, 3), "target": 3.0}))


if __name__ == "__main__":
    main()
