"""Which GPU each rank's pieces use when a task does not see every GPU of its node (`--gpus-per-task=1`, GPU
binding), what a checkpoint's GPU random stream becomes on another layout, and how long scoring ranks wait for each
other. No GPU here: DeepSpeed runs its CPU accelerator, and `torch.cuda` is replaced only where nothing else reaches
the CUDA path (the device count, the per-device generators)."""

from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import deepspeed
import pytest
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from shared_data import SHARED_DATA

from ltm import distributed, launch
from ltm.checkpoint import checkpointer as checkpoint
from ltm.config import load_config, save_config
from ltm.models import build_model

REPO = Path(__file__).resolve().parents[1]


# --- item: DeepSpeed takes ltm's device, not cuda:LOCAL_RANK ---------------------------------------------------------


def test_deepspeed_takes_the_gpu_ltm_chose_when_a_task_sees_only_its_own(monkeypatch):
    """Local rank 3 of a node whose tasks each see one GPU (as cuda:0): ltm picks cuda:0, and DeepSpeed's engine must
    set and use that device too, not cuda:3 ("invalid device ordinal"). After teardown LOCAL_RANK is 3 again."""
    port = launch.free_port()
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="3", LOCAL_WORLD_SIZE="4",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    # The group exists before ltm's init_distributed (gloo: there is no NCCL here), so of the CUDA path only the
    # device choice runs, with the count a bound task sees.
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    chosen: list[int] = []
    asked: list[int] = []
    env = None
    try:
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            m.setattr(torch.cuda, "device_count", lambda: 1)
            m.setattr(torch.cuda, "set_device", lambda index: chosen.append(int(index)))
            env = distributed.init_distributed()
        assert env.local_rank == 3 and env.device == torch.device("cuda", 0) and chosen == [0]

        # DeepSpeed's engine asks its accelerator for the rank's device (the CPU accelerator does nothing with it)
        accelerator = get_accelerator()
        monkeypatch.setattr(accelerator, "set_device", lambda index: asked.append(int(index)))
        model = torch.nn.Linear(2, 2)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            config={"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
        assert asked == [env.device.index], f"DeepSpeed set device {asked}, ltm chose {env.device}"
        assert engine.local_rank == env.device.index
    finally:
        if env is not None:
            distributed.teardown(env, wait_for_others=False)
        if dist.is_initialized():  # made by this test, not by init_distributed
            dist.destroy_process_group()
            import deepspeed.comm.comm as ds_comm
            import deepspeed.utils.groups as ds_groups

            ds_comm.cdb, ds_groups._WORLD_GROUP = None, None
    assert os.environ["LOCAL_RANK"] == "3"


def test_gpu_index_wraps_the_local_rank_to_the_visible_gpus():
    assert [distributed.gpu_index(r, 8) for r in (0, 5, 7)] == [0, 5, 7]  # a task that sees the whole node
    assert [distributed.gpu_index(r, 1) for r in (0, 5, 7)] == [0, 0, 0]  # a task bound to its own GPU
    assert [distributed.gpu_index(r, 2) for r in (0, 1, 2, 3)] == [0, 1, 0, 1]  # two GPUs per task
    with pytest.raises(ValueError, match="no GPU is visible"):
        distributed.gpu_index(0, 0)


# --- item: each rank saves and restores its own GPU's random stream -------------------------------------------------


class FakeGPUs:
    """The per-device CUDA generators of a process that sees `n` GPUs: a state per device index, an IndexError for
    a device it does not have (CUDA's "invalid device ordinal"), and a record of the indices asked for."""

    def __init__(self, n: int, base: int = 0):
        self.states = {i: torch.full((8,), base + i, dtype=torch.uint8) for i in range(n)}
        self.asked: list[tuple[str, int]] = []

    def _index(self, device) -> int:
        index = torch.device(device).index if not isinstance(device, int) else device
        index = 0 if index is None else index
        if index not in self.states:
            raise IndexError(f"invalid device ordinal {index}")
        return index

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        index = self._index(device)
        self.asked.append(("get", index))
        return self.states[index].clone()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        index = self._index(device)
        self.asked.append(("set", index))
        self.states[index] = state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(i) for i in sorted(self.states)]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        for i, state in enumerate(states):
            self.set_rng_state(state, i)

    def install(self, m: pytest.MonkeyPatch) -> FakeGPUs:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "device_count", lambda: len(self.states))
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            m.setattr(torch.cuda, name, getattr(self, name))
        return self


def test_resume_on_another_gpu_layout_restores_the_ranks_own_stream(monkeypatch):
    """Rank 5 saved on one 8-GPU node (cuda:5) resumes on the second of two 4-GPU nodes (cuda:1): its saved stream
    goes to cuda:1, and only cuda:5's state was saved."""
    with monkeypatch.context() as m:
        saving = FakeGPUs(8, base=10).install(m)
        state = checkpoint.rng_state(torch.device("cuda", 5))
    assert saving.asked == [("get", 5)]
    assert torch.equal(state["cuda"], torch.full((8,), 15, dtype=torch.uint8))

    with monkeypatch.context() as m:
        resuming = FakeGPUs(4, base=100).install(m)
        checkpoint.set_rng_state(state, torch.device("cuda", 1))
    assert resuming.asked == [("set", 1)]
    assert torch.equal(resuming.states[1], torch.full((8,), 15, dtype=torch.uint8))
    assert all(torch.equal(resuming.states[i], torch.full((8,), 100 + i, dtype=torch.uint8)) for i in (0, 2, 3))


def test_a_stream_that_cannot_be_restored_is_said_in_the_log(monkeypatch, caplog):
    """A CPU-saved checkpoint resumed on a GPU, and an old-format list without this device's entry: the GPU stream
    restarts, with a warning naming the device; the CPU generators are restored all the same."""
    torch.manual_seed(123)
    cpu_saved = checkpoint.rng_state(torch.device("cpu"))
    assert "cuda" not in cpu_saved
    expected = torch.rand(3)
    torch.manual_seed(0)
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="ltm.checkpoint.checkpointer"):
        gpus = FakeGPUs(2).install(m)
        checkpoint.set_rng_state(cpu_saved, torch.device("cuda", 1))
        assert gpus.asked == []
        assert "no GPU stream" in caplog.text and "cuda:1" in caplog.text
        assert torch.equal(torch.rand(3), expected)

        caplog.clear()
        old_format = dict(cpu_saved, cuda=[torch.zeros(8, dtype=torch.uint8)])  # one visible GPU when saved
        checkpoint.set_rng_state(old_format, torch.device("cuda", 1))
        assert gpus.asked == [] and "none for cuda:1" in caplog.text


def test_an_old_checkpoint_with_every_gpus_state_restores_this_devices_entry(monkeypatch, caplog):
    """Checkpoints written before per-device saving hold a list of every visible GPU's state: this device's entry
    is restored (the layout is assumed unchanged, and the log says so); no other device is touched."""
    saved = dict(checkpoint.rng_state(torch.device("cpu")),
                 cuda=[torch.full((8,), 50 + i, dtype=torch.uint8) for i in range(4)])
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="ltm.checkpoint.checkpointer"):
        gpus = FakeGPUs(4).install(m)
        checkpoint.set_rng_state(saved, torch.device("cuda", 2))
    assert gpus.asked == [("set", 2)]
    assert torch.equal(gpus.states[2], torch.full((8,), 52, dtype=torch.uint8))
    assert "old format" in caplog.text


def test_cpu_ranks_touch_no_gpu_generator(monkeypatch):
    """On the CPU nothing CUDA is read or written, whatever the checkpoint holds."""
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU rank reached a CUDA generator")

    with monkeypatch.context() as m:
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            m.setattr(torch.cuda, name, no_cuda)
        m.setattr(torch.cuda, "is_available", lambda: True)
        state = checkpoint.rng_state(torch.device("cpu"))
        checkpoint.set_rng_state(dict(state, cuda=torch.zeros(8, dtype=torch.uint8)), torch.device("cpu"))


# --- smaller: the scoring ranks' process group waits eval.timeout_min -----------------------------------------------

RANK_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from ltm.eval.evaluate import scoring_accelerator

with scoring_accelerator("fp32", "cpu", timeout_min=7) as accelerator:
    timeout = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    world = accelerator.num_processes
with open(f"{sys.argv[1]}/rank{os.environ['RANK']}.json", "w") as f:
    json.dump({"timeout_s": timeout, "world": world}, f)
"""


def test_the_scoring_process_group_waits_timeout_min(tmp_path):
    """Two ranks: the process group accelerate makes for scoring waits `timeout_min` (7) minutes in a collective,
    not torch's default (30 for gloo, 10 for NCCL)."""
    env = {k: v for k, v in os.environ.items() if k not in launch.DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    assert launch.launch_local(2, ["-c", RANK_SCRIPT, str(tmp_path)], env=env) == 0
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert results == [{"timeout_s": timedelta(minutes=7).total_seconds(), "world": 2}] * 2


class _Recorded(BaseException):
    """Stops a command once it has asked for its accelerator (BaseException: no command handler catches it)."""


@pytest.fixture(scope="module")
def run_with_timeout(tmp_path_factory) -> Path:
    """A tiny-cpu run folder (config with `eval.timeout_min=7`, a weights file)."""
    run = tmp_path_factory.mktemp("timeout-run")
    cfg = load_config("tiny-cpu", ["data.root=" + str(run / "no-shards"), "eval.timeout_min=7"])
    save_config(cfg, run / "config.yaml")
    torch.save(build_model(cfg.model, cfg.data.image_size, load_weights=False).state_dict(), run / "weights.pt")
    return run


@pytest.mark.parametrize("command", ["eval", "robustness", "predict"])
def test_eval_and_predict_take_the_timeout_from_the_runs_config(command, run_with_timeout, monkeypatch):
    """`ltm eval`, its robustness sweep and `ltm predict --run` hand the run config's `eval.timeout_min` to the
    scoring accelerator."""
    import inspect

    import ltm.eval.evaluate as ev
    from ltm.cli import main

    run = run_with_timeout
    asked: list[int] = []
    signature = inspect.signature(ev.scoring_accelerator)

    def recording(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        asked.append(bound.arguments["timeout_min"])
        raise _Recorded

    monkeypatch.setattr(ev, "scoring_accelerator", recording)
    weights = str(run / "weights.pt")
    with pytest.raises(_Recorded):
        if command == "eval":
            ev.evaluate(run, data=["unused"], weights=weights)
        elif command == "robustness":
            ev.robustness(run, data=["unused"], weights=weights)
        else:
            photo = sorted((SHARED_DATA / "faces").glob("*.jpg"))[0]
            main(["predict", str(photo), "--run", str(run), "--weights", weights, "--detector", "none"])
    assert asked == [7]


def test_training_takes_its_process_group_timeout_from_the_config(run_with_timeout, monkeypatch):
    """`ltm train` joins its process group with `train.timeout_min` (here 9), not a fixed 30 minutes."""
    import ltm.train.trainer as engine

    asked: list[int] = []

    def recording(timeout_min: int = 30):
        asked.append(timeout_min)
        raise _Recorded

    monkeypatch.setattr(engine, "init_distributed", recording)
    cfg = load_config("tiny-cpu", ["data.root=" + str(run_with_timeout / "no-shards"), "train.timeout_min=9",
                                   "train.run_dir=" + str(run_with_timeout / "train")])
    with pytest.raises(_Recorded):
        engine.Trainer(cfg)
    assert asked == [9]


def test_predict_takes_overrides_after_its_options(run_with_timeout, monkeypatch):
    """`ltm predict FILE --run R ... eval.timeout_min=5`: an override after the options reaches the run's config
    (argparse alone leaves it over as an unrecognized argument); a stray word is still refused."""
    import ltm.eval.evaluate as ev
    from ltm.cli import main

    asked: list[int] = []

    def recording(precision, device, timeout_min: int = 60, **kwargs):
        asked.append(timeout_min)
        raise _Recorded

    monkeypatch.setattr(ev, "scoring_accelerator", recording)
    photo = str(sorted((SHARED_DATA / "faces").glob("*.jpg"))[0])
    options = ["--run", str(run_with_timeout), "--weights", str(run_with_timeout / "weights.pt"), "--detector", "none"]
    with pytest.raises(_Recorded):
        main(["predict", photo, *options, "eval.timeout_min=5"])
    assert asked == [5]
    with pytest.raises(SystemExit) as stray:
        main(["predict", photo, *options, "not-an-override"])
    assert stray.value.code == 2
