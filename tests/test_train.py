"""ltm train on real DeepSpeed (CPU accelerator, gloo): ranks agree, exact resume, atomic saves, universal resume,
preemption, and the errors that name a file. Tiny model (MobileNetV3-small-0.5 at 64 px, a 1-block ViT) on
synthetic shards written with data_prep's shard writer, so the whole file takes a few minutes on 2 cores."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ltm.checkpoint import CheckpointError
from ltm.checkpoint.checkpointer import COMPLETE, Checkpointer, tag_for
from ltm.config import ConfigError, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
# One thread per rank: two ranks on a shared 2-core machine with 2 OpenMP threads each spin-wait ~100x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(name, None)

pytestmark = pytest.mark.timeout(600)


# ------------------------------------------------------------------------------------------------ fixtures/helpers


def _jpeg(rng: np.random.Generator, fake: int, size: int = 64) -> bytes:
    img = np.clip(rng.integers(60, 200, size=3) + rng.normal(0, 12, (size, size, 3)), 0, 255)
    if fake:  # a high-frequency patch, the "artifact" to find
        y, x = rng.integers(8, size - 28, size=2)
        img[y:y + 20, x:x + 20] += ((np.indices((20, 20)).sum(0) % 2) * 80 - 40)[..., None]
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    from data_prep.shards import write_shards

    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for split, count in (("train", 48), ("val", 24)):
        for method, fake in (("real", 0), ("fake", 1)):
            samples = [{"__key__": f"{split}{method}{i // 4:03d}-{i % 4:06d}", "jpg": _jpeg(rng, fake), "cls": fake,
                        "json": {"dataset": "synth", "split": split, "video": f"{split}{method}{i // 4:03d}",
                                 "frame": i % 4, "label": fake, "method": method}} for i in range(count)]
            write_shards(samples, root / "synth" / split / method, f"synth-{split}-{method}", max_samples=16)
    return root


def write_config(folder: Path, shards: Path, run_dir: Path, **train) -> Path:
    t = dict(run_dir=str(run_dir), batch_size=4, iters_per_epoch=2, epochs=3, lr=0.01, lr_gamma=0.9, log_every=1,
             val_every=3, ckpt_every=3, zero_stage=1, keep_last=3)
    t.update(train)
    cfg = {
        "base": "tiny-cpu",
        # ImageNet EfficientNet-Lite0 (shipped weights): exact resume and eval are checked on a pretrained run
        "model": {"backbone": "tf_efficientnet_lite0", "pretrained": "imagenet",
                  "vit": {"dim": 32, "heads": 2, "depth": 1, "mlp_ratio": 2.0},
                  "mask_strategy": "random", "mixup": True},  # both random parts of the model are exercised
        "data": {"root": str(shards), "image_size": 64, "loader": "reference", "num_threads": 0,
                 "train": [{"path": "synth/train/real", "weight": 1}, {"path": "synth/train/fake", "weight": 1}],
                 "val": ["synth/val"], "test": ["synth/val"]},
        "train": t,
    }
    path = folder / f"{run_dir.name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def ltm_train(config: Path, *args: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ltm.cli", "train", "--config", str(config), "--nproc", str(nproc), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def train_here(config: Path) -> None:
    """One rank of `config` in this process (`ltm.train.trainer.train`, what `ltm train` runs): for tests whose subject
    is the arithmetic or the files of a run, not its launch. It must complete."""
    from ltm.train.trainer import train

    result = train(load_config(config))
    assert result["status"] == "completed", result


def module_state(run_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=False)["module"]


WALL_CLOCK = ("time", "images_per_s", "data_stall", "tflops", "mfu", "max_memory_gb")


def records(run_dir: Path, kind: str) -> list[dict]:
    """metrics.jsonl lines of one type, without wall-clock fields."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == kind:
            out.append({k: v for k, v in r.items() if k not in WALL_CLOCK})
    return out


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


DRIVER = """
from ltm.cli import defer_full_gc; defer_full_gc()  # as a rank `ltm train` starts does
import sys, torch
from ltm.config import load_config
from ltm.train.trainer import Trainer
trainer = Trainer(load_config(sys.argv[1]))
result = trainer.fit()
state = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
torch.save({"result": result, "state": state}, f"{sys.argv[2]}/rank{trainer.env.rank}.pt")
trainer.close()
"""


def run_driver_on_two_ranks(tmp: Path, config: Path, driver_source: str = DRIVER) -> list[dict]:
    """`driver_source` (a script taking the config and an output folder) on 2 local gloo ranks; what each rank saved
    as `rank<r>.pt` in `tmp`."""
    from ltm.launch import launch_local

    driver = tmp / "driver.py"
    driver.write_text(driver_source)
    old = dict(os.environ)
    os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    try:
        assert launch_local(2, [str(driver), str(config), str(tmp)]) == 0
    finally:
        os.environ.clear()
        os.environ.update(old)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="session")
def run_a(tmp_path_factory, shards) -> dict:
    """Run A: 2 gloo ranks, ZeRO-1, 6 steps over 3 epochs; each rank dumps its final in-memory weights."""
    tmp = tmp_path_factory.mktemp("run_a")
    config = write_config(tmp, shards, tmp / "A")
    ranks = run_driver_on_two_ranks(tmp, config)
    return {"tmp": tmp, "config": config, "run_dir": tmp / "A", "ranks": ranks,
            "weights": module_state(tmp / "A", tag_for(6)), "train": records(tmp / "A", "train"),
            "val": records(tmp / "A", "val")}


# ------------------------------------------------------------------------------------------------ tests


def test_two_ranks_end_with_the_same_weights(run_a):
    r0, r1 = run_a["ranks"]
    assert r0["result"]["status"] == "completed" and r0["result"]["step"] == 6
    assert_same_weights(r0["state"], r1["state"])  # parameters and BatchNorm buffers alike
    assert_same_weights(r0["state"], run_a["weights"])  # and the checkpoint holds exactly that model

    run_dir = run_a["run_dir"]
    ckpt = Checkpointer(run_dir / "checkpoints")
    assert ckpt.latest() == "step00000006"
    assert ckpt.tags() == ["step00000003", "step00000004", "step00000006"]  # saves at 2, 3, 4, 6; keep_last=3
    files = json.loads((run_dir / "checkpoints" / "step00000006" / COMPLETE).read_text())["files"]
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rank00000_state.pt", "rank00001_state.pt", "mp_rank_00_model_states.pt"} <= set(files)
    client = torch.load(run_dir / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt",
                        weights_only=False)
    assert client["step"] == 6 and client["epoch"] == 3 and client["samples"] == 24
    assert client["config"]["model"]["backbone"] == "tf_efficientnet_lite0"

    train = run_a["train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "cls_t", "vit_t", "div", "student", "lr", "samples"} <= set(train[0])
    assert [round(r["lr"], 6) for r in train] == [0.01, 0.01, 0.009, 0.009, 0.0081, 0.0081]  # gamma 0.9 per epoch
    val = run_a["val"]
    assert [r["step"] for r in val] == [3, 6] and all(0 <= r["val_auc"] <= 1 for r in val)
    assert all(r["val_frames"] == 48 for r in val)  # every val frame scored once across the two ranks
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert load_config(run_dir / "config.yaml").train.run_dir == str(run_dir)


def test_resume_after_sigkill_is_bitwise_exact(run_a, shards, tmp_path):
    config = write_config(tmp_path, shards, tmp_path / "B")
    ckpt = Checkpointer(tmp_path / "B" / "checkpoints")
    cmd = [sys.executable, "-m", "ltm.cli", "train", "--config", str(config), "--nproc", "2"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while (ckpt.latest() or "step00000000") < "step00000003" and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-training
    proc.wait()
    killed_at = ckpt.latest()
    assert killed_at in ("step00000003", "step00000004"), f"run B was not stopped mid-way: latest={killed_at}"

    done = ltm_train(config, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 6
    # 4 images over 2 CPU ranks: rank 0 says what the split changes (BatchNorm per rank; mixup is global)
    assert "is 2 images per rank: BatchNorm" in done.stderr and "train.sync_bn=true" not in done.stderr
    assert done.stderr.count("images per rank") == 1
    assert_same_weights(module_state(tmp_path / "B", tag_for(6)), run_a["weights"])
    assert records(tmp_path / "B", "train") == run_a["train"]  # every loss term of every step
    assert records(tmp_path / "B", "val") == run_a["val"]


def train_with_step4_save_hook(tmp_path: Path, config: Path, modules: str,
                               hook: list[str]) -> subprocess.CompletedProcess:
    """`ltm train` (one rank) in a process whose torch.save first runs `hook` (lines of Python, `modules` imported)
    when DeepSpeed writes step 4's model file."""
    driver = tmp_path / "save_hook.py"
    driver.write_text(
        "from ltm.cli import defer_full_gc; defer_full_gc()\n"
        f"import {modules}, sys, torch\n"
        "real_save = torch.save\n"
        "def save(obj, f, *args, **kwargs):\n"
        "    if 'step00000004' in str(f) and 'mp_rank_00_model_states' in str(f):\n"
        + "".join(f"        {line}\n" for line in hook) +
        "    return real_save(obj, f, *args, **kwargs)\n"
        "torch.save = save\n"
        "from ltm.cli import main\n"
        "sys.exit(main(['train', '--config', sys.argv[1]]))\n"
    )
    return subprocess.run([sys.executable, str(driver), str(config)], env=ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def assert_rerun_resumes_from_step2_and_finishes(config: Path, run_dir: Path, caplog) -> None:
    """The same config trained again (here, in this process: one rank, as `ltm train` runs it) resumes from step 2."""
    import logging

    with caplog.at_level(logging.INFO, logger="ltm"):
        train_here(config)
    assert f"resumed from {run_dir / 'checkpoints' / 'step00000002'}" in caplog.text, caplog.text[-3000:]
    ckpt = Checkpointer(run_dir / "checkpoints")
    assert ckpt.latest() == "step00000004" and (run_dir / "checkpoints" / "step00000004" / COMPLETE).is_file()
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3, 4]


def test_kill_during_save_leaves_the_previous_checkpoint(shards, tmp_path, caplog):
    """SIGKILL while DeepSpeed writes the optimizer file of step 4: `latest` still names step 2, which loads."""
    config = write_config(tmp_path, shards, tmp_path / "K", epochs=2, ckpt_every=2, val_every=0, zero_stage=0)
    killed = train_with_step4_save_hook(tmp_path, config, "io, os, signal", [
        "buf = io.BytesIO(); real_save(obj, buf)",
        "with open(f, 'wb') as out: out.write(buf.getvalue()[: len(buf.getvalue()) // 2])",
        "os.kill(os.getpid(), signal.SIGKILL)  # half a file on disk, then gone",
    ])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    ckpt = Checkpointer(tmp_path / "K" / "checkpoints")
    assert ckpt.latest() == "step00000002"
    partial = tmp_path / "K" / "checkpoints" / "step00000004"
    assert partial.is_dir() and not (partial / COMPLETE).exists()
    assert ckpt.resolve("auto") == "step00000002"
    with pytest.raises(CheckpointError, match="step00000004.*incomplete"):
        ckpt.resolve("step00000004")

    assert_rerun_resumes_from_step2_and_finishes(config, tmp_path / "K", caplog)


def test_a_save_that_fails_for_want_of_space_names_it_and_keeps_the_previous_checkpoint(shards, tmp_path,
                                                                                          caplog):
    """A write error while DeepSpeed saves step 4 (here the file-size limit, as a full disk would): the run stops
    with an error naming the tag, the failure and the free space; `latest` still names step 2; a rerun resumes."""
    config = write_config(tmp_path, shards, tmp_path / "F", epochs=2, ckpt_every=2, val_every=0, zero_stage=0)
    failed = train_with_step4_save_hook(tmp_path, config, "resource, signal", [
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead",
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))",
    ])
    assert failed.returncode == 2, failed.stderr[-3000:]
    folder = tmp_path / "F" / "checkpoints" / "step00000004"
    assert re.search(rf"checkpoint {folder}: saving failed on rank 0 \(RuntimeError: .*\); [\d,]+ MiB free of "
                     rf"[\d.,]+ GiB on the filesystem of .*; latest still names step00000002", failed.stderr), \
        failed.stderr[-3000:]
    ckpt = Checkpointer(tmp_path / "F" / "checkpoints")
    assert ckpt.latest() == "step00000002" and ckpt.resolve("auto") == "step00000002"
    assert not (folder / COMPLETE).exists()
    assert not list(folder.glob(".*.tmp*"))  # no half-written temporary file left behind

    assert_rerun_resumes_from_step2_and_finishes(config, tmp_path / "F", caplog)


def test_universal_resume_two_ranks_to_one(run_a, tmp_path):
    """A 2-rank ZeRO-1 checkpoint continues on 1 rank: weights and SGD momentum arrive whole, steps go on."""
    from ltm.train.trainer import Trainer

    run_dir = tmp_path / "C"
    shutil.copytree(run_a["run_dir"], run_dir)
    cfg = load_config(run_a["config"], [f"train.run_dir={run_dir}", "train.epochs=4"])
    old, threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)
    trainer = Trainer(cfg)  # world of one, in this process
    try:
        assert trainer.universal and (run_dir / "checkpoints" / "universal" / "step00000006" / COMPLETE).is_file()
        assert trainer.state.step == 6
        assert_same_weights({k: v for k, v in trainer.engine.module.state_dict().items()}, run_a["weights"])
        saved = [torch.load(run_dir / "checkpoints" / "step00000006" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                            weights_only=False)["optimizer_state_dict"] for r in range(2)]
        joined = sum(float(s["base_optimizer_state"]["state"][0]["momentum_buffer"].double().sum()) for s in saved)
        loaded = trainer.engine.optimizer.optimizer.state
        assert len(loaded) == 1
        assert next(iter(loaded.values()))["momentum_buffer"].double().sum().item() == pytest.approx(joined, rel=1e-9)
        assert trainer.lr() == pytest.approx(0.01 * 0.9**3)
        result = trainer.fit()
    finally:
        trainer.close()
        os.environ.clear()
        os.environ.update(old)
        torch.set_num_threads(threads)
    assert result["status"] == "completed" and result["step"] == 8 and result["world_size"] == 1
    assert [r["step"] for r in records(run_dir, "train")] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert Checkpointer(run_dir / "checkpoints").latest() == "step00000008"


def test_the_nproc_launchers_import_nothing_the_ranks_use(shards, tmp_path):
    """`ltm train --nproc 2` and `ltm eval --nproc 2` start their ranks from a process that never imports what only
    the ranks use, torch included: it only waits on them and forwards signals."""
    config = write_config(tmp_path, shards, tmp_path / "L")
    probe = ("import sys\n"
             "import ltm.launch\n"
             "def launch_local(nproc, argv):  # stands in for the ranks: what has the launcher imported by now?\n"
             "    print(nproc, sorted(m for m in ('torch', 'deepspeed', 'timm', 'sklearn', 'ltm.models',\n"
             "                                    'ltm.train.trainer', 'ltm.eval.evaluate') if m in sys.modules))\n"
             "    return 0\n"
             "ltm.launch.launch_local = launch_local\n"
             "from ltm.cli import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    run = tmp_path / "R"  # what `ltm eval` checks before it starts ranks: a config and a tag folder
    (run / "checkpoints" / tag_for(6)).mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(tag_for(6))
    save_config(load_config(config), run / "config.yaml")
    for command in (["train", "--config", str(config)], ["eval", "--run", str(run)]):
        proc = subprocess.run([sys.executable, "-c", probe, *command, "--nproc", "2"], env=ENV, capture_output=True,
                              text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == "2 []", command


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _rank_of(pid: int) -> int:
    env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    return int(env["RANK"])


def test_preemption_signal_saves_at_the_next_step_and_exits_cleanly(shards, tmp_path):
    config = write_config(tmp_path, shards, tmp_path / "P", epochs=100, ckpt_every=1000, val_every=0)
    cmd = [sys.executable, "-m", "ltm.cli", "train", "--config", str(config), "--nproc", "2"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "P" / "metrics.jsonl"
    deadline = time.time() + 300
    # past step 3: the epoch-end checkpoint of step 2 is older than the one the signal will make
    while not (metrics.is_file() and '"step": 3' in metrics.read_text()) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    signalled_at = max(r["step"] for r in records(tmp_path / "P", "train"))
    rank1 = next(pid for pid in _children(proc.pid) if _rank_of(pid) == 1)
    os.kill(rank1, signal.SIGUSR1)  # one rank only: the ranks must agree through the step's all-reduce
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["status"] == "preempted"
    assert signalled_at < result["step"] < 200
    ckpt = Checkpointer(tmp_path / "P" / "checkpoints")
    assert ckpt.latest() == tag_for(result["step"]) and ckpt.verify(ckpt.latest())["world_size"] == 2
    end = records(tmp_path / "P", "end")
    assert end[-1]["status"] == "preempted"

    # the same command resumes from the checkpoint the signal wrote (an older epoch-end tag exists as well)
    k = result["step"]
    assert tag_for(2) in ckpt.tags() and k > 3
    done = ltm_train(config, f"train.epochs={k // 2 + 2}", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {ckpt.dir / tag_for(k)} (step {k}," in done.stderr
    assert [r["step"] for r in records(tmp_path / "P", "train")] == list(range(1, 2 * (k // 2 + 2) + 1))
    assert [(r["status"], r["step"]) for r in records(tmp_path / "P", "end")] == [
        ("preempted", k), ("completed", 2 * (k // 2 + 2))]


def test_errors_name_the_file(run_a, shards, tmp_path):
    from ltm.train.trainer import train

    run_dir = run_a["run_dir"]
    other_model = load_config(run_a["config"], ["model.backbone=resnet18"])
    with pytest.raises(ConfigError, match=f"{run_dir}/config.yaml.*model.backbone"):
        train(other_model)

    cfg = load_config(run_a["config"])
    with pytest.raises(CheckpointError, match=f"{run_dir}/checkpoints/step00000099: no such tag"):
        train(cfg, resume="step00000099")
    with pytest.raises(CheckpointError, match="holds checkpoints"):
        train(cfg, resume="never")

    broken = tmp_path / "D"
    shutil.copytree(run_dir, broken)
    victim = broken / "checkpoints" / "step00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{victim}: corrupt"):
        train(load_config(run_a["config"], [f"train.run_dir={broken}"]))

    (broken / "checkpoints" / "step00000006" / COMPLETE).unlink()
    with pytest.raises(CheckpointError, match="step00000006: incomplete"):
        train(load_config(run_a["config"], [f"train.run_dir={broken}"]))


def test_keep_last_and_incomplete_tags(tmp_path):
    """Pruning keeps the newest K complete tags and the one `latest` names; unfinished saves never count."""
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        folder = tmp_path / tag_for(step)
        folder.mkdir()
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
        if step != 4:  # step 4's save was interrupted
            (folder / COMPLETE).write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": step},
                                                       "world_size": 1}))
    (tmp_path / "latest").write_text(tag_for(1))  # resumed from an older tag
    assert ckpt.tags() == [tag_for(1), tag_for(2), tag_for(3)]
    ckpt.prune()
    assert ckpt.tags() == [tag_for(1), tag_for(2), tag_for(3)]  # newest two, and the one latest names
    (tmp_path / "latest").write_text(tag_for(3))
    ckpt.prune()
    assert ckpt.tags() == [tag_for(2), tag_for(3)]
    ckpt.drop_incomplete()
    assert not (tmp_path / tag_for(4)).exists()
    (tmp_path / tag_for(3) / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{tmp_path / tag_for(3) / 'mp_rank_00_model_states.pt'}: corrupt"):
        ckpt.resolve("auto")
    with pytest.raises(CheckpointError, match="expected step<8 digits>"):
        ckpt.resolve("last")


# ------------------------------------------------------------------------------------------------ training paths


def edit_config(path: Path, run_dir: Path, **sections) -> Path:
    """A copy of a write_config file for another run folder, with some sections' keys replaced."""
    cfg = json.loads(path.read_text())
    cfg["train"]["run_dir"] = str(run_dir)
    for section, values in sections.items():
        cfg[section].update(values)
    out = path.with_name(f"{run_dir.name}.yaml")
    out.write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="session")
def artifact_shards(tmp_path_factory) -> Path:
    """Fakes carry a full-frame checkerboard of 4 px blocks (+-30 grey levels under noise of 12), learnable."""
    from data_prep.shards import write_shards

    root = tmp_path_factory.mktemp("artifact")
    rng = np.random.default_rng(2)
    board = (((np.indices((64, 64)) // 4).sum(0) % 2) * 60 - 30)[..., None]
    for split, count in (("train", 64), ("val", 32)):
        samples = []
        for i in range(2 * count):
            fake = i % 2
            img = rng.integers(60, 200, size=3) + rng.normal(0, 12, (64, 64, 3)) + fake * board
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95)
            samples.append({"__key__": f"{split}{i // 4:03d}-{i % 4:06d}", "jpg": buf.getvalue(), "cls": fake,
                            "json": {"dataset": "synth", "split": split, "video": f"{split}{i // 4:03d}",
                                     "frame": i % 4, "label": fake, "method": "fake" if fake else "real"}})
        write_shards(samples, root / "synth" / split / "mixed", f"synth-{split}-mixed", max_samples=64)
    return root


def test_training_learns_the_planted_artifact(artifact_shards, tmp_path):
    """A short run on one rank from random weights: validation AUC of the student (the inference head) ends far
    above chance and every part of the model moved (a no-op optimizer step or a detached term would leave a part
    where it started)."""
    from ltm.models import build_model

    base = write_config(tmp_path, artifact_shards, tmp_path / "L")
    config = edit_config(base, tmp_path / "L", model={"backbone": "mobilenetv3_small_050", "pretrained": None},
                         data={"train": [{"path": "synth/train/mixed", "weight": 1}],
                                                     "val": ["synth/val"]},
                         train={"batch_size": 16, "iters_per_epoch": 10, "epochs": 5, "lr": 0.03,
                                "val_every": 10, "ckpt_every": 50})
    train_here(config)
    val = records(tmp_path / "L", "val")
    assert [r["step"] for r in val] == [10, 20, 30, 40, 50] and val[-1]["val_frames"] == 64
    assert val[-1]["val_auc"] > 0.85, val
    cfg = load_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the Trainer's initial weights
        start = build_model(cfg.model, cfg.data.image_size).state_dict()
    end = module_state(tmp_path / "L", tag_for(50))
    for part in ("teacher_cnn.", "teacher_vit.", "teacher_cnn_head.", "teacher_vit_head.", "student_cnn.",
                 "student_head."):
        names = [k for k in start if k.startswith(part) and start[k].is_floating_point()]
        assert names, part
        moved = sum(not torch.equal(start[k], end[k]) for k in names)
        assert moved > len(names) // 2, f"{part}: {moved} of {len(names)} tensors changed"


@pytest.fixture(scope="session")
def mixed_shards(shards) -> Path:
    """One training folder holding both classes: its sample order does not depend on the batch size."""
    from data_prep.shards import write_shards

    rng = np.random.default_rng(1)
    samples = [{"__key__": f"mixed{i // 4:03d}-{i % 4:06d}", "jpg": _jpeg(rng, i % 2), "cls": i % 2,
                "json": {"dataset": "synth", "split": "train", "video": f"mixed{i // 4:03d}", "frame": i % 4,
                         "label": i % 2, "method": "mixed"}} for i in range(32)]
    write_shards(samples, shards / "synth" / "mixed", "synth-mixed", max_samples=16)
    return shards


def test_grad_accum_equals_the_larger_batch(mixed_shards, tmp_path):
    """batch 8 as 2 micro-batches of 4 (train.grad_accum=2) ends with the weights of batch 8 in one go.

    BatchNorm statistics and the mixup partners depend on the micro-batch, so this model has neither (ConvNeXt
    has LayerNorm; mixup off, `high` mask): what remains is the gradient, which accumulation must average exactly.
    """
    base = write_config(tmp_path, mixed_shards, tmp_path / "G1")
    model = {"backbone": "convnext_atto", "pretrained": None, "mixup": False, "mask_strategy": "high"}
    data = {"train": [{"path": "synth/mixed", "weight": 1}], "val": []}
    train = {"batch_size": 8, "epochs": 2, "val_every": 0, "lr": 0.05}
    runs = {}
    for name, accum in (("G1", 1), ("G2", 2)):
        train_here(edit_config(base, tmp_path / name, model=model, data=data, train={**train, "grad_accum": accum}))
        runs[name] = (module_state(tmp_path / name, tag_for(4)), records(tmp_path / name, "train"))
    (one, log_one), (two, log_two) = runs["G1"], runs["G2"]
    assert one.keys() == two.keys()
    changed = 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-4, msg=k)
        changed += not torch.equal(one[k], module_state(tmp_path / "G1", tag_for(2))[k])
    assert changed > len(one) // 2  # steps 3-4 moved the weights: the comparison is not between two idle models
    assert [r["samples"] for r in log_two] == [r["samples"] for r in log_one] == [8, 16, 24, 32]
    for a, b in zip(log_one, log_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)


def test_zero2_trains_like_zero1_and_resumes_exactly(run_a, shards, tmp_path):
    """ZeRO-2 on 2 ranks, stopped after epoch 2 and continued to epoch 3 in a new process: the same weights as the
    uninterrupted ZeRO-1 run A (two ranks' gradient sums are exact in any order)."""
    config = write_config(tmp_path, shards, tmp_path / "Z", zero_stage=2, epochs=2)
    first = ltm_train(config, nproc=2)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = Checkpointer(tmp_path / "Z" / "checkpoints")
    assert ckpt.latest() == tag_for(4) and ckpt.verify(tag_for(4))["zero_stage"] == 2
    done = ltm_train(config, "train.epochs=3", nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {tmp_path / 'Z' / 'checkpoints' / tag_for(4)} (step 4," in done.stderr
    assert_same_weights(module_state(tmp_path / "Z", tag_for(6)), run_a["weights"])
    assert records(tmp_path / "Z", "train") == run_a["train"]


def _resume_copy_of_run_a(run_a, tmp_path: Path, name: str, *args: str) -> tuple[Path, float]:
    run_dir = tmp_path / name
    shutil.copytree(run_a["run_dir"], run_dir)
    config = edit_config(run_a["config"], run_dir)
    saved_at = json.loads((run_dir / "checkpoints" / tag_for(6) / COMPLETE).read_text())["time"]
    done = ltm_train(config, "--resume", tag_for(4), *args, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(4)} (step 4," in done.stderr
    return run_dir, saved_at


def test_resume_from_an_older_tag_continues_exactly(run_a, tmp_path):
    """`--resume step00000004` in a folder whose latest is step 6: steps 5-6 are trained again, to run A's weights."""
    run_dir, saved_at = _resume_copy_of_run_a(run_a, tmp_path, "R")
    info = json.loads((run_dir / "checkpoints" / tag_for(6) / COMPLETE).read_text())
    assert info["time"] > saved_at  # step 6 was saved again by this run
    assert_same_weights(module_state(run_dir, tag_for(6)), run_a["weights"])
    assert records(run_dir, "train") == run_a["train"] and records(run_dir, "val") == run_a["val"]


def test_universal_resume_at_the_same_world_size(run_a, tmp_path):
    """`--universal` on the same 2 ranks: loads through the converted checkpoint and lands on run A's weights."""
    run_dir, _ = _resume_copy_of_run_a(run_a, tmp_path, "U", "--universal")
    assert (run_dir / "checkpoints" / "universal" / tag_for(4) / COMPLETE).is_file()
    assert_same_weights(module_state(run_dir, tag_for(6)), run_a["weights"])
    assert records(run_dir, "train") == run_a["train"]


def test_resume_keeps_metrics_when_the_last_line_was_cut_short(tmp_path):
    """A node crash mid-write leaves half a JSON line in metrics.jsonl; the resumed run drops it and goes on."""
    from ltm.train.metrics_log import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 1}\n{"type": "train", "step": 2}\n{"type": "train", "step": 3}\n'
                    '{"type": "train", "st')
    log = MetricsLog(tmp_path, start_step=2, enabled=True)
    log.write({"type": "train", "step": 3, "loss": 0.5})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_logged_throughput_data_stall_and_mfu(shards, tmp_path, monkeypatch):
    """Every train record has images/s, the data-stall fraction, achieved TFLOP/s (from the model's FLOP count) and,
    with a peak, MFU. The trainer reads a clock the test moves, and only the test: by `wait` while the loader hands
    over a batch and by `step` in each optimizer step. Each figure is then exact on any machine under any load: the
    stall is wait / (wait + step), images/s is batch / (wait + step)."""
    import types

    from torch.optim.optimizer import register_optimizer_step_post_hook

    import ltm.data
    import ltm.train.trainer as trainer_module
    from ltm.models.flops import train_flops_per_step
    from ltm.train.trainer import Trainer

    step = 0.25
    clock = [1000.0]

    def advance(seconds: float) -> None:
        clock[0] += seconds

    # the trainer's `time` with perf_counter on the test's clock; everything else is the real module's
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.perf_counter = lambda: clock[0]
    monkeypatch.setattr(trainer_module, "time", fake_time)
    hook = register_optimizer_step_post_hook(lambda *_: advance(step))

    class LateLoader:
        """The real loader; each batch arrives `wait` seconds late on the test's clock."""

        def __init__(self, inner, wait: float):
            self.inner, self.wait = inner, wait

        def __next__(self):
            advance(self.wait)
            return next(self.inner)

        def __iter__(self):
            return self

        def __getattr__(self, name):
            return getattr(self.inner, name)

    real = ltm.data.build_train_loader
    try:
        for name, wait in (("plain", 0.0), ("slow", 0.75)):
            monkeypatch.setattr(ltm.data, "build_train_loader",
                                lambda *a, wait=wait, **k: LateLoader(real(*a, **k), wait))
            cfg = load_config(write_config(tmp_path, shards, tmp_path / name, iters_per_epoch=4, epochs=1,
                                           log_every=2, val_every=0, ckpt_every=4),
                              ["data.val=[]", "train.peak_tflops=2.0"])
            trainer = Trainer(cfg)
            trainer.fit()
            trainer.close()
            logged = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            train_records = [r for r in logged if r["type"] == "train"]
            assert len(train_records) == 2
            seconds = wait + step  # per step, on the test's clock
            flops = train_flops_per_step(cfg)
            for r in train_records:
                assert r["data_stall"] == pytest.approx(wait / seconds, abs=1e-9)
                assert r["images_per_s"] == pytest.approx(cfg.train.batch_size / seconds, rel=1e-9)
                assert r["tflops"] == pytest.approx(flops / seconds / 1e12, rel=1e-9)
                assert r["mfu"] == pytest.approx(r["tflops"] / 2.0, rel=1e-9)
    finally:
        hook.remove()


def test_profile_writes_a_trace_and_changes_nothing(shards, tmp_path):
    """train.profile traces steps 2..3 on rank 0 into <run>/profile/ (a Chrome/Perfetto trace); the weights and
    the logged losses equal those of the same run without it."""
    from ltm.train.trainer import Trainer

    states = {}
    for name, profile in (("plain", []), ("profiled", ["train.profile.start=2", "train.profile.steps=2"])):
        cfg = load_config(write_config(tmp_path, shards, tmp_path / name, iters_per_epoch=4, epochs=1, log_every=1,
                                       val_every=0, ckpt_every=4), ["data.val=[]", *profile])
        trainer = Trainer(cfg)
        trainer.fit()
        states[name] = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
        trainer.close()
    assert_same_weights(states["plain"], states["profiled"])
    assert records(tmp_path / "plain", "train") == records(tmp_path / "profiled", "train")
    traces = list((tmp_path / "profiled" / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1 and not (tmp_path / "plain" / "profile").exists()
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("ProfilerStep" in e.get("name", "") or "aten::" in e.get("name", "") for e in events)
    with pytest.raises(ConfigError, match="train.profile.steps"):
        load_config("tiny-cpu", ["train.profile.start=3"])


def _train_state(shards: Path, tmp_path: Path, name: str, *overrides: str, epochs: int = 1) -> dict:
    from ltm.train.trainer import Trainer

    cfg = load_config(write_config(tmp_path, shards, tmp_path / name, iters_per_epoch=3, epochs=epochs, log_every=1,
                                   val_every=0, ckpt_every=3), ["data.val=[]", *overrides])
    trainer = Trainer(cfg)
    trainer.fit()
    state = {k: v.detach().clone().contiguous() for k, v in trainer.engine.module.state_dict().items()}
    trainer.close()
    return state


def test_speed_options_train_the_same_model(shards, tmp_path):
    """foreach/for-loop SGD kernels are the same arithmetic: bitwise equal weights. The fused kernel reorders
    floating-point operations: weights within 1e-7 (relative) after 3 steps. channels_last changes the order of the
    convolutions' sums: the first step's loss (the same weights) within 1e-5; this tiny config's later steps amplify
    the rounding (its loss rises from 2.0 to 3.0 in 3 steps), so they are held to 1e-2 (fp32, CPU).

    At 2 intra-op threads whatever the process was started with (make test: one): the rounding of a sum depends on
    how many threads share it, and these bounds were measured at 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _speed_options_train_the_same_model(shards, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _speed_options_train_the_same_model(shards: Path, tmp_path: Path) -> None:
    base = _train_state(shards, tmp_path, "default")
    base_losses = [r["loss"] for r in records(tmp_path / "default", "train")]
    assert_same_weights(base, _train_state(shards, tmp_path, "foreach", "train.optimizer_impl=foreach"))
    assert_same_weights(base, _train_state(shards, tmp_path, "loop", "train.optimizer_impl=for-loop"))
    fused = _train_state(shards, tmp_path, "fused", "train.optimizer_impl=fused")
    assert max(float((base[k].float() - fused[k].float()).abs().max() / base[k].float().abs().max().clamp_min(1))
               for k in base) < 1e-7
    _train_state(shards, tmp_path, "nhwc", "train.channels_last=true")
    losses = [r["loss"] for r in records(tmp_path / "nhwc", "train")]
    assert losses[0] == pytest.approx(base_losses[0], abs=1e-5) and losses != base_losses
    assert losses == pytest.approx(base_losses, abs=1e-2)


def test_student_lr_scale_moves_only_the_student_further(shards, tmp_path):
    """train.student_lr_scale=2: after the first SGD step (momentum buffer = gradient) every student weight has moved
    twice as far as with one learning rate, every teacher weight exactly as far; the scheduler decays both groups.
    A Baseline has no student: refused, naming the key."""
    from ltm.config import ConfigError
    from ltm.train.trainer import Trainer

    def first_step(name: str, *overrides: str) -> tuple[dict, dict, Trainer]:
        cfg = load_config(write_config(tmp_path, shards, tmp_path / name, iters_per_epoch=1, epochs=1, log_every=1,
                                       val_every=0, ckpt_every=1), ["data.val=[]", *overrides])
        trainer = Trainer(cfg)
        before = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
        trainer.fit()
        after = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
        trainer.close()
        return before, after, trainer

    b1, a1, _ = first_step("one")
    b2, a2, trainer = first_step("two", "train.student_lr_scale=2")
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.01 * 0.9, 0.02 * 0.9])
    moved = {"student": 0, "teacher": 0}
    for k in b1:
        assert torch.equal(b1[k], b2[k]), k  # the same initial weights
        if not b1[k].is_floating_point() or "running" in k or torch.equal(a1[k], b1[k]):
            continue  # counters, BatchNorm statistics (not SGD's), weights without gradient at this step
        part = "student" if k.startswith("student_") else "teacher"
        factor = 2.0 if part == "student" else 1.0
        # differences of fp32 weights: exact to a few ulps of the weight, not of the (smaller) step
        torch.testing.assert_close(a2[k] - b2[k], factor * (a1[k] - b1[k]), rtol=1e-4,
                                   atol=4 * float(b1[k].abs().max()) * 2**-23, msg=lambda m, k=k: f"{k}: {m}")
        moved[part] += 1
    assert moved["student"] > 10 and moved["teacher"] > 10, moved
    with pytest.raises(ConfigError, match="student_lr_scale"):
        first_step("base", "model.kind=baseline", "train.student_lr_scale=2")


def test_channels_last_run_resumes_exactly(shards, tmp_path):
    """Checkpoints hold weights, not memory formats: a channels_last run killed after its first epoch and resumed
    ends with the weights of the same run trained straight through."""
    straight = _train_state(shards, tmp_path, "straight", "train.channels_last=true", epochs=2)
    _train_state(shards, tmp_path, "split", "train.channels_last=true", epochs=1)
    resumed = _train_state(shards, tmp_path, "split", "train.channels_last=true", epochs=2)
    assert_same_weights(straight, resumed)


# the compile tests' model: timm's smallest ResNet (random init) keeps inductor's compile short on 2 cores
COMPILE_MODEL = ("model.backbone=test_resnet", "model.pretrained=null")


@pytest.mark.timeout(1200)  # a cold inductor cache: the first compile alone took 2-5 min on the shared 2-core machine
def test_compiled_model_trains_like_eager_resumes_exactly_and_loads_in_eval(shards, tmp_path):
    """train.compile=default compiles the model inside the DeepSpeed engine (inductor, C++ kernels). The state-dict
    keys stay the eager model's (no `_orig_mod.` prefix), so a compiled run resumes, and its checkpoint loads in
    `ltm eval`'s loader. With train.deterministic inductor uses eager's random ops: the first loss (the random mask
    strategy and mixup on) equals the eager run's within 1e-6; the fused kernels sum in another order, so the later
    losses are held to 1e-2 (fp32, CPU). A compiled run stopped after its first epoch and resumed ends bitwise equal
    to the compiled run trained straight through."""
    from ltm.checkpoint.reader import load_model
    from ltm.train.trainer import Trainer

    eager = _train_state(shards, tmp_path, "eager", *COMPILE_MODEL)
    eager_losses = [r["loss"] for r in records(tmp_path / "eager", "train")]

    def compiled_run(name: str, epochs: int) -> dict[str, torch.Tensor]:
        cfg = load_config(write_config(tmp_path, shards, tmp_path / name, iters_per_epoch=3, epochs=epochs,
                                       log_every=1, val_every=0, ckpt_every=3),
                          ["data.val=[]", *COMPILE_MODEL, "train.compile=default"])
        trainer = Trainer(cfg)
        assert trainer.engine.is_compiled  # the option reached the engine
        trainer.fit()
        state = {k: v.detach().clone().contiguous() for k, v in trainer.engine.module.state_dict().items()}
        trainer.close()
        return state

    straight = compiled_run("compiled", epochs=2)
    assert list(straight) == list(eager)  # the same keys in the same order: checkpoints are interchangeable
    losses = [r["loss"] for r in records(tmp_path / "compiled", "train")][:3]
    assert losses[0] == pytest.approx(eager_losses[0], abs=1e-6)
    assert losses == pytest.approx(eager_losses, abs=1e-2)

    compiled_run("split", epochs=1)
    resumed = compiled_run("split", epochs=2)
    assert_same_weights(straight, resumed)

    model, cfg, source = load_model(tmp_path / "split")  # ltm eval's loader: strict keys, the eager model
    assert cfg.train.compile == "default" and source.endswith(tag_for(6))
    assert_same_weights(straight, {k: v.contiguous() for k, v in model.state_dict().items()})


def test_linear_lr_scaling_sets_the_optimizer_rate(shards, tmp_path, caplog):
    """train.lr_scaling=linear: the SGD groups start at lr x batch_size / 32 (the student's at that x
    student_lr_scale) and the schedule decays from there; a world of one says nothing about the per-rank batch."""
    import logging

    from ltm.train.trainer import Trainer

    cfg = load_config(write_config(tmp_path, shards, tmp_path / "scaled", batch_size=8, iters_per_epoch=1, epochs=1,
                                   val_every=0), ["data.val=[]", "train.lr_scaling=linear",
                                                  "train.student_lr_scale=2"])
    with caplog.at_level(logging.WARNING, logger="ltm.train.trainer"):
        trainer = Trainer(cfg)
    try:
        assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.01 * 8 / 32, 0.02 * 8 / 32])
        assert trainer.scheduler.base_lrs == pytest.approx([0.0025, 0.005])
    finally:
        trainer.close()
    assert "images per rank" not in caplog.text


def test_gradient_maps_train_through_the_trainer(shards, tmp_path):
    """model.attention_map=saliency (and grad) take a backward pass through the teacher inside the forward, occlusion
    h*w extra teacher forwards: a run trains with each (the FLOP count at start-up once failed on that backward) and
    the count includes those passes."""
    from ltm.models.flops import train_flops_per_step
    from ltm.train.trainer import train

    def config(kind: str, name: str, *more: str):
        return load_config(write_config(tmp_path, shards, tmp_path / name, iters_per_epoch=2, epochs=1, val_every=0),
                           ["data.val=[]", f"model.attention_map={kind}", "model.mask_strategy=high", *more])

    for kind, more in (("saliency", ()), ("occlusion", ("model.mask_at=input", "model.real_mask=fake"))):
        result = train(config(kind, kind, *more))
        assert result["status"] == "completed" and result["step"] == 2
        losses = [r["loss"] for r in records(tmp_path / kind, "train")]
        assert losses and all(np.isfinite(losses))
    mean = train_flops_per_step(config("mean", "mean"))
    assert train_flops_per_step(config("saliency", "s2")) > 1.5 * mean
    assert train_flops_per_step(config("grad", "g2")) > 1.5 * mean
    assert train_flops_per_step(config("occlusion", "o2")) > 2 * mean  # h*w teacher forwards
