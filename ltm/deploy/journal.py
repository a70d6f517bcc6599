"""`ltm predict --part I/N` and `--merge N`: one slice of the files per SLURM array task, a journal per slice, and
the merge of the slices' tables into one.

    <table dir>/.<table name>.parts/<i>-of-<N>.jsonl  one line per scored file, appended and fsynced as each file ends:
                                                      a rerun skips the files listed, a crash loses the file in hand
    <table dir>/.<table name>.parts/<i>-of-<N>.csv    the slice's table, written atomically when the slice is done
    <table>                                           `--merge N`: every slice's rows in input order, atomically

Kept free of heavy imports, as `ltm predict --model` is.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import TextIO

from ltm.files import atomic_write_text

log = logging.getLogger(__name__)

CSV_COLUMNS = ("path", "p_fake", "frames", "no_face", "detector", "error")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def parts_dir(table: Path) -> Path:
    return table.parent / f".{table.name}.parts"


def part_name(i: int, n: int) -> str:
    return f"{i}-of-{n}"


def parse_part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--part {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--part {text!r}: needs 0 <= I < N")
    return i, n


def write_rows(path: Path, rows: list[dict]) -> None:
    """A predict table (CSV_COLUMNS), written to a temp name and renamed: a reader never sees half a table."""
    buf = io.StringIO()
    out = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    out.writeheader()
    out.writerows(rows)
    atomic_write_text(path, buf.getvalue())


class Journal:
    """A slice's journal: the rows scored so far by path, and `record` to append one, fsynced before it returns."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if not path.is_file():
            return
        data = path.read_bytes()
        for line in data.decode(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # that file is scored again
                log.warning("%s: dropping a line cut short by an earlier crash: %.80s", path, line)
                continue
            self.done[row["path"]] = row
        if data and not data.endswith(b"\n"):  # cut the half-written line, so that the next one starts on its own
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def __enter__(self) -> Journal:
        self._out: TextIO = open(self.path, "a")
        return self

    def __exit__(self, *exc) -> None:
        self._out.close()

    def record(self, row: dict) -> None:
        self._out.write(json.dumps(row) + "\n")
        self._out.flush()
        os.fsync(self._out.fileno())
        self.done[row["path"]] = row


def merge_parts(table: Path, files: list[str], n: int) -> list[dict]:
    """The N slices' tables as one, in input order; a missing slice or a file not scored exactly once is an error."""
    folder = parts_dir(table)
    missing = [f"{part_name(i, n)}.csv" for i in range(n) if not (folder / f"{part_name(i, n)}.csv").is_file()]
    if missing:
        raise ValueError(f"{folder}: no table for part(s) {', '.join(missing)} (their tasks have not finished)")
    rows: dict[str, dict] = {}
    for i in range(n):
        with open(folder / f"{part_name(i, n)}.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["path"] in rows:
                    raise ValueError(f"{folder}: {row['path']} is in two parts' tables")
                rows[row["path"]] = row
    absent = [f for f in files if f not in rows]
    if absent:
        raise ValueError(f"{folder}: {plural(len(absent), 'file')} of the inputs in no part's table, e.g. {absent[0]} "
                         f"(were the parts run with other inputs or another N?)")
    merged = [rows[f] for f in files]
    write_rows(table, merged)
    return merged
