"""The layout of a he2st work folder, in one place.

``samples/<id>.h5ad`` prepared samples; ``patches/<id>__<spec>.h5`` patch caches;
``folds/<scheme>.json`` fold definitions; ``embeddings/<encoder>/<id>__<spec>.h5`` (and the spot's
other views, :mod:`he2st.data.views`, beside them);
``encoders/<encoder>__adapted-<recipe>.pt`` encoder weights adapted on the patches (``he2st adapt``);
``models/<method>.pt`` checkpoints; ``runs/<name>/`` results. Every path is checked to stay inside the
work folder (:func:`he2st.io.inside`), whatever the ids it is built from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from he2st.data.embeddings import EmbedConfig
from he2st.data.patches import PatchSpec, patch_cache_path
from he2st.data.splits import Fold
from he2st.data.views import ADAPTED, adapted_recipe, view_embed, view_patch, view_tiles
from he2st.errors import He2stError
from he2st.io import inside, path_kind, safe_name, write_text_atomic

if TYPE_CHECKING:
    from he2st.data.sample import Sample

WORK_DIR_ENV = "HE2ST_WORK_DIR"


def default_work_dir() -> Path:
    """Where prepared samples, patches, embeddings and runs go: ``$HE2ST_WORK_DIR`` or ``./he2st-work``."""
    # an empty variable is unset (not the current folder); ``~`` is the home folder, as a shell would read it
    return Path(os.environ.get(WORK_DIR_ENV) or "he2st-work").expanduser()


class Workspace:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def sample_path(self, sample_id: str) -> Path:
        return self._inside(self.root / "samples" / f"{safe_name(sample_id, 'sample id')}.h5ad")

    def sample_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "samples").glob("*.h5ad") if not p.name.startswith("."))

    def load_sample(self, sample_id: str) -> Sample:
        from he2st.data.sample import Sample  # anndata is imported only where a sample is loaded

        return Sample.load(self.prepared_sample_path(sample_id))

    def prepared_sample_path(self, sample_id: str) -> Path:
        """The file of a prepared sample; one line listing the prepared ones when it is not there."""
        path = self.sample_path(sample_id)
        if path_kind(path) == "missing":  # a link loop, a folder, ...: the reader names what it is
            known = ", ".join(self.sample_ids()) or "none"
            raise He2stError(f"sample {sample_id!r} is not prepared here (prepared: {known}); run `he2st prepare`", path)
        return path

    def patch_path(self, sample_id: str, spec: PatchSpec) -> Path:
        return self._inside(patch_cache_path(self.root, sample_id, spec))

    def patched_sample_ids(self, spec: PatchSpec) -> list[str]:
        """Samples with a patch cache cut with ``spec`` (whether or not their prepared sample is still here)."""
        suffix = f"__{spec.key}.h5"
        return sorted(p.name[: -len(suffix)] for p in (self.root / "patches").glob(f"*{suffix}")
                      if not p.name.startswith("."))

    def adapted_weights_path(self, encoder: str, recipe: str) -> Path:
        """Weights of ``encoder`` adapted by the recipe whose checksum starts with ``recipe``: one file per recipe,
        so embeddings made with one are never mistaken for another's."""
        name = f"{_safe_encoder(encoder)}__adapted-{safe_name(recipe, 'recipe')}.pt"
        return self._inside(self.root / "encoders" / name)

    def adapted_weights(self, encoder: str, recipe: str = "") -> Path:
        """The file of ``encoder``'s adapted weights an adapted view embeds with: for ``adapted`` (``recipe``
        '') the one file here, for ``adapted-<recipe>`` the one whose recipe checksum starts with ``recipe``;
        else one error line: none (adapt first) or several (which one is meant cannot be guessed)."""
        folder = self.root / "encoders"
        view = f"{ADAPTED}-{recipe}" if recipe else ADAPTED
        pattern = f"{_safe_encoder(encoder)}__adapted-{safe_name(recipe, 'recipe') if recipe else ''}*.pt"
        found = sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))
        if not found:
            raise He2stError(f"view '{view}': no adapted weights of {encoder} here"
                             f"{f' with recipe {recipe}' if recipe else ''}; run `he2st adapt -w {self.root} "
                             f"--encoder {encoder}` first", folder)
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise He2stError(f"view '{view}': {len(found)} adapted weights of {encoder} here ({names}); name one "
                             f"as 'adapted-<recipe>' (each file's name ends with its recipe) or remove the others",
                             folder)
        return self._inside(found[0])

    def folds_path(self, scheme: str) -> Path:
        return self._inside(self.root / "folds" / f"{safe_name(scheme, 'fold scheme')}.json")

    def save_folds(self, scheme: str, folds: list[Fold], patients: dict[str, str]) -> Path:
        payload = {"scheme": scheme, "patients": patients, "folds": [f.model_dump() for f in folds]}
        path = self.folds_path(scheme)
        write_text_atomic(path, json.dumps(payload, indent=1))
        return path

    def load_folds(self, scheme: str) -> tuple[list[Fold], dict[str, str]]:
        path = self.folds_path(scheme)
        if not path.exists():
            raise He2stError("folds not prepared; run `he2st prepare` (folds need samples of at least 2 patients, "
                             "or 2 samples for loso)", path)
        try:
            payload = json.loads(path.read_text())
            return [Fold(**f) for f in payload["folds"]], dict(payload["patients"])
        except (ValueError, KeyError, TypeError) as exc:
            raise He2stError(f"not a valid folds file ({type(exc).__name__}); re-run `he2st prepare`", path) from exc

    def embedding_path(self, embed: EmbedConfig, sample_id: str, spec: PatchSpec, tiles: int = 1) -> Path:
        """One file per (encoder, weights, stain, TTA, precision, token grid, tiles) recipe, so recipes never
        overwrite each other."""
        safe = embed.encoder.replace("/", "_").replace(":", "_")
        tags = [f"{k}-{v}" for k, v in (("stain", embed.stain), ("tta", embed.tta), ("precision", embed.precision))
                if v not in ("none", "auto")]
        if embed.token_grid:
            tags.append(f"tokens-{embed.token_grid}")
        if tiles > 1:
            tags.append(f"tiles-{tiles}")
        if embed.weights is not None:
            tags.append("w-" + hashlib.sha1(str(Path(embed.weights).resolve()).encode()).hexdigest()[:8])
        name = "__".join([safe_name(sample_id, "sample id"), spec.key, *tags]) + ".h5"
        return self._inside(self.root / "embeddings" / safe / name)

    def view_config(self, embed: EmbedConfig, view: str) -> EmbedConfig:
        """The embedding recipe of one view of the spots embedded with ``embed`` (an adapted view's weights are
        those :meth:`adapted_weights` finds)."""
        recipe = adapted_recipe(view)
        return view_embed(embed, view, self.adapted_weights(embed.encoder, recipe) if recipe is not None else None)

    def view_path(self, embed: EmbedConfig, sample_id: str, spec: PatchSpec, view: str) -> Path:
        """The embedding file of one view (:mod:`he2st.data.views`) of a sample's spots embedded with ``embed``
        from ``spec`` patches."""
        return self.embedding_path(self.view_config(embed, view), sample_id, view_patch(spec, view), view_tiles(view))

    def run_dir(self, name: str) -> Path:
        return self._inside(self.root / "runs" / safe_name(name, "run name"))

    def _inside(self, path: Path) -> Path:
        return inside(self.root, path, "work-folder path")


def _safe_encoder(encoder: str) -> str:
    """An encoder name as a file-name part (a timm or hub name may hold ``/`` and ``:``)."""
    return safe_name(encoder.replace("/", "_").replace(":", "_"), "encoder name")
