"""Put the end of a `make demo` output (runs/demo.log) into README.md, between its demo-output markers.

    .venv/bin/python scripts/demo_readme.py runs/demo.log [--readme README.md]

The block is the data's digests and the student's report as printed, without what depends on the machine (log
lines, elapsed seconds); the rest repeats on every run (docs/determinism.md). So the README shows what a demo prints.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BEGIN = "<!-- demo output: begin (scripts/demo_readme.py) -->"
END = "<!-- demo output: end -->"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|DEBUG) ")


def demo_block(log: str) -> str:
    """The data's digests, then the student's report from its table on; log lines (time stamps, images/s) and the
    elapsed seconds are left out: they depend on the machine, the rest does not."""
    lines = [line.rstrip() for line in log.splitlines()]
    digests = [line for line in lines if line.startswith("digest: ")]
    tables = [i for i, line in enumerate(lines) if line.startswith("┏")]
    if not digests or not tables or not re.match(r"== \[\d+s\] done$", lines[-2] if len(lines) > 1 else ""):
        raise ValueError("not the output of a finished `make demo` (digest lines, a table and '== [Ns] done' expected)")
    title = tables[-1] - 1  # the table's title line, `ltm eval`
    tail = [re.sub(r"^== \[\d+s\]", "== [Ns]", line) for line in lines[title:] if not LOG_LINE.match(line)]
    return "\n".join(["```text", *digests, "...", *tail, "```"])


def replace_block(readme: str, block: str) -> str:
    if readme.count(BEGIN) != 1 or readme.count(END) != 1:
        raise ValueError(f"the README must hold one {BEGIN!r} and one {END!r} line")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="a finished demo's output (runs/demo.log)")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[1] / "README.md")
    args = parser.parse_args(argv)
    try:
        block = demo_block(args.log.read_text())
        text = replace_block(args.readme.read_text(), block)
    except (OSError, ValueError) as exc:
        print(f"{args.log}: {exc}", file=sys.stderr)
        return 2
    tmp = args.readme.with_name(f".{args.readme.name}.tmp")
    tmp.write_text(text)
    tmp.replace(args.readme)
    print(f"{args.readme}: demo output from {args.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
