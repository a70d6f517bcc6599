"""bench/gpu.py, the GPU check, runs every step in its CPU mode (tiny sizes) where there is no CUDA: real shards,
both DALI and reference decodes, DeepSpeed ZeRO-1 training of LTM and Baseline, the plain loop, a real SIGUSR1
preemption and resume, and the eval measurement; GPU-only figures say they were skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ltm.distributed import DIST_VARS

REPO = Path(__file__).resolve().parents[1]
SKIP = "skipped: no CUDA"


def test_gpu_check_runs_in_cpu_mode(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    # one OpenMP thread: two on a shared 2-core machine spin-wait for each other (toy steps then vary 15-50x)
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--work", str(tmp_path)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    fig = json.loads(lines[-1])
    assert "figure" in proc.stdout and "resume_fp32_bitwise" in proc.stdout  # the table above the JSON line
    assert fig["bench"] == "gpu" and fig["cuda"] is False and fig["device"] == "cpu"
    assert fig["dali_package"] in ("nvidia-dali-cuda120", "nvidia-dali-cuda130") and fig["dali_version"]
    for key in ("decode_mixed_images_per_s", "peak_gpu_memory_gib"):
        assert fig[key] == SKIP, key
    assert fig["targets"]["decode_mixed_images_per_s"] == {"value": SKIP, "target": ">= 8000.0", "ok": None}
    # the shards it wrote follow the contract: both loaders read every sample, in the same order, same pixels
    assert fig["decode_pair"] == "cpu vs reference" and fig["decode_same_keys_and_labels"] is True
    assert fig["decode_images"] == 32 and fig["decode_max_pixel_diff"] <= 1.0
    assert (tmp_path / "shards" / "gpucheck" / "train" / "manifest.json").is_file()
    assert fig["eval_images"] == 32
    for key in ("decode_cpu_images_per_s", "train_images_per_s", "baseline_images_per_s", "plain_images_per_s",
                "eval_images_per_s", "forward_images_per_s"):
        assert isinstance(fig[key], float) and fig[key] > 0, key
    assert fig["train_loader"] == "dali" and 0 <= fig["train_data_stall"] < 1
    assert 1.0 < fig["ltm_baseline_flop_ratio"] < 10.0  # LTM: two CNNs and a ViT over one CNN
    assert fig["ratio"] == fig["ltm_over_plain"] and fig["target"] == 1.2
    # a few toy steps are no steady state, and the check says so under its table
    assert fig["train_steady"] is False and "warm-up-dominated: 3 timed steps" in fig["train_note"]
    assert f"note: {fig['train_note']}" in proc.stdout and "bench/step.py --engine" in fig["train_note"]
    # every speed option ran against the default (compile only when asked: it takes minutes to compile on a CPU)
    for name in ("channels_last", "fused", "prefetch4", "pin_memory"):
        assert isinstance(fig[f"option_{name}_over_default"], float) and fig[f"option_{name}_over_default"] > 0, name
    assert fig["option_compile_over_default"].startswith("skipped: CPU mode")
    # exact resume after a real preemption signal: bitwise on the CPU in fp32 and in bf16
    assert fig["resume_fp32_bitwise"] is True and fig["resume_fp32_max_weight_diff"] == 0.0
    assert fig["resume_bf16_bitwise"] is True
    assert (tmp_path / "runs" / "resume" / "bf16-cut" / "checkpoints" / "latest").read_text().strip() == "step00000004"
