"""Inference runtimes for encoders: eager torch, ONNX Runtime and OpenVINO on the same ONNX graph.

On a CPU, an optimising runtime runs the same fp32 network several times faster than torch eager
(fused convolutions, tuned kernels). Each graph is checked against torch on a fixed batch before
it is trusted: outputs must agree within :data:`FP32_TOLERANCE`. A graph that cannot be exported or
that disagrees is refused with a warning that says why, and the encoder runs in torch.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from he2st.encoders.encoder import Encoder, spatial_tokens
from he2st.encoders.export import onnx_graph
from he2st.errors import He2stError, He2stWarning

GRAPH_RUNTIMES = ("openvino", "onnxruntime")  # fastest first, as measured by benchmarks/embed_throughput.py
FP32_TOLERANCE = 1e-4  # max abs difference to torch on the validation batch
_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}

GraphRun = Callable[[np.ndarray], list[np.ndarray]]


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(_PACKAGES[runtime]) is not None


def resolve_runtime(requested: str, device: torch.device, dtype: torch.dtype | None) -> str:
    """The runtime to use: ``auto`` is the fastest installed graph runtime on a CPU in fp32, torch
    otherwise (GPUs, half precision). An explicit choice that cannot run is an error."""
    if requested == "torch":
        return "torch"
    if requested == "auto":
        if device.type != "cpu" or dtype is not None:
            return "torch"
        return next((name for name in GRAPH_RUNTIMES if installed(name)), "torch")
    if requested not in GRAPH_RUNTIMES:
        raise He2stError(f"unknown embed.runtime '{requested}': choose auto, torch, {', '.join(GRAPH_RUNTIMES)}")
    if device.type != "cpu":
        raise He2stError(f"embed.runtime '{requested}' runs on the CPU in he2st; use runtime torch (or auto) "
                         f"on device '{device}'")
    if dtype is not None:
        raise He2stError(f"embed.runtime '{requested}' runs in fp32; use precision fp32 (or auto) or runtime torch")
    if not installed(requested):
        raise He2stError(f"embed.runtime '{requested}' is not installed: pip install 'he2st[runtime]'")
    return requested


def graph_runner(encoder: Encoder, runtime: str, raw_input: bool, tokens: bool, threads: int) -> GraphRun | None:
    """A validated graph of ``encoder`` on ``runtime``, or None (with a warning saying why) when the
    encoder must run in torch. Inputs: uint8 ``(B, S, S, 3)`` with ``raw_input``, else normalised
    float32 ``(B, 3, S, S)``; outputs: pooled embeddings and, with ``tokens``, spatial tokens."""
    try:
        path = onnx_graph(encoder, raw_input, tokens)
        try:
            run = _load(runtime, path, threads)
        except Exception as exc:  # a runtime that cannot read or compile the graph: torch runs it
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise He2stError(f"{runtime} could not load the graph of encoder '{encoder.spec.name}' ({reason})") from exc
        difference = _difference_to_torch(encoder, run, raw_input, tokens)
    except He2stError as exc:
        warnings.warn(f"{exc}; embedding with torch instead", He2stWarning, stacklevel=2)
        return None
    if not difference <= FP32_TOLERANCE:
        warnings.warn(f"encoder '{encoder.spec.name}' on {runtime} differs from torch by {difference:.2g} "
                      f"(more than {FP32_TOLERANCE:g}); embedding with torch instead", He2stWarning, stacklevel=2)
        return None
    return run


def _load(runtime: str, path: Path, threads: int) -> GraphRun:
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"patches": x})
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    outputs = compiled.outputs

    def run(x: np.ndarray) -> list[np.ndarray]:
        result = request.infer({0: x})
        return [np.array(result[output]) for output in outputs]  # copies: the request reuses its buffers

    return run


def _difference_to_torch(encoder: Encoder, run: GraphRun, raw_input: bool, tokens: bool) -> float:
    """Max abs difference between the graph and torch on a fixed batch of random patches."""
    size = encoder.spec.input_size
    patches = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    with torch.inference_mode():
        x = encoder.cpu().eval().preprocess(patches)
        features = encoder.forward_features(x)
        expected = [encoder.pool(features)] + ([spatial_tokens(features, encoder.backbone)] if tokens else [])
        got = run(patches if raw_input else x.numpy())
    if len(got) != len(expected) or any(g.shape != tuple(e.shape) for g, e in zip(got, expected, strict=True)):
        return float("inf")
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected, strict=True))
