"""Extra views of each spot: more than one look at the same tissue, each embedded once and cached.

A spot's own embedding sees its patch (112 µm at 224 px by default) through one encoder. Other views
see the same spot another way, and a method's ``views`` option appends their features to the spot's:

* ``field``: the field 3x the spot's side around it (the tissue context; cut by ``he2st prepare``);
* ``tiles``: the spot patch cut into :data:`SUBSPOT_TILES` x :data:`SUBSPOT_TILES` sub-spot tiles, each
  enlarged to the encoder's input (cell scale: 0.25 µm/px for the default patch) and their embeddings
  averaged, so the view does not depend on the tissue's orientation;
* ``adapted``: the spot patches through the run's own encoder with the weights ``he2st adapt`` adapted to
  the work folder's H&E (:meth:`he2st.data.workspace.Workspace.adapted_weights` finds them), so the
  ensemble's nested selection can choose adapted features per dataset; ``adapted-<recipe>`` names one of
  several adaptations (the recipe checksum in its file name), so the selection can choose among recipes;
* any other name: an encoder (``efficientnet_lite1``, a foundation model) run on the same spot patches.

Each view lives in an embedding file beside the spot's (:meth:`he2st.data.workspace.Workspace.view_path`),
made by ``he2st embed`` (``embed.views``; the field whenever it was cut).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from he2st.data.embeddings import EmbedConfig
from he2st.data.patches import PatchSpec

FIELD = "field"
TILES = "tiles"
ADAPTED = "adapted"
SUBSPOT_TILES = 2  # tiles per side of the tiles view


def adapted_recipe(view: str) -> str | None:
    """The recipe an adapted view names: '' for ``adapted`` (the one adaptation of the work folder), the
    checksum prefix for ``adapted-<recipe>``, None for a view that is not adapted."""
    if view == ADAPTED:
        return ""
    if view.startswith(ADAPTED + "-"):
        return view[len(ADAPTED) + 1 :]
    return None


def is_encoder_view(view: str) -> bool:
    """Whether ``view`` is embedded by an encoder of its own, not the spot's (an encoder's name, or the spot's
    encoder with adapted weights): anything but the field and the tiles."""
    return view not in (FIELD, TILES)


def view_patch(patch: PatchSpec, view: str) -> PatchSpec:
    """The patch cache a view is embedded from: the context field for ``field``, else the spot patches."""
    return patch.context_field() if view == FIELD else patch


def view_embed(embed: EmbedConfig, view: str, adapted: Path | None = None) -> EmbedConfig:
    """The embedding recipe of a view: the spot's (the field's keeps its token grid, as it always had), with
    an encoder view's own encoder and preset weights, or for ``adapted`` the spot's encoder with the
    ``adapted`` weights file (its path names the view's embedding files, so one adaptation's embeddings are
    never read as another's); no view has views of its own."""
    if view == FIELD:
        return embed
    update: dict = {"token_grid": 0, "views": []}
    if adapted_recipe(view) is not None:
        if adapted is None:
            raise ValueError("the adapted view needs the adapted weights file")
        update["weights"] = adapted
    elif is_encoder_view(view):
        update |= {"encoder": view, "weights": None}
    return embed.model_copy(update=update)


def view_tiles(view: str) -> int:
    """Tiles per side a view cuts each patch into (1: the whole patch)."""
    return SUBSPOT_TILES if view == TILES else 1


def describe(view: str) -> str:
    """A view in words, for messages."""
    if view == FIELD:
        return "the context field around each spot"
    if view == TILES:
        return "the sub-spot tiles of each spot"
    recipe = adapted_recipe(view)
    if recipe is not None:
        named = f" (recipe {recipe})" if recipe else ""
        return f"each spot's embedding by the encoder adapted with `he2st adapt`{named}"
    return f"each spot's {view} embedding"


def how_to_make(view: str) -> str:
    """The command that makes a view's embeddings (for the error line of a method missing it)."""
    if view == FIELD:
        return "prepare with context_field on (the default) and re-run `he2st embed`"
    if adapted_recipe(view) is not None:
        return f"run `he2st adapt`, then `he2st embed --set 'embed.views=[{view}]'`"
    return f"run `he2st embed --set 'embed.views=[{view}]'`"


def tile_patches(patches: np.ndarray, tiles: int) -> np.ndarray:
    """uint8 patches ``(B, H, W, 3)`` -> their ``tiles`` x ``tiles`` sub-patches ``(B * tiles², H // tiles,
    W // tiles, 3)``, patch by patch in row-major order (a remainder row/column of pixels is left out)."""
    patches = np.asarray(patches)
    b, h, w, c = patches.shape
    th, tw = h // tiles, w // tiles
    cut = patches[:, : th * tiles, : tw * tiles]
    return np.ascontiguousarray(
        cut.reshape(b, tiles, th, tiles, tw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * tiles * tiles, th, tw, c))
