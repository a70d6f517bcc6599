"""The callables that submitit pickles and runs on the SLURM nodes: training, evaluation, dataset preparation.

Each one runs the same code as its `ltm` command, in-process, inside one SLURM task. Training follows the
requeue pattern of DeiT/MAE's `run_with_submitit.py` Trainer: the job object is its own checkpoint (the state
lives in the run folder, `resume="auto"` picks up `latest`), and `checkpoint()` hands submitit a fresh copy.

Preemption / time limit: SLURM sends SIGUSR2 `signal_delay_s` before the end to every task. `ltm.train.trainer.train`
catches it (its handler replaces submitit's), the ranks agree at the next step boundary, save one checkpoint
together and return status "preempted". Only then does global rank 0 requeue the job (`scontrol requeue`), so
every rank has saved before the allocation goes away; the new allocation resumes from `latest`. A SIGUSR2
that arrives before training started reaches submitit's own handler, which on rank 0 calls `checkpoint()`
and requeues as well (nothing to save yet). `cfg.launch.max_requeue` bounds the number of restarts.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import submitit

from ltm.cli import defer_full_gc

log = logging.getLogger("ltm.launcher")

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def setup_task(gpus_per_node: int, cpus_per_task: int | None = None) -> submitit.helpers.TorchDistributedEnvironment:
    """Logging, threads and the torch.distributed environment of one SLURM task (RANK, WORLD_SIZE, ...)."""
    # The submitting shell's distributed variables travel with sbatch's --export=ALL; they describe another job.
    for key in DIST_VARS:
        os.environ.pop(key, None)
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if gpus_per_node == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU with gloo
    threads = cpus_per_task or int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    host = socket.gethostname()
    logging.basicConfig(
        level=getattr(logging, os.environ.get("LTM_LOG_LEVEL", "INFO")),
        format=f"%(asctime)s %(levelname)s [{host} rank {dist_env.rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    log.info(
        "job %s (restart %s): rank %d of world size %d on node %s, local rank %d, master %s:%d",
        os.environ.get("SLURM_JOB_ID", "?"),
        os.environ.get("SLURM_RESTART_COUNT", "0"),
        dist_env.rank,
        dist_env.world_size,
        host,
        dist_env.local_rank,
        dist_env.master_addr,
        dist_env.master_port,
    )
    return dist_env


def slurm_job_state(job_id: str) -> str:
    """JobState of a job from `scontrol show job` (UNKNOWN when SLURM does not know it)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=60)
    m = re.search(r"\bJobState=(\S+)", proc.stdout)
    return m.group(1) if proc.returncode == 0 and m else "UNKNOWN"


class TrainJob:
    """`ltm train` of one resolved config on every task of the allocation; requeues itself when preempted."""

    def __init__(self, cfg: dict[str, Any], resume: str = "auto") -> None:
        self.cfg = cfg  # resolved config as a plain dict (ltm.config.to_dict): pickles without the dataclasses
        self.resume = resume

    def __call__(self) -> dict[str, Any]:
        defer_full_gc()  # as `ltm train` does, before the training stack is imported
        from ltm.config import from_dict

        cfg = from_dict(self.cfg)
        dist_env = setup_task(cfg.launch.gpus_per_node, cfg.launch.cpus_per_task)
        from ltm.train import trainer  # after the environment is set: DeepSpeed reads DS_ACCELERATOR on import

        result = trainer.train(cfg, resume=self.resume)
        log.info("training returned %s at step %s", result.get("status"), result.get("step"))
        if result.get("status") == "preempted":
            self._requeue(cfg.launch.max_requeue, cfg.launch.time_min, dist_env.rank)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """What submitit runs after a requeue: the same training, resuming from the run folder's `latest`."""
        return submitit.helpers.DelayedSubmission(type(self)(self.cfg, resume="auto"))

    def _requeue(self, max_requeue: int, time_min: int, rank: int) -> None:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        run_dir = self.cfg["train"]["run_dir"]
        if restarts >= max_requeue:
            raise RuntimeError(
                f"training of {run_dir} was preempted and has already been requeued {restarts} times "
                f"(launch.max_requeue={max_requeue}); resume it with `ltm submit train` on the same run_dir"
            )
        if rank == 0:
            job_env = submitit.JobEnvironment()
            state = slurm_job_state(job_env.job_id)
            if state != "RUNNING":
                # COMPLETING/CANCELLED: `scancel` (its SIGTERM made the ranks save) must end the job, and an outside
                # `scontrol requeue` (or PreemptMode=REQUEUE) already brings it back; requeueing again would undo
                # a cancel. Only a running job -- time-limit signal, preemption grace time -- requeues itself.
                log.info("job %s is %s: saved at step boundary, not requeued from here", job_env.job_id, state)
            else:
                # Rewrite the submitted pickle with checkpoint()'s submission (as submitit's own handler would),
                # then requeue: the job keeps its id, its log files and its dependants (a chained eval).
                delayed = self.checkpoint()
                delayed.set_timeout(time_min, max_requeue - restarts)
                pickle_path = job_env.paths.submitted_pickle
                tmp = pickle_path.with_name(f".{pickle_path.name}.tmp{os.getpid()}")
                delayed.dump(tmp)
                os.replace(tmp, pickle_path)
                proc = subprocess.run(["scontrol", "requeue", job_env.job_id], capture_output=True, text=True,
                                      timeout=60)
                if proc.returncode != 0:
                    raise RuntimeError(f"scontrol requeue {job_env.job_id} failed: {proc.stderr.strip()}")
                log.info("requeued job %s (restart %d of at most %d)", job_env.job_id, restarts + 1, max_requeue)
        # SystemExit is not an Exception: submitit writes no result file, so the submitter keeps waiting for the
        # requeued job instead of taking this allocation's "preempted" as the final result.
        sys.exit(0)


class EvalJob:
    """`ltm eval --run RUN --data D ...` in one SLURM task (or several: each scores its share of the samples)."""

    def __init__(
        self,
        run_dir: str,
        data: list[str],
        tag: str | None = None,
        cfg_overrides: list[str] | None = None,
        gpus_per_node: int = 0,
    ) -> None:
        self.run_dir = str(Path(run_dir).absolute())
        self.data = list(data)
        self.tag = tag
        self.cfg_overrides = list(cfg_overrides or [])
        self.gpus_per_node = gpus_per_node

    def __call__(self) -> list[dict[str, Any]]:
        defer_full_gc()
        setup_task(self.gpus_per_node)
        from ltm.eval.evaluate import evaluate

        reports = evaluate(self.run_dir, self.data, tag=self.tag, cfg_overrides=self.cfg_overrides or None)
        for report in reports:
            log.info("%s: frame AUC %.4f, video AUC %.4f", report.get("data"), report.get("frame_auc", float("nan")),
                     report.get("video_auc", float("nan")))
        return reports


class CommandJob:
    """One `ltm <command> ...` run in-process (dataset preparation parts and their merge)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> int:
        from ltm.cli import main

        setup_task(0)
        log.info("running: ltm %s", " ".join(self.argv))
        status = main(self.argv)
        if status != 0:
            raise RuntimeError(f"`ltm {' '.join(self.argv)}` exited with status {status}")
        return status


class PrepPartJob(CommandJob):
    """Part i of N of `ltm prep ...` (one array task): `--part i/N` selects every N-th input, from the i-th."""

    def __init__(self, prep_args: list[str], part: int, parts: int) -> None:
        super().__init__(["prep", *prep_args, "--part", f"{part}/{parts}"])
        self.part, self.parts = part, parts


class PrepMergeJob(CommandJob):
    """After every part succeeded: `ltm prep merge` writes the shards and the manifests from all parts.

    The dataset name (e.g. `ffpp_c23`) is the one whose work folder `<out>/.prep/<dataset>/parts/` holds all N
    part records, unless given; the parts name it themselves, so the launcher need not know each adapter's naming.
    """

    def __init__(self, out: str, parts: int, dataset: str | None = None) -> None:
        super().__init__([])
        self.out = str(Path(out).absolute())
        self.parts = parts
        self.dataset = dataset

    def __call__(self) -> int:
        dataset = self.dataset or self.find_dataset()
        self.argv = ["prep", "merge", "--out", self.out, "--dataset", dataset]
        return super().__call__()

    def find_dataset(self) -> str:
        work = Path(self.out) / ".prep"
        complete = sorted(
            d.name for d in work.glob("*") if d.is_dir()
            and all((d / "parts" / f"{i}-of-{self.parts}.json").is_file() for i in range(self.parts))
        )
        if len(complete) != 1:
            found = ", ".join(complete) or "none"
            raise RuntimeError(f"{work}: expected the work folder of exactly one dataset with all {self.parts} "
                               f"parts done, found {found}; pass the dataset name (`ltm submit prep --dataset`)")
        return complete[0]
