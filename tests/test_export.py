"""`ltm export` and `ltm predict --model`: each head alone as ONNX and TorchScript, the same P(fake) as the trained
model, its metadata, and scoring in an environment that has none of the training stack."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from shared_data import SHARED_DATA

from ltm.cli import main
from ltm.config import load_config, save_config
from ltm.deploy.exported import ExportedModel, read_metadata
from ltm.models import build_model

REPO = Path(__file__).resolve().parents[1]
PHOTO = SHARED_DATA / "faces" / "3ddfa__examples_inputs_JianzhuGuo.jpg"
SMALL = ["model.backbone=mobilenetv3_small_050", "model.pretrained=null", "model.vit.dim=32", "model.vit.depth=1",
         "model.vit.heads=2", "data.image_size=64"]


def make_run(folder: Path, shards: Path, *overrides: str) -> Path:
    """A run folder: the config (reading the sample shards' manifest for its crops) and a weights file."""
    folder.mkdir(parents=True)
    cfg = load_config("tiny-cpu", [f"data.root={shards}", *SMALL, *overrides])
    save_config(cfg, folder / "config.yaml")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size)
    with torch.no_grad():  # as after training: BatchNorm statistics other than 0/1
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    spread_scores(model.eval())
    torch.save(model.state_dict(), folder / "weights.pt")
    return folder


def spread_scores(model: torch.nn.Module) -> None:
    """Scale and centre each head's classifier so that its logits on random images have mean 0 and std 2: the
    heads then tell images apart (an untrained head gives nearly the same P(fake) to all, and an export that got
    the input normalisation wrong could pass a comparison of near-constant outputs)."""
    images = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    if hasattr(model, "head"):  # Baseline
        heads = {"head": (model.head, lambda: model.logits(images))}
    else:
        heads = {"student": (model.student_head, lambda: model.student_head(model.pool(model.student_cnn(images),
                                                                                      None)).squeeze(1)),
                 "teacher_cnn": (model.teacher_cnn_head, lambda: model.teacher(images)["cls_logits"]),
                 "teacher_vit": (model.teacher_vit_head, lambda: model.teacher(images)["vit_logits"])}
    with torch.no_grad():
        for linear, logits in heads.values():
            linear.weight.mul_(2.0 / logits().std())
            linear.bias.sub_(logits().mean())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_shards) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("export")
    return {"ltm": make_run(tmp / "ltm", sample_shards),
            "baseline": make_run(tmp / "baseline", sample_shards, "model.kind=baseline")}


def expected_probs(run: Path, head: str, images: torch.Tensor) -> torch.Tensor:
    overrides = [] if head == "baseline" else [f"model.inference_head={head}"]
    cfg = load_config(run / "config.yaml", overrides)
    model = build_model(cfg.model, cfg.data.image_size, load_weights=False)
    model.load_state_dict(torch.load(run / "weights.pt"))
    return model.eval().predict(images)


CASES = [("ltm", head, fmt) for head in ("student", "teacher_cnn", "teacher_vit", "ensemble")
         for fmt in ("onnx", "torchscript")]
CASES += [("baseline", "baseline", "onnx"), ("baseline", "baseline", "torchscript")]


@pytest.mark.parametrize("kind,head,fmt", CASES)
def test_export_round_trip_gives_the_heads_probabilities(runs, tmp_path, capsys, kind, head, fmt):
    run = runs[kind]
    out = tmp_path / f"{head}.{'onnx' if fmt == 'onnx' else 'pt'}"
    assert main(["export", "--run", str(run), "--weights", str(run / "weights.pt"), "--head", head,
                 "--out", str(out)]) == 0
    assert "largest P(fake) difference to PyTorch" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp file left
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # batch 5: not the traced 2
    got = ExportedModel(out).predict(images)
    want = expected_probs(run, head, images)
    assert got.shape == (5,) and float((got - want).abs().max()) <= 1e-4
    assert float(want.max() - want.min()) > 0.05  # inputs that the head tells apart: a constant would not pass
    meta = read_metadata(out)
    assert meta["head"] == head and meta["format"] == fmt and meta["image_size"] == 64
    assert meta["crop"]["size"] == 112 and meta["crop"]["scale"] == 1.3  # from the sample shards' manifest
    assert meta["crop_from"].endswith("ffpp_c23/train/manifest.json") and meta["run"] == str(run.resolve())


def test_the_student_file_holds_the_student_only(runs, tmp_path):
    run = runs["ltm"]
    sizes = {}
    for head in ("student", "ensemble"):
        out = tmp_path / f"{head}.pt"
        assert main(["export", "--run", str(run), "--weights", str(run / "weights.pt"), "--head", head,
                     "--out", str(out)]) == 0
        module = torch.jit.load(str(out))
        sizes[head] = sum(p.numel() for p in module.parameters())
        names = {n for n, _ in module.named_parameters()}
        if head == "student":
            assert names and all(n.startswith(("model.student_cnn.", "model.student_head.")) for n in names), names
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg.model, 64, load_weights=False)
    student = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("student_cnn.", "student_head.")))
    assert sizes["student"] == student < sizes["ensemble"] == sum(p.numel() for p in model.parameters())


def test_export_errors_are_one_line(runs, tmp_path, caplog):
    run = runs["baseline"]
    args = ["export", "--run", str(run), "--weights", str(run / "weights.pt")]
    assert main([*args, "--head", "student", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--head student: a baseline run has the heads baseline" in caplog.text
    assert main([*args, "--out", str(tmp_path / "x.bin")]) == 2
    assert "say --format onnx|torchscript or use a .onnx / .pt suffix" in caplog.text
    assert main(["predict", str(PHOTO), "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "missing.onnx: no such file" in caplog.text
    not_a_model = tmp_path / "fake.onnx"
    not_a_model.write_bytes(b"not onnx")
    assert main(["predict", str(PHOTO), "--model", str(not_a_model)]) == 2
    assert "fake.onnx: not a loadable ONNX model" in caplog.text
    assert main(["predict", str(PHOTO), "--model", str(not_a_model), "--run", str(run)]) == 2
    assert "give --run RUN_FOLDER (a training run) or --model FILE" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["fake.onnx"]  # the refused exports wrote nothing


def predict_json(*argv: str, env: dict | None = None, python: str = sys.executable) -> dict:
    proc = subprocess.run([python, "-m", "ltm.cli", "predict", str(PHOTO), "--json", *argv], capture_output=True,
                          text=True, timeout=600, env=env or {**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the slim environment: only `ltm[predict]`'s dependencies, no DeepSpeed / DALI / timm / accelerate ------------

def predict_requirements() -> list[str]:
    """The `predict` extra of pyproject.toml, plus facenet-pytorch and requests (installed --no-deps, see README)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["optional-dependencies"]["predict"], "facenet-pytorch", "requests"]


def closure(requirements: list[str]) -> set[str]:
    """Distribution names these requirements pull in, transitively, as installed here (markers evaluated)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in seen:
            continue
        dist = metadata.distribution(req.name)
        seen.add(name)
        if req.name.lower() == "facenet-pytorch":
            continue  # installed --no-deps: its pins would replace torch
        for text in dist.requires or []:
            dep = Requirement(text)
            if dep.marker is None or dep.marker.evaluate({"extra": ""}):
                todo.append(dep)
    return seen


@pytest.fixture(scope="module")
def slim_python(tmp_path_factory) -> str:
    """A fresh venv whose site-packages holds exactly the predict closure (linked from this environment's files)
    and ltm from the source tree: what `pip install 'ltm[predict]'` gives a deployment machine."""
    venv = tmp_path_factory.mktemp("slim") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    for name in closure(predict_requirements()):
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        root = Path(dist.locate_file(""))
        for top in tops:
            if not (site / top).exists() and (root / top).exists():
                (site / top).symlink_to(root / top)
    (site / "ltm-source.pth").write_text(str(REPO) + "\n")
    return str(venv / "bin" / "python")


def test_slim_environment_lacks_the_training_stack(slim_python):
    for module in ("deepspeed", "nvidia.dali", "timm", "accelerate", "submitit", "webdataset", "sklearn"):
        proc = subprocess.run([slim_python, "-c", f"import {module}"], capture_output=True, text=True, env={})
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, module


def test_predict_with_an_exported_model_in_the_slim_environment_equals_predict_with_the_run(runs, tmp_path,
                                                                                            slim_python):
    run = runs["ltm"]
    out = tmp_path / "student.onnx"
    assert main(["export", "--run", str(run), "--weights", str(run / "weights.pt"), "--out", str(out)]) == 0
    full = predict_json("--run", str(run), "--weights", str(run / "weights.pt"))
    bare = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # nothing of this environment's PYTHONPATH
    slim = predict_json("--model", str(out), python=slim_python, env=bare)
    assert slim["n_frames"] == full["n_frames"] == 1
    assert slim["frames"][0]["box"] == full["frames"][0]["box"]  # the same face, cut with the manifest's recipe
    assert abs(slim["p_fake"] - full["p_fake"]) <= 1e-4
    torchscript = tmp_path / "student.pt"
    assert main(["export", "--run", str(run), "--weights", str(run / "weights.pt"), "--out", str(torchscript)]) == 0
    ts = predict_json("--model", str(torchscript), python=slim_python, env=bare)
    assert abs(ts["p_fake"] - full["p_fake"]) <= 1e-4
