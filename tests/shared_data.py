"""Where the real test media live: $LTM_TEST_DATA, else `../shared/data` beside the checkout, else /work/shared/data."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _find() -> Path:
    if os.environ.get("LTM_TEST_DATA"):
        return Path(os.environ["LTM_TEST_DATA"])
    for candidate in (REPO.parent / "shared" / "data", Path("/work/shared/data")):
        if candidate.is_dir():
            return candidate
    return REPO.parent / "shared" / "data"


SHARED_DATA = _find()
