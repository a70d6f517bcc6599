"""Nothing queues that can only fail: `ltm submit ...` and `ltm reproduce` check what the login node can check
(also with --dry-run), name every problem at once, one line each, exit 2; a refused sbatch is one line with
SLURM's message and leaves nothing behind. The real local SLURM cluster (tests/conftest.py) takes the jobs."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from ltm.cli import main
from ltm.config import load_config, save_config

SLURM_CPU = ["--nodes", "1", "--gpus-per-node", "0", "--cpus-per-task", "1", "--time", "15"]


@pytest.fixture
def cli(caplog, capsys):
    """`ltm ...` in this process: (exit status, the ERROR lines logged, the WARNING lines, stdout, stderr)."""

    def call(*argv: str):
        caplog.clear()
        capsys.readouterr()
        with caplog.at_level(logging.INFO):
            status = main(list(argv))
        out = capsys.readouterr()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        return status, errors, warnings, out.out, out.err

    return call


def queued_names() -> list[str]:
    proc = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, check=True)
    return proc.stdout.split()


# --- prep: the array tasks' arguments are `ltm prep`'s, checked with its own parser and dataset listing -----------

def test_submit_prep_refuses_missing_splits_and_root_before_queueing(cli, tmp_path, monkeypatch, sample_root):
    monkeypatch.chdir(tmp_path)
    for dry in (["--dry-run"], []):
        status, errors, *_ = cli("submit", "prep", "ffpp", "--root", str(tmp_path / "nope"), "--out", "shards",
                                 "--array", "16", *dry)
        assert status == 2
        assert errors == ["ltm prep ffpp: the following arguments are required: --splits",
                          f"--root '{tmp_path / 'nope'}': no such folder"]
        # the root exists but holds no FF++ layout; the split files are missing
        status, errors, *_ = cli("submit", "prep", "ffpp", "--root", str(tmp_path), "--splits",
                                 str(tmp_path / "splits"), "--out", "shards", "--array", "2", *dry)
        assert status == 2 and len(errors) == 1 and "FF++ real videos" in errors[0]
        status, errors, *_ = cli("submit", "prep", "folder", "--root", str(sample_root / "splits"), "--out",
                                 "shards", "--array", "2", *dry)  # a folder without real/ and fake/
        assert status == 2 and len(errors) == 1, errors
    assert os.listdir(tmp_path) == []  # no <out>/.slurm, nothing queued

    status, errors, _, out, _ = cli("submit", "prep", "ffpp", "--root", str(sample_root), "--splits",
                                    str(sample_root / "splits"), "--out", "shards", "--array", "2", "--dry-run")
    assert status == 0 and errors == [] and "parts=2" in out


# --- train: inputs, weights and the launch against the config, on dry runs too ---------------------------------

def test_submit_train_names_every_problem_at_once(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: resnet18's ImageNet weights are not here
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    status, errors, *_ = cli("submit", "train", "--config", "tiny-cpu", "--dry-run", "--eval", "x/test",
                             "data.root=missing", "model.backbone=resnet18", "train.precision=bf16")
    assert status == 2
    assert errors[0].startswith("data.root '") and "missing': no such folder" in errors[0]
    assert "ltm weights fetch resnet18" in errors[1]  # the dry run checks the weights as the real submit does
    assert errors[2].startswith("train.precision=bf16 needs GPUs but the job asks for none")
    assert len(errors) == 3


def test_submit_train_names_missing_shard_folders_and_resume_tags(cli, tmp_path, sample_shards):
    run = tmp_path / "run"
    status, errors, *_ = cli("submit", "train", "--config", "tiny-cpu", "--dry-run", "--eval", "ffpp_c23/nope",
                             "--resume", "step00000007", f"data.root={sample_shards}", f"train.run_dir={run}",
                             "data.train=[{path: ffpp_c23/train/real}, {path: ffpp_c23/train/Deepfakes}]")
    assert status == 2
    assert errors[0].startswith("data.train 'ffpp_c23/train/Deepfakes': shard folder") and "does not exist" in errors[0]
    assert errors[1].startswith("--eval 'ffpp_c23/nope': shard folder")
    assert errors[2].startswith("--resume step00000007: checkpoint") and "no such tag" in errors[2]
    assert len(errors) == 3 and not run.exists()


def paper_on_sample(sample_shards: Path, run: Path) -> list[str]:
    """The paper config on the sample's methods, random init (no hub here): only the launch is left to check."""
    return [f"data.root={sample_shards}", f"train.run_dir={run}", "model.pretrained=null",
            "data.train=[{path: ffpp_c23/train/real, weight: 2}, {path: ffpp_c23/train/SelfBlend, weight: 1}, "
            "{path: ffpp_c23/train/FaceSwap, weight: 1}]"]


def test_the_paper_config_gets_a_gpu_and_a_wall_time_that_fits(cli, tmp_path, sample_shards):
    overrides = paper_on_sample(sample_shards, tmp_path / "run")
    status, errors, warnings, out, _ = cli("submit", "train", "--config", "paper", "--dry-run", *overrides)
    assert status == 0 and errors == [] and warnings == []
    assert "#SBATCH --gpus-per-node=1" in out and "#SBATCH --time=120" in out and "#SBATCH --cpus-per-task=8" in out

    status, errors, *_ = cli("submit", "train", "--config", "paper", "--gpus-per-node", "0", "--dry-run", *overrides)
    assert status == 2 and errors == ["train.precision=bf16 needs GPUs but the job asks for none: give "
                                      "--gpus-per-node N (launch.gpus_per_node), or train.precision=fp32 for a CPU run"]

    # 9,000 steps of LTM-Xception: 0.19 GPU hours at 25 TFLOP/s (the sample's val/test frames), x1.25 = 14 minutes
    status, errors, *_ = cli("submit", "train", "--config", "paper", "--time", "3", "--max-requeue", "3",
                             "--dry-run", *overrides)
    assert status == 2 and len(errors) == 1
    assert errors[0].startswith("--time 3 min (launch.time_min) x 4 allocation(s) (1 + launch.max_requeue=3) is "
                                "too short: the run needs about 0.19 h on 1 GPU(s)")
    assert "margin: 14 min" in errors[0]
    status, errors, warnings, *_ = cli("submit", "train", "--config", "paper", "--time", "10", "--dry-run",
                                       *overrides)
    assert status == 0 and errors == [] and len(warnings) == 1
    assert warnings[0].startswith("--time 10 min is below the estimate") and "about 2 allocations" in warnings[0]
    # eight GPUs share the same work
    status, errors, warnings, *_ = cli("submit", "train", "--config", "paper", "--time", "3", "--gpus-per-node",
                                       "8", "--dry-run", *overrides)
    assert status == 0 and warnings == []


def test_submit_eval_checks_the_run_and_data(cli, tmp_path, sample_shards):
    status, errors, *_ = cli("submit", "eval", "--run", str(tmp_path / "norun"), "--data", "x", "--dry-run")
    assert status == 2 and errors == [f"--run: run folder '{tmp_path / 'norun'}': no such folder"]
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("tiny-cpu", [f"data.root={sample_shards}"]), run / "config.yaml")
    status, errors, *_ = cli("submit", "eval", "--run", str(run), "--data", "ffpp_c23/test", "--data", "nope",
                             "--dry-run")
    assert status == 2 and len(errors) == 2
    assert errors[0].startswith("--tag latest:") and "no finished checkpoint" in errors[0]
    assert errors[1].startswith("--data 'nope': shard folder")


# --- reproduce ------------------------------------------------------------------------------------------------------

def test_collect_from_a_missing_runs_folder_is_an_error(cli, tmp_path):
    status, errors, *_ = cli("reproduce", "table2", "--runs", str(tmp_path / "typo"), "--collect")
    assert status == 2 and errors == [f"--runs '{tmp_path / 'typo'}': no such folder (nothing to collect)"]
    assert not (tmp_path / "typo").exists()


def test_estimate_needs_no_shards_and_dry_run_keeps_its_listing(cli, tmp_path, sample_shards):
    status, errors, _, out, _ = cli("reproduce", "table4", "--runs", str(tmp_path / "runs"), "--estimate",
                                    "--rows", "high")
    assert status == 0 and errors == [] and "GPU hours" in out
    status, errors, _, out, _ = cli("reproduce", "table4", "--runs", str(tmp_path / "runs"), "--estimate",
                                    "--dry-run", "--local", "--rows", "high", "--columns", "ffpp_c23",
                                    "--shards", str(sample_shards), "--base", "tiny-cpu",
                                    "--map", "Deepfakes=SelfBlend", "--map", "Face2Face=SelfBlend",
                                    "--map", "NeuralTextures=FaceSwap")
    assert status == 0 and "GPU hours" in out and "table4: 1 run x 1 seed = 1 point, 1 to do" in out
    assert "here, in this order (each trained to its budget, then scored): ffpp_c23_ltm seed 0" in out


@pytest.mark.slurm
def test_reproduce_with_missing_shards_queues_nothing(cli, slurm_cluster, tmp_path):
    runs = tmp_path / "runs"
    for dry in (["--dry-run"], []):
        status, errors, *_ = cli("reproduce", "table2", "--shards", str(tmp_path / "missing"), "--runs", str(runs),
                                 "--base", "tiny-cpu", *SLURM_CPU, *dry)
        assert status == 2 and errors == [f"--shards '{tmp_path / 'missing'}': no such folder"]
    assert not runs.exists() and not any("ltm-train" in n for n in queued_names())


# --- a refused sbatch -------------------------------------------------------------------------------------------------

@pytest.mark.slurm
def test_refused_sbatch_is_one_line_and_leaves_nothing_behind(cli, slurm_cluster, tmp_path, sample_shards):
    run = tmp_path / "runs" / "refused"
    status, errors, _, out, err = cli("submit", "train", "--config", "tiny-cpu", *SLURM_CPU, "--partition",
                                      "nosuch", "--eval", "ffpp_c23/test", f"data.root={sample_shards}",
                                      f"train.run_dir={run}")
    assert status == 2
    assert errors == ["sbatch refused the train job: invalid partition specified: nosuch; Batch job submission "
                      "failed: Invalid partition name specified"]
    assert "Traceback" not in err and "sbatch: error" not in err  # submitit's own echo of sbatch's stderr is kept out
    assert not (tmp_path / "runs").exists()  # neither <run>/slurm/train-*/ nor the run folder


@pytest.mark.slurm
def test_refused_prep_array_leaves_no_slurm_folder(cli, slurm_cluster, tmp_path, sample_root):
    out_dir = tmp_path / "shards"
    status, errors, *_ = cli("submit", "prep", "ffpp", "--root", str(sample_root), "--splits",
                             str(sample_root / "splits"), "--out", str(out_dir), "--array", "2", "--partition",
                             "nosuch", "--cpus-per-task", "1")
    assert status == 2 and len(errors) == 1 and errors[0].startswith("sbatch refused the prep array job: invalid "
                                                                     "partition specified: nosuch")
    assert not out_dir.exists()


@pytest.mark.slurm
def test_reproduce_refused_by_sbatch_leaves_no_job_folders(cli, slurm_cluster, tmp_path, sample_shards):
    runs = tmp_path / "runs"
    status, errors, *_ = cli("reproduce", "table4", "--shards", str(sample_shards), "--runs", str(runs), "--rows",
                             "high", "--columns", "ffpp_c23", "--base", "tiny-cpu", "--map", "Deepfakes=SelfBlend",
                             "--map", "Face2Face=SelfBlend", "--map", "NeuralTextures=FaceSwap", *SLURM_CPU,
                             "--partition", "nosuch")
    assert status == 2 and len(errors) == 1 and errors[0].startswith("sbatch refused the sweep array job")
    assert not (runs / "slurm").exists() and not (runs / "points").exists()  # nothing of the array is left


# --- smaller one-line errors and help texts -------------------------------------------------------------------------

def test_unknown_weights_name_and_empty_prep_input_say_what_is_wrong(cli, tmp_path, capsys):
    status, _, _, out, _ = cli("weights", "list", "nosuchnet")
    assert status == 0 and "nosuchnet\tnot a timm model name" in out
    csv = tmp_path / "empty.csv"
    csv.write_text("path,label\n")
    status, errors, *_ = cli("prep", "folder", "--csv", str(csv), "--out", str(tmp_path / "shards"))
    assert status == 2 and errors == [f"empty: no inputs: CSV {csv} lists no videos, frame folders or images"]
    assert not (tmp_path / "shards").exists()


def test_config_errors_name_the_range_the_file_and_list_configs_one_per_line(cli, tmp_path):
    status, errors, *_ = cli("config", "--config", "tiny-cpu", "train.epochs=-3")
    assert status == 2 and errors == ["key 'train.epochs': invalid value -3, must be >= 1"]
    bad = tmp_path / "mine.yaml"
    bad.write_text("base: nosuch\n")
    status, errors, *_ = cli("config", "--config", str(bad))
    assert status == 2 and errors[0].startswith(f"{bad}: key 'base': config 'nosuch': no such file")
    assert "  paper" in errors and "  tiny-cpu" in errors  # one packaged name per line


def test_prep_help_texts(capsys):
    for argv, text in ((["prep", "celebdf", "--help"], "Celeb-DF v2 root"),
                       (["prep", "wdf", "--help"], "WildDeepfake root"),
                       (["prep", "merge", "--help"], "the shard root the --part runs wrote"),
                       (["prep", "sample", "--help"], "an even number >= 6"),
                       (["prep", "ffpp", "--help"], "--splits SPLITS")):
        with pytest.raises(SystemExit):
            main(argv)
        out = " ".join(capsys.readouterr().out.split())
        assert text in out and "[--splits" not in out, (argv, text)  # --splits is required, not optional

