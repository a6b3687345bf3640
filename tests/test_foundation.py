"""The foundation-model presets from weights file to embeddings, offline, with random weights.

Each preset's network is built in its real architecture (the parameter count of the published model), saved as
its weights are published (file name, container, key layout: :mod:`release_formats`) and loaded back the way a
user does, ``embed.encoder=<preset>`` with ``embed.weights=<file>``; every tensor must be the saved one (loading is
strict, and a fingerprint of each tensor is compared) and the embedding must have the preset's width. CTransPath
(27.5 M parameters, 3 s) runs in the fast loop; the others are slow: 2 s (Lite0) to 2.5 minutes and 11 GB of memory
(ViT-g, 1.1 B parameters) each on a 2-core machine, one after the other; those of 600 M parameters and more are
also marked ``large`` and run with ``HE2ST_LARGE_TESTS=1``. The last test takes CTransPath through
``he2st embed``, ``train`` and ``predict`` on a small work folder.
"""

from __future__ import annotations

import gc

import anndata as ad
import numpy as np
import pytest
import timm
import torch
from in_process import run_cli
from release_formats import write_release
from synthetic import prepared_sections
from torch import nn

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.patches import PatchSpec
from he2st.data.workspace import Workspace
from he2st.encoders import create, list_presets
from he2st.encoders.conch import INSTALL_HINT
from he2st.encoders.inference import PatchEmbedder, load_encoder
from he2st.encoders.presets import PRESETS
from he2st.encoders.runtime import resolve_runtime
from he2st.errors import He2stError
from he2st.methods import load_method

FAST = {"ctranspath"}
LARGE = {"uni2_h", "virchow2", "hoptimus0", "hoptimus1", "gigapath"}  # 600 M parameters and more
# Millions of parameters of the published models (model cards), which the preset's architecture must have.
PUBLISHED_MILLIONS = {"uni": 303, "phikon_v2": 303, "uni2_h": 681, "virchow2": 631, "hoptimus0": 1134,
                      "hoptimus1": 1134, "gigapath": 1134, "ctranspath": 27.5}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights come from the file the test names, never from the hub or a developer's registry."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HE2ST_WEIGHTS", raising=False)


def _preset(name: str):
    marks = () if name in FAST else (pytest.mark.slow, pytest.mark.large) if name in LARGE else pytest.mark.slow
    return pytest.param(name, id=name, marks=marks)


def _require_architecture(name: str) -> None:
    spec = PRESETS[name]
    if spec.backend == "conch":
        pytest.importorskip("conch.open_clip_custom", reason=f"the CONCH package is not installed ({INSTALL_HINT})")
    elif not timm.is_model(spec.architecture):
        pytest.skip(f"timm {timm.__version__} has no '{spec.architecture}', the architecture of preset {name}")


def _published_network(name: str) -> nn.Module:
    """The network whose weights the preset's file holds, with random weights: the preset's own backbone, the
    whole CoCa model for CONCH, the whole ResNet-50 (layer 4 and classifier included) for the truncated preset."""
    spec = PRESETS[name]
    if spec.backend == "conch":
        import json

        from conch.open_clip_custom import CoCa
        from conch.open_clip_custom.factory import CFG_DIR

        config = json.loads((CFG_DIR / f"{spec.architecture}.json").read_text())
        config.pop("custom_text")
        return CoCa(**config)
    if spec.truncate_after:
        return timm.create_model(spec.architecture, pretrained=False)
    return create(name, pretrained=False).backbone


def _fingerprint(module: nn.Module) -> dict[str, tuple[tuple[int, ...], float, float]]:
    """Shape, sum and first value of every tensor: equal for the same tensor, different for another draw."""
    return {key: (tuple(value.shape), value.double().sum().item(), value.flatten()[0].item())
            for key, value in module.state_dict().items()}


def _patches(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", [_preset(name) for name in list_presets()])
def test_preset_embeds_with_its_published_weights_file(name: str, tmp_path) -> None:
    _require_architecture(name)
    spec = PRESETS[name]
    torch.manual_seed(0)
    network = _published_network(name)
    if name in PUBLISHED_MILLIONS:
        millions = sum(p.numel() for p in network.parameters()) / 1e6
        assert millions == pytest.approx(PUBLISHED_MILLIONS[name], rel=0.01)
    weights = write_release(name, network, tmp_path)
    assert weights.name == (spec.weights_file or weights.name)
    saved = _fingerprint(network)
    del network  # the giant ones: one copy in memory at a time
    gc.collect()

    torch.manual_seed(1)  # a tensor left at its random initialisation would differ from the saved one
    config = EmbedConfig(encoder=name, weights=weights, device="cpu", runtime="torch", num_workers=0)
    encoder = load_encoder(config)
    loaded = _fingerprint(encoder.backbone)
    assert loaded.keys() <= saved.keys()
    assert [key for key in loaded if loaded[key] != saved[key]] == []
    left_out = saved.keys() - loaded.keys()
    if spec.backend == "conch":  # the text towers, which embeddings do not use
        assert left_out and not any(key.startswith("visual.") for key in left_out)
    elif spec.truncate_after:  # the stage after the cut and the classifier
        assert left_out and all(key.startswith(("layer4.", "fc.")) for key in left_out)
    else:
        assert not left_out
    assert encoder.spec.weights == str(weights.resolve())

    embedder = PatchEmbedder(encoder, config, spec.input_size)
    embeddings, _ = embedder(_patches(2, spec.input_size))
    assert encoder.embed_dim == spec.embed_dim and embeddings.shape == (2, spec.embed_dim)
    assert np.isfinite(embeddings).all() and not np.allclose(embeddings[0], embeddings[1])
    del encoder, embedder
    gc.collect()


@pytest.mark.slow
def test_conch_refuses_a_checkpoint_without_a_visual_tensor(tmp_path) -> None:
    """CONCH's own loader ignores what does not fit; he2st loads its visual tower strictly."""
    _require_architecture("conch_v1")
    network = _published_network("conch_v1")
    state = network.state_dict()
    del state["visual.attn_pool_contrast.ln_k.weight"]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(He2stError, match=r"pytorch_model\.bin.*missing \(first: 'attn_pool_contrast\.ln_k\.weight'\)"):
        create("conch_v1", weights=tmp_path / "pytorch_model.bin")


@pytest.mark.slow
def test_foundation_preset_through_embed_train_and_predict(tmp_path) -> None:
    """CTransPath with local weights through the CLI: embed three sections, train knn on two, predict the third at
    its spots; prediction encodes the slide exactly as the training features were encoded."""
    genes = [f"G{i}" for i in range(20)]
    work = prepared_sections(tmp_path, {"S1": "P1", "S2": "P2", "S3": "P3"}, genes)
    torch.manual_seed(0)
    weights = write_release("ctranspath", create("ctranspath", pretrained=False).backbone, tmp_path)
    embed = ["--set", "embed.encoder=ctranspath", "--set", f"embed.weights={weights}", "--set", "embed.num_workers=0"]
    result = run_cli("embed", "-w", work, *embed)
    assert result.returncode == 0, result.stderr
    ws = Workspace(work)
    config = EmbedConfig(encoder="ctranspath", weights=weights, num_workers=0)
    s1 = EmbeddingFile(ws.embedding_path(config, "S1", PatchSpec()))
    assert s1.embeddings.shape == (25, 768) and s1.encoder_spec["name"] == "ctranspath"
    assert s1.encoder_spec["weights"] == str(weights.resolve()) and np.isfinite(s1.embeddings).all()
    assert s1.attrs["runtime"] == resolve_runtime("auto", torch.device("cpu"), None)  # exported, no fallback

    model = tmp_path / "knn.pt"
    result = run_cli("train", "-w", work, "--method", "knn", "--samples", "S2,S3", "--out", model, *embed,
                     "--set", "genes.n_genes=20", "--set", "genes.min_spot_fraction=0", "--set", "n_top=5")
    assert result.returncode == 0, result.stderr
    method = load_method(model)
    assert method.card.encoder.name == "ctranspath" and method.card.embedding.weights.resolve() == weights.resolve()

    out = tmp_path / "pred"
    result = run_cli("predict", "--model", model, "--spots-from", ws.sample_path("S1"), "--out", out,
                     "--weights", weights)
    assert result.returncode == 0, result.stderr
    predicted = ad.read_h5ad(next(out.rglob("*.h5ad")))
    assert predicted.n_obs == 25 and predicted.n_vars == 20 and np.isfinite(predicted.X).all()
    from he2st.data.spots import SpotSet

    spots = SpotSet(np.array(["S1"] * 25, dtype=object), np.arange(25).astype(str).astype(object), s1.embeddings,
                    np.zeros((25, 2)), method.panel.genes)
    np.testing.assert_allclose(predicted.X, method.predict(spots).expression, rtol=1e-4, atol=1e-4)
