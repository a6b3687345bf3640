"""Model cards filled from what a workflow knows: the panel, the embedding file's recorded encoder (and,
for adapted weights, the record beside them), the weights of the ``adapted`` view and of every encoder view
a method may read, the patch spec and embedding recipe, the gene sets and the training samples and patients."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.genes import GenePanel
from he2st.data.patches import PatchSpec
from he2st.data.views import ADAPTED, is_encoder_view
from he2st.data.workspace import Workspace
from he2st.encoders.adaptation import adaptation_record
from he2st.encoders.spec import EncoderSpec
from he2st.encoders.weights import weights_sha256
from he2st.methods import ModelCard


@functools.lru_cache(maxsize=8)
def _checksum(spec_json: str) -> str | None:
    return weights_sha256(EncoderSpec.model_validate_json(spec_json))


def model_card(
    method: str, panel: GenePanel, embeddings: EmbeddingFile, patch: PatchSpec, embed: EmbedConfig,
    gene_sets: dict[str, list[str]], training_samples: dict[str, str],
    training_pixel_size_um: dict[str, float] | None = None, adapted: EmbeddingFile | None = None,
    encoder_views: dict[str, EmbeddingFile] | None = None,
) -> ModelCard:
    """The card of a model about to be fitted on features from ``embeddings`` (curves come after fitting);
    ``training_pixel_size_um`` (sample id -> µm/px) sets how coarse a slide the model predicts; ``adapted``,
    an embedding file of the ``adapted`` view, records that view's weights so prediction embeds with them;
    ``encoder_views`` (view -> an embedding file of it) record each encoder view's weights, so prediction
    can check it embeds with the same ones."""
    spec_json = embeddings.attrs["encoder_spec"]
    spec, checksum = EncoderSpec.model_validate_json(spec_json), _checksum(spec_json)
    return ModelCard(
        method=method, panel=panel, encoder=spec, weights_sha256=checksum,
        encoder_adaptation=adaptation_record(spec.weights, checksum), adapted_view=_adapted_view(adapted),
        view_encoders={view: _view_encoder(file) for view, file in (encoder_views or {}).items()},
        patch=patch, embedding=embed,
        gene_sets=gene_sets, training_samples=training_samples,
        training_pixel_size_um={sid: float(mpp) for sid, mpp in (training_pixel_size_um or {}).items()},
    )


def adapted_view_file(ws: Workspace, embed: EmbedConfig, sample_id: str, patch: PatchSpec,
                      views: Sequence[str]) -> EmbeddingFile | None:
    """A training sample's embedding file of the ``adapted`` view, when ``views`` (what a method may read)
    name it and it was made (a method reading a missing view is refused when it is fitted)."""
    if ADAPTED not in views:
        return None
    path = ws.view_path(embed, sample_id, patch, ADAPTED)
    return EmbeddingFile(path) if path.exists() else None


def encoder_view_files(ws: Workspace, embed: EmbedConfig, sample_id: str, patch: PatchSpec,
                       views: Sequence[str]) -> dict[str, EmbeddingFile]:
    """A training sample's embedding file of each encoder view ``views`` name (another encoder's, not the
    adapted one's, which :func:`adapted_view_file` reads) that was made."""
    paths = {v: ws.view_path(embed, sample_id, patch, v) for v in views if is_encoder_view(v) and v != ADAPTED}
    return {view: EmbeddingFile(path) for view, path in paths.items() if path.exists()}


def _view_encoder(embeddings: EmbeddingFile) -> dict[str, Any]:
    """The encoder an encoder view's embedding file was made with: its name, weights and their sha256."""
    spec_json = embeddings.attrs["encoder_spec"]
    spec = EncoderSpec.model_validate_json(spec_json)
    return {"encoder": spec.name, "weights": spec.weights, "weights_sha256": _checksum(spec_json)}


def _adapted_view(embeddings: EmbeddingFile | None) -> dict[str, Any]:
    """The weights file an ``adapted``-view embedding file was made with, its sha256 and its adaptation record."""
    if embeddings is None:
        return {}
    spec_json = embeddings.attrs["encoder_spec"]
    weights, checksum = EncoderSpec.model_validate_json(spec_json).weights, _checksum(spec_json)
    return {"weights": weights, "weights_sha256": checksum, "adaptation": adaptation_record(weights, checksum)}
