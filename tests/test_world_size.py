"""The method at any number of ranks (ltm.train.batch_scaling): deep mixup over the global batch on a real 2-rank gloo
group, SyncBatchNorm conversion, fp32 gradient reduction in the DeepSpeed config (accepted by a DeepSpeed CPU engine),
the per-rank batch warnings of `ltm train` / `ltm submit train`, and the linear learning-rate scaling rule."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch

from ltm.config import ConfigError, LaunchConfig, load_config
from ltm.models.masking import deep_mixup, global_deep_mixup, mixup_partners

REPO = Path(__file__).resolve().parents[1]
B, C = 6, 5  # per-rank batch and feature width of the mixup checks

# Each rank: its own features (a leaf) and labels, rank 0's stream seeded with SEED (rank 1's with another seed,
# which must not matter), global mixup, then a loss whose weights are zero on rank 1, so that every gradient rank 1
# receives comes from rank 0's mixed rows through the gather.
DRIVER = """
from ltm.cli import defer_full_gc; defer_full_gc()  # as a rank `ltm train` starts does
import sys, torch, torch.distributed as dist
from ltm.models.masking import global_deep_mixup
dist.init_process_group("gloo")
rank, out = dist.get_rank(), sys.argv[1]
results = {}
for same_class in (False, True):
    features = torch.randn(B_, C_, generator=torch.Generator().manual_seed(10 + rank)).requires_grad_()
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]) if rank == 0 else torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    weights = torch.randn(B_, C_, generator=torch.Generator().manual_seed(20)) * (rank == 0)
    torch.manual_seed(SEED_ if rank == 0 else 999)
    mixed, mixed_labels, lam = global_deep_mixup(features, labels, 0.7, same_class=same_class)
    (mixed * weights).sum().backward()
    results[same_class] = {"features": features.detach(), "labels": labels, "mixed": mixed.detach(),
                            "mixed_labels": mixed_labels, "lam": lam, "grad": features.grad}
torch.save(results, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""
SEED = 1234


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    from ltm.launch import launch_local

    tmp = tmp_path_factory.mktemp("mixup")
    driver = tmp / "driver.py"
    driver.write_text(DRIVER.replace("B_", str(B)).replace("C_", str(C)).replace("SEED_", str(SEED)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    assert launch_local(2, [str(driver), str(tmp)], env=env) == 0
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("same_class", [False, True])
def test_global_mixup_over_two_ranks_is_one_mixup_of_the_whole_batch(two_ranks, same_class):
    """Eq. 5-6 over 2 gloo ranks: each rank's rows equal `deep_mixup` of the concatenated batch with rank 0's draws
    (partners, lambdas), partners cross ranks, and the gradient of rank 0's mixed rows reaches rank 1's features
    exactly where they were partners, as in one process."""
    r0, r1 = two_ranks[0][same_class], two_ranks[1][same_class]
    features = torch.cat([r0["features"], r1["features"]]).requires_grad_()
    labels = torch.cat([r0["labels"], r1["labels"]])
    torch.manual_seed(SEED)
    mixed, mixed_labels, lam = deep_mixup(features, labels, 0.7, same_class=same_class)
    torch.manual_seed(SEED)
    perm = mixup_partners(labels, same_class)  # the draw's first part: the partners

    assert torch.equal(torch.cat([r0["mixed"], r1["mixed"]]), mixed.detach())
    assert torch.equal(torch.cat([r0["mixed_labels"], r1["mixed_labels"]]), mixed_labels)
    assert torch.equal(torch.cat([r0["lam"], r1["lam"]]), lam)
    assert (perm[:B] >= B).any() and (perm[B:] < B).any(), perm  # partners on the other rank, both ways
    if same_class:
        assert torch.equal(labels[perm], labels)

    weights = torch.randn(B, C, generator=torch.Generator().manual_seed(20))
    (mixed[:B] * weights).sum().backward()  # rank 0's loss only, as in the driver
    assert torch.allclose(torch.cat([r0["grad"], r1["grad"]]), features.grad, rtol=0, atol=1e-6)
    partners_on_1 = perm[:B][perm[:B] >= B] - B
    assert (r1["grad"][partners_on_1].abs().sum(1) > 0).all()  # the partner's rank received its gradient
    untouched = torch.ones(B, dtype=torch.bool)
    untouched[partners_on_1] = False
    assert (r1["grad"][untouched] == 0).all()


def test_global_mixup_in_a_world_of_one_draws_what_deep_mixup_draws(tmp_path):
    """No process group, and a gloo group of one: the same partners, lambdas and rows as the per-rank mixup always
    drew from the same stream (the partners, then lambda ~ Beta), to the bit: a single-process run does not change
    with model.mixup_scope, nor with the draw's refactoring."""
    import torch.distributed as dist

    features, labels = torch.randn(8, C), torch.tensor([0.0, 1.0] * 4)

    def per_rank(same_class: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # Eq. 5-6 as first written
        perm = mixup_partners(labels, same_class)
        concentration = torch.full((8,), 1.0)
        lam = torch.distributions.Beta(concentration, concentration).sample()
        return (lam[:, None] * features + (1 - lam[:, None]) * features[perm], lam * labels + (1 - lam) * labels[perm],
                lam)

    def both() -> None:
        for same_class in (False, True):
            torch.manual_seed(3)
            expected = per_rank(same_class)
            expected_next = torch.rand(3)
            for mixup in (deep_mixup, global_deep_mixup):
                torch.manual_seed(3)
                got = mixup(features, labels, 1.0, same_class=same_class)
                assert all(torch.equal(a, b) for a, b in zip(got, expected)), mixup.__name__
                assert torch.equal(torch.rand(3), expected_next)  # and the stream goes on where it would

    both()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        both()
    finally:
        dist.destroy_process_group()


def test_model_forward_takes_the_scope_from_the_config():
    """model.mixup_scope picks the mixup of LearningToMask.forward; in a world of one both give the same loss."""
    from ltm.models import build_model

    losses = {}
    for scope in ("rank", "global"):
        cfg = load_config("tiny-cpu", ["model.backbone=mobilenetv3_small_050", "model.pretrained=null",
                                       "model.vit.dim=32", "model.vit.heads=4", "model.vit.depth=1",
                                       "model.mixup=true", f"model.mixup_scope={scope}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, image_size=64)
        torch.manual_seed(1)
        losses[scope] = model(torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 0, 1]))["losses"]["student"]
    assert torch.equal(losses["rank"], losses["global"])
    with pytest.raises(ConfigError, match="model.mixup_scope"):
        load_config("tiny-cpu", ["model.mixup_scope=world"])


# ------------------------------------------------------------------------------------------------ SyncBatchNorm


def sync_cfg(sync_bn: bool = True):
    return load_config("tiny-cpu", [f"train.sync_bn={str(sync_bn).lower()}"])


def test_sync_bn_converts_every_batchnorm_and_keeps_activations_and_tensors():
    """On GPUs with several ranks every BatchNorm becomes a SyncBatchNorm: timm's BatchNormAct layers (EfficientNet)
    keep their activation (torch's own converter drops it), parameters and buffers are the same tensors under the
    same keys, and without a process group the converted model computes what the original did. The conversion is
    module surgery only: the device is named, not used."""
    from ltm.models.backbone import Backbone
    from ltm.train.batch_scaling import batchnorm_layers, sync_batchnorm

    torch.manual_seed(0)
    model = Backbone("tf_efficientnet_lite0", None)
    original = copy.deepcopy(model)
    params = {name: id(p) for name, p in model.named_parameters()}
    layers = batchnorm_layers(model)
    converted, synced = sync_batchnorm(model, sync_cfg(), 2, torch.device("cuda", 0))
    assert synced and layers > 10
    norms = [m for m in converted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == layers and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert {name: id(p) for name, p in converted.named_parameters()} == params
    assert list(converted.state_dict()) == list(original.state_dict())
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(converted(images), original(images))  # training mode: batch statistics, activations kept
    assert torch.equal(converted.state_dict()["net.bn1.running_mean"], original.state_dict()["net.bn1.running_mean"])


def test_sync_bn_is_left_out_in_a_world_of_one_and_on_the_cpu(caplog):
    from ltm.models.backbone import Backbone
    from ltm.train.batch_scaling import sync_batchnorm

    model = Backbone("tf_efficientnet_lite0", None)
    assert sync_batchnorm(model, sync_cfg(), 1, torch.device("cuda", 0)) == (model, False)  # nothing to sync
    assert sync_batchnorm(model, sync_cfg(False), 2, torch.device("cuda", 0)) == (model, False)
    with caplog.at_level(logging.WARNING, logger="ltm.train.batch_scaling"):
        assert sync_batchnorm(model, sync_cfg(), 2, torch.device("cpu")) == (model, False)
    assert "train.sync_bn=true needs GPUs" in caplog.text and "2 ranks normalises BatchNorm over its own" in caplog.text


# ------------------------------------------------------------------------------------------------ fp32 reduction


@pytest.mark.parametrize("precision,stage", [("bf16", 1), ("bf16", 2), ("fp16", 0)])
def test_gradients_are_reduced_in_fp32_by_a_deepspeed_cpu_engine(precision, stage):
    """bf16/fp16 training all-reduces gradients in fp32 (`communication_data_type`), and bf16 ZeRO-2 accumulates
    micro-batches in fp32 (`grad_accum_dtype`): the config carries it and a DeepSpeed CPU engine takes it and steps."""
    import deepspeed

    from ltm.distributed import init_distributed, teardown
    from ltm.train.trainer import deepspeed_config

    cfg = load_config("tiny-cpu", [f"train.precision={precision}", f"train.zero_stage={stage}", "train.grad_accum=2",
                                   "train.batch_size=4"])
    ds = deepspeed_config(cfg, 2, 1, False)
    assert ds["communication_data_type"] == "fp32"
    assert ds["data_types"].get("grad_accum_dtype") == ("fp32" if (precision, stage) == ("bf16", 2) else None)
    if precision == "fp16":
        return  # DeepSpeed's CPU accelerator has no fp16 training; the config is what the GPU gets
    dtype = torch.bfloat16
    env = init_distributed()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          config=ds)
        assert engine.communication_data_type == torch.float32
        assert engine.get_data_types() == (dtype, torch.float32 if stage == 2 else dtype)
        before = [p.detach().clone() for p in engine.module.parameters()]
        for _ in range(2):  # one optimizer step over grad_accum=2 micro-batches
            engine.backward(engine(torch.randn(2, 4, dtype=dtype)).float().pow(2).mean())
            engine.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    finally:
        teardown(env, wait_for_others=False)


# ------------------------------------------------------------------------------------------------ batch warnings


def paper(*overrides: str, nodes: int = 2, gpus: int = 8):
    import dataclasses

    cfg = load_config("paper", list(overrides))
    return dataclasses.replace(cfg, launch=LaunchConfig(nodes=nodes, gpus_per_node=gpus))


def test_submit_warns_of_a_per_rank_batch_the_options_do_not_cover():
    """`ltm submit train --config paper --nodes 2 --gpus-per-node 8`: 2 images per rank. With sync_bn and global
    mixup (the paper config) nothing is said; without them each line says what changes and the fix; a batch that
    does not divide over the ranks refuses; a world of one never warns."""
    from launcher.checks import batch_split_problems, launch_problems

    assert batch_split_problems(paper()) == ([], [])
    problems, warnings = batch_split_problems(paper("train.sync_bn=false", "model.mixup_scope=rank"))
    assert problems == [] and len(warnings) == 2
    bn, mix = warnings
    assert bn.startswith("train.batch_size=32 over 16 ranks is 2 images per rank: BatchNorm (")
    assert ("normalises over 2 images where a world of one uses 32; set train.sync_bn=true (statistics over all 32) "
            "or model.freeze_bn=true (the pretrained statistics) or train.batch_size=128 with "
            "train.lr_scaling=linear (lr x 4) or fewer ranks") in bn
    assert "draws each sample's partner among 2 images" in mix and "set model.mixup_scope=global" in mix
    # same_class needs twice the pool: 8 per rank is enough for any partner, not for one of the same label
    assert batch_split_problems(paper("model.mixup_scope=rank", "train.batch_size=128"))[1] == []
    assert len(batch_split_problems(paper("model.mixup_scope=rank", "model.mixup_partner=same_class",
                                          "train.batch_size=128"))[1]) == 1
    # a CPU job (one rank per node) cannot sync BatchNorm: not offered as the fix
    cpu = batch_split_problems(paper("train.precision=fp32", "train.batch_size=8", nodes=4, gpus=0))[1]
    assert len(cpu) == 1 and "sync_bn" not in cpu[0] and "over 8 images where a world of one" not in cpu[0]
    assert batch_split_problems(paper("train.sync_bn=false", "model.mixup_scope=rank", nodes=1, gpus=1)) == ([], [])
    assert "not divisible" in batch_split_problems(paper("train.batch_size=24"))[0][0]
    # what `ltm submit train` and `ltm reproduce` run
    problems, warnings = launch_problems(paper("train.sync_bn=false", "launch.time_min=600"), [])
    assert problems == [] and any("train.sync_bn=true" in w for w in warnings)


def test_bf16_accumulation_below_zero2_is_warned():
    from ltm.train.batch_scaling import batch_warnings

    cfg = load_config("paper", ["train.grad_accum=2"])
    assert any("summed in bf16; set train.zero_stage=2" in w for w in batch_warnings(cfg, 1, False, 0))
    assert batch_warnings(load_config("paper", ["train.grad_accum=2", "train.zero_stage=2"]), 1, False, 0) == []


# ------------------------------------------------------------------------------------------------ lr scaling


def test_linear_lr_scaling_rule():
    from ltm.train.batch_scaling import scaled_lr

    assert scaled_lr(load_config("paper")) == 0.01
    assert scaled_lr(load_config("paper", ["train.batch_size=256", "train.lr_scaling=none"])) == 0.01
    assert scaled_lr(load_config("paper", ["train.batch_size=256", "train.lr_scaling=linear"])) == pytest.approx(0.08)
    assert scaled_lr(load_config("paper", ["train.lr_scaling=linear"])) == 0.01  # the paper's batch: unchanged
    with pytest.raises(ConfigError, match="train.lr_scaling"):
        load_config("paper", ["train.lr_scaling=sqrt"])


def test_a_cpu_rank_compiles_no_deepspeed_extension(monkeypatch):
    """DeepSpeed's CPU accelerator compiles its shared-memory all-reduce (a C++ extension, ~30 s on 2 cores) when a
    rank sets up its collectives. It serves inference only, training's collectives go through gloo: `init_distributed`
    turns it off, so no rank compiles it and `make install` does not build it ahead."""
    import deepspeed.comm.comm as ds_comm
    from torch.utils import cpp_extension

    from ltm.distributed import init_distributed, teardown

    def compile_extension(*args, **kwargs):
        raise AssertionError(f"a C++ extension was compiled or loaded: {kwargs.get('name', args[:1])}")

    monkeypatch.setattr(cpp_extension, "load", compile_extension)
    env = init_distributed()
    try:
        assert env.backend == "gloo" and ds_comm.cdb.shm_comm_op is None
    finally:
        teardown(env, wait_for_others=False)


def test_a_command_imports_the_training_stack_without_a_full_garbage_collection():
    """Every `ltm` command defers the collector's full passes before it imports anything: importing torch grows the
    heap by a quarter again and again, and each growth made a full pass over it (3 for `ltm env`'s torch import, 7
    for `ltm plan`'s whole stack, at Python's default thresholds). The SLURM jobs call the same setting. Counted by
    bench/startup.py's probe, in a fresh process."""
    from repo_script import load_script

    run = load_script("bench/startup.py").run_once("deferred", ["env"])
    assert run["imported_torch"] and run["full_passes"] == 0, run
