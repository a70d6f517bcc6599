"""`ltm env` and the build choices it reports: DALI's build for torch's CUDA, and a driver it cannot serve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ltm.env import EnvironmentMismatch, check_dali_serves_driver, dali_build_for, dali_package

REPO = Path(__file__).resolve().parents[1]


def test_dali_build_follows_torchs_cuda_major():
    assert dali_build_for("13.0") == "cuda130" and dali_build_for("12.4") == "cuda120"
    assert dali_build_for(None) == "cuda120"  # a CPU-only torch: the CPU pipelines are the same in both builds
    assert dali_build_for("14.1") == "cuda130"  # newer than any DALI build: the newest


def test_a_driver_older_than_dalis_cuda_is_refused_in_one_line():
    cuda13 = {"package": "nvidia-dali-cuda130", "version": "2.4.0", "cuda": "13.0"}
    with pytest.raises(EnvironmentMismatch) as err:
        check_dali_serves_driver(cuda13, driver=(12, 4))
    assert str(err.value) == ("nvidia-dali-cuda130 2.4.0 needs a driver for CUDA 13, this node's driver supports CUDA "
                              "12.4: install nvidia-dali-cuda120 (`make install DALI=cuda120`) or use "
                              "data.loader=reference")
    cuda12 = {"package": "nvidia-dali-cuda120", "version": "2.4.0", "cuda": "12.0"}
    check_dali_serves_driver(cuda12, driver=(13, 0))  # a newer driver serves CUDA 12
    check_dali_serves_driver(cuda13, driver=None)  # no GPU: CPU pipelines only


def test_ltm_env_reports_the_installed_builds_and_make_install_agrees():
    proc = subprocess.run([sys.executable, "-m", "ltm.cli", "env", "--json"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    info = json.loads(proc.stdout)
    import torch

    assert info["torch"] == torch.__version__ and info["torch_cuda"] == torch.version.cuda
    dali = dali_package()
    assert info["dali"] == [f"{dali['package']} {dali['version']}"]
    # make install's default (DALI=auto) installs the build for torch's CUDA major: the two agree, no problem
    assert info["dali"][0].startswith(info["dali_for_torch"]), info
    assert proc.returncode == 0 and info["problems"] == []
    auto = subprocess.run([sys.executable, "-m", "ltm.env", "--dali-build", "auto"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert auto.stdout.strip() == info["dali_for_torch"].removeprefix("nvidia-dali-")
