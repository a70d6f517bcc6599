"""`ltm submit ... --dry-run`: the batch scripts asked for, and nothing written or submitted."""

from __future__ import annotations

import os

import pytest

from launcher.submit import parse_mem_gb, parse_time
from ltm.cli import main
from ltm.config import ConfigError, load_config, save_config


@pytest.fixture
def run_folder(tmp_path, sample_shards):
    """What `ltm submit eval` looks for in a run folder: its config and the checkpoint tag `latest` names."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("tiny-cpu", [f"data.root={sample_shards}", f"train.run_dir={run}"]), run / "config.yaml")
    (run / "checkpoints" / "step00000002").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step00000002\n")
    return run


def sbatch_options(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def scripts(text: str) -> list[str]:
    """The batch scripts of a dry run's output (each starts after a '# ---- <kind> job' header)."""
    return [part for part in text.split("# ---- ")[1:]]


def test_train_dry_run_has_nodes_tasks_gpus_and_dependency(tmp_path, capsys, monkeypatch, sample_shards):
    monkeypatch.chdir(tmp_path)
    status = main(["submit", "train", "--config", "tiny-cpu", "--nodes", "3", "--gpus-per-node", "4",
                   "--cpus-per-task", "6", "--time", "1-02:00:00", "--mem", "64G", "--partition", "gpu",
                   "--account", "proj", "--qos", "high", "--constraint", "a100", "--exclusive",
                   "--setup", "module load cuda/12.4\nexport NCCL_DEBUG=WARN", "--eval", "ffpp_c23/test",
                   "--dry-run", "train.run_dir=runs/x", f"data.root={sample_shards}",
                   "train.batch_size=48"])  # divides over the 12 ranks (32 would be refused)
    assert status == 0
    out = capsys.readouterr().out
    train, evaluation = scripts(out)
    opts = sbatch_options(train)
    assert opts["nodes"] == "3" and opts["ntasks-per-node"] == "4" and opts["gpus-per-node"] == "4"
    assert opts["cpus-per-task"] == "6" and opts["time"] == str(26 * 60) and opts["mem"] == "64GB"
    assert opts["partition"] == "gpu" and opts["account"] == "proj" and opts["qos"] == "high"
    assert opts["constraint"] == "a100" and "exclusive" in opts and "requeue" in opts
    assert opts["signal"] == "USR2@120"
    assert "module load cuda/12.4\nexport NCCL_DEBUG=WARN\n" in train
    assert "srun" in train and "--kill-on-bad-exit=1" in train
    eopts = sbatch_options(evaluation)
    assert eopts["dependency"] == "afterok:TRAIN_JOB_ID" and eopts["kill-on-invalid-dep"] == "yes"
    assert eopts["nodes"] == "1" and eopts["gpus-per-node"] == "4"
    assert "world_size=12" in out
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_cpu_training_is_one_task_per_node_without_gpus(tmp_path, capsys, monkeypatch, sample_shards):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "train", "--config", "tiny-cpu", "--nodes", "2", "--dry-run", "launch.max_requeue=5",
                 f"data.root={sample_shards}"]) == 0
    (train,) = scripts(capsys.readouterr().out)
    opts = sbatch_options(train)
    assert opts["nodes"] == "2" and opts["ntasks-per-node"] == "1" and "gpus-per-node" not in opts
    assert "dependency" not in opts


def test_eval_and_prep_dry_runs(tmp_path, capsys, monkeypatch, run_folder, sample_root):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "eval", "--run", str(run_folder), "--data", "ffpp_c23/test", "--after", "42",
                 "--gpus-per-node", "2", "--dry-run"]) == 0
    (evaluation,) = scripts(capsys.readouterr().out)
    opts = sbatch_options(evaluation)
    assert opts["dependency"] == "afterok:42" and opts["ntasks-per-node"] == "2" and opts["nodes"] == "1"

    # launch flags may stand before or after the dataset; the rest goes to `ltm prep`
    assert main(["submit", "prep", "--cpus-per-task", "3", "ffpp", "--root", str(sample_root), "--array", "4",
                 "--dry-run", "--splits", str(sample_root / "splits"), "--out", "shards"]) == 0
    out = capsys.readouterr().out
    parts, merge = scripts(out)
    assert sbatch_options(parts)["array"] == "0-3%4" and sbatch_options(parts)["cpus-per-task"] == "3"
    assert sbatch_options(merge)["dependency"] == "afterok:PREP_ARRAY_JOB_ID"
    assert "parts=4 (--part i/4)" in out
    assert os.listdir(tmp_path) == ["run"]


def test_bad_resources_are_clear_errors(caplog):
    assert parse_time("90") == 90 and parse_time("01:30:00") == 90 and parse_time("2-00") == 2880
    assert parse_time("0:30") == 1 and parse_mem_gb("65536M") == 64 and parse_mem_gb("2T") == 2048
    with pytest.raises(ConfigError, match="--time"):
        parse_time("soon")
    with pytest.raises(ConfigError, match="--mem"):
        parse_mem_gb("lots")
    assert main(["submit", "train", "--config", "tiny-cpu", "--nodes", "0", "--dry-run"]) == 2
    assert "--nodes 0: must be >= 1" in caplog.text
