"""ONNX graphs of encoders, exported once per encoder and weights and kept in the user cache.

A graph maps uint8 RGB patches ``(B, S, S, 3)`` (or, when patches must first be resized, the
normalised ``(B, 3, S, S)`` input of :meth:`Encoder.preprocess`) to the pooled embedding and,
when asked, the spatial tokens ``(B, N, C)``, so the normalisation runs inside the optimised
graph instead of as a separate pass over every pixel. Graphs are named by a checksum of the
spec, the parameters and the graph's inputs and outputs: new weights can never reuse a stale graph.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from he2st.encoders.encoder import Encoder, spatial_tokens
from he2st.errors import He2stError

CACHE_DIR_ENV = "HE2ST_CACHE_DIR"
OPSET = 17


def cache_dir() -> Path:
    """``$HE2ST_CACHE_DIR`` if set, else the user cache (``$XDG_CACHE_HOME/he2st``)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "he2st"


class _Graph(nn.Module):
    """What is exported: optional in-graph normalisation, the backbone, pooling, optional tokens."""

    def __init__(self, encoder: Encoder, raw_input: bool, tokens: bool) -> None:
        super().__init__()
        self.encoder, self.raw_input, self.tokens = encoder, raw_input, tokens

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.raw_input:  # the exact operations of Encoder.preprocess, for patches already S x S
            x = x.permute(0, 3, 1, 2).to(torch.float32).div(255.0)
            x = (x - self.encoder.pixel_mean) / self.encoder.pixel_std
        features = self.encoder.forward_features(x)
        pooled = self.encoder.pool(features)
        if not self.tokens:
            return (pooled,)
        return pooled, spatial_tokens(features, self.encoder.backbone)


def weights_checksum(encoder: Encoder) -> str:
    """sha256 over the spec and every parameter and buffer (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256(encoder.spec.model_dump_json().encode())
    for name, tensor in encoder.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def onnx_graph(encoder: Encoder, raw_input: bool, tokens: bool) -> Path:
    """The cached ONNX graph of ``encoder`` (exported on first use; atomic, so a crash leaves none)."""
    variant = f"{'uint8' if raw_input else 'float'}-{'tokens' if tokens else 'pooled'}"
    path = cache_dir() / "onnx" / f"{encoder.spec.name.replace('/', '_')}-{weights_checksum(encoder)[:16]}-{variant}.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    size = encoder.spec.input_size
    example = (torch.zeros(2, size, size, 3, dtype=torch.uint8) if raw_input
               else torch.zeros(2, 3, size, size))
    outputs = ["pooled", "tokens"] if tokens else ["pooled"]
    graph = _Graph(encoder.cpu().eval(), raw_input, tokens).eval()
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's
            torch.onnx.export(
                graph, (example,), str(partial), input_names=["patches"], output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in ["patches", *outputs]}, opset_version=OPSET,
                dynamo=False,
            )
        os.replace(partial, path)
    except Exception as exc:  # any exporter failure means: this encoder runs in torch
        partial.unlink(missing_ok=True)
        raise He2stError(f"encoder '{encoder.spec.name}' could not be exported to ONNX "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return path

