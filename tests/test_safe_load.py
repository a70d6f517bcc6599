"""Checkpoint files are loaded weights-only: a file whose pickle would run code is refused, naming the file, and the
code never runs; every file a real `ltm train` run writes still loads (eval weights, universal conversion, rank
state on resume)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ltm.checkpoint import CheckpointError
from ltm.checkpoint.checkpointer import COMPLETE, convert_to_universal, rank_state_name
from ltm.checkpoint.reader import load_checkpoint_weights, load_weights_file
from ltm.checkpoint.safe_load import UnsafeCheckpointError, load_file
from ltm.config import load_config

sys.path.insert(0, str(Path(__file__).parent))
from test_train import _jpeg, train_here, write_config  # noqa: E402 - the train tests' tiny model and synthetic shards

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


class RunsCode:
    """Unpickling this calls os.system: the marker file appears exactly when a loader ran the pickle's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Overwrite a checkpoint file with one that carries tensors and a pickled callable."""
    torch.save({"module": {"w": torch.zeros(2)}, "optimizer_state_dict": {}, "payload": RunsCode(marker)}, path)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real `ltm train` run: 1 rank, ZeRO-1 (a partitioned optimizer file), 2 steps on synthetic shards."""
    from data_prep.shards import write_shards

    tmp = tmp_path_factory.mktemp("safe-load")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for method, fake in (("real", 0), ("fake", 1)):
            samples = [{"__key__": f"{method}{i // 4:03d}-{i % 4:06d}", "jpg": _jpeg(rng, fake), "cls": fake,
                        "json": {"dataset": "synth", "split": split, "video": f"{method}{i // 4:03d}",
                                 "frame": i % 4, "label": fake, "method": method}} for i in range(8)]
            write_shards(samples, tmp / "shards" / "synth" / split / method, f"synth-{split}-{method}")
    config = write_config(tmp, tmp / "shards", tmp / "R", epochs=1, iters_per_epoch=2, ckpt_every=2, val_every=0,
                          zero_stage=1)
    cfg = json.loads(config.read_text())
    cfg["model"]["pretrained"] = None  # random init: this test is about the files a run writes, not its weights
    config.write_text(json.dumps(cfg))
    train_here(config)  # the files are what is tested
    return tmp / "R"


def test_a_pickled_callable_is_refused_and_never_runs(tmp_path):
    marker, evil = tmp_path / "ran", tmp_path / "evil.pt"
    plant(evil, marker)
    with pytest.raises(UnsafeCheckpointError, match=f"checkpoint file {evil}: refused.*system"):
        load_file(evil)
    with pytest.raises(CheckpointError, match=f"weights file.*{evil}|checkpoint file {evil}: refused"):
        load_weights_file(evil)  # `ltm eval/predict --weights FILE`
    assert not marker.exists()
    junk = tmp_path / "junk.pt"  # damaged, not hostile: reported as such, not as refused
    junk.write_bytes(os.urandom(3000))
    with pytest.raises(CheckpointError, match="junk.pt.*corrupt"):
        load_weights_file(junk)


def test_real_checkpoint_loads_on_every_path(run, tmp_path):
    tag = run / "checkpoints" / "step00000002"
    assert (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    weights = load_checkpoint_weights(tag)  # DeepSpeed's zero_to_fp32, weights-only
    module = load_file(tag / "mp_rank_00_model_states.pt")["module"]
    assert weights.keys() == module.keys() and all(torch.equal(weights[k], module[k].float()) for k in module)
    state = load_file(tag / rank_state_name(0))  # loader state and RNG states, numpy's included
    assert state["rng"]["numpy"][0] == "MT19937" and state["rng"]["numpy"][1].dtype == np.uint32
    convert_to_universal(tag, tmp_path / "universal")
    assert (tmp_path / "universal" / "zero" / "optimizer_state.pt").is_file()
    load_file(tmp_path / "universal" / "zero" / "optimizer_state.pt")


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_eval_and_universal_conversion_refuse_a_planted_file(run, tmp_path, victim):
    tag = shutil.copytree(run / "checkpoints" / "step00000002", tmp_path / "checkpoints" / "step00000002")
    marker = tmp_path / "ran"
    plant(tag / victim, marker)
    with pytest.raises(CheckpointError, match=f"checkpoint file {tag / victim}: refused"):
        load_checkpoint_weights(tag)
    with pytest.raises(UnsafeCheckpointError, match=f"checkpoint file {tag / victim}: refused"):
        convert_to_universal(tag, tmp_path / "universal")
    assert not marker.exists()


def test_resume_refuses_a_planted_rank_state(run, tmp_path):
    from ltm.train.trainer import train

    copy = shutil.copytree(run, tmp_path / "R")
    tag = copy / "checkpoints" / "step00000002"
    victim, marker = tag / rank_state_name(0), tmp_path / "ran"
    plant(victim, marker)
    info = json.loads((tag / COMPLETE).read_text())
    info["files"][victim.name] = victim.stat().st_size  # a consistent tag: only the contents are hostile
    (tag / COMPLETE).write_text(json.dumps(info))
    cfg = load_config(copy / "config.yaml", [f"train.run_dir={copy}", "train.epochs=2"])
    with pytest.raises(UnsafeCheckpointError, match=f"checkpoint file {victim}: refused"):
        train(cfg)
    assert not marker.exists()
