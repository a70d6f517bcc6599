"""ltm eval: metrics against scikit-learn, video grouping, weights from real DeepSpeed checkpoints, exactly-once
scoring on 2 ranks, report files, and every error naming its file."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import SHARED_DATA
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score, roc_curve

from ltm.checkpoint import CheckpointError
from ltm.checkpoint.reader import load_checkpoint_weights, load_model
from ltm.config import load_config, save_config
from ltm.eval import metrics
from ltm.eval.evaluate import evaluate
from ltm.eval.report.files import read_scores
from ltm.launch import DIST_VARS

REPO = Path(__file__).resolve().parents[1]
FACES = SHARED_DATA / "faces"
METHODS = {"real": 10, "FaceSwap": 7, "Deepfakes": 6}  # 23 samples: an uneven split over 2 ranks


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


# ------------------------------------------------------------------------------------------------------ metrics


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    for n in (7, 100, 1001):
        labels = rng.integers(0, 2, n).astype(float)
        labels[:2] = (0, 1)
        scores = np.round(rng.random(n) * 0.5 + labels * 0.3, 2)  # rounded: ties included
        assert abs(metrics.auc(labels, scores) - roc_auc_score(labels, scores)) < 1e-9
        assert abs(metrics.average_precision(labels, scores) - average_precision_score(labels, scores)) < 1e-9
        assert abs(metrics.accuracy(labels, scores) - accuracy_score(labels, scores >= 0.5)) < 1e-9
        # EER: on sklearn's ROC curve, FPR equals FNR at the returned point (checked by interpolating both rates)
        e = metrics.eer(labels, scores)
        fpr, tpr, _ = roc_curve(labels, scores)
        assert abs(np.interp(e, fpr, 1 - tpr) - e) < 1e-9 or np.any(np.isclose(fpr, e))
        assert 0 <= e <= 1


def test_eer_known_values():
    assert metrics.eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0  # separable
    assert metrics.eer([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 1.0  # inverted
    # one real above one fake: FPR = FNR = 0.5 somewhere on the curve
    assert abs(metrics.eer([0, 0, 1, 1], [0.1, 0.6, 0.5, 0.9]) - 0.5) < 1e-9
    assert metrics.auc([1, 1, 1], [0.2, 0.3, 0.4]) is None and metrics.eer([0, 0], [0.1, 0.2]) is None


def test_expected_calibration_error_by_hand_and_against_a_direct_binning():
    # every frame scored 0.8, half of them fake: one bin, |0.5 - 0.8|
    assert metrics.expected_calibration_error([0, 1] * 50, [0.8] * 100) == pytest.approx(0.3)
    # calibrated: P(fake) 0.25 where a quarter are fake, 0.9 where nine in ten are
    labels, scores = [1, 0, 0, 0] * 10 + [1] * 9 + [0], [0.25] * 40 + [0.9] * 10
    assert metrics.expected_calibration_error(labels, scores) == pytest.approx(0.0, abs=1e-12)
    assert metrics.expected_calibration_error([0, 0], [0.1, 0.3]) == pytest.approx(0.2)  # one class is defined too
    assert metrics.expected_calibration_error([], []) is None
    assert metrics.expected_calibration_error([0, 1], [0.2, 1.3]) is None  # a score, not a probability
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500).astype(float)
    scores = np.clip(rng.random(500) * 0.6 + labels * 0.3, 0, 1)
    scores[:2] = (0.0, 1.0)
    direct = 0.0
    for b in range(15):  # the bins written out: (b/15, (b+1)/15], the first closed
        sel = ((scores > b / 15) | (b == 0)) & (scores <= (b + 1) / 15)
        if sel.any():
            direct += sel.mean() * abs(labels[sel].mean() - scores[sel].mean())
    assert metrics.expected_calibration_error(labels, scores) == pytest.approx(direct, abs=1e-12)


def test_video_grouping_hand_built():
    videos = ["a", "a", "a", "b", "b", "a", "c"]
    methods = ["real", "real", "real", "real", "real", "FaceSwap", "FaceSwap"]  # "a" reused by a fake: own video
    labels = [0, 0, 0, 0, 0, 1, 1]
    scores = [0.1, 0.2, 0.6, 0.9, 0.5, 0.4, 0.3]
    ids, v_labels, v_scores = metrics.video_scores(videos, methods, labels, scores, "mean")
    got = {k: (lab, s) for k, lab, s in zip(ids, v_labels, v_scores)}
    assert set(got) == {("real", "a"), ("real", "b"), ("FaceSwap", "a"), ("FaceSwap", "c")}
    assert got[("real", "a")][1] == pytest.approx(0.3) and got[("real", "b")][1] == pytest.approx(0.7)
    assert got[("FaceSwap", "a")] == (1, pytest.approx(0.4))
    _, _, v_max = metrics.video_scores(videos, methods, labels, scores, "max")
    assert sorted(v_max.tolist()) == pytest.approx([0.3, 0.4, 0.6, 0.9])
    m = metrics.compute_metrics(videos, methods, labels, scores, "mean")
    assert m["n_videos"] == 4 and m["n_frames"] == 7
    assert m["video_auc"] == pytest.approx(roc_auc_score([0, 0, 1, 1], [0.3, 0.7, 0.4, 0.3]))
    with pytest.raises(ValueError, match="'x'.*both real and fake"):
        metrics.video_scores(["x", "x"], ["m", "m"], [0, 1], [0.1, 0.2])


def test_per_method_is_method_fakes_against_all_reals():
    rng = np.random.default_rng(1)
    methods = np.array(["real"] * 40 + ["Deepfakes"] * 30 + ["FaceSwap"] * 20)
    labels = (methods != "real").astype(float)
    scores = rng.random(90) + 0.3 * labels
    videos = [f"v{i // 5}" for i in range(90)]
    m = metrics.compute_metrics(videos, methods.tolist(), labels, scores)
    for method in ("Deepfakes", "FaceSwap"):
        sel = (methods == "real") | (methods == method)
        assert abs(m["per_method"][method]["frame_auc"] - roc_auc_score(labels[sel], scores[sel])) < 1e-9
        assert m["per_method"][method]["n_frames"] == int((methods == method).sum())
    assert set(m["per_method"]) == {"Deepfakes", "FaceSwap"}
    json.dumps(m)  # valid JSON: no NaN, no numpy types


# ------------------------------------------------------------------------------------------------ fixtures

CHECKPOINT_SCRIPT = textwrap.dedent('''
    """Train 2 steps of the tiny LTM with DeepSpeed on the shards and save a real checkpoint (every rank)."""
    from ltm.cli import defer_full_gc; defer_full_gc()  # as a rank `ltm train` starts does
    import sys
    from pathlib import Path
    from ltm import distributed
    import deepspeed, torch
    from ltm.config import load_config, save_config
    from ltm.data import build_eval_loader
    from ltm.models import build_model

    run, shards, stage = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    cfg = load_config("tiny-cpu", [f"data.root={shards}", "data.test=[toy/test]", f"train.zero_stage={stage}",
                                   "data.loader=reference", "eval.attention_samples=2", "eval.batch_size=8"])
    env = distributed.init_distributed()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.image_size)
    ds = {"train_batch_size": 8 * env.world_size, "zero_optimization": {"stage": stage},
          "optimizer": {"type": "SGD", "params": {"lr": 0.01, "momentum": 0.9}}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    loader = build_eval_loader(cfg, ["toy/test"], env.rank, env.world_size, "cpu", 8)
    for _, batch in zip(range(2), loader):
        engine.backward(engine(batch["images"], batch["labels"])["loss"])
        engine.step()
    engine.save_checkpoint(str(run / "checkpoints"), tag="step00000002", client_state={"step": 2})
    if env.rank == 0:
        save_config(cfg, run / "config.yaml")
        torch.save({k: v.float() for k, v in engine.module.state_dict().items()}, run / "module_fp32.pt")
    distributed.teardown(env)
''')


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory) -> Path:
    """`<root>/toy/test/{real,FaceSwap,Deepfakes}` shards of real face photos (labels by folder), 23 samples."""
    from data_prep.shards import jpeg_bytes, write_shards

    root = tmp_path_factory.mktemp("eval-shards")
    faces = sorted(FACES.glob("*.jpg"))[: sum(METHODS.values())]
    assert len(faces) == sum(METHODS.values()), f"need real face photos in {FACES}"
    names = [m for m, n in METHODS.items() for _ in range(n)]
    by_method: dict[str, list[dict]] = {}
    for i, (path, method) in enumerate(zip(faces, names)):
        img = Image.open(path).convert("RGB")
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((112, 112))
        video, label = f"{method[:4]}{i // 3}", int(method != "real")
        by_method.setdefault(method, []).append({
            "__key__": f"{video}-{i:06d}", "jpg": jpeg_bytes(np.asarray(img)), "cls": label,
            "json": {"dataset": "toy", "split": "test", "video": video, "frame": i, "label": label, "method": method,
                     "compression": "raw", "bbox": [0, 0, s, s], "source": path.name}})
    for method, samples in by_method.items():
        folder = root / "toy" / "test" / method
        folder.mkdir(parents=True)
        write_shards(samples, folder, f"toy-test-{method}", max_samples=4)
    return root


@pytest.fixture(scope="session")
def toy_runs(toy_shards, tmp_path_factory) -> dict[str, Path]:
    """Real DeepSpeed checkpoints: ZeRO-2 saved by 2 ranks (fp32 master weights sharded) and ZeRO-0 by 1 rank."""
    base = tmp_path_factory.mktemp("eval-runs")
    script = base / "make_checkpoint.py"
    script.write_text(CHECKPOINT_SCRIPT)
    runs = {"zero2": base / "zero2", "zero0": base / "zero0"}
    launcher = "import sys; from ltm.launch import launch_local; sys.exit(launch_local(2, sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", launcher, str(script), str(runs["zero2"]), str(toy_shards), "2"],
                   check=True, env=clean_env(), cwd=base, timeout=300)
    subprocess.run([sys.executable, str(script), str(runs["zero0"]), str(toy_shards), "0"],
                   check=True, env=clean_env(), cwd=base, timeout=300)
    return runs


@pytest.fixture(scope="session")
def engine_run(toy_shards, tmp_path_factory) -> Path:
    """`ltm train` itself on 2 ranks, ZeRO-1 in bf16 (the paper config's layout), 2 steps on the toy shards."""
    base = tmp_path_factory.mktemp("eval-engine")
    config = base / "toy.yaml"
    config.write_text(textwrap.dedent(f"""
        base: tiny-cpu
        data:
          root: {toy_shards}
          image_size: 64
          loader: reference
          train: [{{path: toy/test/real, weight: 1}}, {{path: toy/test/FaceSwap, weight: 1}}]
          val: []
          test: [toy/test]
        train: {{batch_size: 4, iters_per_epoch: 2, epochs: 1, zero_stage: 1, precision: bf16, val_every: 0}}
    """))
    subprocess.run([sys.executable, "-m", "ltm.cli", "train", "--config", str(config), "--nproc", "2",
                    f"train.run_dir={base / 'run'}"], check=True, env=clean_env(), cwd=base, timeout=400)
    return base / "run"


def all_keys(shards: Path) -> set[str]:
    """Every sample key of the toy split, read from the DALI index files (one line per sample), with the dataset
    and method that scores.csv keys carry."""
    from data_prep.keys import video_id
    from ltm.data.shards import scan_source

    return {video_id("toy", m, k) for m in METHODS
            for shard in scan_source(shards / "toy" / "test" / m, ("jpg", "cls")).shards for k in shard.keys}


# ------------------------------------------------------------------------------------------- weights + scoring


@pytest.mark.parametrize("kind", ["zero2", "zero0"])
def test_weights_from_deepspeed_checkpoint_equal_trained_module(toy_runs, kind):
    run = toy_runs[kind]
    files = sorted(p.name for p in (run / "checkpoints" / "step00000002").iterdir())
    assert ("zero_pp_rank_1_mp_rank_00_optim_states.pt" in files) == (kind == "zero2")
    state = load_checkpoint_weights(run / "checkpoints" / "step00000002")
    ref = torch.load(run / "module_fp32.pt")
    assert set(state) == set(ref)
    for k in ref:
        assert torch.equal(state[k].float(), ref[k].float()), k
    model, cfg, source = load_model(run)  # tag from checkpoints/latest
    assert source.endswith("step00000002") and cfg.model.backbone == "tf_efficientnet_lite0"
    assert not model.training


def test_weights_from_ltm_train_zero1_bf16(engine_run):
    """fp32 master weights from the engine's ZeRO-1 bf16 checkpoint: they round to exactly the bf16 module."""
    tag = engine_run / "checkpoints" / (engine_run / "checkpoints" / "latest").read_text().strip()
    assert len(list(tag.glob("*_optim_states.pt"))) == 2
    state = load_checkpoint_weights(tag)
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert set(state) == set(module)
    floats = [k for k, v in module.items() if v.is_floating_point()]
    stats = [k for k in floats if ".running_" in k]  # BatchNorm statistics: fp32 in a bf16 run (ltm.models.precision)
    assert stats and all(module[k].dtype == torch.float32 and torch.equal(state[k], module[k]) for k in stats)
    floats = [k for k in floats if k not in stats]
    assert all(module[k].dtype == torch.bfloat16 and state[k].dtype == torch.float32 for k in floats)
    for k in floats:
        assert torch.equal(state[k].to(torch.bfloat16), module[k]), k
    assert any(not torch.equal(state[k], module[k].float()) for k in floats)  # more than the bf16 copy
    (report,) = evaluate(engine_run, ["toy/test"], out_dir=engine_run / "eval-test")
    assert report["n_frames"] == 23 and report["checkpoint"] == str(tag)


def test_nproc_rejects_a_bad_run_before_any_rank_starts(toy_runs, tmp_path):
    """`ltm eval --nproc 2` checks the run folder, its config with the overrides, the tag and --weights itself, so a
    mistake is one clear error from the launcher, not the same error from each rank after it imported torch."""
    run = toy_runs["zero2"]
    no_config = tmp_path / "not-a-run"
    no_config.mkdir()
    cases = {
        (str(tmp_path / "missing"),): "no such folder",
        (str(no_config),): "config.yaml: no such file",
        (str(run), "--tag", "step00000099"): "checkpoint tag folder",
        (str(run), "--weights", str(tmp_path / "w.pt")): "w.pt': no such file",
        (str(run), "eval.batch_size=x"): "key 'eval.batch_size'",
    }
    for args, message in cases.items():
        proc = subprocess.run([sys.executable, "-m", "ltm.cli", "eval", "--run", *args, "--nproc", "2"],
                              capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and message in errors[0], (args, proc.stderr[-2000:])  # no rank reported it


def test_two_rank_eval_scores_each_key_once(toy_runs, toy_shards, tmp_path):
    run = toy_runs["zero2"]
    one = evaluate(run, ["toy/test"], out_dir=tmp_path / "one")
    assert not any(k in os.environ for k in ("RANK", "WORLD_SIZE")) or os.environ.get("WORLD_SIZE") == "1"
    proc = subprocess.run([sys.executable, "-m", "ltm.cli", "eval", "--run", str(run), "--data", "toy/test",
                           "--nproc", "2", "--out", str(tmp_path / "two")],
                          env=clean_env(), cwd=toy_shards.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report_json = tmp_path / "two" / "toy-test" / "report.json"
    assert proc.stdout.strip().splitlines()[-1] == str(report_json)
    two = json.loads(report_json.read_text())
    assert two["world_size"] == 2 and one[0]["world_size"] == 1
    rows = read_scores(tmp_path / "two" / "toy-test" / "scores.csv")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == sum(METHODS.values())
    assert set(keys) == all_keys(toy_shards)
    single = {r["key"]: r["score"] for r in read_scores(tmp_path / "one" / "toy-test" / "scores.csv")}
    assert max(abs(single[r["key"]] - r["score"]) for r in rows) < 1e-5
    for r in rows:
        assert r["label"] == int(r["method"] != "real")
    assert two["frame_auc"] == pytest.approx(one[0]["frame_auc"], abs=1e-6)


def test_report_files(toy_runs, tmp_path):
    reports = evaluate(toy_runs["zero0"], ["toy/test", "toy/test/FaceSwap"], out_dir=tmp_path)
    assert [r["name"] for r in reports] == ["toy-test", "toy-test-FaceSwap"]
    folder = tmp_path / "toy-test"
    report = json.loads((folder / "report.json").read_text())
    for key in ("frame_auc", "video_auc", "ap", "eer", "acc", "n_frames", "n_videos", "per_method", "checkpoint",
                "data"):
        assert key in report, key
    assert report["n_frames"] == 23 and report["n_videos"] == 10  # 4 real + 3 + 3 fake videos
    assert set(report["per_method"]) == {"FaceSwap", "Deepfakes"}
    assert report["per_method"]["FaceSwap"]["n_frames"] == 7
    rows = read_scores(folder / "scores.csv")
    labels = [r["label"] for r in rows]
    scores = [r["score"] for r in rows]
    assert report["frame_auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert list(rows[0]) == ["key", "video", "method", "label", "score"]
    assert "| frames |" in (folder / "report.md").read_text()
    assert report["ece"] == pytest.approx(metrics.expected_calibration_error(labels, scores), abs=1e-9)
    assert "| ECE |" in (folder / "report.md").read_text()
    pictures = sorted((folder / "attention").glob("*.png"))
    assert len(pictures) == 4 and len(report["attention"]) == 4  # eval.attention_samples=2 per label
    assert sum("_fake_" in p.name for p in pictures) == 2
    for png in [folder / "roc.png", *pictures]:
        with Image.open(png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
    assert not list(folder.rglob(".*tmp*"))  # no temp files left behind
    # a single-method folder holds fakes only: AUC undefined, reported as null
    assert reports[1]["frame_auc"] is None and reports[1]["n_frames"] == 7


def test_threshold_from_a_validation_folder_decides_the_accuracy(toy_runs, tmp_path):
    from ltm.eval.metrics import accuracy, eer_threshold

    plain = evaluate(toy_runs["zero0"], ["toy/test"], out_dir=tmp_path / "plain")[0]
    (report,) = evaluate(toy_runs["zero0"], ["toy/test"], out_dir=tmp_path / "val", threshold_from="toy/test")
    rows = read_scores(tmp_path / "val" / "toy-test" / "scores.csv")
    labels, scores = [r["label"] for r in rows], [r["score"] for r in rows]
    # scores.csv holds 8 decimals: the sample at the threshold may round below it, hence the 1e-7 allowance
    assert report["threshold"] == pytest.approx(eer_threshold(labels, scores), abs=1e-7) and report["threshold"] != 0.5
    assert report["acc"] == pytest.approx(accuracy(labels, scores, report["threshold"] - 1e-7))
    assert report["threshold_from"].endswith("toy/test") and plain["threshold_from"] is None
    assert report["frame_auc"] == plain["frame_auc"]  # the threshold changes the accuracy only
    md = (tmp_path / "val" / "toy-test" / "report.md").read_text()
    assert "(the EER threshold of `" in md and "| FPR target | frame TPR |" in md
    assert report["tpr_at_fpr"]["0.01"] is not None and "TPR@1%FPR" in md


@pytest.mark.parametrize("spec", ["block:5", "video:3"])
def test_perturbed_evaluation_is_deterministic_and_differs_from_clean(toy_runs, tmp_path, spec):
    """`ltm eval --perturb TYPE:LEVEL`: every crop (inside the DALI pipeline) or every video's clip (H.264 on the
    host) perturbed, the same scores on a rerun, other scores than the clean set's; the report names it."""
    clean = evaluate(toy_runs["zero0"], ["toy/test"], out_dir=tmp_path / "clean")[0]
    runs = [evaluate(toy_runs["zero0"], ["toy/test"], out_dir=tmp_path / f"p{i}",
                     cfg_overrides=[f"eval.perturb={spec}", "data.loader=dali"])[0] for i in range(2)]
    scores = [read_scores(tmp_path / f"p{i}" / "toy-test" / "scores.csv") for i in range(2)]
    assert scores[0] == scores[1] and runs[0]["perturbation"] == spec and clean["perturbation"] is None
    clean_scores = {r["key"]: r["score"] for r in read_scores(tmp_path / "clean" / "toy-test" / "scores.csv")}
    assert sum(abs(r["score"] - clean_scores[r["key"]]) > 1e-6 for r in scores[0]) > len(scores[0]) // 2
    with pytest.raises(ValueError, match="expected TYPE:LEVEL"):
        evaluate(toy_runs["zero0"], ["toy/test"], out_dir=tmp_path / "bad", cfg_overrides=["eval.perturb=fog:9"])


def test_frames_per_video_flag_scores_the_chosen_frames_and_says_so(toy_runs, toy_shards, tmp_path, capsys):
    """`ltm eval --frames-per-video N` on 2 ranks: the frames of `ltm.data.plan.frame_indices` per video, each once;
    report.json carries `frames_per_video` and report.md states the protocol."""
    from ltm.cli import main
    from ltm.data.plan import frame_indices

    proc = subprocess.run([sys.executable, "-m", "ltm.cli", "eval", "--run", str(toy_runs["zero0"]), "--data",
                           "toy/test", "--frames-per-video", "2", "--nproc", "2", "--out", str(tmp_path / "two")],
                          env=clean_env(), cwd=toy_shards.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "two" / "toy-test"
    report = json.loads((folder / "report.json").read_text())
    by_video: dict[str, list[str]] = {}
    for key in sorted(all_keys(toy_shards)):  # toy keys: <dataset>-<method>-<video>-<frame:06d>
        by_video.setdefault(key.rsplit("-", 1)[0], []).append(key)
    expected = {keys[i] for keys in by_video.values() for i in frame_indices(len(keys), 2)}
    assert len(expected) < len(all_keys(toy_shards))  # some videos have 3 frames: a real selection
    keys = [r["key"] for r in read_scores(folder / "scores.csv")]
    assert sorted(keys) == sorted(expected) and report["n_frames"] == len(expected)
    assert report["frames_per_video"] == 2 and report["world_size"] == 2
    assert "- frames: 2 evenly spaced frames per video" in (folder / "report.md").read_text()
    assert main(["eval", "--run", str(toy_runs["zero0"]), "--data", "toy/test", "--out", str(tmp_path / "all")]) == 0
    assert json.loads((tmp_path / "all" / "toy-test" / "report.json").read_text())["frames_per_video"] == 0
    assert "- frames: all frames in the shards" in (tmp_path / "all" / "toy-test" / "report.md").read_text()


@pytest.fixture(scope="module")
def robustness_run(toy_runs, tmp_path_factory) -> dict:
    """The ZeRO-0 run on toy/test: a plain evaluation with 2 error samples, then `ltm eval --robustness` into the same
    folder (every type and level, its clean pass rewriting the report). Read by the robustness test and the HTML
    report's test; what the command printed is kept."""
    from ltm.cli import main

    out = tmp_path_factory.mktemp("robustness")
    evaluate(toy_runs["zero0"], ["toy/test"], out_dir=out, cfg_overrides=["eval.error_samples=2"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["eval", "--run", str(toy_runs["zero0"]), "--data", "toy/test", "--robustness", "--out",
                       str(out)])
    assert status == 0
    return {"out": out, "printed": printed.getvalue()}


def test_robustness_scores_every_type_and_level_and_draws_them(toy_runs, robustness_run, tmp_path):
    from ltm.data.perturb import LEVELS

    folder = robustness_run["out"] / "toy-test"
    assert robustness_run["printed"].strip().endswith(str(folder / "robustness.md"))
    result = json.loads((folder / "robustness.json").read_text())
    assert set(result["auc"]) == set(LEVELS)
    assert all(set(v) == {"1", "2", "3", "4", "5"} for v in result["auc"].values())
    single = evaluate(toy_runs["zero0"], ["toy/test"], out_dir=tmp_path / "one", cfg_overrides=["eval.perturb=blur:4"])
    assert result["auc"]["blur"]["4"]["frame_auc"] == pytest.approx(single[0]["frame_auc"])  # the same pass
    clean = evaluate(toy_runs["zero0"], ["toy/test"], out_dir=tmp_path / "clean")[0]
    assert result["clean"]["frame_auc"] == pytest.approx(clean["frame_auc"])
    # the clean pass leaves the report a plain `ltm eval` writes, beside the robustness files
    report = json.loads((folder / "report.json").read_text())
    plain = json.loads((tmp_path / "clean" / "toy-test" / "report.json").read_text())
    assert report["perturbation"] is None and report["frame_auc"] == pytest.approx(plain["frame_auc"])
    assert {k for k in plain if k not in ("seconds", "images_per_s")} == {k for k in report
                                                                          if k not in ("seconds", "images_per_s")}
    assert (folder / "report.md").read_text().startswith("# Evaluation: toy-test")
    assert (folder / "scores.csv").is_file() and (folder / "roc.png").is_file()
    assert "| blur |" in (folder / "robustness.md").read_text()
    with Image.open(folder / "robustness.png") as im:
        im.verify()
        assert im.format == "PNG"


def test_robustness_curve_keeps_an_auc_of_zero_and_leaves_one_class_levels_out():
    """A perfectly inverted detector (AUC 0.0) is a point on the plot, not a gap; only an undefined AUC is."""
    from ltm.eval.report.files import level_aucs

    result = {"auc": {"contrast": {str(k): {"frame_auc": v} for k, v in zip(range(1, 6), (1.0, 0.5, 0.0, None, 0.25))}}}
    curve = level_aucs(result, "contrast")
    assert curve[:3] == [1.0, 0.5, 0.0] and np.isnan(curve[3]) and curve[4] == 0.25


def test_consolidated_weights_file_and_baseline_without_attention(toy_runs, toy_shards, tmp_path):
    from ltm.models import build_model

    cfg = load_config(toy_runs["zero0"] / "config.yaml", ["model.kind=baseline"])
    run = tmp_path / "baseline"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.data.image_size).state_dict(), run / "weights.pt")
    (report,) = evaluate(run, [str(toy_shards / "toy" / "test")], weights=run / "weights.pt")
    assert report["checkpoint"] == str(run / "weights.pt") and report["attention"] == []
    assert (run / "eval" / "toy-test" / "roc.png").is_file()
    assert not (run / "eval" / "toy-test" / "attention").exists()


# ------------------------------------------------------------------------------------------------------ errors


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval"))
    return dst


def test_errors_name_the_file(toy_runs, toy_shards, tmp_path):
    run = toy_runs["zero2"]
    with pytest.raises(CheckpointError, match="no-such-run"):
        load_model(tmp_path / "no-such-run")
    with pytest.raises(CheckpointError, match="step00000099.*no such folder.*step00000002"):
        load_model(run, tag="step00000099")
    no_latest = copy_run(run, tmp_path / "no-latest")
    (no_latest / "checkpoints" / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoints/latest: no such file"):
        load_model(no_latest)
    no_config = copy_run(run, tmp_path / "no-config")
    (no_config / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="config.yaml: no such file"):
        load_model(no_config)

    missing = copy_run(run, tmp_path / "missing")
    (missing / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: no such file"):
        load_model(missing)
    one_shard = copy_run(run, tmp_path / "one-shard")
    (one_shard / "checkpoints" / "step00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="step00000002"):
        load_model(one_shard)

    corrupt = copy_run(run, tmp_path / "corrupt")
    bad = corrupt / "checkpoints" / "step00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt.*corrupt"):
        load_model(corrupt)
    with pytest.raises(CheckpointError, match="weights file.*nope.pt"):
        load_model(run, weights=tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt.*corrupt"):
        load_model(run, weights=junk)

    with pytest.raises(CheckpointError, match=r"step00000002.*config.yaml.*model/config mismatch"):
        load_model(run, cfg_overrides=["model.vit.dim=32"])

    empty = toy_shards / "toy" / "empty-split"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="empty-split.*no .tar shards"):
        evaluate(run, [str(empty)])
    with pytest.raises(FileNotFoundError, match="toy/nothing-here"):
        evaluate(run, ["toy/nothing-here"])


def test_cli_error_exit_code(toy_runs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ltm.cli", "eval", "--run", str(tmp_path / "absent"),
                           "--data", "toy/test"], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "absent" in proc.stderr


# ------------------------------------------------------------------------------------------ mistakes, HTML report


def test_most_confident_mistakes_are_the_extreme_errors_of_the_scores(toy_runs, tmp_path):
    """errors/ holds the reals with the highest P(fake) at or above the threshold and the fakes with the lowest
    below it, as scores.csv says, in that order; the threshold is the median score so both kinds exist."""
    first = evaluate(toy_runs["zero0"], ["toy/test"], out_dir=tmp_path / "a")[0]
    rows = read_scores(tmp_path / "a" / "toy-test" / "scores.csv")
    threshold = float(np.median([r["score"] for r in rows]))
    (report,) = evaluate(toy_runs["zero0"], ["toy/test"], out_dir=tmp_path / "b",
                         cfg_overrides=[f"eval.threshold={threshold!r}", "eval.error_samples=3"])
    fp = sorted((r for r in rows if r["label"] == 0 and r["score"] >= threshold), key=lambda r: (-r["score"], r["key"]))
    fn = sorted((r for r in rows if r["label"] == 1 and r["score"] < threshold), key=lambda r: (r["score"], r["key"]))
    assert fp and fn and "errors" in first  # the median threshold misplaces both classes on this toy model
    assert [e["key"] for e in report["errors"]["false_positives"]] == [r["key"] for r in fp[:3]]
    assert [e["key"] for e in report["errors"]["false_negatives"]] == [r["key"] for r in fn[:3]]
    assert [e["p_fake"] for e in report["errors"]["false_positives"]] == pytest.approx([r["score"] for r in fp[:3]],
                                                                                       abs=1e-6)
    folder = tmp_path / "b" / "toy-test"
    for e in report["errors"]["false_positives"] + report["errors"]["false_negatives"]:
        with Image.open(folder / e["picture"]) as im:
            assert im.format == "PNG"
    assert len(list((folder / "errors").glob("*.png"))) == len(fp[:3]) + len(fn[:3])
    assert "Most confident false negatives" in (folder / "report.md").read_text()


def test_html_report_and_comparison_render_in_chromium(toy_runs, robustness_run, tmp_path):
    """report.html after an evaluation and a robustness run, and `--compare`, opened in headless Chromium: every
    embedded picture decodes, the page shows its tables and keys, and its screenshot is not blank."""
    from browser import images_state, screenshot

    from ltm.cli import main

    out = robustness_run["out"]
    page = out / "toy-test" / "report.html"
    report = json.loads((out / "toy-test" / "report.json").read_text())  # the robustness run's clean pass wrote it
    text = page.read_text()
    assert "src=\"roc.png\"" not in text and text.count("data:image/png;base64,") >= 1  # self-contained
    n_pictures = 2 + len(report["attention"]) + sum(len(v) for v in report["errors"].values())  # + roc, robustness
    assert images_state(page) == f"ok:{n_pictures}"
    for needle in ("Summary", "Per fake method", "Robustness", "Teacher attention", "Most confident false positives",
                   "all frames in the shards", report["errors"]["false_positives"][0]["key"]
                   if report["errors"]["false_positives"] else "none"):
        assert needle in text, needle
    shot = screenshot(page, tmp_path / "report.png")
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text and pictures, not an empty white page
    # two runs side by side
    evaluate(toy_runs["zero2"], ["toy/test"], out_dir=tmp_path / "zero2")
    compare = tmp_path / "compare.html"
    assert main(["eval", "--compare", str(out), str(tmp_path / "zero2"), "--out", str(compare)]) == 0
    assert images_state(compare) == "ok:2"  # the two ROC curves
    ctext = compare.read_text()
    assert "toy-test" in ctext and "B - A" in ctext and "FaceSwap frame AUC" in ctext
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing-here.: no evaluation reports"):
        main(["-v", "eval", "--compare", str(out), str(tmp_path / "nothing-here")])


def test_report_says_where_the_mask_lands_on_known_regions(toy_runs, tmp_path):
    """Fakes with region.png: report.json's mask_diagnostics per method, the report's table and the region pictures
    (the figures themselves are checked against planted regions in test_regions.py)."""
    from tests.test_regions import stamped_fakes, write_folder

    split = write_folder(tmp_path / "shards", "Stamp", stamped_fakes(6))
    report = evaluate(toy_runs["zero0"], [str(split)], out_dir=tmp_path / "out")[0]
    diag = report["mask_diagnostics"]
    assert diag["grid"] == [4, 4] and diag["k"] == 4 and diag["n"] == 6
    d = diag["per_method"]["Stamp"]
    assert d["n"] == 6 and d["kinds"] == ["blend"]
    assert 0.0 <= d["mask"]["hit_rate"] <= 1.0 and d["mask"]["chance_hit_rate"] == pytest.approx(0.25)
    kinds = {"mean", "max", "rollout", "grad", "cam", "saliency", "input_grad", "occlusion", "head0", "mask_map"}
    assert kinds <= set(d["maps"])
    folder = Path(report["report_dir"])
    stored = json.loads((folder / "report.json").read_text())
    assert stored["mask_diagnostics"]["per_method"]["Stamp"]["mask"] == d["mask"]
    assert len(stored["regions"]) == 2 and all((folder / p).is_file() for p in stored["regions"])
    assert "Mask diagnostics on fakes with a known manipulated region" in (folder / "report.md").read_text()
    assert "Does the mask find the manipulated region?" in (folder / "report.html").read_text()
    # a folder without regions says nothing about them
    plain = evaluate(toy_runs["zero0"], ["toy/test"], out_dir=tmp_path / "plain")[0]
    assert plain["mask_diagnostics"] is None and plain["regions"] == []
