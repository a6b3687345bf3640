"""The contrastive retrieval methods' shared options and base: BLEEP, CMRCNet and CarHE align image and
expression embeddings and predict a spot by retrieving the reference spots whose expression embeddings
are nearest to its image embedding."""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from torch import nn

from he2st.data.spots import SpotSet
from he2st.methods.layers.bank import ReferenceBank
from he2st.methods.base import Prediction
from he2st.methods.configs.common import RetrievalConfig
from he2st.methods.layers.features import standardize_columns
from he2st.methods.layers.losses import NegativeBank
from he2st.methods.layers.neighbourhood import neighbour_context
from he2st.methods.neural import NeuralMethod, validation_sample


class RetrievalMethod(NeuralMethod):
    """Prediction by retrieval, BLEEP's way: image embeddings of query spots are matched (cosine)
    against expression embeddings of reference spots held in the method's own :attr:`bank`.

    A subclass provides :meth:`embed_images` and keeps its expression tower at
    ``self.net.expression_tower`` (or overrides :meth:`embed_expression`); its config is a
    :class:`RetrievalConfig`. Its bank is every training spot (validation spots included);
    :meth:`reference_bank` builds others -- with expression-only sections, or returning more genes
    (the whole transcriptome) -- and :meth:`retrieve` queries any bank.
    """

    query_options = ("query_neighbours", "per_sample", "smooth_neighbours")

    Config = RetrievalConfig
    uses_bank = True
    retrieves = True

    @property
    def context_k(self) -> int:
        return self.config.query_neighbours

    @abstractmethod
    def embed_images(self, spots: SpotSet) -> np.ndarray:
        """Image embeddings of ``spots`` (the query side of retrieval)."""

    @torch.no_grad()
    def embed_expression(self, expression: np.ndarray, batch: int = 1024) -> np.ndarray:
        """Expression embeddings (the reference side of retrieval), computed where the model lives."""
        self.net.eval()
        device = next(self.net.parameters()).device
        out = [
            self.net.expression_tower(torch.from_numpy(expression[a : a + batch].astype(np.float32)).to(device))
            .cpu()
            for a in range(0, len(expression), batch)
        ]
        return torch.cat(out).numpy() if out else np.zeros((0, self.config.projection_dim), np.float32)

    def all_negatives(self) -> bool:
        """Whether training contrasts each batch with the bank of every training spot (``negatives="all"``)."""
        return self.config.negatives == "all" and self.config.loss == "contrastive"

    def negative_bank(self, train: SpotSet, generator: torch.Generator) -> NegativeBank | None:
        """The bank of detached negatives for ``negatives="all"`` (None otherwise); refresh it each epoch."""
        if not self.all_negatives():
            return None
        z = torch.from_numpy(standardize_columns(train.targets))
        return NegativeBank(z, self.config.bank_negatives, self.config.target_temperature, generator)

    def prepare_validation(self, train: SpotSet) -> None:
        """Retrieval from the training spots only (a bank holding validation spots would retrieve them),
        searched exactly: the bank changes every epoch, so an approximate index would be rebuilt each time
        and cost more than exact search of the few validation spots scored."""
        self.bank = self.reference_bank(train.targets, train.genes, list(train.sample_ids), search="exact")

    def validation_rows(self, n: int) -> np.ndarray | None:
        """A fixed seeded sample of ``max_validation_spots`` of them: the cost of an epoch's validation is
        spots scored x training spots. The bank stays whole: retrieving the same k from a sample of it
        would average a wider neighbourhood -- another, smoother predictor -- not the model's."""
        return validation_sample(n, self.config.max_validation_spots, self.config.seed)

    def validation_prediction(self, inputs: SpotSet, n: int) -> np.ndarray:
        return self._retrieve(inputs, self.bank, None if n == len(inputs) else np.arange(n)).expression

    @torch.no_grad()
    def embed_frozen(self, head: nn.Module, spots: SpotSet, batch: int = 1024) -> torch.Tensor:
        """``head`` applied, in batches, to the spots' standardised frozen features (``self.scaler``)."""
        self.net.eval()
        x = self.scaler(spots.features)
        out = [head(torch.from_numpy(x[a : a + batch])) for a in range(0, len(x), batch)]
        return torch.cat(out) if out else torch.zeros(0, self.config.projection_dim)

    def after_fit(self, train: SpotSet, val: SpotSet | None) -> None:
        """The default bank: every training spot, validation spots included."""
        spots = train if val is None else SpotSet.concat([train, val])
        self.bank = self.reference_bank(spots.targets, spots.genes, list(spots.sample_ids))

    def reference_bank(
        self,
        panel_expression: np.ndarray,
        genes: list[str],
        sample_ids: list[str],
        output_expression: np.ndarray | None = None,
        output_genes: list[str] | None = None,
        search: str = "auto",
    ) -> ReferenceBank:
        """A bank of the expression embeddings of reference spots (training spots, and any
        expression-only sections whose patient is not under test); ``output_expression`` optionally
        returns more genes (e.g. the whole transcriptome) than the model was trained on."""
        panel_expression = self.level_free(panel_expression, sample_ids)
        if output_expression is not None:
            output_expression = self.level_free(output_expression, sample_ids)
        return ReferenceBank(
            self.embed_expression(panel_expression),
            panel_expression if output_expression is None else output_expression,
            genes if output_genes is None else output_genes,
            sample_ids,
            search=search,
        )

    def transcriptome_reference(self, spots: SpotSet, expression: np.ndarray, genes: list[str]) -> ReferenceBank:
        return self.reference_bank(spots.targets, spots.genes, list(spots.sample_ids),
                                   output_expression=expression, output_genes=genes)

    def _predict(self, spots: SpotSet) -> Prediction:
        return self._retrieve(spots, self.bank)

    def retrieve(self, spots: SpotSet, bank: ReferenceBank) -> Prediction:
        """Profiles of another ``bank`` (say, whole-transcriptome profiles) retrieved for the images of
        ``spots``, as :meth:`predict` retrieves from the model's own."""
        self.check_spots(spots)
        return self.smoothed(self._retrieve(self.contextual(spots.without_expression()), bank), spots)

    def _retrieve(self, spots: SpotSet, bank: ReferenceBank, rows: np.ndarray | None = None) -> Prediction:
        """Retrieval for spots whose features carry the context (with query-time neighbour averaging), for
        ``rows`` of them (all when None; the neighbour averaging still reads every spot)."""
        cfg = self.config
        if cfg.query_neighbours:
            queries = neighbour_context(self.embed_images(spots), spots.coords_um, spots.sample_ids,
                                        cfg.query_neighbours)
            queries = queries if rows is None else queries[rows]
        else:
            queries = self.embed_images(spots if rows is None else spots.subset(rows))
        result = bank.predict(
            queries, k=min(cfg.top_k, len(bank)), weighting=cfg.weighting,
            temperature=cfg.weighting_temperature, per_sample=cfg.per_sample,
        )
        return Prediction(
            result.expression, result.genes,
            {"best_similarity": result.best_similarity, "dispersion": result.dispersion},
        )
