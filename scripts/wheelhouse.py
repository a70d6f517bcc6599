"""`make wheelhouse`: every wheel `make install` needs for one target (Python version, platform), in one folder, for
nodes that reach no package index. `make install WHEELS=DIR` (or `bash DIR/install.sh DIR`) installs from it offline.

    python scripts/wheelhouse.py build DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64]
                                           [--torch yes|no] [--dali auto|cuda120|cuda130] [--part-mb 60]
    python scripts/wheelhouse.py parts DIR --part-mb 60      # (re)split a built wheelhouse into parts

Run with the project's venv (`make install` first): DeepSpeed is published as source only, so its wheel is built
here once, against this venv's torch (`--no-build-isolation`; a pure-Python wheel, its ops compile on first use).
The rest is resolved in one go, as pip would for the target (`pip install --dry-run --report` with the project's
requirements.txt and constraints.txt, torch, torchvision, the DALI build, pip and setuptools), then each wheel is
downloaded (`pip download`, this machine's pip configuration) and checked against the index's sha256.
facenet-pytorch comes without its dependencies, as `make install` installs it. `--torch no` leaves out torch,
torchvision and what only they need (their CUDA libraries, triton) for nodes that bring their own torch.

DIR ends up holding:
    *.whl                                the wheels, ltm's own included (built from this checkout)
    requirements.txt, constraints.txt    the project's (constraints without torch's pins with --torch no)
    install.sh                           the offline installer (scripts/wheelhouse-install.sh)
    manifest.json                        the target and every wheel (name, version, bytes, sha256, source)
    SHA256SUMS                           every file above (`sha256sum -c SHA256SUMS`)
    parts/p1 ... pN                      with --part-mb N: the same files in folders of at most N MiB each, files
                                         larger than that cut into NAME.piece-000, -001, ...; every part lists
                                         its files' sha256 in SHA256SUMS.pK; p1 holds install.sh
                                         and PARTS, the sha256 of every part's list

A rerun keeps every wheel that is present and matches its sha256 (and DeepSpeed's wheel once built), fetches the
rest, and removes wheels the new resolution no longer names. Downloads and builds go to a temporary folder inside
DIR first and are moved in only when complete and checked, so an interrupted run never leaves a partial wheel.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform as platform_module
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parent.parent
INSTALLER = REPO / "scripts" / "wheelhouse-install.sh"
CONTROL = ["install.sh", "manifest.json", "requirements.txt", "constraints.txt"]  # beside the wheels; + SHA256SUMS
TORCH_ROOTS = {"torch", "torchvision"}
BUILD_TOOLS = ["pip", "setuptools"]  # a venv on Python >= 3.12 has no setuptools; `pip install -e .` needs it
PIECE = ".piece-"
MIB = 1024 * 1024


class WheelhouseError(RuntimeError):
    """A wheelhouse that cannot be built or split; the message names the file or step."""


def say(message: str) -> None:
    print(f"wheelhouse: {message}", flush=True)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, text: str, mode: int | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    if mode is not None:
        tmp.chmod(mode)
    tmp.replace(path)


def read_sums(path: Path) -> dict[str, str]:
    """file name -> sha256 from a `sha256sum` list; {} when there is none."""
    if not path.exists():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.lstrip("*")] = digest
    return sums


def sums_text(sums: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))


def pinned(constraints: Path, name: str) -> str:
    """The version constraints.txt pins `name` to."""
    for line in constraints.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m and normalize(m.group(1)) == normalize(name):
            return m.group(2)
    raise WheelhouseError(f"{constraints} pins no version of {name}")


def platform_tags(platform: str) -> list[str]:
    """pip takes `--platform` literally for manylinux_X_Y: a wheel for an older glibc (manylinux_2_17, ...) installs
    on a manylinux_2_28 node too, so every older tag and its legacy alias is listed."""
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    major, minor, arch = int(m.group(1)), int(m.group(2)), m.group(3)
    tags = [f"manylinux_{major}_{k}_{arch}" for k in range(minor, 4, -1)] if major == 2 else [platform]
    aliases = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{alias}_{arch}" for glibc, alias in aliases.items() if major > 2 or minor >= glibc]
    return tags


def target_options(python_version: str, platform: str) -> list[str]:
    options = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version]
    for tag in platform_tags(platform):
        options += ["--platform", tag]
    return options


def pip(args: list[str], what: str, env: dict | None = None) -> None:
    """Run this venv's pip; its output is shown without the lines about index folders that do not exist."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    noise = re.compile(r"^WARNING: Location '.*' is ignored")
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and not noise.match(line):
            print(f"  {line}", flush=True)
    if proc.returncode:
        raise WheelhouseError(f"{what} failed (pip exited {proc.returncode}, its message above)")


def resolve(requirements: list[str], options: list[str], scratch: Path, no_deps: bool = False) -> list[dict]:
    """What pip would install for the target: one entry per package (name, version, url, sha256, requires)."""
    report = scratch / f"report{len(list(scratch.glob('report*.json')))}.json"
    pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), *options,
         *(["--no-deps"] if no_deps else []), *requirements], "resolving " + " ".join(requirements))
    items = []
    for entry in json.loads(report.read_text())["install"]:
        info, meta = entry["download_info"], entry["metadata"]
        url = info["url"]
        items.append({"name": normalize(meta["name"]), "version": meta["version"], "url": url,
                      "file": unquote(Path(urlparse(url).path).name),
                      "sha256": info.get("archive_info", {}).get("hashes", {}).get("sha256"),
                      "requested": entry.get("requested", False),
                      "requires": meta.get("requires_dist", []),
                      "extras": entry.get("requested_extras", [])})
    return items


def without_torch(items: list[dict], python_version: str, platform: str) -> list[dict]:
    """Drop torch, torchvision and every package reached only through them: the dependencies of every other
    requested package, followed with their markers evaluated for the target (extras included), are kept."""
    from packaging.requirements import InvalidRequirement, Requirement

    machine = re.search(r"(x86_64|aarch64|ppc64le|s390x|i686|armv7l)$", platform)
    arch = machine.group(1) if machine else platform_module.machine()
    target = {"python_version": python_version, "python_full_version": f"{python_version}.0",
              "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": arch,
              "implementation_name": "cpython", "platform_python_implementation": "CPython"}

    def deps(item: dict, extras: set[str]) -> list[tuple[str, set[str]]]:
        found = []
        for text in item["requires"]:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is None or any(req.marker.evaluate({**target, "extra": e}) for e in {"", *extras}):
                found.append((normalize(req.name), set(req.extras)))
        return found

    by_name = {item["name"]: item for item in items}
    seen: set[tuple[str, frozenset]] = set()
    keep: set[str] = set()
    todo = [(item["name"], set(item["extras"])) for item in items if item["requested"]]
    while todo:
        name, extras = todo.pop()
        if name in TORCH_ROOTS or name not in by_name or (name, frozenset(extras)) in seen:
            continue
        seen.add((name, frozenset(extras)))
        keep.add(name)
        todo += deps(by_name[name], extras)
    return [item for item in items if item["name"] in keep]


def build_wheel(args: list[str], scratch: Path, what: str, env: dict | None = None) -> Path:
    """`pip wheel --no-deps` into a fresh folder; the one wheel it made."""
    out = Path(tempfile.mkdtemp(prefix="build-", dir=scratch))
    pip(["wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), *args], what, env)
    wheels = list(out.glob("*.whl"))
    if len(wheels) != 1:
        raise WheelhouseError(f"{what}: expected one wheel, pip made {[w.name for w in wheels]}")
    return wheels[0]


def ltm_wheel(scratch: Path) -> Path:
    """ltm's own wheel, built from a copy of the packaged sources (no build/ left in the checkout, nothing stale)."""
    src = scratch / "ltm-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in ("ltm", "data_prep", "launcher"):
        shutil.copytree(REPO / package, src / package, ignore=ignore)
    wheel = build_wheel([str(src)], scratch, "building ltm's wheel")
    shutil.rmtree(src)
    return wheel


def intact(wheel: Path) -> bool:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def deepspeed_wheel(out: Path, scratch: Path, constraints: Path, old_sums: dict[str, str]) -> Path:
    """DeepSpeed's wheel: the one already in `out` when it matches the recorded sha256, else built (once)."""
    version = pinned(constraints, "deepspeed")
    for wheel in out.glob(f"deepspeed-{version}-*.whl"):
        # moved in only once complete: kept if it matches the recorded sha256, or (a run stopped before recording
        # it) if it reads back whole
        recorded = old_sums.get(wheel.name)
        if (sha256(wheel) == recorded) if recorded else intact(wheel):
            say(f"{wheel.name}: built before, kept")
            return wheel
    say(f"building DeepSpeed {version}'s wheel against this venv's torch (pure Python: DS_BUILD_OPS=0)")
    built = build_wheel(["-c", str(constraints), f"deepspeed=={version}"], scratch, "building DeepSpeed's wheel",
                        env={"DS_BUILD_OPS": "0"})
    if not built.name.endswith("-none-any.whl"):
        raise WheelhouseError(f"DeepSpeed's wheel {built.name} is not pure Python (set DS_BUILD_OPS=0)")
    target = out / built.name
    built.replace(target)
    return target


def fetch(items: list[dict], out: Path, scratch: Path, options: list[str], old_sums: dict[str, str]) -> dict:
    """Every item's wheel in `out`, checked: present and matching -> kept, else downloaded into scratch, checked,
    then moved in. Returns file name -> sha256."""
    sums, missing = {}, []
    for item in items:
        path = out / item["file"]
        expected = item["sha256"] or old_sums.get(item["file"])
        if path.exists() and expected and sha256(path) == expected:
            sums[item["file"]] = expected
        else:
            missing.append(item)
    say(f"{len(items) - len(missing)} wheels present and checked, {len(missing)} to download")
    if missing:
        partial = scratch / "download"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        listing = partial / "requirements.txt"
        listing.write_text("".join(f"{item['name']} @ {item['url']}\n" for item in missing))
        pip(["download", "--quiet", "--no-deps", *options, "-d", str(partial), "-r", str(listing)],
            f"downloading {len(missing)} wheels")
        for item in missing:
            got = partial / item["file"]
            if not got.exists():
                raise WheelhouseError(f"pip download did not produce {item['file']} ({item['url']})")
            digest = sha256(got)
            if item["sha256"] and digest != item["sha256"]:
                raise WheelhouseError(f"checksum mismatch: {item['file']} from {item['url']} has sha256 {digest}, "
                                      f"the index says {item['sha256']}")
            got.replace(out / item["file"])
            sums[item["file"]] = digest
        shutil.rmtree(partial)
    return sums


def resolve_dali(dali: str) -> str:
    if dali != "auto":
        return dali
    proc = subprocess.run([sys.executable, "-m", "ltm.env", "--dali-build", "auto"], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode:
        raise WheelhouseError(f"`python -m ltm.env --dali-build auto` failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


def locked(out: Path):
    """An exclusive lock on the wheelhouse folder for this process's lifetime: two runs never write one folder."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise WheelhouseError(f"another run is writing {out} (it holds {out / '.lock'})") from None
    return handle


def build(out: Path, python_version: str, platform: str, torch: bool, dali: str, part_mb: int) -> dict:
    lock = locked(out)  # noqa: F841  (held until the process ends)
    scratch = out / ".partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    constraints, requirements = REPO / "constraints.txt", REPO / "requirements.txt"
    old_sums = read_sums(out / "SHA256SUMS")
    dali = resolve_dali(dali)
    options = target_options(python_version, platform)
    say(f"{out}: cp{python_version.replace('.', '')} {platform}, torch {'included' if torch else 'left out'}, "
        f"nvidia-dali-{dali}")

    deepspeed = deepspeed_wheel(out, scratch, constraints, old_sums)
    say("resolving the pinned requirements for the target")
    items = resolve(["-c", str(constraints), "-r", str(requirements), *sorted(TORCH_ROOTS), f"nvidia-dali-{dali}",
                     *BUILD_TOOLS, str(deepspeed)], options, scratch)
    items += resolve(["-c", str(constraints), "facenet-pytorch"], options, scratch, no_deps=True)
    if not torch:
        items = without_torch(items, python_version, platform)
    ours = [item for item in items if item["name"] == "deepspeed"]
    items = [item for item in items if item["name"] != "deepspeed"]
    if [item["file"] for item in ours] != [deepspeed.name]:
        raise WheelhouseError(f"the resolution chose {[item['file'] for item in ours]}, not {deepspeed.name}")

    sums = fetch(items, out, scratch, options, old_sums)
    sums[deepspeed.name] = sha256(deepspeed)
    say("building ltm's wheel from this checkout")
    ltm = ltm_wheel(scratch)
    ltm.replace(out / ltm.name)
    sums[ltm.name] = sha256(out / ltm.name)

    for stale in sorted(set(p.name for p in out.glob("*.whl")) - set(sums)):
        (out / stale).unlink()
        say(f"removed {stale} (no longer needed)")

    versions = {item["file"]: (item["name"], item["version"], item["url"]) for item in items}
    versions[deepspeed.name] = ("deepspeed", pinned(constraints, "deepspeed"), "built here (pip wheel)")
    versions[ltm.name] = ("ltm", ltm.name.split("-")[1], "built here from this checkout")
    wheels = [{"file": name, "name": versions[name][0], "version": versions[name][1], "sha256": sums[name],
               "bytes": (out / name).stat().st_size, "source": versions[name][2]} for name in sorted(sums)]
    kept_constraints = constraints.read_text()
    if not torch:
        kept_constraints = "".join(line for line in kept_constraints.splitlines(keepends=True)
                                   if not re.match(r"\s*(torch|torchvision)\s*==", line))
    write_atomic(out / "requirements.txt", requirements.read_text())
    write_atomic(out / "constraints.txt", kept_constraints)
    write_atomic(out / "install.sh", INSTALLER.read_text(), mode=0o755)
    manifest = {"python_version": python_version, "platform": platform, "platform_tags": platform_tags(platform),
                "torch": torch, "dali": f"nvidia-dali-{dali}", "wheels": wheels,
                "wheel_bytes": sum(w["bytes"] for w in wheels)}
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    for name in CONTROL:
        sums[name] = sha256(out / name)
    write_atomic(out / "SHA256SUMS", sums_text(sums))
    shutil.rmtree(scratch)
    say(f"{len(wheels)} wheels, {manifest['wheel_bytes'] / MIB:.0f} MiB in {out}")
    if part_mb:
        split(out, part_mb)
    else:
        shutil.rmtree(out / "parts", ignore_errors=True)
    return manifest


def _write_piece(source: Path, start: int, length: int, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as dst:
        src.seek(start)
        left = length
        while left:
            block = src.read(min(left, 4 * MIB))
            dst.write(block)
            left -= len(block)


def split(out: Path, part_mb: int) -> list[dict]:
    """out/parts/p1 ... pN: the wheelhouse's files (checked against SHA256SUMS first) in folders of at most
    `part_mb` MiB, each checksum list included; a file larger than a part is cut into pieces. Largest first, each
    into the first part with room; p1 starts with the control files."""
    limit = part_mb * MIB
    if limit < 64 * 1024:
        raise WheelhouseError(f"--part-mb {part_mb}: a part must hold at least 64 KiB")
    sums = read_sums(out / "SHA256SUMS")
    if not sums:
        raise WheelhouseError(f"{out}/SHA256SUMS is missing: not a built wheelhouse")
    for name, digest in sums.items():
        if not (out / name).exists():
            raise WheelhouseError(f"{out / name} is missing (listed in SHA256SUMS)")
        if sha256(out / name) != digest:
            raise WheelhouseError(f"checksum mismatch: {out / name}")
    tmp = out / ".parts-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    def cost(name: str, size: int) -> int:  # the bytes of the file and of its line in the part's checksum list
        return size + 64 + 2 + len(name) + 1

    units = []  # (name, source, start, length)
    piece_bytes = limit - 4096
    for name in sorted([*sums, "SHA256SUMS"]):
        size = (out / name).stat().st_size
        if cost(name, size) <= limit:
            units.append((name, name, 0, size))
        else:
            for k, start in enumerate(range(0, size, piece_bytes)):
                units.append((f"{name}{PIECE}{k:03d}", name, start, min(piece_bytes, size - start)))
    control = {"SHA256SUMS", *CONTROL}
    first = [u for u in units if u[0] in control]
    rest = sorted((u for u in units if u[0] not in control), key=lambda u: (-u[3], u[0]))
    parts: list[list] = [[]]
    used = [cost("PARTS", 0) + len(units) * cost("SHA256SUMS.p999", 0)]  # p1's list of the parts' lists
    for unit in first:
        parts[0].append(unit)
        used[0] += cost(unit[0], unit[3])
    for unit in rest:
        c = cost(unit[0], unit[3])
        k = next((k for k in range(len(parts)) if used[k] + c <= limit), None)
        if k is None:
            parts.append([])
            used.append(0)
            k = len(parts) - 1
        parts[k].append(unit)
        used[k] += c
    for k, units_k in enumerate(parts, 1):
        folder = tmp / f"p{k}"
        folder.mkdir()
        part_sums = {}
        for name, source, start, length in units_k:
            target = folder / name
            if name == source:
                try:
                    os.link(out / source, target)
                except OSError:
                    shutil.copy2(out / source, target)
                part_sums[name] = sums.get(name) or sha256(target)
            else:
                _write_piece(out / source, start, length, target)
                part_sums[name] = sha256(target)
        (folder / f"SHA256SUMS.p{k}").write_text(sums_text(part_sums))
    lists = {f"SHA256SUMS.p{k}": sha256(tmp / f"p{k}" / f"SHA256SUMS.p{k}") for k in range(1, len(parts) + 1)}
    (tmp / "p1" / "PARTS").write_text(sums_text(lists))
    summary = []
    for k in range(1, len(parts) + 1):
        files = list((tmp / f"p{k}").iterdir())
        size = sum(p.stat().st_size for p in files)
        if size > limit:
            raise WheelhouseError(f"part p{k} came out at {size} bytes, over {limit}")
        summary.append({"part": f"p{k}", "bytes": size, "files": len(files)})
    shutil.rmtree(out / "parts", ignore_errors=True)
    tmp.replace(out / "parts")
    pieces = sum(1 for units_k in parts for u in units_k if u[0] != u[1])
    say(f"{len(parts)} parts of at most {part_mb} MiB in {out / 'parts'} ({pieces} pieces of "
        f"{len({u[1] for units_k in parts for u in units_k if u[0] != u[1]})} large files); "
        f"copy every part's files into one folder W on the node, then: bash W/install.sh W")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/wheelhouse.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download and build every wheel into DIR (resumable)")
    b.add_argument("dir", type=Path)
    b.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the node's Python, e.g. 3.12 (default: this venv's)")
    b.add_argument("--platform", default=f"manylinux_2_28_{platform_module.machine()}",
                   help="the node's platform tag (default: manylinux_2_28_<this machine's arch>); older manylinux "
                        "tags are included")
    b.add_argument("--torch", choices=["yes", "no"], default="yes", help="no: the node brings its own torch")
    b.add_argument("--dali", default="auto", choices=["auto", "cuda120", "cuda130"],
                   help="DALI build (auto: for this venv's torch's CUDA major)")
    b.add_argument("--part-mb", type=int, default=0, help="also split into parts of at most this many MiB")
    p = sub.add_parser("parts", help="split a built wheelhouse into DIR/parts/p1 ... pN")
    p.add_argument("dir", type=Path)
    p.add_argument("--part-mb", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            if not re.fullmatch(r"3\.\d+(\.\d+)?", args.python_version):
                raise WheelhouseError(f"--python-version {args.python_version!r}: expected 3.X, e.g. 3.12")
            python_version = ".".join(args.python_version.split(".")[:2])  # 3.12.1 -> 3.12: wheels are tagged so
            build(args.dir.resolve(), python_version, args.platform, args.torch == "yes", args.dali, args.part_mb)
        else:
            lock = locked(args.dir.resolve())  # noqa: F841
            split(args.dir.resolve(), args.part_mb)
    except WheelhouseError as exc:
        print(f"wheelhouse: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
