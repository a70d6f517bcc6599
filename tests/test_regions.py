"""Mask diagnostics (ltm.eval.mask_diagnostics): known manipulated regions read aligned with their crops, and the hit
rate of a map that does find them against one that does not."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.shards import jpeg_bytes, write_shards
from ltm.config import load_config
from ltm.eval.mask_diagnostics import cell_coverage, chance_hit, diagnose, map_scores, mask_scores, region_samples
from ltm.models.masking import feature_mask
from tests.shared_data import SHARED_DATA

FACES = SHARED_DATA / "faces"

SIZE, GRID, PATCH = 112, (4, 4), 20  # a 20 px patch fits inside one 28 px cell


def png_bytes(region: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(region).save(buf, format="PNG")
    return buf.getvalue()


def stamped_fakes(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """Real face crops each carrying a bright checkerboard patch inside one grid cell (the "manipulation"), its
    region (255 on the patch) and the patch's cell."""
    rng = np.random.default_rng(seed)
    faces = sorted(FACES.glob("*.jpg"))[:n]
    assert len(faces) == n, f"need {n} face photos in {FACES}"
    out = []
    for path in faces:
        img = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE)), dtype=np.uint8).copy()
        cell = (int(rng.integers(4)), int(rng.integers(4)))
        top, left = cell[0] * 28 + 4, cell[1] * 28 + 4
        yy, xx = np.mgrid[:PATCH, :PATCH]
        img[top:top + PATCH, left:left + PATCH] = np.where(((yy // 2 + xx // 2) % 2)[..., None] == 1, 255, 200)
        region = np.zeros((SIZE, SIZE), np.uint8)
        region[top:top + PATCH, left:left + PATCH] = 255
        out.append((img, region, cell))
    return out


def write_folder(root, method: str, fakes, transform=lambda r: r, reals: int = 2):
    """`<root>/toy/test/{real,<method>}` with region.png on the fakes (through `transform`), none on the reals."""
    samples = []
    for i, (img, region, _) in enumerate(fakes):
        samples.append({"__key__": f"f{i}-{i:06d}", "jpg": jpeg_bytes(img), "cls": 1,
                        "region.png": png_bytes(transform(region)),
                        "json": {"video": f"f{i}", "frame": i, "label": 1, "method": method, "region": "blend"}})
    folder = root / "toy" / "test" / method
    folder.mkdir(parents=True)
    write_shards(samples, folder, f"toy-test-{method}", max_samples=5)
    real = root / "toy" / "test" / "real"
    if not real.exists():
        real.mkdir(parents=True)
        write_shards([{"__key__": f"r{i}-{i:06d}", "jpg": jpeg_bytes(fakes[i][0]), "cls": 0,
                       "json": {"video": f"r{i}", "frame": i, "label": 0, "method": "real"}}
                      for i in range(reals)], real, "toy-test-real")
    return root / "toy" / "test"


class PatchFinder(torch.nn.Module):
    """A stand-in teacher whose map is each cell's high-frequency energy: it finds the checkerboard patch. The
    diagnostics are under test here, so the map must be known; the real teacher's maps are tested in test_models."""

    grid = GRID

    def __init__(self):
        super().__init__()
        self.cfg = load_config("tiny-cpu").model

    def _energy(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.mean(1, keepdim=True)
        detail = (gray[..., 1:, :] - gray[..., :-1, :]).abs()[..., :, :-1] + \
            (gray[..., :, 1:] - gray[..., :, :-1]).abs()[..., :-1, :]
        return torch.nn.functional.adaptive_avg_pool2d(detail, GRID)[:, 0]

    def teacher_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        energy = self._energy(images)
        return {"mean": energy, "head0": -energy, "mask_map": energy}

    def explain(self, images: torch.Tensor) -> dict:
        return {"mask": feature_mask(self._energy(images), self.cfg.mask_ratio, "high")}


def test_region_samples_are_aligned_with_their_crops(tmp_path):
    fakes = stamped_fakes(6)
    split = write_folder(tmp_path, "Stamp", fakes)
    samples = region_samples(split, SIZE, limit=100)
    assert [s.method for s in samples] == ["Stamp"] * 6  # the reals carry no region
    for s, (img, region, _) in zip(sorted(samples, key=lambda s: int(s.key[1:].split("-")[0])), fakes):
        inside = s.region > 0.5
        assert inside.sum() == PATCH * PATCH
        assert torch.equal(inside, torch.from_numpy(region > 127))
        # the crop's patch (bright checkerboard) lies exactly under the region
        assert s.image[:, inside].mean() > 0.75
        assert abs(s.image[:, inside].mean() - torch.from_numpy(img[region > 127] / 255.0).float().mean()) < 0.03
    assert len(region_samples(split, SIZE, limit=2)) == 2


@pytest.mark.parametrize("transform,finds", [(lambda r: r, True),
                                             (lambda r: np.ascontiguousarray(r[::-1]), False),
                                             (lambda r: np.roll(r, (56, 56), axis=(0, 1)), False)],
                         ids=["aligned", "flipped", "shifted"])
def test_hit_rate_is_high_only_when_the_region_lies_under_its_evidence(tmp_path, transform, finds):
    fakes = stamped_fakes(12, seed=1)
    moved = sum(np.argwhere(transform(r) > 0).mean(0).astype(int).tolist() != np.argwhere(r > 0).mean(0)
                .astype(int).tolist() for _, r, _ in fakes)
    assert finds or moved >= 10  # the flip and shift move (nearly) every patch to another cell
    figures, pictures = diagnose(PatchFinder(), write_folder(tmp_path, "Stamp", fakes, transform), SIZE, 100,
                                 torch.device("cpu"))
    d = figures["per_method"]["Stamp"]
    assert d["n"] == 12 and figures["k"] == 4 and figures["grid"] == [4, 4]
    assert d["mask"]["chance_hit_rate"] == pytest.approx(0.25)  # one strongest cell, 4 of 16 masked
    if finds:
        assert d["mask"]["hit_rate"] == 1.0 and d["maps"]["mean"]["hit_rate"] == 1.0
        assert d["mask"]["masked_in_region"] == pytest.approx(PATCH * PATCH / 28**2 / 4, rel=0.01)
        assert d["maps"]["mean"]["attention_in_region"] > 2 * d["mask"]["region_share"]
        assert d["maps"]["head0"]["hit_rate"] == 0.0  # the inverted map avoids the patch
    else:
        assert d["mask"]["hit_rate"] <= 0.5
    assert len(pictures) == 2 and pictures[0][0] == "Stamp"


def test_scores_by_hand():
    coverage = torch.zeros(2, 4, 4)
    coverage[0, 1, 2] = 1.0  # one strongest cell
    coverage[1, 0, :2] = 1.0  # two tied strongest cells
    coverage[1, 3, 3] = 0.5
    attention = torch.zeros(2, 4, 4)
    attention[0, 1, 2] = 1.0
    attention[1, 3, 3] = 1.0
    s = map_scores(attention, coverage, k=1)
    assert s["hit_rate"].tolist() == [1.0, 0.0]
    assert s["attention_in_region"].tolist() == pytest.approx([1.0, 0.5])
    assert s["entropy"].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    mask = torch.ones(2, 4, 4)
    mask[0, 0, 0] = 0
    mask[1, 0, 1] = 0
    m = mask_scores(mask, coverage)
    assert m["hit_rate"].tolist() == [0.0, 1.0]
    assert m["masked_in_region"].tolist() == [0.0, 1.0]
    assert m["chance_hit_rate"].tolist() == pytest.approx([1 / 16, 2 / 16])
    assert chance_hit(torch.tensor([[True] + [False] * 15]), 4).item() == pytest.approx(0.25)
    assert cell_coverage(torch.ones(1, 8, 8), (4, 4)).sum() == 16
