"""bench/gpu.py, the GPU check, runs every step in its CPU mode (tiny sizes) where there is no CUDA: real shards,
both DALI and reference decodes, DeepSpeed ZeRO-1 training of LTM and Baseline, the plain loop, a real SIGUSR1
preemption and resume, and the eval measurement; GPU-only figures say they were skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import SHARED_DATA

from ltm.launch import DIST_VARS

REPO = Path(__file__).resolve().parents[1]
SKIP = "skipped: no CUDA"


@pytest.fixture(scope="module")
def bench():
    """bench/'s modules by name (bench/ is no package; its scripts import each other with bench/ on the path)."""
    import importlib

    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.fixture(scope="module")
def gpu_check(bench):
    """bench/gpu.py, the check's legs and main."""
    return bench("gpu")


@pytest.fixture(scope="module")
def decode_legs(bench):
    """bench/decode.py, the decode and agree legs."""
    return bench("decode")


@pytest.fixture(scope="module")
def checkdata(bench):
    """bench/checkdata.py, the check's shards and config."""
    return bench("checkdata")


def _face_split(root: Path, name: str, encode) -> Path:
    """`<root>/<name>/test/{real,fake}`: 8 real face photos as 64 px crops, 4 per method, encoded by `encode`."""
    from data_prep.shards import write_shards

    paths = sorted((SHARED_DATA / "faces").glob("*.jpg"))[:8]
    assert len(paths) == 8, f"need real face photos in {SHARED_DATA / 'faces'}"
    for label, method in enumerate(("real", "fake")):
        items = []
        for i, path in enumerate(paths[label::2]):
            with Image.open(path) as im:
                im = im.convert("RGB")
                side = min(im.size)
                crop = np.array(im.crop((0, 0, side, side)).resize((64, 64), Image.BILINEAR))
            video = f"{method}_{i}"
            items.append({"__key__": f"{video}-000000", "jpg": encode(crop), "cls": label,
                          "json": {"dataset": name, "split": "test", "video": video, "frame": 0, "label": label,
                                   "method": method}})
        write_shards(items, root / name / "test" / method, f"{name}-test-{method}", max_samples=4)
    return root / name / "test"


def test_decode_agreement_holds_on_real_shards_and_fails_on_a_planted_offset(gpu_check, decode_legs, checkdata,
                                                                           tmp_path):
    """The agree leg's comparison on real face shards (4:4:4 as prep writes them, 4:2:0 as other tools do): without
    CUDA it compares DALI's CPU pipeline with the reference loader, within that pair's stated tolerances, and one
    level added to one side's pixels puts every type outside its bound."""
    from data_prep.shards import jpeg_bytes
    from ltm.config import load_config

    splits = {"444": _face_split(tmp_path, "f444", jpeg_bytes),
              "420": _face_split(tmp_path, "f420", checkdata.encode_420)}
    cfg = load_config(None, [f"data.root={tmp_path}", "data.image_size=64", "data.num_threads=1"])
    kinds = ["clean", "clean420", "pixelate", "jpeg"]
    fig = decode_legs.decode_agreement(cfg, splits, False, 4, kinds, levels=(5,))
    assert fig["agree_pair"] == "cpu vs reference" and fig["agree_levels"] == [5]
    assert fig["agree_within_tolerance"] is True and fig["agree_outside"] == [], fig
    # two different paths were compared: pixelate's fixed-point weights differ from OpenCV's by a level or two
    assert 1 <= fig["agree_pixelate_max_diff"] <= 2 and 0 < fig["agree_pixelate_mean_diff"] <= 0.3
    assert fig["agree_clean420_max_diff"] == 0  # DALI's CPU decoder and PIL both upsample 4:2:0 chroma "fancily"
    planted = decode_legs.decode_agreement(cfg, splits, False, 4, kinds, levels=(5,), plant=1)
    assert planted["agree_within_tolerance"] is False and planted["agree_outside"] == kinds, planted
    assert all(planted[f"agree_{k}_mean_diff"] > 0.5 for k in kinds)
    # the verdicts in the JSON line carry the same tolerances
    targets = gpu_check.verdicts(planted)
    assert targets["agree_jpeg_max_diff"] == {"value": planted["agree_jpeg_max_diff"], "target": "<= 0", "ok": False}
    # samples out of order are a failure too, whatever the pixels
    batches = [{"keys": [f"k{i}"], "labels": torch.zeros(1), "images": torch.zeros(1, 3, 4, 4)} for i in range(2)]
    assert decode_legs.compare_loaders(batches, batches)["same_keys"] is True
    assert decode_legs.compare_loaders(batches, batches[::-1])["same_keys"] is False
    assert decode_legs.compare_loaders(batches, batches[:1])["same_keys"] is False


def test_mixed_decoder_upsamples_chroma_as_the_cpu_decoder(gpu_check):
    """nvJPEG's default chroma upsampling differs from libjpeg-turbo's and PIL's "fancy" one on 4:2:0 JPEGs: both
    DALI decode pipelines (training and eval, with and without a perturbation) ask the mixed decoder for fancy
    upsampling. The graphs are built without a GPU; their decoder's arguments are read back."""
    from ltm.data.dali import _decode, _decode_eval
    from ltm.data.perturb import perturbation

    pipes = [_decode(64, "mixed", batch_size=1, num_threads=1, device_id=0),
             _decode_eval(64, "mixed", None, False, batch_size=1, num_threads=1, device_id=0),
             _decode_eval(64, "mixed", perturbation("jpeg:3"), False, batch_size=1, num_threads=1, device_id=0)]
    for pipe in pipes:
        pipe._build_graph()
        decoders = [str(op.spec) for op in pipe._ops if "OpSpec for decoders__Image" in str(op.spec)]
        assert len(decoders) == 1
        assert "device: mixed" in decoders[0] and "jpeg_fancy_upsampling: True" in decoders[0], decoders[0]


def test_timed_legs_run_under_the_configs_cudnn_setting(gpu_check, checkdata, tmp_path):
    """An earlier leg may leave cudnn.benchmark either way (the plain loop turns it on for a non-deterministic
    config, the engine turns it off for a deterministic one): each engine leg sets the config's own setting again,
    so an option is never timed under another setting than the default it is compared with."""
    from data_prep.shards import jpeg_bytes

    split = _face_split(tmp_path, "faces", jpeg_bytes)
    over = ["model.pretrained=null", "data.num_threads=1", "data.shuffle_buffer=8", *gpu_check.CPU_OVERRIDES,
            "data.image_size=64", "train.batch_size=4", "train.deterministic=false"]
    cfg = checkdata.configure("tiny-cpu", split, tmp_path / "run", over)
    before = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    try:
        torch.backends.cudnn.benchmark = False  # as a deterministic leg (resume) leaves it
        torch.use_deterministic_algorithms(True, warn_only=True)
        r = gpu_check.engine_steps(cfg, 2, 1, False)
        assert r["timed_steps"] == 1
        assert torch.backends.cudnn.benchmark is True and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1], warn_only=True)


def test_quick_check_skips_the_legs_whose_packages_are_missing(tmp_path):
    """The GPU machine has torch but no DALI or DeepSpeed: --quick must skip the DALI legs with the reason printed,
    run the train leg's plain loop and FLOP count without the engine, and still end with its JSON line (ratio
    null, and why). DALI and DeepSpeed are hidden from the import system, as on that machine."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # the path finder answers "not found" for them, so importing fails and find_spec (accelerate's probe) says None
    hide = ("import importlib.machinery as m, runpy, sys\n"
            "class Hide(m.PathFinder):\n"
            "    @classmethod\n"
            "    def find_spec(cls, name, path=None, target=None):\n"
            "        if name == 'deepspeed' or name.startswith(('deepspeed.', 'nvidia.dali')):\n"
            "            return None\n"
            "        return super().find_spec(name, path, target)\n"
            "sys.meta_path[:] = [Hide if f is m.PathFinder else f for f in sys.meta_path]\n"
            f"sys.argv = ['gpu.py', '--quick', '--work', {str(tmp_path)!r}]\n"
            f"sys.path.insert(0, {str(REPO / 'bench')!r})\n"  # as running the script puts its folder first
            f"runpy.run_path({str(REPO / 'bench' / 'gpu.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", hide], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    fig = json.loads(out.strip().splitlines()[-1])
    for leg in ("decode", "agree"):
        assert f"skipped leg {leg}: needs DALI" in out
        assert fig["legs_skipped"][leg].startswith("needs DALI") and fig[f"leg_{leg}"].startswith("skipped: needs DALI")
    assert fig["legs"] == ["eval", "train"] and fig["quick"] is True
    assert "train leg: the Trainer's runs skipped (needs deepspeed" in out
    assert fig["train_images_per_s"].startswith("skipped: needs deepspeed")
    assert isinstance(fig["plain_images_per_s"], float) and fig["plain_images_per_s"] > 0
    assert fig["ratio"] is None and "did not run" in fig["ratio_note"] and fig["target"] == 1.2
    assert "resume_fp32_bitwise" not in fig and "option_fused_over_default" not in fig  # not in the quick set


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
    # the agree leg: every per-crop type (and clean 4:2:0) within the CPU pair's tolerances
    assert fig["agree_pair"] == "cpu vs reference" and fig["agree_within_tolerance"] is True
    assert fig["targets"]["agree_pixelate_max_diff"]["ok"] is True
    assert fig["legs"] == ["decode", "agree", "eval", "train", "options", "resume"] and fig["legs_skipped"] == {}
    assert fig["cudnn_benchmark"] is False and fig["gpu_memory_outside_torch_gib"] == SKIP
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
