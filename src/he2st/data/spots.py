"""Spot bundles: what a method sees of a set of samples (features, targets, positions, extras).

Building a bundle for prediction (``with_targets=False``) never touches the samples' counts or
anything derived from them (cell-type proportions), so a method cannot read test expression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from he2st.data.embeddings import EmbedConfig, EmbeddingFile
from he2st.data.genes import GenePanel
from he2st.data.patch_rows import PatchRows
from he2st.data.patches import PatchSpec
from he2st.data.views import FIELD
from he2st.data.workspace import Workspace
from he2st.errors import He2stError

# obsm keys a predictor may see (derived from the image alone). Everything else in a sample --
# counts, cell-type proportions, any user-added obsm -- is withheld from spots being predicted.
IMAGE_DERIVED: tuple[str, ...] = ()

# count-derived per-spot annotations that methods may train on (CarHE's cell-type modality)
TRAINING_EXTRAS: tuple[str, ...] = ("celltype_major",)


def shared_extras(samples) -> tuple[str, ...]:
    """The :data:`TRAINING_EXTRAS` that every one of ``samples`` (Sample objects) carries in obsm."""
    return tuple(k for k in TRAINING_EXTRAS if all(k in s.adata.obsm for s in samples))


@dataclass
class SpotSet:
    """Per-spot arrays aligned row by row."""

    sample_ids: np.ndarray  # (N,) sample of each spot
    barcodes: np.ndarray  # (N,)
    features: np.ndarray  # (N, D) frozen image embeddings
    coords_um: np.ndarray  # (N, 2) spot centres in µm (for neighbourhoods)
    genes: list[str]
    targets: np.ndarray | None = None  # (N, G) panel targets; None when predicting
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. cell-type proportions
    patches: np.ndarray | PatchRows | None = None  # (N, H, W, 3) uint8 for end-to-end training (PatchRows: on disk)
    tokens: np.ndarray | None = None  # (N, T, C) spatial tokens, for token-level methods
    views: dict[str, np.ndarray] = field(default_factory=dict)  # view name -> (N, D_view) (he2st.data.views)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, mask: np.ndarray) -> SpotSet:
        """Rows selected by a boolean mask or index array."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[mask]

        return replace(
            self, sample_ids=self.sample_ids[mask], barcodes=self.barcodes[mask], features=self.features[mask],
            coords_um=self.coords_um[mask], targets=pick(self.targets),
            extras={k: v[mask] for k, v in self.extras.items()}, patches=pick(self.patches), tokens=pick(self.tokens),
            views={k: v[mask] for k, v in self.views.items()},
        )

    @staticmethod
    def concat(sets: Sequence[SpotSet]) -> SpotSet:
        """Stack spot sets with the same genes (optional arrays, extras and views kept only if every set has them;
        patches stay unread when every set's are :class:`PatchRows`, else all are read)."""
        def cat(name: str) -> np.ndarray | PatchRows | None:
            arrays = [getattr(s, name) for s in sets]
            if any(a is None for a in arrays):
                return None
            if all(isinstance(a, PatchRows) for a in arrays):
                return PatchRows.concat(arrays)  # still unread
            return np.concatenate([np.asarray(a) for a in arrays])

        keys = set.intersection(*(set(s.extras) for s in sets)) if sets else set()
        views = set.intersection(*(set(s.views) for s in sets)) if sets else set()
        return SpotSet(
            sample_ids=cat("sample_ids"), barcodes=cat("barcodes"), features=cat("features"),
            coords_um=cat("coords_um"), genes=list(sets[0].genes), targets=cat("targets"),
            extras={k: np.concatenate([s.extras[k] for s in sets]) for k in sorted(keys)},
            patches=cat("patches"), tokens=cat("tokens"),
            views={k: np.concatenate([s.views[k] for s in sets]) for k in sorted(views)},
        )

    def without_expression(self) -> SpotSet:
        """The same spots with every expression-derived array removed (what a predictor may see)."""
        return replace(self, targets=None, extras={k: v for k, v in self.extras.items() if k in IMAGE_DERIVED})


def load_spots(
    workspace: Workspace,
    sample_ids: Sequence[str],
    patch: PatchSpec,
    embed: EmbedConfig,
    panel: GenePanel,
    with_targets: bool,
    extras: Sequence[str] = (),
    with_patches: bool = False,
    with_tokens: bool = False,
    views: Sequence[str] = (FIELD,),
) -> SpotSet:
    """Assemble a :class:`SpotSet` from a prepared work folder and its embedding files
    (``with_tokens``: also the cached token grids, for token-level methods). Each of ``views``
    (:mod:`he2st.data.views`) comes along when every sample has it; a method reading one that is
    missing names the command that makes it. ``with_patches``: the patches as :class:`PatchRows`, read
    from the caches a batch at a time."""
    parts: dict[str, list] = {k: [] for k in ("sid", "bc", "feat", "xy", "y", "patch", "tok")}
    extra_parts: dict[str, list] = {k: [] for k in extras}
    view_parts: dict[str, list] = {k: [] for k in dict.fromkeys(views)}
    for sid in sample_ids:
        sample = workspace.load_sample(sid)
        emb = EmbeddingFile(workspace.embedding_path(embed, sid, patch))
        if emb.barcodes != list(sample.adata.obs_names):
            raise He2stError(f"embeddings of {sid} do not match its spots; re-run `he2st embed`", emb.path)
        parts["sid"].append(np.full(sample.n_spots, sid, dtype=object))
        parts["bc"].append(np.asarray(sample.adata.obs_names, dtype=object))
        parts["feat"].append(emb.embeddings.astype(np.float32))
        parts["xy"].append(sample.spatial * sample.pixel_size_um)
        if with_targets:
            parts["y"].append(panel.targets(sample.adata, where=workspace.sample_path(sid)))
        for key in extras:
            if not with_targets and key not in IMAGE_DERIVED:
                continue
            if key not in sample.adata.obsm:
                raise He2stError(f"sample {sid} has no obsm[{key!r}]", workspace.sample_path(sid))
            extra_parts[key].append(np.asarray(sample.adata.obsm[key], dtype=np.float32))
        if with_patches:
            rows = PatchRows.from_cache(workspace.patch_path(sid, patch))
            if len(rows) != sample.n_spots:
                raise He2stError(f"patches of {sid} do not match its spots; re-run `he2st prepare`", rows.files[0])
            parts["patch"].append(rows)
        if with_tokens:
            parts["tok"].append(emb.tokens())
        for view, found in view_parts.items():
            path = workspace.view_path(embed, sid, patch, view)
            if len(found) < len(parts["sid"]) - 1 or not path.exists():
                continue  # an earlier sample lacks the view, or this one does
            other = EmbeddingFile(path)
            if other.barcodes != emb.barcodes:
                raise He2stError(f"{view}-view embeddings of {sid} do not match its spots; re-run `he2st embed`",
                                 other.path)
            found.append(other.embeddings.astype(np.float32))
    return SpotSet(
        sample_ids=np.concatenate(parts["sid"]),
        barcodes=np.concatenate(parts["bc"]),
        features=np.concatenate(parts["feat"]),
        coords_um=np.concatenate(parts["xy"]),
        genes=list(panel.genes),
        targets=np.concatenate(parts["y"]) if with_targets else None,
        extras={k: np.concatenate(v) for k, v in extra_parts.items() if v},
        patches=PatchRows.concat(parts["patch"]) if with_patches else None,
        tokens=np.concatenate(parts["tok"]) if with_tokens else None,
        views={k: np.concatenate(v) for k, v in view_parts.items() if v and len(v) == len(sample_ids)},
    )
