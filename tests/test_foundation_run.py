"""The ViT path end to end, as a user runs it: `vit-tiny-cpu` (random-init ViT student and teacher backbone, the
teacher's mask dropping the student's tokens) trained by `ltm train` on 2 DeepSpeed ranks over the sample shards,
resumed from an earlier checkpoint to the same weights, scored by `ltm eval` with its attention gallery and mask
diagnostics on the 7x7 token grid, exported, and used by `ltm predict`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from shared_data import SHARED_DATA

from ltm.checkpoint.checkpointer import tag_for
from ltm.cli import main
from ltm.deploy.exported import ExportedModel

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(name, None)
PHOTO = SHARED_DATA / "faces" / "3ddfa__examples_inputs_JianzhuGuo.jpg"
STEPS = 6

pytestmark = pytest.mark.timeout(900)


def ltm(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ltm.cli", *args], env=ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def train(run_dir: Path, shards: Path) -> subprocess.CompletedProcess:
    return ltm("train", "--config", "vit-tiny-cpu", "--nproc", "2", f"data.root={shards}",
               f"train.run_dir={run_dir}", "train.iters_per_epoch=3", "train.epochs=2", "train.warmup_steps=2",
               "train.log_every=1", "train.val_every=3", "train.ckpt_every=3", "data.loader=reference",
               "data.num_threads=0")


def module_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / tag_for(step) / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)["module"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory, sample_shards) -> Path:
    run = tmp_path_factory.mktemp("vit-tiny") / "run"
    out = train(run, sample_shards)
    assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == STEPS
    return run


def test_the_run_trains_the_token_masked_vit_and_logs_its_parameters(vit_run):
    records = [json.loads(line) for line in (vit_run / "metrics.jsonl").read_text().splitlines()]
    params = [r for r in records if r["type"] == "params"]
    assert params and params[0]["student"]["trainable"] == params[0]["student"]["total"] > 1_000_000
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    lrs = [r["lr"] for r in train_records]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warm-up, then the cosine decay
    state = module_state(vit_run, STEPS)
    assert "student_cnn.net.blocks.3.attn.qkv.weight" in state and "student_cnn.net.pos_embed" in state
    assert state["student_cnn.net.pos_embed"].shape[1] == 1 + 7 * 7  # sized for 112 px, not the default 224


def test_resuming_from_the_middle_reaches_the_same_weights(vit_run, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(vit_run, run)
    shutil.rmtree(run / "checkpoints" / tag_for(STEPS))
    (run / "checkpoints" / "latest").write_text(tag_for(3))
    config = run / "config.yaml"
    config.write_text(config.read_text().replace(str(vit_run), str(run)))
    resumed = ltm("train", "--config", str(config), "--nproc", "2")
    assert "resum" in resumed.stderr.lower()
    a, b = module_state(vit_run, STEPS), module_state(run, STEPS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_draws_the_token_grid_and_measures_the_mask(vit_run, sample_shards, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(vit_run), "--data", "ffpp_c23/test"]) == 0  # one rank: in this process
    report_json = Path(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads(report_json.read_text())
    assert report["n_frames"] > 0 and 0.0 <= report["frame_auc"] <= 1.0
    diagnostics = report["mask_diagnostics"]
    assert diagnostics["grid"] == [7, 7] and diagnostics["k"] == 12  # round(0.25 * 49) tokens
    assert {"FaceSwap", "SelfBlend"} <= set(diagnostics["per_method"])
    pictures = [report_json.parent / p for p in report["attention"]]
    assert len(pictures) == 8 and all(p.is_file() for p in pictures)  # 4 per label
    width, height = Image.open(pictures[0]).size
    assert width > 300 and height > 150


def test_export_and_predict_score_as_the_run(vit_run, tmp_path, capsys):
    out = tmp_path / "student.onnx"
    assert main(["export", "--run", str(vit_run), "--head", "student", "--out", str(out)]) == 0
    assert "largest P(fake) difference to PyTorch" in capsys.readouterr().out
    from ltm.checkpoint.reader import load_model

    model, cfg = load_model(vit_run)[:2]
    images = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval().predict(images)
    got = ExportedModel(out).predict(images)
    assert float((got - want).abs().max()) <= 1e-4
    capsys.readouterr()
    assert main(["predict", str(PHOTO), "--model", str(out)]) == 0
    by_model = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["predict", str(PHOTO), "--run", str(vit_run)]) == 0
    by_run = capsys.readouterr().out.strip().splitlines()[-1]
    p_model = float(by_model.split("P(fake) = ")[1].split()[0])
    p_run = float(by_run.split("P(fake) = ")[1].split()[0])
    assert p_model == pytest.approx(p_run, abs=1e-3)
