"""`ltm env`: the builds this environment holds (torch and its CUDA, DALI and its CUDA, the driver, DeepSpeed,
onnxruntime) and whether they fit together.

    ltm env                 # a table
    ltm env --json
    python -m ltm.env --dali-build auto     # what `make install` uses: DALI's build for torch's CUDA major

torch's wheel and DALI's are built for one CUDA major each (`torch 2.14.1+cu130`, `nvidia-dali-cuda120`/`-cuda130`).
`make install` picks DALI's build from torch's CUDA major unless `DALI=cuda120|cuda130` says otherwise, and a DALI
built for a newer CUDA than the node's driver supports is refused with one line before a GPU pipeline is built.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import sys

DALI_BUILDS = {12: "cuda120", 13: "cuda130"}  # CUDA major -> nvidia-dali-<build>


def dali_import_error() -> str | None:
    """Why nvidia.dali cannot be imported here ("ImportError: ..."), or None when it can."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising at import
        return f"{type(exc).__name__}: {exc}"
    return None


def dali_available() -> bool:
    return dali_import_error() is None


def dali_package() -> dict:
    """Which DALI build is installed: `{"package", "version", "cuda"}` (e.g. nvidia-dali-cuda130, 2.4.0, "13.0").

    The CUDA 12 and CUDA 13 wheels (and their nightly/weekly builds) install the same `nvidia.dali` package, so
    ltm imports either the same way; this names the one present. "package" is None when none is installed; a
    venv holding two is reported as an error because one overwrote the other's files.
    """
    import re

    found = sorted({d.metadata["Name"].lower() for d in metadata.distributions()
                    if re.fullmatch(r"nvidia-dali(-nightly|-weekly)?-cuda\d+", (d.metadata["Name"] or "").lower())})
    if len(found) > 1:
        raise RuntimeError(f"several DALI builds are installed ({', '.join(found)}); they share the nvidia.dali "
                           f"package: uninstall all but one (`make install DALI=cuda120|cuda130` does)")
    if not found:
        return {"package": None, "version": None, "cuda": None}
    built = re.search(r"cuda(\d+)$", found[0]).group(1)
    return {"package": found[0], "version": metadata.version(found[0]), "cuda": f"{built[:-1]}.{built[-1]}"}


class EnvironmentMismatch(RuntimeError):
    """Builds that cannot work together on this node; the message says which and what to install."""


def torch_cuda() -> str | None:
    import torch

    return torch.version.cuda


def dali_build_for(cuda: str | None) -> str:
    """DALI's build for a CUDA version string ("13.0"); a CPU-only torch gets the CUDA 12 build (its CPU pipelines
    are the same in both)."""
    major = int(cuda.split(".")[0]) if cuda else 12
    return DALI_BUILDS.get(major, DALI_BUILDS[max(DALI_BUILDS)] if major > max(DALI_BUILDS) else DALI_BUILDS[12])


def driver_cuda() -> tuple[int, int] | None:
    """The newest CUDA version the node's driver supports, or None without a usable CUDA driver."""
    import torch

    if not torch.cuda.is_available():
        return None
    version = torch._C._cuda_getDriverVersion()  # e.g. 12040 for CUDA 12.4
    return version // 1000, (version % 1000) // 10


def check_dali_serves_driver(dali: dict | None = None, driver: tuple[int, int] | None = None) -> None:
    """Refuse a DALI build the driver cannot serve (DALI for CUDA 13 on a CUDA 12 driver), or two builds at once.
    `dali`: `dali_package()`'s answer."""
    if dali is None:
        try:
            dali = dali_package()
        except RuntimeError as exc:  # two builds installed
            raise EnvironmentMismatch(str(exc)) from None
    if not dali.get("package") or driver is None:
        return
    needed = int(dali["cuda"].split(".")[0])
    if driver[0] < needed:
        other = dali_build_for(f"{driver[0]}.{driver[1]}")
        raise EnvironmentMismatch(f"{dali['package']} {dali['version']} needs a driver for CUDA {needed}, this node's "
                                  f"driver supports CUDA {driver[0]}.{driver[1]}: install nvidia-dali-{other} "
                                  f"(`make install DALI={other}`) or use data.loader=reference")


def report() -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch_cuda(),
           "cuda_available": torch.cuda.is_available(), "driver_cuda": None, "gpus": [], "dali": [],
           "dali_for_torch": "nvidia-dali-" + dali_build_for(torch_cuda()), "problems": []}
    try:
        dali = dali_package()
        out["dali"] = [f"{dali['package']} {dali['version']}"] if dali["package"] else []
    except RuntimeError as exc:
        dali = {"package": None}
        out["problems"].append(str(exc))
    driver = driver_cuda()
    if driver:
        out["driver_cuda"] = f"{driver[0]}.{driver[1]}"
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    for name in ("deepspeed", "onnxruntime", "timm", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        check_dali_serves_driver(dali, driver)
    except EnvironmentMismatch as exc:
        out["problems"].append(str(exc))
    if out["dali"] and not any(d.startswith(out["dali_for_torch"]) for d in out["dali"]):
        out["problems"].append(f"torch is built for CUDA {out['torch_cuda']} but DALI is {', '.join(out['dali'])}; "
                               f"`make install DALI={dali_build_for(torch_cuda())}` makes them agree")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--dali-build", metavar="auto|cuda120|cuda130",
                        help="print the DALI build to install (auto: from torch's CUDA major) and exit")


def run(args: argparse.Namespace) -> int:
    if args.dali_build:
        if args.dali_build != "auto" and args.dali_build not in DALI_BUILDS.values():
            raise ValueError(f"--dali-build {args.dali_build!r}: expected auto or one of "
                             f"{', '.join(DALI_BUILDS.values())}")
        print(dali_build_for(torch_cuda()) if args.dali_build == "auto" else args.dali_build)
        return 0
    info = report()
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            if key != "problems":
                print(f"{key:<16} {', '.join(value) if isinstance(value, list) else value}")
        for problem in info["problems"]:
            print(f"problem          {problem}")
    return 1 if info["problems"] else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ltm.env")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
