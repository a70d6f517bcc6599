"""`make install` installs with uv from the sources pip is configured with (scripts/pip_sources.py): a site's mirror
in pip.conf or a PIP_* variable must reach uv, which reads no pip configuration itself."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UV = Path(sys.executable).parent / "uv"
CLOSED = "http://127.0.0.1:9/simple"  # the discard port: nothing listens, a connection is refused


def pip_env(config: Path, **variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    return {**env, "PIP_CONFIG_FILE": str(config), **variables}


def uv_options(env: dict[str, str]) -> list[str]:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "pip_sources.py")], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    return shlex.split(proc.stdout)


def test_pip_configuration_becomes_uv_options_with_pips_precedence(tmp_path):
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = http://mirror.example/simple\nextra-index-url = http://a/simple\n"
                      "    http://b/simple\nfind-links = /wheels\n[install]\nconstraint = /site/pins.txt\n")
    options = uv_options(pip_env(config))
    assert options == ["--index-strategy", "unsafe-best-match", "--index-url", "http://mirror.example/simple",
                       "--extra-index-url", "http://a/simple", "--extra-index-url", "http://b/simple",
                       "--find-links", "/wheels", "--constraint", "/site/pins.txt"]
    # a variable overrides the file, as for pip; no-index leaves only the local wheels
    options = uv_options(pip_env(config, PIP_INDEX_URL="http://other/simple"))
    assert options[options.index("--index-url") + 1] == "http://other/simple"
    options = uv_options(pip_env(config, PIP_NO_INDEX="1"))
    assert "--no-index" in options and "--index-url" not in options and "--extra-index-url" not in options
    assert options[options.index("--find-links") + 1] == "/wheels"


def test_uv_asks_the_index_pip_is_configured_with(tmp_path):
    """Resolved through the venv's uv as `make install` runs it: a package not installed is looked up on the
    configured index (here a closed port), not on PyPI."""
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nindex-url = {CLOSED}\n")
    env = pip_env(config, UV_CACHE_DIR=str(tmp_path / "cache"), UV_HTTP_RETRIES="0")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    proc = subprocess.run([str(UV), "pip", "install", "--dry-run", "--python", str(venv / "bin" / "python"),
                           *uv_options(env), "ruff"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "127.0.0.1:9" in proc.stderr, proc.stderr
