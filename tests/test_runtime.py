"""Encoder runtimes: ONNX Runtime and OpenVINO run the exported graph with torch's numbers.

A tiny timm ViT (``test_vit``) and the offline default CNN encoder, on random patches;
every graph is compared with torch eager within the fp32 tolerance, for pooled embeddings, token
grids, test-time augmentation and patches that must first be resized.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from he2st.data.embeddings import EmbedConfig
from he2st.encoders import create
from he2st.encoders import export as export_module
from he2st.encoders import runtime as runtime_module
from he2st.encoders.export import external_data_path, onnx_graph, parameter_bytes
from he2st.encoders.inference import PatchEmbedder
from he2st.encoders.runtime import FP32_TOLERANCE, GRAPH_RUNTIMES, installed, resolve_runtime
from he2st.errors import He2stError, He2stWarning

RUNTIMES = [r for r in GRAPH_RUNTIMES if installed(r)]
pytestmark = pytest.mark.skipif(not RUNTIMES, reason="no ONNX runtime installed (pip install 'he2st[runtime]')")


@pytest.fixture(scope="module")
def tiny_vit():
    return create("test_vit", pretrained=False)


def _patches(n: int = 6, size: int = 224, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("name", ["test_vit", "efficientnet_lite0", "convnext_atto"])  # + timm's own head pooling
@pytest.mark.parametrize(("tta", "token_grid", "patch_px"), [("none", 0, 224), ("d4", 2, 224), ("flips", 0, 160)])
def test_graph_matches_torch(name: str, runtime: str, tta: str, token_grid: int, patch_px: int) -> None:
    encoder = create(name, pretrained=name == "efficientnet_lite0")
    patches = _patches(size=patch_px)
    config = EmbedConfig(tta=tta, token_grid=token_grid)
    expected = PatchEmbedder(encoder, config.model_copy(update={"runtime": "torch"}), patch_px, token_grid)(patches)
    embedder = PatchEmbedder(encoder, config.model_copy(update={"runtime": runtime}), patch_px, token_grid)
    assert embedder.runtime == runtime
    got = embedder(torch.from_numpy(patches))  # the embed loop may hand over tensors
    assert np.abs(got[0] - expected[0]).max() <= FP32_TOLERANCE
    if token_grid:
        assert got[1].shape == expected[1].shape == (len(patches), token_grid**2, expected[1].shape[-1])
        assert np.abs(got[1] - expected[1]).max() <= FP32_TOLERANCE


def test_auto_is_a_graph_on_cpu_in_fp32_and_torch_otherwise() -> None:
    cpu = torch.device("cpu")
    assert resolve_runtime("auto", cpu, None) == RUNTIMES[0]
    assert resolve_runtime("auto", cpu, torch.bfloat16) == "torch"
    assert resolve_runtime("auto", torch.device("cuda"), None) == "torch"
    with pytest.raises(He2stError, match="runs in fp32"):
        resolve_runtime(RUNTIMES[0], cpu, torch.bfloat16)
    with pytest.raises(He2stError, match="runs on the CPU"):
        resolve_runtime(RUNTIMES[0], torch.device("cuda"), None)


def test_graph_is_exported_once_per_weights(tiny_vit, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HE2ST_CACHE_DIR", str(tmp_path))
    size = tiny_vit.spec.input_size  # patches at the input size: normalisation runs in the graph
    PatchEmbedder(tiny_vit, EmbedConfig(runtime=RUNTIMES[0]), size)
    graphs = sorted((tmp_path / "onnx").glob("*.onnx"))
    assert len(graphs) == 1 and graphs[0].name.startswith("test_vit-") and graphs[0].name.endswith("uint8-pooled.onnx")
    stamp = graphs[0].stat().st_mtime_ns
    PatchEmbedder(tiny_vit, EmbedConfig(runtime=RUNTIMES[0]), size)
    assert graphs[0].stat().st_mtime_ns == stamp  # reused, not re-exported
    other = create("test_vit", pretrained=False)  # same spec, other weights: another graph
    with torch.no_grad():
        next(other.backbone.parameters()).add_(1.0)
    PatchEmbedder(other, EmbedConfig(runtime=RUNTIMES[0]), size)
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 2
    assert not list((tmp_path / "onnx").glob("*partial*"))
    assert not list((tmp_path / "onnx").glob("*.data"))  # a small encoder's graph is one file


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_large_encoder_graph_keeps_its_tensors_in_one_external_file(tiny_vit, runtime, tmp_path, monkeypatch) -> None:
    """Above the size threshold (0 bytes here, standing in for a 2.5-4.5 GB ViT-H or ViT-g) every tensor goes to
    ``<graph>.onnx.data``; the runtime reads it from beside the graph and matches torch."""
    import onnx

    monkeypatch.setenv("HE2ST_CACHE_DIR", str(tmp_path))
    size = tiny_vit.spec.input_size
    path = onnx_graph(tiny_vit, raw_input=True, tokens=False, external_data_above=0)
    data = external_data_path(path)
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted([path.name, data.name])
    assert path.stat().st_size < data.stat().st_size / 10  # the graph holds structure, the side file tensors
    proto = onnx.load(str(path), load_external_data=False)
    assert {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
            if entry.key == "location"} == {data.name}
    stamp = path.stat().st_mtime_ns
    embedder = PatchEmbedder(tiny_vit, EmbedConfig(runtime=runtime), size)  # the cached graph, not a new one
    assert embedder.runtime == runtime and path.stat().st_mtime_ns == stamp
    patches = _patches(size=size)
    expected = PatchEmbedder(tiny_vit, EmbedConfig(runtime="torch"), size)(patches)[0]
    assert np.abs(embedder(patches)[0] - expected).max() <= FP32_TOLERANCE
    data.unlink()  # a graph without its tensors is not a cached graph: exported again
    assert onnx_graph(tiny_vit, raw_input=True, tokens=False, external_data_above=0) == path and data.exists()


@pytest.mark.slow
@pytest.mark.large
def test_encoder_over_2_gb_runs_in_a_graph(tmp_path, monkeypatch) -> None:
    """Virchow2's ViT-H (631 M parameters, 2.5 GB): its graph is saved with external data instead of falling back."""
    monkeypatch.setenv("HE2ST_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    encoder = create("virchow2", pretrained=False)
    assert parameter_bytes(encoder) > 2**31  # over protobuf's limit for one message
    with warnings.catch_warnings():
        warnings.simplefilter("error", He2stWarning)  # a fallback to torch warns
        embedder = PatchEmbedder(encoder, EmbedConfig(runtime=RUNTIMES[0]), 224)
    assert embedder.runtime == RUNTIMES[0]
    graph = next((tmp_path / "onnx").glob("*.onnx"))
    assert external_data_path(graph).stat().st_size > 2**31
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == sorted([graph.name, f"{graph.name}.data"])
    patches = _patches(2)
    expected = PatchEmbedder(encoder, EmbedConfig(runtime="torch"), 224)(patches)[0]
    assert np.abs(embedder(patches)[0] - expected).max() <= FP32_TOLERANCE


def test_disagreeing_graph_falls_back_to_torch_with_a_warning(tiny_vit, monkeypatch) -> None:
    monkeypatch.setattr(runtime_module, "FP32_TOLERANCE", -1.0)  # nothing can agree
    with pytest.warns(He2stWarning, match="differs from torch"):
        embedder = PatchEmbedder(tiny_vit, EmbedConfig(runtime=RUNTIMES[0]), 224)
    assert embedder.runtime == "torch"
    expected = PatchEmbedder(tiny_vit, EmbedConfig(runtime="torch"), 224)(_patches(2))[0]
    np.testing.assert_array_equal(embedder(_patches(2))[0], expected)


def test_encoder_that_cannot_be_exported_runs_in_torch(tiny_vit, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HE2ST_CACHE_DIR", str(tmp_path))

    def broken_export(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::something")

    monkeypatch.setattr(export_module.torch.onnx, "export", broken_export)
    with pytest.warns(He2stWarning, match="could not be exported to ONNX"):
        embedder = PatchEmbedder(tiny_vit, EmbedConfig(), 224)
    assert embedder.runtime == "torch"
    assert not list(tmp_path.rglob("*.onnx*"))  # no half-written graph


def test_no_warning_for_a_plain_run(tiny_vit) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PatchEmbedder(tiny_vit, EmbedConfig(), 224)
