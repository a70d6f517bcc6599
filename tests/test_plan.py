"""`ltm plan`: model-state bytes per ZeRO stage, the micro-batch that fits, the CLI's report, and the refusal of
`ltm submit train` / `ltm sweep --submit` with a `--gpu-mem` the config does not fit."""

from __future__ import annotations

import os

import pytest

from ltm.cli import main
from ltm.config import load_config
from ltm.train import plan as planner

GiB = 2**30


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("optimizer, states", [("adamw", 2), ("sgd", 1)])
def test_model_states_follow_each_stage(precision, optimizer, states):
    """Parameters, fp32 master copy, gradients and optimizer states per GPU, sharded as each stage does."""
    total, trained, world, largest = 1_000_000, 600_000, 4, 50_000
    w = 2 if precision == "bf16" else 4
    bucket = 1000
    opt = 4 * states * trained
    master = 4 * trained
    bf16_optimizer = precision == "bf16"  # DeepSpeed's BF16_Optimizer at stage 1: fp32 gradients whole, no bucket
    prefetched = w * total  # a model under the prefetch bucket is gathered whole
    expected = {  # stage: (params, master, grads, optimizer, gathered, prefetched, bucket)
        0: (w * total, master if w == 2 else 0, w * trained + (4 * trained if w == 2 else 0), opt, 0, 0, 0),
        1: (w * total, master / world, w * trained + (4 * trained if bf16_optimizer else 4 * trained / world),
            opt / world, 0, 0, 0 if bf16_optimizer else w * bucket),
        2: (w * total, master / world, (w + 4 if w == 2 else 4) * trained / world, opt / world, 0, 0, w * bucket),
        3: (w * total / world, master / world, (w + 4) * trained / world, opt / world, 4 * largest, prefetched,
            w * bucket),
    }
    for stage, values in expected.items():
        s = planner.model_states(total, trained, stage, world, precision, states, largest, bucket)
        got = (s.params, s.master, s.grads, s.optimizer, s.gathered, s.prefetched, s.bucket)
        assert got == pytest.approx(values), stage
        assert s.optimizer > 0, f"ZeRO-{stage} lost the optimizer states"


@pytest.mark.parametrize("nodes, gpus", [(1, 1), (1, 8), (4, 8)])
def test_model_states_agree_with_deepspeeds_estimators(nodes, gpus):
    """Where DeepSpeed's estimators model the run (AdamW, 16-bit, everything trained, no offload), the planner's
    model states are theirs plus what they leave out: the gradient bucket, and at ZeRO-3 the prefetched parameters
    and the 16-bit gradient partition."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = 300_000_000, 4_000_000
    world = nodes * gpus
    s2 = planner.model_states(total, total, 2, world, "bf16", 2, largest)
    s3 = planner.model_states(total, total, 3, world, "bf16", 2, largest)
    z2 = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)[1]
    z3 = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=False,
                                               cpu_offload_params=False)[1]
    assert s2.total - s2.bucket == pytest.approx(z2, rel=1e-6)
    assert s3.total - s3.bucket - s3.prefetched - 2 * total / world == pytest.approx(z3, rel=1e-6)
    assert planner.deepspeed_estimate(total, largest, 2, nodes, gpus) == pytest.approx(z2)
    assert planner.deepspeed_estimate(total, largest, 1, nodes, gpus) is None


@pytest.fixture(scope="module")
def tiny():
    return load_config("vit-tiny-cpu")


def test_largest_micro_batch_and_its_grad_accum(tiny):
    """The micro-batch: the largest divisor of the per-rank batch whose peak fits; grad_accum makes up the rest."""
    acts = planner.activation_bytes(tiny)
    per_image = acts.per_image(False)
    assert per_image > 0 and acts.per_image("blocks") < per_image
    states = planner.make_plan(tiny, 1, 2).stages[0].states.total
    # room for 5.5 images per rank: 16 per rank -> micro 4 (largest divisor <= 5), grad_accum 4
    hw = planner.Hardware(gpu_mem_gib=(states + 5.5 * per_image + planner.CONTEXT_BYTES)
                          / (1 - planner.ALLOCATOR_MARGIN) / GiB)
    p = planner.make_plan(tiny, 1, 2, hw)
    s = p.stages[0]
    assert (s.max_micro, s.micro, s.grad_accum, s.config_micro) == (5, 4, 4, 16)
    assert s.peak(s.micro) <= hw.usable_bytes < s.peak(s.max_micro + 1)
    assert not s.fits_config
    assert planner.fix_for(p) == "train.grad_accum=4"


def test_cli_prints_the_plan(capsys):
    assert main(["plan", "--config", "clip-l14", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert "8 ranks, 80 GiB each" in out
    for stage in range(4):
        assert f"ZeRO-{stage}" in out
    assert "*ZeRO-1" in out  # the config's stage
    assert "fits: ZeRO-1 at micro-batch 4 x grad_accum 1" in out


def test_submit_train_refuses_a_plan_that_does_not_fit_and_names_the_change(tmp_path, capsys, caplog, monkeypatch,
                                                                            sample_shards):
    monkeypatch.chdir(tmp_path)
    args = ["submit", "train", "--config", "vit-tiny-cpu", "--gpus-per-node", "2", "--dry-run",
            f"data.root={sample_shards}", "train.run_dir=runs/x"]
    # the per-rank batch of 16 cannot be one micro-batch in 1.2 GiB; a smaller one can
    assert main([*args, "--gpu-mem", "1.2"]) == 2
    message = caplog.text
    assert "--gpu-mem 1.2" in message and "it fits with train.grad_accum=" in message
    change = message.split("it fits with ")[1].split()[0]
    assert capsys.readouterr().out == ""  # nothing printed, nothing submitted
    assert main([*args, "--gpu-mem", "1.2", change]) == 0
    assert "#SBATCH" in capsys.readouterr().out
    assert main([*args, "--gpu-mem", "0.5"]) == 2  # nothing fits under the CUDA context
    assert "nothing fits 2 GPUs of 0.5 GiB" in caplog.text
    assert not os.listdir(tmp_path)


def test_sweep_submit_refuses_a_point_that_does_not_fit(tmp_path, caplog, sample_shards):
    status = main(["sweep", "--config", "vit-tiny-cpu", "--variant", "base:", "--seeds", "1", "--submit",
                   "--eval", "ffpp_c23/test", "--dry-run", "--gpus-per-node", "2", "--gpu-mem", "1.2",
                   "--out", str(tmp_path / "sweep"),
                   f"data.root={sample_shards}"])
    assert status == 2
    assert "variant 'base': --gpu-mem 1.2" in caplog.text and "train.grad_accum=" in caplog.text
