"""Model cards filled from what a workflow knows: the panel, the embedding file's recorded encoder (and,
for adapted weights, the record beside them), the patch spec and embedding recipe, the gene sets and the
training samples and patients."""

from __future__ import annotations

import functools

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.genes import GenePanel
from he2st.data.patches import PatchSpec
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
    training_pixel_size_um: dict[str, float] | None = None,
) -> ModelCard:
    """The card of a model about to be fitted on features from ``embeddings`` (curves come after fitting);
    ``training_pixel_size_um`` (sample id -> µm/px) sets how coarse a slide the model predicts."""
    spec_json = embeddings.attrs["encoder_spec"]
    spec, checksum = EncoderSpec.model_validate_json(spec_json), _checksum(spec_json)
    return ModelCard(
        method=method, panel=panel, encoder=spec, weights_sha256=checksum,
        encoder_adaptation=adaptation_record(spec.weights, checksum), patch=patch, embedding=embed,
        gene_sets=gene_sets, training_samples=training_samples,
        training_pixel_size_um={sid: float(mpp) for sid, mpp in (training_pixel_size_um or {}).items()},
    )
