"""``he2st predict``: a checkpoint (or a fitted method) and a slide -> one prediction ``.h5ad``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from he2st.encoders import Encoder
from he2st.errors import one_line
from he2st.methods import Method, load_method
from he2st.predict import ChunkInfo, PredictConfig, run_prediction


def predict_slide(
    model: str | Path | Method,
    slide: str | Path | None = None,
    out: str | Path = "he2st-predictions",
    *,
    encoder: Encoder | None = None,
    on_chunk: Callable[[ChunkInfo], None] | None = None,
    **options: Any,
) -> Path:
    """Predict ``model`` (a checkpoint path or a fitted method) over ``slide``; ``options`` are
    :class:`~he2st.predict.PredictConfig` fields (``spots_from``, ``genes``, ``chunk``, ``stain``, ...)."""
    try:
        config = PredictConfig(slide=slide, out=out, **options,
                               model=model if isinstance(model, str | Path) else None)
    except ValidationError as exc:
        raise one_line(exc, "invalid prediction setting") from exc
    method = model if isinstance(model, Method) else load_method(model)
    return run_prediction(config, method, encoder=encoder, on_chunk=on_chunk)
