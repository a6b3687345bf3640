"""The house's floors, checked on every run: import-linter's contracts in pyproject.toml (imports point
down only; no cycle between the modules of any package), counting imports inside functions too."""

from __future__ import annotations

from pathlib import Path

from importlinter import cli

REPO = Path(__file__).resolve().parents[1]


def test_imports_point_down_the_floors_and_form_no_cycles():
    assert cli.lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True) == 0


def test_every_method_is_registered_with_its_ablations_beside_it():
    from he2st.methods import list_methods, method_class

    assert {"bleep", "bleep_faithful", "cmrcnet", "nh2st", "carhe", "ridge", "ridge_cv", "mlp", "knn"} <= set(
        list_methods())
    for name in list_methods():
        cls = method_class(name)
        assert cls.name == name and isinstance(cls.ablations, dict)
