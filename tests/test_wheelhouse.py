"""`make wheelhouse` and `make install WHEELS=DIR`: an air-gapped install, checked end to end.

The module builds one wheelhouse for this machine's target (cp311, manylinux_2_28_x86_64) with `TORCH=no` and
`PART_MB=60`, the route docs/install.md gives for a node that brings its own torch. The node is played by a fresh venv
whose torch, torchvision and their dependencies come from a folder on PYTHONPATH (as `module load pytorch` puts them
there): this venv's installed files, linked one by one, nothing else. The parts are copied together as they would
arrive on the node, and `make install WHEELS=...` installs from them with pip's configuration set aside, no index
(PIP_NO_INDEX=1) and every proxy pointing at a closed port, so any attempt to reach the network fails. ltm,
DeepSpeed, DALI and webdataset must then import from the new venv, and `ltm train` runs two steps on tiny shards
through DALI. (With torch included the same wheelhouse adds torch's 2.8 GiB of wheels; installing those alone takes
minutes here.)

Also: the parts rejoin byte-identical, a damaged piece or a missing part is refused with its name, a rerun keeps
checked wheels and replaces a damaged one, `install.sh --target` installs wheels into a folder, and the Makefile
passes its variables on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from repo_script import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "wheelhouse.py"
PART_MB = 60
REFUSED = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sums(path: Path) -> dict[str, str]:
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in path.read_text().splitlines())}


def run(cmd: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def offline_env(node: Path | None = None) -> dict[str, str]:
    """No pip configuration, no index, no find-links from the environment; proxies that refuse every connection.
    pip compiles no bytecode (the installed files are what is checked; the 10,000 files of the requirements took 17
    CPU-s): PIP_COMPILE=0, since pip reads PIP_NO_COMPILE=1 as `--compile`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in DIST_VARS
           and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}  # bytecode: written on first import
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_COMPILE="0", PIP_DISABLE_PIP_VERSION_CHECK="1",
               http_proxy=REFUSED, https_proxy=REFUSED, HTTP_PROXY=REFUSED, HTTPS_PROXY=REFUSED, ALL_PROXY=REFUSED,
               no_proxy="", NO_PROXY="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    if node:
        env["PYTHONPATH"] = str(node)
    return env


def link_tree(src: Path, dst: Path) -> None:
    """dst holds src's files as hard links (a copy that costs no space)."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


def node_torch(dest: Path) -> list[str]:
    """torch, torchvision and their dependencies (markers and extras followed) as this venv has them, linked file by
    file into `dest`: a node's own torch. Returns the distributions' names."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def key(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen, dists, todo = set(), {}, [("torch", frozenset()), ("torchvision", frozenset())]
    while todo:
        name, extras = todo.pop()
        if (key(name), extras) in seen:
            continue
        seen.add((key(name), extras))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        dists[key(name)] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append((req.name, frozenset(req.extras)))
    for dist in dists.values():
        for file in dist.files or []:
            if file.parts[0] == "..":
                continue
            source, target = Path(file.locate()), dest / file
            if source.exists() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source)
    return sorted(dists)


def tiny_shards(root: Path) -> None:
    """`root/toy/train/{real,FaceSwap}`: 8 noise images each (real brighter than fake), DALI index files included."""
    from data_prep.shards import jpeg_bytes, write_shards

    rng = np.random.default_rng(0)
    for label, method in enumerate(("real", "FaceSwap")):
        samples = []
        for i in range(8):
            image = rng.integers(0, 128, (64, 64, 3), dtype=np.uint8) + (0 if label else 100)
            video = f"{method[:4]}{i // 2}"
            samples.append({"__key__": f"{video}-{i:06d}", "jpg": jpeg_bytes(image), "cls": label,
                            "json": {"dataset": "toy", "split": "train", "video": video, "frame": i, "label": label,
                                     "method": method, "compression": "raw", "bbox": [0, 0, 64, 64],
                                     "source": "noise"}})
        folder = root / "toy" / "train" / method
        folder.mkdir(parents=True)
        write_shards(samples, folder, f"toy-train-{method}", max_samples=4)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """The wheelhouse for this machine's target, TORCH=no, split into parts of 60 MiB (removed afterwards: it is
    about 0.6 GB, its parts as much again)."""
    base = tmp_path_factory.mktemp("wheelhouse")
    out = base / "w"
    proc = run([sys.executable, str(SCRIPT), "build", str(out), "--torch", "no", "--part-mb", str(PART_MB)],
               timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    yield out
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, emptied afterwards (a venv is 1.6 GB; links into the wheelhouse hold its space once it is gone)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_wheelhouse_holds_every_wheel_and_its_checksum(wheelhouse):
    manifest = json.loads((wheelhouse / "manifest.json").read_text())
    names = {w["name"] for w in manifest["wheels"]}
    assert {"deepspeed", "ltm", "nvidia-dali-cuda130", "facenet-pytorch", "webdataset", "timm", "accelerate",
            "submitit", "omegaconf", "pip", "setuptools"} <= names
    # torch and what only torch needs are left out; what others need too stays
    assert not names & {"torch", "torchvision", "triton", "nvidia-cudnn-cu13", "nvidia-cublas", "nvidia-nccl-cu13"}
    assert {"numpy", "pillow", "sympy"} <= names
    assert manifest["torch"] is False and manifest["python_version"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), flags=re.M))
    versions = {w["name"]: w["version"] for w in manifest["wheels"]}
    assert versions["deepspeed"] == pins["deepspeed"] and versions["facenet-pytorch"] == pins["facenet-pytorch"]
    assert not re.search(r"^torch(vision)?==", (wheelhouse / "constraints.txt").read_text(), flags=re.M)
    listed = sums(wheelhouse / "SHA256SUMS")
    on_disk = {p.name for p in wheelhouse.iterdir() if p.is_file() and not p.name.startswith(".")} - {"SHA256SUMS"}
    assert set(listed) == on_disk == {w["file"] for w in manifest["wheels"]} | {
        "install.sh", "manifest.json", "requirements.txt", "constraints.txt"}
    for w in manifest["wheels"]:
        assert listed[w["file"]] == w["sha256"] == sha256(wheelhouse / w["file"]), w["file"]


def test_parts_rejoin_byte_identical(wheelhouse):
    parts = sorted((wheelhouse / "parts").iterdir(), key=lambda p: int(p.name[1:]))
    assert len(parts) >= 2 and (parts[0] / "install.sh").exists()
    pieces: dict[str, list[Path]] = {}
    for part in parts:
        files = sorted(part.iterdir())
        assert sum(f.stat().st_size for f in files) <= PART_MB * 1024 * 1024, part.name
        listed = sums(part / f"SHA256SUMS.{part.name}")
        assert set(listed) == {f.name for f in files} - {f"SHA256SUMS.{part.name}", "PARTS"}
        for f in files:
            if ".piece-" in f.name:
                assert listed[f.name] == sha256(f)
                pieces.setdefault(f.name.rsplit(".piece-", 1)[0], []).append(f)
    assert pieces, "no wheel is larger than a part: nothing was cut into pieces"
    assert sums(parts[0] / "PARTS") == {f"SHA256SUMS.{p.name}": sha256(p / f"SHA256SUMS.{p.name}") for p in parts}
    whole = sums(wheelhouse / "SHA256SUMS")
    for name, files in pieces.items():
        joined = hashlib.sha256()
        for f in sorted(files, key=lambda f: f.name):
            joined.update(f.read_bytes())
        assert joined.hexdigest() == whole[name] == sha256(wheelhouse / name), name
    every = {f.name for part in parts for f in part.iterdir() if ".piece-" not in f.name
             and not f.name.startswith("SHA256SUMS.") and f.name != "PARTS"}
    assert every | set(pieces) == set(whole) | {"SHA256SUMS"}


def as_delivered(wheelhouse: Path, dest: Path) -> Path:
    """Every part's files copied into one folder, as on the node."""
    dest.mkdir()
    for part in (wheelhouse / "parts").iterdir():
        for f in part.iterdir():
            os.link(f, dest / f.name)
    return dest


def test_offline_install_from_the_parts_then_a_tiny_train(wheelhouse, scratch):
    """`make install WHEELS=...` into a fresh venv with the network refused, then imports and two training steps."""
    tmp_path = scratch
    delivered = as_delivered(wheelhouse, tmp_path / "delivered")
    node = tmp_path / "node-torch"
    provided = node_torch(node)
    assert {"torch", "torchvision"} <= set(provided)
    venv = tmp_path / "venv"
    proc = run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], timeout=300)
    assert proc.returncode == 0, proc.stderr
    env = offline_env(node)
    proc = run(["make", "install", f"WHEELS={delivered}", f"VENV={venv}"], timeout=1200, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "every file present and checked" in proc.stdout
    # the pieces were joined into the wheels the wheelhouse holds
    whole = sums(wheelhouse / "SHA256SUMS")
    assert not list(delivered.glob("*.piece-*"))
    for name, digest in whole.items():
        assert sha256(delivered / name) == digest, name

    probe = ("import json, ltm, deepspeed, nvidia.dali, webdataset, timm, torch; from ltm.env import report; "
             "print(json.dumps({'report': report(), 'files': {m.__name__: m.__file__ "
             "for m in (ltm, deepspeed, nvidia.dali, webdataset, timm, torch)}}))")
    proc = run([str(venv / "bin" / "python"), "-c", probe], timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    where, info = found["files"], found["report"]
    for name in ("deepspeed", "nvidia.dali", "webdataset", "timm"):
        assert where[name].startswith(str(venv)), (name, where[name])
    assert where["ltm"] == str(REPO / "ltm" / "__init__.py")  # editable, from this checkout
    assert where["torch"].startswith(str(node))  # the node's own
    assert info["dali"] == ["nvidia-dali-cuda130 2.4.0"] and info["deepspeed"] and not info["problems"], info

    shards = tmp_path / "shards"
    tiny_shards(shards)
    config = tmp_path / "toy.yaml"
    config.write_text(f"""base: tiny-cpu
data:
  root: {shards}
  image_size: 64
  loader: dali
  train: [{{path: toy/train/real, weight: 1}}, {{path: toy/train/FaceSwap, weight: 1}}]
  val: []
  test: []
train: {{batch_size: 4, iters_per_epoch: 2, epochs: 1, val_every: 0, ckpt_every: 2, log_every: 1}}
""")
    run_dir = tmp_path / "run"
    proc = run([str(venv / "bin" / "ltm"), "train", "--config", str(config), f"train.run_dir={run_dir}"],
               timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 2, steps
    assert (run_dir / "checkpoints" / "step00000002").is_dir()


def test_a_damaged_piece_or_a_missing_part_is_named(wheelhouse, scratch):
    tmp_path = scratch  # hard links into the wheelhouse: they would hold its space once it is removed
    parts = tmp_path / "parts"
    link_tree(wheelhouse / "parts", parts)
    piece = sorted(parts.glob("p*/*.piece-001"))[0]
    data = bytearray(piece.read_bytes())
    data[len(data) // 2] ^= 0xFF
    piece.unlink()  # a hard link: write a new file, the wheelhouse's stays intact
    piece.write_bytes(bytes(data))
    proc = run(["bash", str(parts / "p1" / "install.sh"), str(parts), "--verify"], timeout=300)
    assert proc.returncode != 0
    assert f"checksum mismatch: {parts}/{piece.name} (part {piece.parent.name})" in proc.stderr, proc.stderr
    assert not (parts / piece.name.rsplit(".piece-", 1)[0]).exists(), "nothing may be joined past a damaged piece"

    short = tmp_path / "short"
    link_tree(wheelhouse / "parts", short)
    gone = max(short.iterdir(), key=lambda p: int(p.name[1:]))
    shutil.rmtree(gone)
    proc = run(["bash", str(short / "p1" / "install.sh"), str(short), "--verify"], timeout=300)
    assert proc.returncode != 0
    assert f"part {gone.name} is missing (no SHA256SUMS.{gone.name} in {short})" in proc.stderr, proc.stderr


def test_install_target_puts_the_wheels_in_a_folder(wheelhouse, scratch):
    """`install.sh W --target DIR`: every wheel, no dependency check, into DIR (a small wheelhouse of two)."""
    tmp_path = scratch
    small = tmp_path / "small"
    small.mkdir()
    listed = sums(wheelhouse / "SHA256SUMS")
    keep = [n for n in listed if n.startswith(("braceexpand-", "hjson-"))] + ["install.sh"]
    for name in keep:
        os.link(wheelhouse / name, small / name)
    (small / "SHA256SUMS").write_text("".join(f"{listed[n]}  {n}\n" for n in keep))
    target = tmp_path / "site"
    # paths relative to where it is called from, as in `make install` (--python .venv/bin/python)
    proc = run(["bash", str(small / "install.sh"), "small", "--target", "site",
                "--python", os.path.relpath(sys.executable, tmp_path)], timeout=300, env=offline_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"export PYTHONPATH={target}" in proc.stdout
    proc = run([sys.executable, "-c", "import braceexpand, hjson; print(braceexpand.__file__, hjson.__file__)"],
               timeout=60, env={**offline_env(), "PYTHONPATH": str(target)})
    assert proc.returncode == 0 and all(p.startswith(str(target)) for p in proc.stdout.split()), proc


def test_rerun_keeps_checked_wheels_and_replaces_damaged_ones(wheelhouse, capsys):
    """What a rerun does with the wheels it resolves (`fetch`): a present wheel whose sha256 matches is kept, a
    damaged or missing one is downloaded again, and a half-finished download left behind never counts. DeepSpeed's
    wheel, once built and recorded, is kept. (A whole second `build` does the same for every wheel, with a minute of
    resolving first.)"""
    script = load_script("scripts/wheelhouse.py")
    manifest = json.loads((wheelhouse / "manifest.json").read_text())
    by_name = {w["name"]: w for w in manifest["wheels"]}
    items = [{"name": n, "file": by_name[n]["file"], "url": by_name[n]["source"], "sha256": by_name[n]["sha256"]}
             for n in ("braceexpand", "six", "hjson")]
    kept, damaged, missing = (wheelhouse / item["file"] for item in items)
    before = kept.stat().st_mtime_ns
    damaged.write_bytes(b"not a wheel")
    missing.unlink()
    partial = wheelhouse / ".partial"
    (partial / "download").mkdir(parents=True)
    (partial / "download" / missing.name).write_bytes(b"half a wheel")
    old_sums = sums(wheelhouse / "SHA256SUMS")
    options = script.target_options(manifest["python_version"], manifest["platform"])
    got = script.fetch(items, wheelhouse, partial, options, old_sums)
    assert "1 wheels present and checked, 2 to download" in capsys.readouterr().out
    assert got == {item["file"]: item["sha256"] for item in items}
    for item in items:
        assert sha256(wheelhouse / item["file"]) == item["sha256"]
    assert kept.stat().st_mtime_ns == before and not (partial / "download").exists()
    deepspeed = script.deepspeed_wheel(wheelhouse, partial, REPO / "constraints.txt", old_sums)
    assert deepspeed.name == by_name["deepspeed"]["file"] and "built before, kept" in capsys.readouterr().out
    shutil.rmtree(partial)


def test_make_passes_the_target_on(tmp_path):
    proc = run(["make", "-n", "-o", ".venv/.installed", "-o", ".venv/.dali-auto", "wheelhouse",
                f"WHEELHOUSE={tmp_path}/w", "PYTHON_VERSION=3.12", "PLATFORM=manylinux_2_28_aarch64", "TORCH=no",
                "DALI=cuda120", "PART_MB=60"], timeout=60, cwd=REPO)
    line = " ".join(proc.stdout.replace("\\\n", " ").split())
    assert (f"scripts/wheelhouse.py build {tmp_path}/w --python-version 3.12 --platform manylinux_2_28_aarch64 "
            "--torch no --dali cuda120 --part-mb 60") in line, proc.stdout
    proc = run(["make", "-n", "install", f"WHEELS={tmp_path}", f"VENV={tmp_path}/venv"], timeout=60, cwd=REPO)
    assert "holds no wheelhouse" in proc.stdout
    (tmp_path / "install.sh").write_text("")
    proc = run(["make", "-n", "install", f"WHEELS={tmp_path}", f"VENV={tmp_path}/venv"], timeout=60, cwd=REPO)
    assert f"bash {tmp_path}/install.sh {tmp_path} --python {tmp_path}/venv/bin/python --dali auto" in proc.stdout
    assert "pip install" not in proc.stdout  # nothing from an index


def test_platform_tags_include_older_manylinux():
    script = load_script("scripts/wheelhouse.py")
    tags = script.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_29_x86_64" not in tags
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert script.platform_tags("manylinux_2_17_aarch64")[-4:] == [
        "manylinux_2_5_aarch64", "manylinux2014_aarch64", "manylinux2010_aarch64", "manylinux1_aarch64"]
    assert script.platform_tags("macosx_11_0_arm64") == ["macosx_11_0_arm64"]
