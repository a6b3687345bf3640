"""The flat Python API, in the scanpy manner: functions over samples (AnnData inside) and paths.

Everything here is also a command (``he2st prepare``, ``embed``, ``train``, ``benchmark``,
``predict``); settings are the same pydantic fields, passed as keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from he2st.data.sample import Sample
from he2st.data.workspace import Workspace
from he2st.errors import one_line
from he2st.methods import Method
from he2st.workflows.benchmark import BenchmarkOutcome, run_benchmark
from he2st.workflows.config import BenchmarkConfig, EmbedRunConfig, PrepareConfig, TrainRunConfig
from he2st.workflows.embed import EmbedSummary, embed_workspace
from he2st.workflows.prepare import Prepared
from he2st.workflows.prepare import prepare as _prepare
from he2st.workflows.train import train_model


def _config(cls: type[BaseModel], settings: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(settings)
    except ValidationError as exc:
        raise one_line(exc, "invalid setting") from exc


def read_sample(path: str | Path) -> Sample:
    """A prepared sample (``samples/<id>.h5ad``): ``.adata`` holds counts and ``obsm["spatial"]``."""
    return Sample.load(path)


def prepare(**settings: Any) -> Prepared:
    """``he2st prepare``: samples, patch caches and folds in ``work_dir`` (PrepareConfig fields)."""
    return _prepare(_config(PrepareConfig, settings))


def embed(sample_ids: list[str] | None = None, **settings: Any) -> EmbedSummary:
    """``he2st embed``: frozen-encoder embeddings of prepared samples (EmbedRunConfig fields)."""
    cfg = _config(EmbedRunConfig, settings)
    ws = Workspace(cfg.work_dir)
    return embed_workspace(ws, sample_ids or ws.sample_ids(), cfg.patch, cfg.embed)


def train(**settings: Any) -> tuple[Method, Path]:
    """``he2st train``: one method on training samples -> (fitted method, checkpoint path)."""
    method, _, path = train_model(_config(TrainRunConfig, settings))
    return method, path


def benchmark(**settings: Any) -> BenchmarkOutcome:
    """``he2st benchmark``: methods over patient-level folds (BenchmarkConfig fields); writes the run folder."""
    return run_benchmark(_config(BenchmarkConfig, settings))
