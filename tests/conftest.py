"""Shared fixtures: the real her2st copy, a prepared work folder, small synthetic inputs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def her2st_root() -> Path:
    """``$HE2ST_DATA_DIR`` or the shared copy next to the checkout (what CI provides)."""
    candidates = [os.environ.get("HE2ST_DATA_DIR"), REPO.parent / "shared" / "data" / "her2st"]
    for c in candidates:
        if c and (Path(c) / "data" / "ST-cnts" / "A1.tsv.gz").exists():
            return Path(c)
    pytest.fail("her2st data not found: set HE2ST_DATA_DIR to the her2st folder (see README)")


@pytest.fixture(scope="session")
def her2st() -> Path:
    root = her2st_root()
    os.environ["HE2ST_DATA_DIR"] = str(root)
    return root


@pytest.fixture(scope="session")
def prepared(her2st: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 7 imaged her2st sections prepared once for the whole test session (real data)."""
    from he2st.workflows.config import PrepareConfig
    from he2st.workflows.prepare import prepare

    work = tmp_path_factory.mktemp("work")
    prepare(PrepareConfig(work_dir=work))
    return work
