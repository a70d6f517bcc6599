"""Every document the code names exists, and so does the section it names.

The code points readers at pages (`docs/contracts.md`, `README.md`) and sections (`docs/scaling.md, "Distributed
environment"`, `docs/method.md#model-options`); a page that was split or renamed, or a document that was never in
the repository, leaves a reader at a dead end. Scanned as text: Python, YAML, shell and batch scripts, the Makefile.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("*.py", "*.yaml", "*.yml", "*.sh", "*.sbatch", "*.toml", "*.cfg", "Makefile")
# a document as code names it: a page under docs/ or a capitalised file at the top (README.md, CHANGELOG.md), then
# optionally an anchor (#model-options) or a quoted section (`, "Shard format"`); report.md, sweep.md and the like
# are files ltm writes, not documents
REFERENCE = re.compile(r'(?<![\w/.-])(docs/[\w./-]+\.md|[A-Z][A-Z_]+\.md)(#[\w-]+)?(?:,? "([^"\n]+)")?')


def source_files(root: Path = ROOT) -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *SOURCES],
                             cwd=root, capture_output=True, text=True, check=True).stdout.split()
    return [root / name for name in tracked if name != "tests/test_references.py"]  # its planted references


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)]


def dead_references(files: list[Path], root: Path = ROOT) -> list[str]:
    """`file:line: what` for each named document that does not exist, or whose named section it lacks."""
    dead = []
    for path in files:
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in REFERENCE.finditer(line):
                name, anchor, section = match.groups()
                if "*" in name or "{" in name or name.startswith(("http", "www.")):
                    continue
                page = next((p for p in (root / name, path.parent / name) if p.is_file()), None)
                where = f"{path.relative_to(root)}:{lineno}"
                if page is None:
                    dead.append(f"{where}: {name} does not exist")
                    continue
                titles = headings(page)
                if anchor and anchor[1:] not in {slug(t) for t in titles}:
                    dead.append(f"{where}: {name} has no section {anchor}")
                if section and section not in titles and not any(t.startswith(section) for t in titles):
                    dead.append(f"{where}: {name} has no section \"{section}\"")
    return dead


def test_documents_named_in_code_exist():
    files = source_files()
    assert len(files) > 100 and any(p.name == "trainer.py" for p in files)
    dead = dead_references(files)
    assert not dead, "references to documents or sections that do not exist:\n" + "\n".join(dead)


def test_a_planted_dead_reference_is_caught(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "contracts.md").write_text("# Contracts\n\n## Shard format\n\ntext\n")
    code = tmp_path / "mod.py"
    code.write_text('"""See DESIGN.md "Shard contract".\n\nShards: docs/contracts.md, "Shard format"; also\n'
                    'docs/contracts.md#shard-format, docs/contracts.md#run-folder and docs/gone.md."""\n'
                    'x = 1  # docs/contracts.md, "Checkpoint layout"\n')
    assert dead_references([code], tmp_path) == [
        "mod.py:1: DESIGN.md does not exist",
        "mod.py:4: docs/contracts.md has no section #run-folder",
        "mod.py:4: docs/gone.md does not exist",
        'mod.py:5: docs/contracts.md has no section "Checkpoint layout"',
    ]
