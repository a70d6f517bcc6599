"""launcher.jobs without a cluster: the requeue limit and how the prep merge finds its dataset."""

from __future__ import annotations

import pytest

from data_prep.shards import write_json_atomic
from launcher.jobs import PrepMergeJob, PrepPartJob, TrainJob


def test_requeue_limit_is_an_error_naming_the_run(monkeypatch):
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    job = TrainJob({"train": {"run_dir": "/runs/x"}})
    with pytest.raises(RuntimeError, match=r"/runs/x was preempted .* requeued 3 times \(launch.max_requeue=3\)"):
        job._requeue(max_requeue=3, time_min=10, rank=1)


def test_checkpoint_resubmits_the_same_training_resuming_from_latest():
    job = TrainJob({"train": {"run_dir": "/runs/x"}}, resume="never")
    delayed = job.checkpoint()
    again = delayed.function
    assert isinstance(again, TrainJob) and again.cfg == job.cfg and again.resume == "auto"


def test_prep_parts_and_merge_commands(tmp_path):
    assert PrepPartJob(["ffpp", "--root", "r", "--out", "o"], 1, 4).argv == [
        "prep", "ffpp", "--root", "r", "--out", "o", "--part", "1/4"]
    # the merge picks the one dataset whose N parts are all done
    for name, done in (("ffpp_c23", (0, 1)), ("celebdf_v2", (0,))):
        for i in done:
            write_json_atomic(tmp_path / ".prep" / name / "parts" / f"{i}-of-2.json", {"part": i, "parts": 2})
    assert PrepMergeJob(str(tmp_path), 2).find_dataset() == "ffpp_c23"
    with pytest.raises(RuntimeError, match="found none"):
        PrepMergeJob(str(tmp_path), 3).find_dataset()
    write_json_atomic(tmp_path / ".prep" / "celebdf_v2" / "parts" / "1-of-2.json", {"part": 1, "parts": 2})
    with pytest.raises(RuntimeError, match="found celebdf_v2, ffpp_c23"):
        PrepMergeJob(str(tmp_path), 2).find_dataset()
