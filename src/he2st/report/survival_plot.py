"""Kaplan-Meier curves of predicted risk groups (``he2st survival``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from he2st.errors import He2stError
from he2st.evaluate.survival import patient_index
from he2st.report.plots import save_figure


def draw_km(time: np.ndarray, event: np.ndarray, high: np.ndarray, path: str | Path, logrank_p: float,
            patients: np.ndarray | None = None) -> Path:
    """Kaplan-Meier estimates (lifelines) for the high- and low-risk groups, with the log-rank p-value.

    With ``patients`` (one per row) each patient counts once, as in the log-rank test: a patient's slides
    share one outcome and one group."""
    try:
        from lifelines import KaplanMeierFitter
    except ImportError as exc:
        raise He2stError("Kaplan-Meier curves need lifelines: pip install 'he2st[survival]'") from exc
    if patients is not None:
        first = patient_index(patients)[0]
        time, event, high = np.asarray(time)[first], np.asarray(event)[first], np.asarray(high)[first]
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, members, colour in (("low risk", ~high, "tab:blue"), ("high risk", high, "tab:red")):
        if not members.any():  # risks tied at the median leave one group empty: nothing to draw for it
            continue
        fitter = KaplanMeierFitter().fit(time[members], event[members])
        steps = fitter.survival_function_.index.to_numpy()
        band = fitter.confidence_interval_survival_function_.to_numpy()
        ax.step(steps, fitter.survival_function_.iloc[:, 0], where="post", color=colour,
                label=f"{label} (n={int(members.sum())})")
        ax.fill_between(steps, band[:, 0], band[:, 1], step="post", color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("time")
    ax.set_ylabel("event-free probability")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title(f"out-of-fold Cox risk, median split (log-rank p = {logrank_p:.2g})")
    return save_figure(fig, path)
