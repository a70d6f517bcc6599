"""The package sources pip is configured with, as uv options: `make install` installs with uv, which reads no pip
configuration, so a site's mirror in pip.conf or PIP_INDEX_URL must reach it from here.

    python scripts/pip_sources.py      # e.g. --extra-index-url file:///opt/pypi/simple --find-links /opt/wheels ...

Reads `pip config list` (pip's merged view: global < user < site files < PIP_* variables, an `install` section over
`global`) and prints index-url, extra-index-url, find-links, no-index and constraint as uv's options, shell-quoted.
`--index-strategy unsafe-best-match` makes uv choose as pip does, the best version over every index, rather than
the first index that lists a package.
"""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys

SECTIONS = ("global", "install", ":env:")  # lowest to highest precedence, as pip applies them to `pip install`
LISTS = {"extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint"}
TRUE = {"1", "true", "yes", "on"}


def pip_config() -> dict[str, str]:
    """Each option pip's `install` command sees, the highest-precedence section's value."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    found: dict[tuple[str, str], str] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if section in SECTIONS and value:
            found[section, name] = ast.literal_eval(value)
    return {name: value for section in SECTIONS for (where, name), value in found.items() if where == section}


def uv_options(config: dict[str, str]) -> list[str]:
    options = ["--index-strategy", "unsafe-best-match"]
    no_index = config.get("no-index", "").lower() in TRUE
    if no_index:
        options.append("--no-index")
    elif config.get("index-url"):
        options += ["--index-url", config["index-url"]]
    for name, flag in LISTS.items():
        if no_index and name == "extra-index-url":  # no index at all: only find-links' wheels
            continue
        for value in config.get(name, "").split():  # pip's lists are whitespace-separated
            options += [flag, value]
    return options


if __name__ == "__main__":
    print(shlex.join(uv_options(pip_config())))
