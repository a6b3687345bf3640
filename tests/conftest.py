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
# One torch/OpenMP thread unless the caller says otherwise: the models under test are small, and on a
# shared machine with few cores, threads that spin-wait for a busy core made tests 10-50x slower
# (set before any test module imports torch; CLI subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Exported encoder graphs go to a folder of this test session, not the user's cache.
if "HE2ST_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HE2ST_CACHE_DIR"] = tempfile.mkdtemp(prefix="he2st-test-cache-")
    atexit.register(shutil.rmtree, os.environ["HE2ST_CACHE_DIR"], ignore_errors=True)


def her2st_root() -> Path:
    """``$HE2ST_DATA_DIR`` when it is set (exclusively: a set but wrong path means no data), otherwise the
    shared copy next to the checkout (what CI provides). Without the data, tests that need it are skipped."""
    env = os.environ.get("HE2ST_DATA_DIR")
    candidate = Path(env) if env else REPO.parent / "shared" / "data" / "her2st"
    if (candidate / "data" / "ST-cnts" / "A1.tsv.gz").exists():
        return candidate
    pytest.skip(f"her2st data not found: set HE2ST_DATA_DIR to the her2st folder (see README); "
                f"looked in {candidate}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """The test machine is shared: keep torch to one thread while a module's tests run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``large`` (encoders of 600 M parameters and more: minutes and up to 11 GB each) run only
    with ``HE2ST_LARGE_TESTS=1``, so that the full suite stays within CI's time and memory."""
    if os.environ.get("HE2ST_LARGE_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="large encoder (HE2ST_LARGE_TESTS=1 runs it)")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)
