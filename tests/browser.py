"""Headless Chromium (Debian's package) for looking at the HTML pages ltm writes as a person would: the DOM after
the page's scripts ran, and a screenshot. Installed with apt-get on first use, as the local SLURM cluster is."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.run(install, capture_output=True, env=env, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900, check=True)
        subprocess.run(install, capture_output=True, env=env, timeout=900, check=True)
    found = shutil.which("chromium")
    assert found, "apt-get installed chromium but it is not on PATH"
    return found


def _run(page: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--virtual-time-budget=10000", *flags, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True)


def images_state(page: Path) -> str:
    """The page's own verdict on its images after load: `ok:N` (N images, all decoded) or `broken:K`."""
    dom = _run(page, "--dump-dom").stdout
    found = re.search(r'<body[^>]*data-images="([^"]+)"', dom)
    assert found, f"{page}: the body carries no data-images mark after load (script did not run?)"
    return found.group(1)


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2400) -> Path:
    _run(page, f"--screenshot={out}", f"--window-size={width},{height}")
    assert out.is_file(), f"chromium wrote no screenshot to {out}"
    return out
