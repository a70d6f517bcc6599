"""Large-model training paths on real DeepSpeed (CPU accelerator, 2 gloo ranks): ZeRO-3 with activation checkpointing
trains as the unchecked run does, resumes bitwise after SIGKILL and on one rank through the universal checkpoint;
gradient accumulation equals the larger batch; frozen parameters stay out of the optimizer and reach eval's reader
at ZeRO-1 and ZeRO-3. A 2-block ViT-Tiny at 48 px (a 3x3 token grid) with a 1-block teacher ViT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from test_train import (  # noqa: F401  (fixtures)
    ENV,
    REPO,
    ltm_train,
    mixed_shards,
    records,
    run_driver_on_two_ranks,
    shards,
)

from ltm.checkpoint.checkpointer import COMPLETE, Checkpointer, convert_to_universal, tag_for
from ltm.checkpoint.reader import load_checkpoint_weights, load_model
from ltm.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(600)
TORCH_LINEAR = torch.nn.functional.linear

MODEL = {"backbone_args": {"depth": 2, "drop_path_rate": 0.1},  # drop-path: the blocks draw random numbers
         "vit": {"dim": 32, "heads": 2, "depth": 1, "mlp_ratio": 2.0},
         "mask_strategy": "random", "mixup": True, "tune": "ln", "teacher_tune": "full"}


def scale_config(folder: Path, root: Path, run_dir: Path, model: dict | None = None, **train) -> Path:
    t = dict(run_dir=str(run_dir), batch_size=4, iters_per_epoch=2, epochs=3, lr=0.001, warmup_steps=1, log_every=1,
             val_every=3, ckpt_every=3, keep_last=4, zero_stage=3, activation_checkpointing="blocks")
    t.update(train)
    cfg = {"base": "vit-tiny-cpu", "model": {**MODEL, **(model or {})},
           "data": {"root": str(root), "image_size": 48, "loader": "reference", "num_threads": 0,
                    "train": [{"path": "synth/train/real", "weight": 1}, {"path": "synth/train/fake", "weight": 1}],
                    "val": ["synth/val"], "test": ["synth/val"]},
           "train": t}
    path = folder / f"{run_dir.name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


# Each rank gathers its ZeRO-3 partitions into whole tensors and saves the model it ends with.
DRIVER = """
from ltm.cli import defer_full_gc; defer_full_gc()  # as a rank `ltm train` starts does
import sys, deepspeed, torch
from ltm.config import load_config
from ltm.train.trainer import Trainer
trainer = Trainer(load_config(sys.argv[1]))
result = trainer.fit()
module = trainer.engine.module
with deepspeed.zero.GatheredParameters(list(module.parameters())):
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
torch.save({"result": result, "state": state}, f"{sys.argv[2]}/rank{trainer.env.rank}.pt")
trainer.close()
"""


def run_two_ranks(tmp: Path, config: Path) -> dict:
    return {"ranks": run_driver_on_two_ranks(tmp, config, DRIVER)}


def initial_model(config: Path) -> torch.nn.Module:
    from ltm.models import build_model

    cfg = load_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the Trainer's initial weights
        return build_model(cfg.model, cfg.data.image_size)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k].float(), b[k].float())]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def z3(tmp_path_factory, shards) -> dict:  # noqa: F811
    """Run A: ZeRO-3 with every backbone block checkpointed, the student ViT's LayerNorms only training (LN tuning);
    6 steps on 2 ranks, each dumping its gathered final weights."""
    tmp = tmp_path_factory.mktemp("z3")
    config = scale_config(tmp, shards, tmp / "A")
    out = run_two_ranks(tmp, config)
    return {**out, "tmp": tmp, "config": config, "run_dir": tmp / "A", "train": records(tmp / "A", "train"),
            "val": records(tmp / "A", "val")}


# ------------------------------------------------------------------------------------------------ config


def test_config_refuses_a_baseline_teacher_tune_and_a_warmup_without_cosine():
    with pytest.raises(ConfigError, match=r"key 'model.teacher_tune'.*baseline has no teacher"):
        load_config("tiny-cpu", ["model.kind=baseline", "model.teacher_tune=ln"])
    with pytest.raises(ConfigError, match=r"key 'train.warmup_steps'.*schedule is cosine"):
        load_config("tiny-cpu", ["train.schedule=exponential", "train.warmup_steps=5"])
    with pytest.raises(ConfigError, match=r"key 'train.activation_checkpointing'"):
        load_config("tiny-cpu", ["train.activation_checkpointing=all"])
    cfg = load_config("vit-tiny-cpu", ["train.zero_stage=3", "train.activation_checkpointing=every_k",
                                       "train.checkpoint_every_k=3"])
    assert (cfg.train.zero_stage, cfg.train.activation_checkpointing, cfg.train.checkpoint_every_k) == (3, "every_k", 3)


# ------------------------------------------------------------------------------------------------ checkpointing


def _step(model: torch.nn.Module, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict, dict]:
    torch.manual_seed(seed)
    model.zero_grad()
    loss = model(images).float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}


def _calls(modules: list[torch.nn.Module]) -> list[int]:
    """How many times each module's first submodule started (twice when the backward recomputed it; a pre-hook, as
    the recomputation stops once it has what the backward needs)."""
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        first = next(m.children())
        first.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("mode", ["blocks", "every_k"])
def test_checkpointed_vit_blocks_recompute_with_the_same_random_draws(mode):
    """ViT blocks with drop-path: the recomputed blocks draw what the forward drew, so loss and gradients are
    bitwise those of the unchecked model; `every_k` (k=2) recomputes blocks 0 and 2 of 3, `blocks` all three."""
    from ltm.models.backbone import set_activation_checkpointing
    from ltm.models.foundation import ViTBackbone

    def vit() -> ViTBackbone:
        torch.manual_seed(0)
        return ViTBackbone("vit_tiny_patch16_224", image_size=32, depth=3, drop_path_rate=0.3).train()

    images = torch.rand(4, 3, 32, 32)
    plain, checked = vit(), vit()
    assert set_activation_checkpointing(checked, mode, every_k=2) == (3 if mode == "blocks" else 2)
    counts = _calls(list(checked.net.blocks))
    for forward in (lambda m, x: m(x).flatten(1), lambda m, x: m.pooled(x)):  # the grid and the pooled paths
        counts[:] = [0, 0, 0]
        loss_p, grads_p, _ = _step_module(plain, forward, images)
        loss_c, grads_c, _ = _step_module(checked, forward, images)
        assert counts == ([2, 2, 2] if mode == "blocks" else [2, 1, 2])
        assert torch.equal(loss_p, loss_c)
        assert grads_p.keys() == grads_c.keys() and all(torch.equal(grads_p[k], grads_c[k]) for k in grads_p)
    with torch.no_grad():  # no gradient, nothing to recompute: the blocks run once
        counts[:] = [0, 0, 0]
        checked(images)
        assert counts == [1, 1, 1]


def _step_module(model, forward, images):
    return _step(_Call(model, forward), images, 1)


class _Call(torch.nn.Module):
    def __init__(self, model, forward):
        super().__init__()
        self.model, self.forward_fn = model, forward

    def forward(self, x):
        return self.forward_fn(self.model, x)


def test_checkpointed_cnn_stages_count_each_batch_once_in_batchnorm():
    """CNN stages (MobileNetV3's `blocks`, BatchNorm inside): the same gradients and the same running statistics as
    the unchecked model; the backward's recomputation normalises by the batch but does not update them again."""
    from ltm.models.backbone import Backbone, set_activation_checkpointing

    def cnn() -> Backbone:
        torch.manual_seed(0)
        return Backbone("mobilenetv3_small_050").train()

    images = torch.rand(4, 3, 64, 64)
    plain, checked = cnn(), cnn()
    assert set_activation_checkpointing(checked, "blocks") == len(checked.net.blocks) > 3
    counts = _calls(list(checked.net.blocks))
    for _ in range(2):
        loss_p, grads_p, bufs_p = _step(plain, images, 1)
        loss_c, grads_c, bufs_c = _step(checked, images, 1)
        assert torch.equal(loss_p, loss_c)
        assert all(torch.equal(grads_p[k], grads_c[k]) for k in grads_p)
        assert_same(bufs_c, bufs_p)  # running means/vars and num_batches_tracked
    assert counts == [4] * len(counts)  # two steps, each a forward and a recomputation
    assert timm.create_model("resnet18").layer1 is not None  # the `layer<N>` family is found too:
    assert len(Backbone("resnet18").checkpoint_units()) == 4


# ------------------------------------------------------------------------------------------------ ZeRO-3 runs


def test_zero3_trains_with_checkpointing_as_without_and_keeps_frozen_weights_out_of_the_optimizer(z3, shards,  # noqa: F811
                                                                                                   tmp_path):
    r0, r1 = z3["ranks"]
    assert r0["result"]["status"] == "completed" and r0["result"]["step"] == 6
    assert_same(r0["state"], r1["state"])
    run_dir = z3["run_dir"]
    files = Checkpointer(run_dir / "checkpoints").verify(tag_for(6))
    assert files["zero_stage"] == 3
    assert {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")} \
        <= set(files["files"])

    # what the optimizer holds is what trains: the student ViT's LayerNorms, not its frozen weights
    saved = torch.load(run_dir / "checkpoints" / tag_for(6) / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       weights_only=False)
    in_optimizer = {n: s for group in saved["param_shapes"] for n, s in group.items()}
    counts = records(run_dir, "params")[0]
    assert sum(s.numel() for s in in_optimizer.values()) == counts["model"]["trainable"]
    assert set(saved["frozen_param_shapes"]) and not set(saved["frozen_param_shapes"]) & set(in_optimizer)
    # and what the trainer hands DeepSpeed holds no frozen parameter (DeepSpeed's own filter is not relied on)
    from ltm.train.trainer import build_optimizer

    built = initial_model(z3["config"])
    optimizer, _ = build_optimizer(built, load_config(z3["config"]))
    handed = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(p.requires_grad for p in handed)
    assert sum(p.numel() for p in handed) == counts["model"]["trainable"]
    start, end = built.state_dict(), r0["state"]
    frozen = list(saved["frozen_param_shapes"])
    assert all(torch.equal(start[n], end[n]) for n in frozen)
    moved = [n for n in in_optimizer if not torch.equal(start[n], end[n])]
    assert len(moved) > len(in_optimizer) // 2

    # the same run without activation checkpointing: the same losses, the same weights
    config = scale_config(tmp_path, shards, tmp_path / "N", activation_checkpointing=False)
    plain = run_two_ranks(tmp_path, config)
    assert records(tmp_path / "N", "train") == z3["train"]
    assert_same(plain["ranks"][0]["state"], end)


def test_zero3_checkpointed_run_resumes_bitwise_after_sigkill(z3, shards, tmp_path):  # noqa: F811
    config = scale_config(tmp_path, shards, tmp_path / "B")
    ckpt = Checkpointer(tmp_path / "B" / "checkpoints")
    cmd = [sys.executable, "-m", "ltm.cli", "train", "--config", str(config), "--nproc", "2"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while (ckpt.latest() or tag_for(0)) < tag_for(3) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-training
    proc.wait()
    assert ckpt.latest() in (tag_for(3), tag_for(4)), f"not stopped mid-way: latest={ckpt.latest()}"

    done = ltm_train(config, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    assert records(tmp_path / "B", "train") == z3["train"]  # every loss term of every step
    assert records(tmp_path / "B", "val") == z3["val"]
    assert_same(load_checkpoint_weights(tmp_path / "B" / "checkpoints" / tag_for(6)),
                load_checkpoint_weights(z3["run_dir"] / "checkpoints" / tag_for(6)))


def test_zero3_resumes_on_one_rank_through_the_universal_checkpoint(z3, tmp_path):
    """Step 4 of the 2-rank ZeRO-3 run on 1 rank: every weight (the frozen ones too) and Adam's moments arrive
    whole, each AdamW group keeps its own weight decay, and training goes on to the end."""
    import deepspeed

    from ltm.train.trainer import Trainer

    run_dir = tmp_path / "U"
    shutil.copytree(z3["run_dir"], run_dir)
    cfg = load_config(z3["config"], [f"train.run_dir={run_dir}"])
    old, threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = Trainer(cfg, resume=tag_for(4))
    try:
        assert trainer.universal and (run_dir / "checkpoints" / "universal" / tag_for(4) / COMPLETE).is_file()
        assert trainer.state.step == 4
        module = trainer.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        assert_same(state, load_checkpoint_weights(run_dir / "checkpoints" / tag_for(4)))
        saved = [torch.load(run_dir / "checkpoints" / tag_for(4) / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                            weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"] for r in range(2)]
        loaded = trainer.engine.optimizer.optimizer
        for key in ("exp_avg", "exp_avg_sq"):
            joined = sum(float(g[key].double().sum()) for s in saved for g in s["state"].values())
            here = sum(float(s[key].double().sum()) for s in loaded.state.values())
            assert here == pytest.approx(joined, rel=1e-9)
        assert [g["weight_decay"] for g in loaded.param_groups] == [g["weight_decay"] for g in saved[0]["param_groups"]]
        result = trainer.fit()
    finally:
        trainer.close()
        os.environ.clear()
        os.environ.update(old)
        torch.set_num_threads(threads)
    assert result["status"] == "completed" and result["step"] == 6 and result["world_size"] == 1
    assert Checkpointer(run_dir / "checkpoints").latest() == tag_for(6)
    # the process's other models are untouched: ZeRO-3 left torch's linear in place (an export traces it)
    assert torch.nn.functional.linear is TORCH_LINEAR


def test_eval_reads_frozen_weights_at_zero1_and_zero3(z3, shards, tmp_path):  # noqa: F811
    """LN tuning leaves most weights frozen. ZeRO-1 checkpoints lack them in DeepSpeed's fp32 helper's answer: the
    reader fills them from the saved module; ZeRO-3 stores them partitioned; both load into `ltm eval`'s model, and
    the universal conversion writes them too."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = scale_config(tmp_path, shards, tmp_path / "Z1", zero_stage=1, activation_checkpointing=False, epochs=1,
                          val_every=0)
    done = ltm_train(config, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    tag = tmp_path / "Z1" / "checkpoints" / tag_for(2)
    built = initial_model(config)
    start = built.state_dict()
    frozen = [n for n, p in built.named_parameters() if not p.requires_grad]
    helper = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    assert frozen and not set(frozen) & set(helper)  # the gap this reader closes
    weights = load_checkpoint_weights(tag)
    assert all(torch.equal(weights[n], start[n]) for n in frozen)
    load_model(tmp_path / "Z1")  # strict: every tensor present
    universal = tmp_path / "universal"
    convert_to_universal(tag, universal)
    assert all(torch.equal(torch.load(universal / "zero" / n / "fp32.pt")["param"], start[n]) for n in frozen)

    model, _, _ = load_model(z3["run_dir"])
    assert_same(model.state_dict(), z3["ranks"][0]["state"])


def test_grad_accum_equals_the_larger_batch_at_zero3(mixed_shards, tmp_path):  # noqa: F811
    """Batch 8 on 2 ranks as 1 x 4 or 2 x 2 per rank: the same weights and losses. Without mixup and with the
    deterministic `high` mask (no drop-path), as the CNN test in test_train: what is left is the gradient average.
    SGD: Adam divides by the gradient's own scale, so float rounding on a weight of near-zero gradient would grow."""
    model = {"mixup": False, "mask_strategy": "high", "backbone_args": {"depth": 2}}
    data = {"train": [{"path": "synth/mixed", "weight": 1}], "val": []}
    runs = {}
    for name, accum in (("G1", 1), ("G2", 2)):
        config = scale_config(tmp_path, mixed_shards, tmp_path / name, model=model, batch_size=8, epochs=2,
                              val_every=0, ckpt_every=2, lr=0.05, grad_accum=accum, optimizer="sgd",
                              schedule="exponential", warmup_steps=0)
        cfg = json.loads(config.read_text())
        cfg["data"].update(data)
        config.write_text(json.dumps(cfg))
        done = ltm_train(config, nproc=2)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = (load_checkpoint_weights(tmp_path / name / "checkpoints" / tag_for(4)),
                      records(tmp_path / name, "train"))
    (one, log_one), (two, log_two) = runs["G1"], runs["G2"]
    start = load_checkpoint_weights(tmp_path / "G1" / "checkpoints" / tag_for(2))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert sum(not torch.equal(one[k], start[k]) for k in one) > len(one) // 4  # steps 3-4 moved the model
    assert [r["samples"] for r in log_two] == [r["samples"] for r in log_one] == [8, 16, 24, 32]
    for a, b in zip(log_one, log_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
