"""Put the end of a `make demo` output (runs/demo.log) into README.md, between its demo-output markers.

    .venv/bin/python scripts/demo_readme.py runs/demo.log [--readme README.md]

The block is the data's digests and everything from the evaluation step on, with the elapsed seconds replaced by
`N` (they depend on the machine; the rest does not: docs/determinism.md). So the README shows what a demo prints.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BEGIN = "<!-- demo output: begin (scripts/demo_readme.py) -->"
END = "<!-- demo output: end -->"


def demo_block(log: str) -> str:
    lines = log.splitlines()
    digests = [line for line in lines if line.startswith("digest: ")]
    start = next((i for i, line in enumerate(lines) if re.match(r"== \[\d+s\] 4/4 ", line)), None)
    if start is None or not digests:
        raise ValueError("not the output of a finished `make demo` (no digest lines or no '4/4' evaluation step)")
    tail = [re.sub(r"^== \[\d+s\]", "== [Ns]", line) for line in lines[start:]]
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
