"""Scoring a corpus in slices: `ltm predict --part I/N` (resumable journal) and `--merge N`, and the same as a SLURM
array on the real local cluster (`ltm submit predict`), with one task killed midway and the submission rerun."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_data import SHARED_DATA
from test_export import make_run

from launcher.submit import job_state, submit_predict, wait_for
from ltm.cli import main
from ltm.deploy.predict import parts_dir

FACES = sorted((SHARED_DATA / "faces").glob("deepface__tests_unit_dataset_img*.jpg"))[:9]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Nine real face photos and one picture without a face (an error row), in a folder."""
    folder = tmp_path_factory.mktemp("corpus") / "uploads"
    folder.mkdir()
    for path in FACES:
        (folder / path.name).symlink_to(path)
    Image.fromarray(np.full((160, 160, 3), 127, np.uint8)).save(folder / "blank.png")
    return folder


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, sample_shards) -> Path:
    run = make_run(tmp_path_factory.mktemp("array") / "run", sample_shards)
    out = run / "student.pt"
    assert main(["export", "--run", str(run), "--weights", str(run / "weights.pt"), "--out", str(out)]) == 0
    return out


def read_table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def whole(corpus, model_file, tmp_path_factory) -> list[dict]:
    """The table of one process scoring everything (the reference every sliced run must reproduce)."""
    table = tmp_path_factory.mktemp("whole") / "whole.csv"
    assert main(["predict", str(corpus), "--model", str(model_file), "--csv", str(table)]) == 1  # blank.png fails
    rows = read_table(table)
    assert len(rows) == 10 and [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert sum(1 for r in rows if r["error"]) == 1 and "blank.png: no face found" in rows[0]["error"]
    return rows


def test_parts_then_merge_equal_one_process(corpus, model_file, whole, tmp_path, caplog):
    table = tmp_path / "t.csv"
    args = ["predict", str(corpus), "--model", str(model_file), "--csv", str(table)]
    assert main([*args, "--merge", "3"]) == 2
    assert "no table for part(s) 0-of-3.csv, 1-of-3.csv, 2-of-3.csv" in caplog.text
    for i in range(3):
        assert main([*args, "--part", f"{i}/3"]) == 0  # errors are rows: the task itself succeeds
    journal = parts_dir(table) / "0-of-3.jsonl"
    scored = journal.read_text()
    assert main([*args, "--part", "0/3"]) == 0  # a rerun scores nothing again
    assert journal.read_text() == scored
    assert main([*args, "--merge", "3"]) == 0
    assert read_table(table) == whole
    # the merge refuses parts made from other inputs or another N
    assert main([*args, "--merge", "2"]) == 2 and "no table for part(s)" in caplog.text


def test_a_crash_loses_only_the_file_in_hand(corpus, model_file, whole, tmp_path):
    table = tmp_path / "t.csv"
    args = ["predict", str(corpus), "--model", str(model_file), "--csv", str(table)]
    assert main([*args, "--part", "0/1"]) == 0
    journal = parts_dir(table) / "0-of-1.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # killed while writing the fifth file's line
    (parts_dir(table) / "0-of-1.csv").unlink()
    assert main([*args, "--part", "0/1"]) == 0
    again = [json.loads(line)["path"] for line in journal.read_text().splitlines()[4:]]
    assert again == [r["path"] for r in whole[4:]]  # the four journalled files were not scored again
    assert main([*args, "--merge", "1"]) == 0 and read_table(table) == whole


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """The real videos of the shared media (11 clips, a few seconds each to score): a corpus slow enough to kill a
    task in the middle of its slice."""
    folder = tmp_path_factory.mktemp("videos") / "clips"
    folder.mkdir()
    for path in sorted((SHARED_DATA / "videos").glob("*.mp4"))[:10]:
        (folder / path.name).symlink_to(path)
    return folder


@pytest.mark.slurm
def test_slurm_array_with_a_task_killed_midway_then_rerun(slurm_cluster, videos, model_file, tmp_path):
    from launcher.submit import LaunchConfig

    reference = tmp_path / "whole.csv"
    argv = [str(videos), "--model", str(model_file), "--frames", "64"]  # about 3 s a clip
    assert main(["predict", *argv, "--csv", str(reference)]) in (0, 1)
    whole = read_table(reference)
    assert len(whole) == 10 and all(r["p_fake"] for r in whole)
    table = tmp_path / "scores" / "clips.csv"
    argv += ["--csv", str(table)]
    launch = LaunchConfig(cpus_per_task=1, time_min=15)
    first = submit_predict(argv, 2, launch)
    array_id, merge_id = first["parts"].job_id, first["merge"].job_id
    journal = parts_dir(table) / "0-of-2.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (journal.is_file() and len(journal.read_text().splitlines()) >= 1):
            assert time.monotonic() < deadline and "FAILED" not in job_state(array_id), job_state(array_id)
            time.sleep(0.1)
        subprocess.run(["scancel", f"{array_id}_0"], check=True)  # task 0 dies midway through its slice
        states = wait_for([array_id, merge_id], timeout_s=300)
    finally:
        subprocess.run(["scancel", array_id, merge_id], capture_output=True)
    assert "CANCELLED" in states[array_id] and "COMPLETED" in states[array_id]  # task 1 finished its slice
    assert states[merge_id] in ("CANCELLED", "PENDING") or not table.exists()  # no merge after a failed task
    before = [json.loads(line)["path"] for line in journal.read_text().splitlines() if line.endswith("}")]
    assert 1 <= len(before) < 5

    second = submit_predict(argv, 2, launch)  # the same submission again
    states = wait_for([second["parts"].job_id, second["merge"].job_id], timeout_s=300)
    assert set(states.values()) == {"COMPLETED"}, states
    assert read_table(table) == whole  # every file exactly once, input order, the same scores
    paths = [json.loads(line)["path"] for line in journal.read_text().splitlines()]
    assert paths[:len(before)] == before and len(paths) == len(set(paths)) == 5  # nothing scored twice
    log = second["parts"].job[0].paths.stderr.read_text()  # task 0's log
    assert f"part 0 of 2: 5 files, {len(before)} already scored" in log


def test_submit_predict_checks_before_queueing_and_dry_run(corpus, model_file, tmp_path, caplog, capsys):
    assert main(["submit", "predict", str(tmp_path / "nothing"), "--model", str(tmp_path / "m.onnx"), "--array",
                 "2", "--dry-run"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"{tmp_path / 'nothing'}: no such file", f"{tmp_path / 'm.onnx'}: no such file"]
    caplog.clear()
    assert main(["submit", "predict", str(corpus), "--array", "2", "--dry-run"]) == 2
    assert "give --run RUN_FOLDER or --model FILE" in caplog.text
    assert main(["submit", "predict", str(corpus), "--model", str(model_file), "--array", "2", "--frames", "8",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    table = model_file.parent / "predict" / "uploads.csv"  # beside the model, as `ltm predict` would put it
    assert f"then merge into {table}" in out and "#SBATCH --array=0-1%2" in out
    assert not (model_file.parent / "predict").exists()  # a dry run writes nothing
