"""Every `ltm ...` command in the README's and docs' code blocks parses as written, and the cheap ones run.

Commands come from fenced code blocks (shell or unlabelled), with `\\` continuations joined, `# comments` dropped
and shell variables set in the same block (`W=...`, `for c in a b; do`) substituted by their (first) value.
Parsing is `ltm.cli.build_parser(command).parse_args(argv)` with the command's module imported, so a wrong flag,
a missing required option or a bad choice fails here. `ltm config` and `ltm weights list` run for real. Relative
links between the pages must point at existing files and headings.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from ltm import cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\S*)\s*$")


def code_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of every shell-like fenced block."""
    blocks, lang, start, lines = [], None, 0, []
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line.strip())
        if m and lang is None:
            lang, start, lines = m.group(1), n + 1, []
        elif line.strip() == "```" and lang is not None:
            if lang in SHELL_LANGS:
                blocks.append((start, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def ltm_commands(path: Path) -> list[tuple[str, int, list[str]]]:
    """(where, line number, argv after `ltm`) for every command line that starts with `ltm`."""
    found = []
    for start, lines in code_blocks(path.read_text()):
        variables: dict[str, str] = {}
        joined: list[tuple[int, str]] = []
        pending, first = "", 0
        for i, line in enumerate(lines):
            if not pending:
                first = start + i
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            joined.append((first, pending + line))
            pending = ""
        for lineno, line in joined:
            if not re.match(r"\s*(ltm\s|for\s|[A-Za-z_][A-Za-z0-9_]*=)", line):
                continue  # another program's line, or a block's non-shell text
            words = shlex.split(line, comments=True)
            if words[0] == "for" and len(words) >= 4 and words[2] == "in":
                variables[words[1]] = words[3].rstrip(";")
                continue
            assignment = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", words[0])
            if assignment and len(words) == 1:
                variables[assignment.group(1)] = assignment.group(2)
                continue
            if words[0] != "ltm":
                continue
            argv: list[str] = []
            for word in words[1:]:
                var = re.fullmatch(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", word)
                if var and var.group(1) in variables:
                    argv += shlex.split(variables[var.group(1)])  # unquoted: the shell splits it
                else:
                    argv.append(word)
            found.append((f"{path.relative_to(ROOT)}:{lineno}", lineno, argv))
    return found


COMMANDS = [c for page in PAGES for c in ltm_commands(page)]


def test_docs_hold_commands():
    """The extraction itself works: every page that shows commands yields some, covering every ltm command."""
    assert len(COMMANDS) > 40, [c[0] for c in COMMANDS]
    used = {argv[0] for _, _, argv in COMMANDS}
    assert used >= set(cli.COMMANDS), f"commands never shown in the docs: {set(cli.COMMANDS) - used}"


def parse(argv: list[str]):
    command = argv[0]
    assert command in cli.COMMANDS, f"unknown command {command!r}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return cli.build_parser(command).parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`ltm {shlex.join(argv)}` does not parse: {err.getvalue().strip()}") from exc


@pytest.mark.parametrize("where,lineno,argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_command_parses(where, lineno, argv):
    assert not any(re.search(r"<[^>]+>", a) for a in argv), f"{where}: a placeholder in a command line"
    args = parse(argv)
    assert callable(args._run)


def _cheap(argv: list[str]) -> bool:
    if argv[0] == "weights":
        return argv[1] == "list"
    if argv[0] == "config":
        # packaged configs only (a user's my.yaml does not exist here)
        config = argv[argv.index("--config") + 1] if "--config" in argv else "paper"
        return not config.endswith((".yaml", ".yml"))
    return False


CHEAP = [c for c in COMMANDS if _cheap(c[2])]


@pytest.mark.parametrize("where,lineno,argv", CHEAP, ids=[c[0] for c in CHEAP])
def test_cheap_command_runs(where, lineno, argv, capsys, caplog):
    rc = cli.main(argv)
    out = capsys.readouterr()
    assert rc == 0, f"{where}: `ltm {shlex.join(argv)}` exited {rc}: {(out.err + caplog.text)[-2000:]}"
    assert out.out.strip(), f"{where}: `ltm {shlex.join(argv)}` printed nothing"


def test_cheap_commands_are_run():
    kinds = {c[2][0] for c in CHEAP}
    assert kinds == {"config", "weights"}, kinds


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{page.relative_to(ROOT)}: link to {target} - no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.relative_to(ROOT)}: link to {target} - no such heading"
