"""model.tune (full | ln | lora | last_k) on real timm backbones with real peft, AdamW's groups and the cosine
schedule, and a LoRA run end to end on real DeepSpeed: what trains, its logged counts, resume at the right rate,
and an export with the adapters merged that scores as the run does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
from test_train import records, shards, write_config  # noqa: F401  (shards: the synthetic shard fixture)
from torch import nn

from ltm.checkpoint.checkpointer import tag_for
from ltm.config import load_config
from ltm.models import build_model
from ltm.models.tuning import TuningError, apply_tuning, merge_lora
from ltm.train.trainer import build_optimizer, cosine_factor

pytestmark = pytest.mark.timeout(600)

VIT_BLOCK = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
SMALL = ["model.backbone=mobilenetv3_small_050", "model.pretrained=null", "model.vit.dim=32", "model.vit.depth=1",
         "model.vit.heads=2", "data.image_size=64"]


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0, global_pool="")


class Holder(nn.Module):
    """A timm model where a Backbone keeps it (`.net`), and what always trains beside a backbone."""

    def __init__(self, net: nn.Module, token: bool = False):
        super().__init__()
        self.net = net
        if token:
            self.mask_token = nn.Parameter(torch.zeros(net.embed_dim))


class VitBaseline(nn.Module):
    """A Baseline's layout (backbone.net + head) around a ViT: tokens mean-pooled into a linear head."""

    def __init__(self):
        super().__init__()
        self.backbone = Holder(tiny_vit())
        self.head = nn.Linear(192, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.net.forward_features(images).mean(1)).squeeze(1)


class VitLTM(nn.Module):
    """LearningToMask's layout (student_cnn / teacher_cnn with .net, teacher_vit, heads, a student mask token)."""

    def __init__(self):
        super().__init__()
        self.student_cnn = Holder(tiny_vit(), token=True)
        self.teacher_cnn = Holder(tiny_vit())
        self.teacher_vit = nn.Sequential(nn.Linear(192, 16), nn.LayerNorm(16))
        self.teacher_cnn_head = nn.Linear(192, 1)
        self.teacher_vit_head = nn.Linear(16, 1)
        self.student_head = nn.Linear(192, 1)


def model_cfg(*overrides: str):
    return load_config("tiny-cpu", list(overrides)).model


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


BASELINE_HEAD = {"head.weight", "head.bias"}


def test_ln_trains_the_layernorms_only():
    model = VitBaseline()
    counts = apply_tuning(model, model_cfg("model.tune=ln"))
    norms = {f"backbone.net.blocks.{i}.{n}.{w}" for i in (0, 1) for n in ("norm1", "norm2") for w in ("weight", "bias")}
    norms |= {"backbone.net.norm.weight", "backbone.net.norm.bias"}
    assert trainable(model) == norms | BASELINE_HEAD
    assert counts["student"] == {"trainable": 5 * 192 * 2, "total": sum(p.numel() for p in model.backbone.parameters())}
    assert counts["model"]["trainable"] == 5 * 192 * 2 + 193


def test_last_k_trains_the_last_blocks_and_the_final_norm():
    model = VitBaseline()
    apply_tuning(model, model_cfg("model.tune=last_k", "model.tune_last_k=1"))
    assert trainable(model) == ({f"backbone.net.blocks.1.{n}" for n in VIT_BLOCK}
                                | {"backbone.net.norm.weight", "backbone.net.norm.bias"} | BASELINE_HEAD)


def test_lora_trains_the_adapters_of_the_attention_layers_only():
    model = VitBaseline()
    counts = apply_tuning(model, model_cfg("model.tune=lora", "model.lora.rank=4"))
    adapters = {f"backbone.net.blocks.{i}.attn.{layer}.lora_{ab}.default.weight"
                for i in (0, 1) for layer in ("qkv", "proj") for ab in "AB"}
    assert trainable(model) == adapters | BASELINE_HEAD  # `proj` is the attention's, not the patch embedding's conv
    # rank 4: qkv 192 -> 4 -> 576, proj 192 -> 4 -> 192, in two blocks
    assert counts["student"]["trainable"] == 2 * (4 * (192 + 576) + 4 * (192 + 192))


def test_full_trains_everything_and_roles_follow_the_teacher_setting():
    model = VitLTM()
    counts = apply_tuning(model, model_cfg("model.tune=ln", "model.teacher_tune=full"))
    names = trainable(model)
    assert {n for n, _ in model.teacher_cnn.named_parameters(prefix="teacher_cnn")} <= names
    student = {n for n in names if n.startswith("student_cnn.net.")}
    assert student and all(".norm" in n for n in student)
    # what starts from random weights always trains: heads, the teacher's ViT, the student's mask token
    always = {n for n, _ in model.named_parameters() if not n.startswith(("student_cnn.net.", "teacher_cnn.net."))}
    assert "student_cnn.mask_token" in always and always <= names
    assert counts["teacher"]["trainable"] == counts["teacher"]["total"]
    assert counts["student"]["trainable"] == 5 * 192 * 2
    # teacher_tune null follows model.tune
    model = VitLTM()
    apply_tuning(model, model_cfg("model.tune=last_k", "model.tune_last_k=1"))
    assert {n for n in trainable(model) if n.startswith("teacher_cnn.net.")} == \
        {f"teacher_cnn.net.{n}" for n in (*(f"blocks.1.{b}" for b in VIT_BLOCK), "norm.weight", "norm.bias")}


def test_build_model_tunes_a_cnn_ltm():
    """The real LearningToMask on a CNN: `ln` keeps the student's BatchNorm scale and shift, nothing else of it."""
    model = build_model(load_config("tiny-cpu", [*SMALL, "model.tune=ln", "model.teacher_tune=lora",
                                                 "model.lora.targets=[conv_pw,conv_pwl]"]).model, 64)
    names = trainable(model)
    bn = {n for n, m in model.student_cnn.net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert {n for n in names if n.startswith("student_cnn.net.")} == \
        {f"student_cnn.net.{m}.{w}" for m in bn for w in ("weight", "bias")}
    teacher = {n for n in names if n.startswith("teacher_cnn.net.")}
    assert teacher and all(".lora_" in n and (".conv_pw." in n or ".conv_pwl." in n) for n in teacher)
    assert {n for n, _ in model.named_parameters() if n.startswith(("teacher_vit.", "student_head."))} <= names


def test_errors_name_the_setting():
    with pytest.raises(TuningError, match=r"model.tune=last_k: .* no `blocks`"):
        build_model(load_config("tiny-cpu", [*SMALL, "model.kind=baseline", "model.backbone=resnet10t",
                                             "model.tune=last_k"]).model, 64)
    with pytest.raises(TuningError, match=r"model.teacher_tune=lora: model.lora.targets \['qkv', 'proj'\] match no"):
        build_model(load_config("tiny-cpu", [*SMALL, "model.teacher_tune=lora"]).model, 64)
    with pytest.raises(TuningError, match="model.tune_last_k=9"):
        apply_tuning(VitBaseline(), model_cfg("model.tune=last_k", "model.tune_last_k=9"))


def test_merge_lora_gives_the_same_outputs_and_timm_keys():
    model = VitBaseline()
    apply_tuning(model, model_cfg("model.tune=lora", "model.lora.targets=[qkv,proj,fc1,fc2]"))
    with torch.no_grad():  # as after training: adapters that change the output (peft starts B at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(images)
        assert merge_lora(model) == 8
        after = model(images)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = VitBaseline().eval()(images)
    assert float((before - plain).abs().max()) > 1e-3  # the adapters did change the output
    assert set(model.backbone.net.state_dict()) == set(tiny_vit().state_dict())  # no base_layer., no lora_


def optimizer_for(model: nn.Module, *overrides: str):
    return build_optimizer(model, load_config("tiny-cpu", ["train.optimizer=adamw", *overrides]))


def test_adamw_groups_decay_weights_only_and_hold_no_frozen_parameter():
    model = VitLTM()
    apply_tuning(model, model_cfg("model.tune=lora", "model.teacher_tune=full"))
    optimizer, _ = optimizer_for(model, "train.weight_decay=0.05", "train.student_lr_scale=2", "train.lr=1e-3",
                                 "train.betas=[0.8,0.99]")
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"], g["betas"])
              for g in optimizer.param_groups]
    assert all(betas == (0.8, 0.99) for *_, betas in groups)
    in_groups = set().union(*(g[0] for g in groups))
    assert in_groups == trainable(model) and sum(len(g[0]) for g in groups) == len(in_groups)
    student = {n for n in in_groups if n.startswith(("student_cnn.", "student_head."))}
    no_decay = {n for n in in_groups if n.endswith((".bias", "norm1.weight", "norm2.weight", "norm.weight",
                                                     "pos_embed", "cls_token", "mask_token", "teacher_vit.1.weight"))}
    assert {"teacher_cnn.net.pos_embed", "teacher_cnn.net.cls_token", "student_cnn.mask_token"} <= no_decay
    expected = [(in_groups - student - no_decay, 1e-3, 0.05), ((in_groups - student) & no_decay, 1e-3, 0.0),
                (student - no_decay, 2e-3, 0.05), (student & no_decay, 2e-3, 0.0)]
    assert [g[:3] for g in groups] == [(n, pytest.approx(lr), wd) for n, lr, wd in expected]


def test_an_adamw_step_moves_what_trains_and_nothing_frozen():
    model = VitBaseline()
    apply_tuning(model, model_cfg("model.tune=lora"))
    optimizer, _ = optimizer_for(model, "train.weight_decay=0.5", "train.lr=1e-2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable(model)  # lora_A too: its gradient is 0 while B is, but weight decay moves it


def test_cosine_schedule_warms_up_then_decays_to_zero():
    model = VitBaseline()
    optimizer, scheduler = optimizer_for(model, "train.schedule=cosine", "train.warmup_steps=4", "train.lr=1e-3",
                                         "train.epochs=2", "train.iters_per_epoch=12")
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    lrs = []
    for _ in range(24):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])  # warm-up: no step at 0, lr at step 4
    assert lrs[14] == pytest.approx(5e-4)  # half-way through the 20 cosine steps
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and 0 < lrs[-1] < 1e-5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # at epochs x iters_per_epoch
    assert cosine_factor(99, 4, 24) == 0.0


# ------------------------------------------------------------------------------------------------ a LoRA run

LORA_RUN = ["data.val=[]", "model.tune=lora", "model.lora.targets=[conv_pw,conv_pwl]", "model.teacher_tune=ln",
            "train.optimizer=adamw", "train.schedule=cosine", "train.warmup_steps=1", "train.lr=1e-3",
            "train.weight_decay=0.05"]


def lora_config(tmp_path: Path, shards: Path, run_dir: Path):  # noqa: F811
    # ZeRO-2: DeepSpeed stores frozen parameters beside the partitioned fp32 weights at stage 2 only, and
    # ltm.checkpoint.reader reads ZeRO-1/2 tags through that store
    return load_config(write_config(tmp_path, shards, run_dir, iters_per_epoch=4, epochs=1, log_every=1, val_every=0,
                                    ckpt_every=2, zero_stage=2), LORA_RUN)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, shards) -> dict:  # noqa: F811
    """4 steps of ZeRO-2 DeepSpeed training, AdamW and cosine, of a LoRA student and a teacher whose BatchNorms
    alone train (`ln` on a CNN), checkpoints at steps 2 and 4: its parameters before and after, and which froze."""
    from ltm.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("lora")
    trainer = Trainer(lora_config(tmp, shards, tmp / "run"))
    module = trainer.engine.module
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.fit()
    after = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.close()
    return {"run_dir": tmp / "run", "tmp": tmp, "frozen": frozen, "before": before, "after": after}


def test_lora_run_trains_only_its_adapters_and_logs_the_counts(lora_run):
    moved = {n for n in lora_run["before"] if not torch.equal(lora_run["before"][n], lora_run["after"][n])}
    assert lora_run["frozen"] and not moved & lora_run["frozen"]
    assert any("lora_A" in n for n in moved) and any(n.startswith("student_head") for n in moved)
    (params,) = records(lora_run["run_dir"], "params")
    student = {n: p for n, p in lora_run["after"].items() if n.startswith("student_cnn.net.")}
    assert params["tune"] == "lora" and params["teacher_tune"] == "ln" and params["step"] == 0
    assert params["student"] == {"trainable": sum(p.numel() for n, p in student.items() if "lora_" in n),
                                 "total": sum(p.numel() for p in student.values())}
    assert params["model"]["total"] == sum(p.numel() for p in lora_run["after"].values())
    assert 0 < params["teacher"]["trainable"] < params["teacher"]["total"]
    lrs = [r["lr"] for r in records(lora_run["run_dir"], "train")]
    assert lrs == pytest.approx([1e-3 * cosine_factor(s, 1, 4) for s in range(4)])


def test_resumed_cosine_run_continues_at_the_right_rate(lora_run, shards, tmp_path):  # noqa: F811
    """Resumed from step 2's checkpoint, the per-step schedule goes on from step 2: the same rates, the same weights."""
    from ltm.train.trainer import Trainer

    run_dir = tmp_path / "resumed"
    shutil.copytree(lora_run["run_dir"], run_dir)
    trainer = Trainer(lora_config(tmp_path, shards, run_dir), resume=tag_for(2))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * cosine_factor(2, 1, 4))
    trainer.fit()
    after = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
    trainer.close()
    assert [r["lr"] for r in records(run_dir, "train")] == \
        pytest.approx([1e-3 * cosine_factor(s, 1, 4) for s in range(4)])
    for name, value in lora_run["after"].items():
        assert torch.equal(after[name], value), name


def test_lora_export_merges_the_adapters_and_scores_as_the_run(lora_run, tmp_path):
    """TorchScript (the merge happens before either writer; ONNX export is test_export's, and slower)."""
    from ltm.checkpoint.reader import load_model
    from ltm.cli import main
    from ltm.deploy.exported import ExportedModel

    out = tmp_path / "student.pt"
    assert main(["export", "--run", str(lora_run["run_dir"]), "--out", str(out)]) == 0
    names = list(torch.jit.load(str(out)).state_dict())
    assert names and not [n for n in names if "lora_" in n or "base_layer" in n]
    model, _, _ = load_model(lora_run["run_dir"])
    assert any("lora_" in n for n in model.state_dict())  # the run's own model keeps its adapters
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.predict(images)
    got = ExportedModel(out).predict(images)
    assert got.shape == (5,) and float((got - want).abs().max()) <= 1e-4
