"""ONNX graphs of encoders, exported once per encoder and weights and kept in the user cache.

A graph maps uint8 RGB patches ``(B, S, S, 3)`` (or, when patches must first be resized, the
normalised ``(B, 3, S, S)`` input of :meth:`Encoder.preprocess`) to the pooled embedding and,
when asked, the spatial tokens ``(B, N, C)``, so the normalisation runs inside the optimised
graph instead of as a separate pass over every pixel. Graphs are named by a checksum of the
spec, the parameters and the graph's inputs and outputs: new weights can never reuse a stale graph.

One protobuf message cannot exceed 2 GiB, so the graph of a large encoder (ViT-H, ViT-g: 2.5-4.5 GB of
fp32 weights) keeps its tensors in one side file, ``<graph>.onnx.data``, in ONNX's external-data format;
ONNX Runtime and OpenVINO read it from beside the graph.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from he2st.encoders.encoder import Encoder, spatial_tokens
from he2st.errors import He2stError
from he2st.io import user_cache

CACHE_DIR_ENV = "HE2ST_CACHE_DIR"
OPSET = 17
# Encoders whose parameters take more bytes than this are saved with external data. Below protobuf's
# 2 GiB limit with room for the graph itself; a graph that the exporter spills anyway is saved the same way.
EXTERNAL_DATA_BYTES = 1 << 30


def cache_dir() -> Path:
    """``$HE2ST_CACHE_DIR`` if set, else the user cache (``$XDG_CACHE_HOME/he2st``)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return user_cache()


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


def parameter_bytes(encoder: Encoder) -> int:
    """Bytes of every parameter and buffer of ``encoder`` (what an exported graph carries as initialisers)."""
    return sum(tensor.numel() * tensor.element_size() for tensor in encoder.state_dict().values())


def external_data_path(graph: Path) -> Path:
    """The file holding the tensors of ``graph`` when it was saved with external data."""
    return graph.with_name(f"{graph.name}.data")


def onnx_graph(
    encoder: Encoder, raw_input: bool, tokens: bool, external_data_above: int = EXTERNAL_DATA_BYTES
) -> Path:
    """The cached ONNX graph of ``encoder`` (exported on first use; atomic, so a crash leaves none).

    An encoder with more than ``external_data_above`` bytes of parameters gets its tensors in
    :func:`external_data_path` beside the graph."""
    variant = f"{'uint8' if raw_input else 'float'}-{'tokens' if tokens else 'pooled'}"
    path = cache_dir() / "onnx" / f"{encoder.spec.name.replace('/', '_')}-{weights_checksum(encoder)[:16]}-{variant}.onnx"
    data = external_data_path(path)
    external = parameter_bytes(encoder) > external_data_above
    if path.exists() and (data.exists() or not external):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    size = encoder.spec.input_size
    example = (torch.zeros(2, size, size, 3, dtype=torch.uint8) if raw_input
               else torch.zeros(2, 3, size, size))
    outputs = ["pooled", "tokens"] if tokens else ["pooled"]
    graph = _Graph(encoder.cpu().eval(), raw_input, tokens).eval()
    # A folder of this process: the exporter writes the tensors of a graph over 2 GiB beside it, one file each.
    work = Path(tempfile.mkdtemp(prefix=f"{path.name}.", suffix=".partial", dir=path.parent))
    try:
        exported = work / "export" / "graph.onnx"
        exported.parent.mkdir()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's
            torch.onnx.export(
                graph, (example,), str(exported), input_names=["patches"], output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in ["patches", *outputs]}, opset_version=OPSET,
                dynamo=False,
            )
        if external or len(list(exported.parent.iterdir())) > 1:
            _save_with_external_data(exported, work / path.name, data.name)
            os.replace(work / data.name, data)  # the tensors first: a graph in place is a complete one
            os.replace(work / path.name, path)
        else:
            os.replace(exported, path)
    except He2stError:
        raise
    except Exception as exc:  # any exporter failure means: this encoder runs in torch
        raise He2stError(f"encoder '{encoder.spec.name}' could not be exported to ONNX "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _save_with_external_data(exported: Path, target: Path, location: str) -> None:
    """Re-save the graph at ``exported`` as ``target`` with all its tensors in one file, ``location``,
    beside it (the name the graph records, so it must be the final one)."""
    try:
        import onnx
    except ImportError as exc:
        raise He2stError(
            f"encoder graph {target.name} needs external data, which needs the onnx package: "
            "pip install 'he2st[runtime]'"
        ) from exc
    model = onnx.load(str(exported))  # also reads any tensors the exporter spilled beside the graph
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
