"""Model cards filled from what a workflow knows: the panel, the embedding file's recorded encoder (and,
for adapted weights, the record beside them), the weights of the adapted views and of every encoder view
a method may read, the patch spec and embedding recipe, the gene sets and the training samples and patients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.genes import GenePanel
from he2st.data.patches import PatchSpec
from he2st.data.views import adapted_recipe, is_encoder_view
from he2st.data.workspace import Workspace
from he2st.encoders.adaptation import adaptation_record
from he2st.encoders.spec import EncoderSpec
from he2st.encoders.weights import weights_sha256
from he2st.methods import ModelCard


def _recorded(embeddings: EmbeddingFile) -> tuple[EncoderSpec, str | None]:
    """The encoder an embedding file records it was made with, and the sha256 of its weights file.

    Not cached by the spec: a file rewritten at the same path holds other weights, and
    :func:`weights_sha256` already hashes each (path, size, modification time) once."""
    spec = EncoderSpec.model_validate_json(embeddings.attrs["encoder_spec"])
    return spec, weights_sha256(spec)


def model_card(
    method: str, panel: GenePanel, embeddings: EmbeddingFile, patch: PatchSpec, embed: EmbedConfig,
    gene_sets: dict[str, list[str]], training_samples: dict[str, str],
    training_pixel_size_um: dict[str, float] | None = None, views: dict[str, EmbeddingFile] | None = None,
) -> ModelCard:
    """The card of a model about to be fitted on features from ``embeddings`` (curves come after fitting);
    ``training_pixel_size_um`` (sample id -> µm/px) sets how coarse a slide the model predicts; ``views``
    (encoder view -> an embedding file of it, :func:`view_files`) record each view's weights, so prediction
    embeds each adapted view with the same file and checks the other encoder views' weights."""
    spec, checksum = _recorded(embeddings)
    views = views or {}
    return ModelCard(
        method=method, panel=panel, encoder=spec, weights_sha256=checksum,
        encoder_adaptation=adaptation_record(spec.weights, checksum),
        adapted_views={view: _adapted_view(file) for view, file in views.items() if adapted_recipe(view) is not None},
        view_encoders={view: _view_encoder(file) for view, file in views.items() if adapted_recipe(view) is None},
        patch=patch, embedding=embed,
        gene_sets=gene_sets, training_samples=training_samples,
        training_pixel_size_um={sid: float(mpp) for sid, mpp in (training_pixel_size_um or {}).items()},
    )


def view_files(ws: Workspace, embed: EmbedConfig, sample_id: str, patch: PatchSpec,
               views: Sequence[str]) -> dict[str, EmbeddingFile]:
    """A training sample's embedding file of each encoder view ``views`` (what a method may read) name that
    was made (a method reading a missing view is refused when it is fitted)."""
    paths = {v: ws.view_path(embed, sample_id, patch, v) for v in views if is_encoder_view(v)}
    return {view: EmbeddingFile(path) for view, path in paths.items() if path.exists()}


def _view_encoder(embeddings: EmbeddingFile) -> dict[str, Any]:
    """The encoder an encoder view's embedding file was made with: its name, weights and their sha256."""
    spec, checksum = _recorded(embeddings)
    return {"encoder": spec.name, "weights": spec.weights, "weights_sha256": checksum}


def _adapted_view(embeddings: EmbeddingFile) -> dict[str, Any]:
    """The weights file an adapted view's embedding file was made with, its sha256 and its adaptation record."""
    spec, checksum = _recorded(embeddings)
    return {"weights": spec.weights, "weights_sha256": checksum, "adaptation": adaptation_record(spec.weights, checksum)}
