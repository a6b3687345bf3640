"""Marker genes scored by default: one documented list per registered dataset.

A benchmark whose ``markers`` setting is left unset scores the default list of its training samples'
dataset as the ``markers`` gene set. The list is fixed in advance (never chosen on data), so the set
is the same for every method and fold; only genes outside a fold's panel are dropped, with a note,
because no method predicts them. A list the user gives is kept whole or refused
(:func:`~he2st.evaluate.gene_sets.build_gene_sets`).

her2st's default is PAM50 (Parker et al. 2009, J Clin Oncol 27:1160-1167), the 50-gene classifier of
the breast-cancer intrinsic subtypes, which include HER2-enriched tumours (ERBB2, GRB7), luminal
(ESR1, PGR, FOXA1, ...), basal (KRT5, KRT14, KRT17, ...) and proliferation genes. The gene-prediction
papers he2st compares with publish no breast-cancer marker list he2st could check, so none of theirs
is claimed here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["DEFAULT_MARKERS", "MARKER_SOURCES", "PAM50", "fold_markers"]

#: PAM50 (Parker et al. 2009), current HGNC symbols (ORC6L is ORC6, KNTC2 is NDC80, CDCA1 is NUF2)
PAM50 = (
    "ACTR3B", "ANLN", "BAG1", "BCL2", "BIRC5", "BLVRA", "CCNB1", "CCNE1", "CDC20", "CDC6",
    "CDH3", "CENPF", "CEP55", "CXXC5", "EGFR", "ERBB2", "ESR1", "EXO1", "FGFR4", "FOXA1",
    "FOXC1", "GPR160", "GRB7", "KIF2C", "KRT14", "KRT17", "KRT5", "MAPT", "MDM2", "MELK",
    "MIA", "MKI67", "MLPH", "MMP11", "MYBL2", "MYC", "NAT1", "NDC80", "NUF2", "ORC6",
    "PGR", "PHGDH", "PTTG1", "RRM2", "SFRP1", "SLC39A6", "TMEM45B", "TYMS", "UBE2C", "UBE2T",
)
#: registered dataset -> its default marker genes
DEFAULT_MARKERS: dict[str, tuple[str, ...]] = {"her2st": PAM50}
MARKER_SOURCES = {"her2st": "PAM50: Parker et al. 2009, J Clin Oncol 27:1160, breast-cancer intrinsic subtypes"}


def fold_markers(given: Sequence[str] | None, datasets: Iterable[str | None],
                 panel: Sequence[str]) -> tuple[list[str] | None, str]:
    """The ``markers`` set of a fold and a note on how it was chosen.

    ``given`` (the ``markers`` setting) is returned as it is: every gene must then be in the panel, and
    an empty list means no markers set. Unset, the default list of ``datasets`` (the fold's training
    samples' datasets) is used when they are all one dataset that has one, restricted to ``panel``;
    a dataset without a list, or a fold of several datasets, gets no markers set."""
    if given is not None:
        return (list(given) or None), ("" if given else "markers: none (an empty list was given)")
    names = set(datasets)
    dataset = next(iter(names)) if len(names) == 1 else None
    if dataset not in DEFAULT_MARKERS:
        return None, ""
    wanted = DEFAULT_MARKERS[dataset]
    in_panel = set(panel)
    kept = [g for g in wanted if g in in_panel]
    note = (f"markers: {dataset}'s default list ({MARKER_SOURCES[dataset]}), {len(kept)} of {len(wanted)} genes "
            f"in the fold's panel ({', '.join(kept) or 'none'}); the others are not predicted and were dropped")
    return (kept or None), note
