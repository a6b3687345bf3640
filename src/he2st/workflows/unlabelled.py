"""Image-only spots for methods that learn from histology alone (CarHE's histology transfer).

Their images join the fit; their counts are never read, so any slide may take part -- the held-out slides
of a benchmark fold included (``'test'``), as CarHE's transfer to unlabelled target tissue intends.
"""

from __future__ import annotations

from collections.abc import Sequence

from he2st.data.embeddings import EmbedConfig
from he2st.data.genes import GenePanel
from he2st.data.patches import PatchSpec
from he2st.data.spots import SpotSet, load_spots
from he2st.data.workspace import Workspace
from he2st.errors import He2stError

HELD_OUT = "test"  # stands for the fold's held-out samples


def unlabelled_ids(names: Sequence[str], ws: Workspace, held_out: Sequence[str] | None = None) -> list[str]:
    """The prepared samples ``names`` stands for (``'test'``: ``held_out``, when there are held-out samples);
    one line naming any that is not prepared."""
    if HELD_OUT in names and held_out is None:
        raise He2stError("unlabelled: 'test' stands for a benchmark fold's held-out samples; name prepared "
                         "samples here", ws.root)
    ids = list(dict.fromkeys(s for name in names for s in (held_out if name == HELD_OUT else [name])))
    unknown = sorted(set(ids) - set(ws.sample_ids()))
    if unknown:
        raise He2stError(f"unlabelled names samples that are not prepared here: {', '.join(unknown)}", ws.root)
    return ids


def unlabelled_spots(ws: Workspace, ids: Sequence[str], patch: PatchSpec, embed: EmbedConfig,
                     panel: GenePanel, views: Sequence[str]) -> SpotSet | None:
    """The samples' spots with image features, the ``views`` a method reads, and positions only (no
    expression), or None for none."""
    if not ids:
        return None
    return load_spots(ws, list(ids), patch, embed, panel, with_targets=False, views=views)
