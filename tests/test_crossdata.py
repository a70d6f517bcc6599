"""The cross-dataset table (ltm.eval.report.crossdata): rows and mean from reports, the protocol stated, and a real
evaluation of the tiny model over three benchmark miniatures prepared by `ltm prep` (Celeb-DF v1, UADFV,
DFDC-Preview), its page opened in headless Chromium."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_prep_benchmarks import _put, media  # noqa: F401  (the module's pooled real media fixture)

from ltm.eval.report import crossdata
from ltm.eval.report.tables import fmt


def _report(name: str, frame: float | None, video: float | None, frames: int = 32, agg: str = "mean") -> dict:
    return {"name": name, "data": f"/x/{name}", "frame_auc": frame, "video_auc": video, "n_frames": 64,
            "n_videos": 2, "frames_per_video": frames, "video_agg": agg, "perturbation": None, "checkpoint": "c"}


def test_rows_mean_and_protocol():
    reports = [_report("celebdf_v2-test", 0.8, 0.9), _report("dfdc-test", 0.6, 0.7),
               _report("dfd_c23-test", float("nan"), None)]
    t = crossdata.summary(reports, "deepfakebench")
    assert [r["name"] for r in t["rows"]] == ["celebdf_v2-test", "dfdc-test", "dfd_c23-test"]
    assert math.isclose(t["mean"]["frame_auc"], 0.7) and math.isclose(t["mean"]["video_auc"], 0.8)
    assert t["short_of_protocol"] == []
    assert t["mean"]["n_frame_auc"] == 2  # a set without an AUC (one class) is left out of the mean, not counted 0
    md = crossdata.crossdata_markdown(t)
    assert "deepfakebench — DeepfakeBench: 32 evenly spaced frames per video" in md
    assert "| **mean** | **0.7000** | **0.8000** |" in md and "| dfd_c23-test | n/a | n/a | 64 | 2 | 32.0 |" in md
    # without a preset the table states the settings the reports were scored under, and flags a mix
    assert crossdata.summary(reports[:2])["protocol_text"].startswith("32 evenly spaced frames per video, video "
                                                                      "score = mean")
    mixed = crossdata.summary([_report("a", 0.5, 0.5), _report("b", 0.5, 0.5, frames=0, agg="max")])
    assert not mixed["consistent"] and "different settings" in crossdata.crossdata_markdown(mixed)
    assert crossdata.protocol_overrides("deepfakebench") == ["eval.frames_per_video=32", "eval.video_agg=mean"]
    assert crossdata.protocol_overrides("all-frames")[0] == "eval.frames_per_video=0"
    with pytest.raises(ValueError, match="--protocol 'nope'"):
        crossdata.protocol_overrides("nope")


def _miniatures(media, root: Path) -> Path:  # noqa: F811
    """Three benchmarks in their own layouts, prepared into one shard root (112 px crops, 3 frames per video)."""
    c = media["clips"]
    out = root / "shards"
    u = root / "UADFV"
    for i in range(2):
        _put(c[i], u / "real" / f"{i:04d}.mp4")
        _put(c[2 + i], u / "fake" / f"{i:04d}_fake.mp4")
    cd = root / "Celeb-DF"
    _put(c[4], cd / "Celeb-real" / "id0_0000.mp4")
    _put(c[5], cd / "YouTube-real" / "00000.mp4")
    _put(c[6], cd / "Celeb-synthesis" / "id0_id1_0000.mp4")
    _put(c[7], cd / "Celeb-synthesis" / "id1_id0_0000.mp4")
    (cd / "List_of_testing_videos.txt").write_text("1 Celeb-real/id0_0000.mp4\n1 YouTube-real/00000.mp4\n"
                                                   "0 Celeb-synthesis/id0_id1_0000.mp4\n"
                                                   "0 Celeb-synthesis/id1_id0_0000.mp4\n")
    dp = root / "dfdc_preview"
    listing = {}
    for i, (rel, lab) in enumerate((("method_A/1/1_A/1_A_001.mp4", "fake"), ("method_B/2/2_B/2_B_001.mp4", "fake"),
                                    ("original_videos/1/1_A_001.mp4", "real"),
                                    ("original_videos/2/2_B_001.mp4", "real"))):
        _put(c[i + 3], dp / rel)
        listing[rel] = {"label": lab, "set": "test"}
    (dp / "dataset.json").write_text(json.dumps(listing))
    for source, r in (("uadfv", u), ("celebdf1", cd), ("dfdcp", dp)):
        assert main_prep(source, r, out) == 0
    return out


def main_prep(source: str, root: Path, out: Path) -> int:
    from ltm.cli import main

    return main(["prep", source, "--root", str(root), "--out", str(out), "--frames", "3", "--size", "112",
                 "--no-progress"])


def test_cross_dataset_report_of_three_miniatures_in_chromium(media, tmp_path):  # noqa: F811
    from browser import _run, screenshot

    from ltm.cli import main
    from ltm.config import load_config, save_config
    from ltm.models import build_model

    shards = _miniatures(media, tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("tiny-cpu", [f"data.root={shards}", "eval.attention_samples=0", "eval.error_samples=0",
                                   "eval.region_samples=0"])
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model, cfg.data.image_size).state_dict(), run / "weights.pt")
    out = tmp_path / "eval"
    sets = ["celebdf_v1/test", "uadfv/test", "dfdcp/test"]
    argv = ["eval", "--run", str(run), "--weights", str(run / "weights.pt"), "--out", str(out),
            "--protocol", "deepfakebench"]
    for s in sets:
        argv += ["--data", s]
    assert main(argv) == 0
    table = json.loads((out / "cross-dataset.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["celebdf_v1-test", "uadfv-test", "dfdcp-test"]
    assert table["protocol"] == "deepfakebench" and table["consistent"]
    # prep wrote 3 frames per video: the table says the sets fall short of the protocol's 32
    assert table["short_of_protocol"] == ["celebdf_v1-test", "uadfv-test", "dfdcp-test"]
    for r in table["rows"]:
        report = json.loads((out / r["name"] / "report.json").read_text())
        assert r["frame_auc"] == report["frame_auc"] and r["video_auc"] == report["video_auc"]
        assert report["frames_per_video"] == 32 and report["video_agg"] == "mean" and report["cross_dataset"]
        md = (out / r["name"] / "report.md").read_text()
        assert "../cross-dataset.md" in md and "## Cross-dataset table" in md  # the whole table, every set's row
        assert all(f"| {x['name']} | {fmt(x['frame_auc'])} |" in md for x in table["rows"])
        assert md.count("## Cross-dataset table") == 1
        page_of_set = (out / r["name"] / "report.html").read_text()
        assert 'id="cross-dataset"' in page_of_set and '<tr class="mean">' in page_of_set
    vals = [r["frame_auc"] for r in table["rows"] if r["frame_auc"] is not None]
    assert len(vals) == 3 and math.isclose(table["mean"]["frame_auc"], sum(vals) / 3)
    assert main(["eval", "--run", str(run), "--weights", str(run / "weights.pt"), "--protocol", "deepfakebench",
                 "--frames-per-video", "8", "--data", sets[0]]) == 2  # a preset and a contradicting flag
    page = out / "cross-dataset.html"
    try:
        dom = _run(page, "--dump-dom").stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.fail(f"headless Chromium could not open {page}: {exc}")
    for r in table["rows"]:
        assert f"<td>{r['name']}</td><td>{fmt(r['frame_auc'])}</td>" in dom
    assert "DeepfakeBench: 32 evenly spaced frames per video" in dom and '<tr class="mean">' in dom
    shot = screenshot(page, tmp_path / "cross.png", 1000, 600)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # a rendered table, not a blank page
