"""Sample and video identities: unique across methods and datasets in the shards, the eval loaders and scores.csv.

FF++ names a manipulated video `<target>_<source>` in every method folder; the sample dataset does the same
(SelfBlend/a_b and FaceSwap/a_b), so these tests see the collision that FF++ has. Shards written before ids carried
dataset and method are read with the same ids.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from data_prep.keys import video_id
from data_prep.shards import read_shard, write_shards
from ltm.config import load_config, save_config
from ltm.data import build_eval_loader
from ltm.data.shards import sample_ids
from ltm.env import dali_available
from ltm.eval.evaluate import evaluate
from ltm.eval.report.files import read_scores

METHODS = ("real", "SelfBlend", "FaceSwap")


def _samples(root: Path, split: str = "test") -> dict[str, list[dict]]:
    return {m: [s for tar in sorted((root / "ffpp_c23" / split / m).glob("*.tar")) for s in read_shard(tar)]
            for m in METHODS}


@pytest.fixture(scope="module")
def old_shards(sample_shards, tmp_path_factory) -> Path:
    """The sample test split rewritten as shards were before: `<video>-<frame>` keys, the dataset's video names."""
    root = tmp_path_factory.mktemp("old-shards")
    for method, samples in _samples(sample_shards).items():
        old = []
        for s in samples:
            meta = json.loads(s["json"])
            name = meta["video"].removeprefix(f"ffpp_c23-{method}-")
            meta["video"] = name
            old.append({"__key__": f"{name}-{meta['frame']:06d}", "jpg": s["jpg"], "cls": s["cls"].decode(),
                        "json": meta})
        write_shards(old, root / "ffpp_c23" / "test" / method, f"ffpp_c23-test-{method}", max_samples=8)
    return root


def test_prep_writes_ids_unique_across_methods(sample_shards):
    by_method = _samples(sample_shards)
    keys = [s["__key__"] for ss in by_method.values() for s in ss]
    assert len(keys) == len(set(keys)) > 0
    names: dict[str, set[str]] = defaultdict(set)  # the dataset's own video name -> its ids
    for method, samples in by_method.items():
        for s in samples:
            meta = json.loads(s["json"])
            assert meta["video"] == video_id("ffpp_c23", method, Path(meta["source"]).stem)
            assert s["__key__"] == f"{meta['video']}-{meta['frame']:06d}"
            names[Path(meta["source"]).stem].add(meta["video"])
    shared = {n: ids for n, ids in names.items() if len(ids) > 1}
    assert shared, "the sample dataset reuses `<target>_<source>` names in both fake methods"
    assert all(len(ids) == 2 for ids in shared.values())  # SelfBlend and FaceSwap versions: two videos


def test_old_and_new_shard_forms_give_the_same_ids(sample_shards, old_shards):
    folder = Path("ffpp_c23/test/FaceSwap")
    new = {"__key__": "ffpp_c23-FaceSwap-000_001-000004",
           "json": b'{"dataset": "ffpp_c23", "method": "FaceSwap", "video": "ffpp_c23-FaceSwap-000_001"}'}
    old = {"__key__": "000_001-000004", "json": b'{"dataset": "ffpp_c23", "method": "FaceSwap", "video": "000_001"}'}
    want = ("ffpp_c23-FaceSwap-000_001-000004", "ffpp_c23-FaceSwap-000_001", "FaceSwap")
    assert sample_ids(new["json"], new["__key__"], folder) == want
    assert sample_ids(old["json"], old["__key__"], folder) == want
    assert sample_ids(None, old["__key__"], folder) == want  # no json: dataset and method from the folder path

    loaders = ["reference"] + (["dali"] if dali_available() else [])
    for loader in loaders:
        cfg = load_config("tiny-cpu", [f"data.loader={loader}", "data.num_threads=1"])
        seen = []
        for root in (sample_shards, old_shards):
            batches = build_eval_loader(cfg, [root / "ffpp_c23" / "test"], 0, 1, "cpu", 8)
            seen.append(sorted((k, v, m) for b in batches for k, v, m in zip(b["keys"], b["videos"], b["methods"])))
        assert seen[0] == seen[1], loader
        keys = [k for k, _, _ in seen[0]]
        assert len(keys) == len(set(keys)) == 24, loader


def _video_auc(rows: list[dict], method: str | None = None) -> float:
    """Video AUC recomputed from scores.csv grouped on `video` alone (mean of the frames, the eval default)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if method is None or r["method"] in ("real", method):
            groups[r["video"]].append(r)
    labels = [g[0]["label"] for g in groups.values()]
    scores = [float(np.mean([r["score"] for r in g])) for g in groups.values()]
    return roc_auc_score(labels, scores)


@pytest.mark.parametrize("form", ["new", "old"])
def test_report_video_auc_equals_sklearn_on_scores_csv(sample_shards, old_shards, tmp_path, form):
    from ltm.models import build_model

    cfg = load_config("tiny-cpu", ["model.kind=baseline", "data.loader=reference", "data.num_threads=0",
                                   "eval.attention_samples=0"])
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.data.image_size, load_weights=False).state_dict(), run / "weights.pt")
    root = sample_shards if form == "new" else old_shards
    (report,) = evaluate(run, [str(root / "ffpp_c23" / "test")], weights=run / "weights.pt")
    assert report["video_agg"] == "mean"
    rows = read_scores(run / "eval" / "ffpp_c23-test" / "scores.csv")
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == report["n_frames"]
    assert len({r["video"] for r in rows}) == report["n_videos"] == 6  # 2 real, 2 SelfBlend, 2 FaceSwap
    assert report["video_auc"] == pytest.approx(_video_auc(rows), abs=1e-9)
    for method in ("SelfBlend", "FaceSwap"):
        assert report["per_method"][method]["video_auc"] == pytest.approx(_video_auc(rows, method), abs=1e-9)


def test_predict_heatmaps_of_same_named_videos_stay_apart(tmp_path):
    """`ltm predict Deepfakes/.../000_003.mp4 Face2Face/.../000_003.mp4 --heatmap DIR`: one picture set per video."""
    from ltm.deploy.predict import write_heatmaps
    from ltm.models import build_model

    cfg = load_config("tiny-cpu")
    model = build_model(cfg.model, cfg.data.image_size, load_weights=False).eval()
    images = torch.rand(1, 3, cfg.data.image_size, cfg.data.image_size)
    written = [write_heatmaps(tmp_path / "maps", tmp_path / m / "c23" / "videos" / "000_003.mp4", model, images,
                              [0], [0.5], 1) for m in ("Deepfakes", "Face2Face")]
    assert len(set(written[0]) | set(written[1])) == 2
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2
