"""Every `ltm ...` command in the README's and docs' code blocks parses as written, and the cheap ones run.

Commands come from fenced code blocks (shell or unlabelled), with `\\` continuations joined, `# comments` dropped
and shell variables set in the same block (`W=...`, `for c in a b; do`) substituted by their (first) value.
Parsing is `ltm.cli.build_parser(command).parse_args(argv)` with the command's module imported, so a wrong flag,
a missing required option or a bad choice fails here. `ltm config` and `ltm weights list` run for real. Relative
links between the pages must point at existing files and headings. Figures and facts that the pages share with the
code stay agreed: the demo's step count (tiny-cpu), the preemption signal (the batch scripts), `--splits` in every
`prep ffpp` example, no path outside the project as a requirement, met / not met beside every benchmark target, and
the GPU hours that `ltm reproduce tableN --estimate` prints. Pages stay within their size (12 KB, the README 10 KB,
without dated figures), and LICENSE and CITATION.cff (with the paper's arXiv id) are there.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
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


# --- figures and facts the pages share with the code: they must stay agreed -----------------------------------------

def page(name: str) -> str:
    return (ROOT / name).read_text()


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def items(text: str) -> list[str]:
    """Paragraphs, with every table row and list item on its own (continuation lines joined)."""
    units = []
    for para in paragraphs(text):
        for unit in re.split(r"\n(?=\s*(?:\||- |\d+\. ))", para):
            units.append(" ".join(line.strip() for line in unit.splitlines()))
    return units


def test_demo_step_count_is_tiny_cpus():
    """`make demo` trains tiny-cpu as shipped: every step count the README gives for it, the schedule that
    training.md and choices.md describe, and demo.sh's comment equal tiny-cpu's iters_per_epoch x epochs."""
    from ltm.config import load_config

    train = load_config("tiny-cpu").train
    steps = train.iters_per_epoch * train.epochs
    readme = page("README.md")
    demo = readme[readme.index("## What `make demo` prints"):readme.index("## A tour of the commands")]
    counts = [int(n) for n in re.findall(r"\b(\d+) steps\b", demo)]
    assert len(counts) >= 2, "README: no demo step count found"
    assert set(counts) == {steps}, f"README: the demo trains {steps} steps (tiny-cpu), the page says {counts}"
    script = (ROOT / "scripts" / "demo.sh").read_text()
    assert re.findall(r"\b(\d+) steps\b", script) == [str(steps)], "scripts/demo.sh: step count"
    for name in ("docs/training.md", "docs/choices.md"):
        schedules = [(int(e), int(i)) for item in items(page(name)) if "tiny-cpu" in item
                     for e, i in re.findall(r"\b(\d+) epochs of (\d+) steps\b", item)]
        assert schedules, f"{name}: tiny-cpu's schedule is not described"
        assert set(schedules) == {(train.epochs, train.iters_per_epoch)}, f"{name}: tiny-cpu's schedule {schedules}"


USR_SIGNAL_CLAIMS = (
    re.compile(r"SLURM[^.;|()]{0,40}?`?SIG(USR\d)\b"),  # "SLURM sends `SIGUSR2` ..."
    re.compile(r"`?SIG(USR\d)`?\s*\((?:SLURM|the preemption)"),  # "SIGUSR2 (SLURM's preemption warning)"
)


def test_preemption_signal_matches_the_batch_scripts(tmp_path):
    """The signal the pages say SLURM sends before the end is the one ltm's batch scripts ask for."""
    from launcher.submit import batch_script, executor_parameters
    from ltm.config import LaunchConfig

    script = batch_script(tmp_path, executor_parameters(LaunchConfig(), "docs"))
    signal, delay = re.search(r"^#SBATCH --signal=(?:B:)?(\w+)@(\d+)$", script, flags=re.M).groups()
    sbatch = (ROOT / "slurm" / "train.sbatch").read_text()
    assert re.search(r"^#SBATCH --signal=(?:B:)?(\w+)@(\d+)$", sbatch, flags=re.M).groups() == (signal, delay)
    claimed = {}
    for path in PAGES:
        text = path.read_text()
        for pattern in USR_SIGNAL_CLAIMS:
            for m in pattern.finditer(text):
                claimed.setdefault(path.name, []).append(m.group(1))
        for m in re.finditer(r"--signal=(?:B:)?(\w+)@(\d+)", text):
            assert m.groups() == (signal, delay), f"{path.name}: `{m.group(0)}`, the batch script has {signal}@{delay}"
    assert "gpu-check.md" in claimed and "slurm.md" in claimed, claimed
    wrong = {name: names for name, names in claimed.items() if set(names) != {signal}}
    assert not wrong, f"SLURM sends SIG{signal} (#SBATCH --signal={signal}@{delay}), the pages say {wrong}"


def test_prep_ffpp_examples_give_splits():
    """`ltm prep ffpp` requires --splits: every example with options (code blocks, inline, sbatch lines) has it."""
    found = 0
    for path in PAGES:
        text = path.read_text().replace("\\\n", " ")
        for m in re.finditer(r"(?:\bprep|slurm/prep\.sbatch) ffpp\b([^`\n]*)", text):
            options = m.group(1)
            if "--" not in options:
                continue  # the command named, not an example
            found += 1
            assert "--splits" in options, f"{path.name}: `{m.group(0).strip()}` lacks --splits"
    assert found >= 5, found


def test_nothing_outside_the_project_is_needed():
    """No page sends a user to ../shared/tools; the optional test media beside the checkout are named as optional."""
    for path in PAGES:
        text = path.read_text()
        assert "shared/tools" not in text, f"{path.name}: points to ../shared/tools, which users do not have"
        for para in paragraphs(text):
            if "shared/" in para:
                assert "optional" in para, f"{path.name}: ../shared named as if it were required: {para[:200]!r}"


def test_benchmark_targets_say_met_or_not():
    """Every target on benchmarks.md stands next to its figure with `met` or `not met`."""
    text = page("docs/benchmarks.md")
    table = [line for line in text.splitlines() if line.startswith("| `bench/")]
    assert len(table) >= 6
    for line in table:
        last = line.strip().strip("|").split("|")[-1]
        assert re.search(r"\bmet\b|not measured", last), f"benchmarks.md summary: {line[:60]!r} says neither"
    targets = re.findall(r"\(target\b[^)]*\)", text)
    assert len(targets) >= 5
    for target in targets:
        assert re.search(r"\bmet\b", target), f"benchmarks.md: {target!r} without met / not met"
    for m in re.finditer(r'"target": [\d.]+`?', text):
        assert re.search(r"\bmet\b", text[m.end():m.end() + 20]), f"benchmarks.md: {m.group(0)} without met / not met"


def expand_braces(name: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", name)
    if not m:
        return [name]
    return [n for part in m.group(1).split(",") for n in expand_braces(name[:m.start()] + part + name[m.end():])]


@pytest.fixture(scope="module")
def printed_estimates(tmp_path_factory):
    """{table: ({run: (GFLOP/img, GPU h)}, total)} as `ltm reproduce tableN --runs DIR --estimate` prints them."""
    from ltm.reproduce import cost
    from ltm.reproduce.paper import TABLES
    from ltm.reproduce.plan import plan_points, select, table_sweep

    printed = {}
    for name in sorted(TABLES):
        empty = tmp_path_factory.mktemp(name)  # no shards (nominal frame counts), no runs (all to do)
        plans = plan_points(table_sweep(select(TABLES[name], None, None), empty / "shards", empty / "runs"))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cost.print_estimate(cost.estimate(plans, tflops=cost.DEFAULT_TFLOPS), cost.DEFAULT_TFLOPS)
        lines = out.getvalue().splitlines()
        runs = {w[0]: (w[1], w[-1]) for w in (line.split() for line in lines[1:-1])}
        printed[name] = (runs, re.match(r"total ([\d.]+) GPU hours", lines[-1]).group(1))
    return printed


def test_reproduce_gpu_hours_are_the_estimates(printed_estimates):
    """docs/reproduce-cost.md's GPU hours per run and per table are what `ltm reproduce tableN --estimate` prints."""
    section = page("docs/reproduce-cost.md")
    assert "printed by `ltm reproduce tableN --runs /tmp/est --estimate`" in section
    quoted: dict[str, dict[str, tuple[str, str]]] = {}
    totals: dict[str, tuple[str, int]] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d)\s*\|(.*)\|(.*)\|(.*)\|\s*$", line)
        if not m:
            continue
        table, runs, gflop, hours = f"table{m.group(1)}", m.group(2), m.group(3).strip(), m.group(4).strip("* ")
        if "total" in runs:
            totals[table] = (hours, int(re.search(r"\((\d+) runs", runs).group(1)))
            continue
        for group in re.findall(r"`([^`]+)`", runs):
            for run in expand_braces(group):
                quoted.setdefault(table, {})[run] = (gflop, hours)
    assert set(quoted) == set(printed_estimates), sorted(quoted)
    for table, (runs, total) in printed_estimates.items():
        assert quoted[table] == runs, f"docs/reproduce-cost.md {table}: the page says {quoted[table]}, printed {runs}"
        assert totals[table] == (total, len(runs)), (f"docs/reproduce-cost.md {table} total: {totals[table]}, "
                                                     f"printed {total}")
    every_run: dict[str, float] = {}
    for runs, _ in printed_estimates.values():
        for run, (_, hours) in runs.items():
            every_run[run] = max(every_run.get(run, 0.0), float(hours))
    tables_sum = sum(float(total) for _, total in printed_estimates.values())
    assert f"The five totals add up to {tables_sum:.1f} GPU hours" in section
    assert f"**{sum(every_run.values()):.2f} GPU hours for {len(every_run)} distinct runs**" in section


# The front page and the reference pages stay short: a page explains one thing (a page that outgrows its limit holds
# two: split it by subject); dated measurements go to the one log page, experiments.md, which has no limit.
PAGE_LIMITS = {"README.md": 10_000}
DEFAULT_PAGE_LIMIT = 12_000
LOG_PAGES = {"experiments.md"}


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in LOG_PAGES], ids=lambda p: p.name)
def test_pages_stay_within_their_size(page):
    limit = PAGE_LIMITS.get(page.name, DEFAULT_PAGE_LIMIT)
    size = len(page.read_bytes())
    assert size <= limit, (f"{page.relative_to(ROOT)} is {size} bytes, over its {limit}: move dated measurements to "
                           "docs/experiments.md or split the page by subject")


def test_readme_holds_no_dated_figures():
    """The front page shows the shape of the demo's output; the dated runs live in docs/experiments.md."""
    dated = re.findall(r"\b20\d\d-\d\d-\d\d\b", page("README.md"))
    assert not dated, f"README.md: dated figures ({dated}): they go to docs/experiments.md"


PAPER_ARXIV_ID = "2212.14309"


def test_licence_and_citation():
    """LICENSE is there, CITATION.cff parses as CFF 1.2.0 and names the paper ltm implements by its arXiv id, and the
    README and method.md cite the paper."""
    import yaml

    licence = page("LICENSE")
    assert "Apache License" in licence and "Version 2.0" in licence
    cff = yaml.safe_load(page("CITATION.cff"))
    assert cff["cff-version"] == "1.2.0" and cff["title"] == "ltm" and cff["type"] == "software"
    assert cff["license"] == "Apache-2.0"
    from ltm import __version__
    assert str(cff["version"]) == __version__, f"CITATION.cff version {cff['version']}, ltm {__version__}"
    paper = cff["preferred-citation"]
    assert paper["type"] == "article" and "Learning to Mask" in paper["title"]
    assert any(PAPER_ARXIV_ID in str(i["value"]) for i in paper["identifiers"]), paper["identifiers"]
    assert PAPER_ARXIV_ID in paper["url"]
    for name in ("README.md", "docs/method.md"):
        assert f"arXiv:{PAPER_ARXIV_ID}" in page(name), f"{name}: the paper's reference (arXiv:{PAPER_ARXIV_ID})"



def test_the_readme_shows_a_demo_output_as_demo_readme_copies_it():
    """The README's demo block is what scripts/demo_readme.py makes of a finished demo's log: the data's digests,
    then the student's report as printed (numbers, not placeholders), without log lines or elapsed seconds."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import demo_readme
    finally:
        sys.path.pop(0)
    readme = page("README.md")
    block = readme.split(demo_readme.BEGIN, 1)[1].split(demo_readme.END, 1)[0].strip().splitlines()
    assert block[0] == "```text" and block[-1] == "```"
    digests = [line for line in block if line.startswith("digest: ")]
    assert len(digests) == 4 and all(re.search(r" [0-9a-f]{64}$", d) for d in digests), digests
    row = next(line for line in block if line.startswith("│ ffpp_c23-test"))
    assert len(re.findall(r"\b[01]\.\d{4}\b", row)) == 6, row  # frame/video AUC, AP, EER, acc, TPR: printed numbers
    assert not any(demo_readme.LOG_LINE.match(line) for line in block)
    assert block[-3:-1] == ["== [Ns] done", "runs/demo/eval/ffpp_c23-test/report.json"]

    log = "\n".join([
        "== [0s] 1/4 sample", "digest: sample videos " + "a" * 64, "== [50s] 4/4 evaluate",
        "12:00:01 INFO ltm.eval.evaluate: ffpp_c23-test: 235 frames, 31.2 images/s", "  ltm eval", "┏━┓", "│ teacher │",
        "12:00:09 INFO ltm.eval.evaluate: again", "  ltm eval", "┏━┓", "│ student │", "└─┘", "report: r",
        "== [61s] done", "runs/demo/eval/x/report.json"])
    assert demo_readme.demo_block(log).splitlines() == [
        "```text", "digest: sample videos " + "a" * 64, "...", "  ltm eval", "┏━┓", "│ student │", "└─┘", "report: r",
        "== [Ns] done", "runs/demo/eval/x/report.json", "```"]
    with pytest.raises(ValueError, match="not the output of a finished"):
        demo_readme.demo_block(log.rsplit("== [61s] done", 1)[0])  # a demo that stopped before its end
