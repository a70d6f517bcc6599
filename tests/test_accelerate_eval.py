"""`accelerate launch --num_processes 2 -m ltm.cli eval ...` on 2 CPU processes gives the report of `ltm eval` on one:
every sample scored once, the same scores and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import SHARED_DATA

from ltm.config import load_config, save_config
from ltm.eval.report.files import read_scores
from ltm.launch import DIST_VARS, free_port
from ltm.models import build_model

REPO = Path(__file__).resolve().parents[1]
METHODS = {"real": 6, "FaceSwap": 5}  # 11 samples: 6 + 5 over 2 ranks, the split falls inside a method folder


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    return env


@pytest.fixture(scope="module")
def run_and_shards(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny-cpu run folder (config + consolidated weights) and `<root>/acc/test/{real,FaceSwap}` face shards."""
    from data_prep.shards import jpeg_bytes, write_shards

    root = tmp_path_factory.mktemp("acc")
    faces = sorted((SHARED_DATA / "faces").glob("*.jpg"))[: sum(METHODS.values())]
    assert len(faces) == sum(METHODS.values()), f"need real face photos in {SHARED_DATA / 'faces'}"
    names = [m for m, n in METHODS.items() for _ in range(n)]
    by_method: dict[str, list[dict]] = {}
    for i, (path, method) in enumerate(zip(faces, names)):
        img = Image.open(path).convert("RGB").resize((64, 64))
        video, label = f"{method[:4]}{i // 2}", int(method != "real")
        by_method.setdefault(method, []).append({
            "__key__": f"{video}-{i:06d}", "jpg": jpeg_bytes(np.asarray(img)), "cls": label,
            "json": {"dataset": "acc", "split": "test", "video": video, "frame": i, "label": label,
                     "method": method}})
    for method, samples in by_method.items():
        folder = root / "shards" / "acc" / "test" / method
        folder.mkdir(parents=True)
        write_shards(samples, folder, f"acc-test-{method}", max_samples=3)
    run = root / "run"
    run.mkdir()
    cfg = load_config("tiny-cpu", [f"data.root={root / 'shards'}", "data.image_size=64", "data.loader=dali",
                                   "eval.batch_size=4", "eval.attention_samples=1"])
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.data.image_size).state_dict(), run / "weights.pt")
    return run, root / "shards"


def test_accelerate_launch_two_processes_equals_one(run_and_shards, tmp_path):
    run, shards = run_and_shards
    args = ["-m", "ltm.cli", "eval", "--run", str(run), "--weights", str(run / "weights.pt"), "--data", "acc/test"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=clean_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    # --multi_gpu: torchrun-style ranks (accelerate's --cpu alone starts one process unless MPI is set up); without
    # CUDA each rank's Accelerator joins a gloo group
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], env=clean_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # one process printed the table and the paths: the main one
    assert two.stdout.count("report.json") == 1, two.stdout
    assert two.stdout.strip().splitlines()[-1] == str(tmp_path / "two" / "acc-test" / "report.json")

    r1 = json.loads((tmp_path / "one" / "acc-test" / "report.json").read_text())
    r2 = json.loads((tmp_path / "two" / "acc-test" / "report.json").read_text())
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    for key in ("frame_auc", "video_auc", "ap", "eer", "acc"):
        assert r2[key] == pytest.approx(r1[key], abs=1e-6), key
    assert r1["n_frames"] == r2["n_frames"] == sum(METHODS.values()) and r1["n_videos"] == r2["n_videos"]
    assert r1["per_method"].keys() == r2["per_method"].keys()

    s1 = read_scores(tmp_path / "one" / "acc-test" / "scores.csv")
    s2 = read_scores(tmp_path / "two" / "acc-test" / "scores.csv")
    keys2 = [r["key"] for r in s2]
    assert len(keys2) == len(set(keys2)) == sum(METHODS.values())  # none dropped, none twice
    assert [r["key"] for r in s1] == keys2
    for a, b in zip(s1, s2):
        assert (a["video"], a["method"], a["label"]) == (b["video"], b["method"], b["label"])
        assert abs(a["score"] - b["score"]) < 1e-5
