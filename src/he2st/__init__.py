"""he2st: predict spatially resolved gene expression from H&E histology.

A flat API in the scanpy manner (names load on first use, so ``import he2st`` stays light)::

    import he2st
    he2st.prepare(work_dir="W", data={"dataset": "her2st", "sections": ["B4", "A1"]})
    he2st.embed(work_dir="W")
    outcome = he2st.benchmark(work_dir="W", methods=["ridge", "knn"])
    method, path = he2st.train(work_dir="W", method="knn", train_samples=["B4"])
    h5ad = he2st.predict_slide(path, spots_from="W/samples/A1.h5ad", out="W/pred")

Sub-packages, from the bottom floor up: ``data``, ``encoders``, ``methods``, ``evaluate``/``predict``,
``workflows``; ``cli`` and ``report`` on top.
"""

from __future__ import annotations

import importlib
from typing import Any

from he2st.errors import He2stError
from he2st.version import __version__

_LAZY = {
    "read_sample": "he2st.api", "prepare": "he2st.api", "embed": "he2st.api", "train": "he2st.api",
    "benchmark": "he2st.api", "predict_slide": "he2st.workflows.predict_slide",
    "create_method": "he2st.methods", "load_method": "he2st.methods", "list_methods": "he2st.methods",
    "ModelCard": "he2st.methods", "PredictConfig": "he2st.predict", "BenchmarkConfig": "he2st.workflows.config",
    "build_report": "he2st.report",
}

__all__ = ["He2stError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'he2st' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
