"""The flat Python API: the README's snippet runs as written, on real her2st sections."""

from __future__ import annotations

import re
from pathlib import Path

import anndata as ad
import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_public_names_resolve_lazily():
    import he2st

    for name in he2st.__all__:
        assert getattr(he2st, name) is not None, name
    with pytest.raises(AttributeError):
        he2st.not_a_function  # noqa: B018


@pytest.mark.slow
def test_readme_python_snippet_runs(her2st, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_snippet(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert "knn" in namespace["outcome"].table and "ridge" in namespace["outcome"].table
    assert namespace["method"].card.training_samples == {"A1": "A", "B4": "B"}
    pred = ad.read_h5ad(namespace["h5ad"])
    c3 = namespace["he2st"].read_sample("W/samples/C3.h5ad")
    assert pred.n_obs == c3.n_spots and pred.uns["he2st"]["target_transform"] == "log1p_cp10k"
    assert "knn" in capsys.readouterr().out  # the printed benchmark table
