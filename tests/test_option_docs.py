"""Every option says in one short line what it does; ``he2st methods`` prints them whole; the method pages'
option tables are the code's; the registry's table names exactly the decorated method classes."""

from __future__ import annotations

import importlib.util
import inspect
import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from he2st.methods.registry import METHODS, list_methods, method_class, method_config, summary_of
from he2st.predict.config import PredictConfig
from he2st.workflows.config import AdaptRunConfig, BenchmarkConfig, EmbedRunConfig, PrepareConfig, TrainRunConfig

REPO = Path(__file__).resolve().parents[1]
MAX_CHARS = 120
# SampleSource (he2st.data.readers) documents each reader's options with its reader
NOT_WALKED: set[str] = set()


def models_in(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``TrainConfig``, ``list[SampleSource] | None``, ...)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is not None or isinstance(annotation, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]
    return []


def options(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str | None]]:
    """(dotted name, description) of every field of ``model`` and of the models nested in it."""
    found = []
    for name, info in model.model_fields.items():
        found.append((f"{model.__name__}.{prefix}{name}", info.description))
        for nested in models_in(info.annotation):
            if nested.__name__ not in NOT_WALKED:
                found += options(nested, f"{prefix}{name}.")
    return found


CONFIGS = [method_config(name) for name in list_methods()] + [
    PrepareConfig, EmbedRunConfig, AdaptRunConfig, BenchmarkConfig, TrainRunConfig, PredictConfig]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_option_says_in_one_short_line_what_it_does(config):
    for name, description in options(config):
        assert description, f"{name} has no description"
        assert len(description) <= MAX_CHARS, f"{name}: {len(description)} characters"
        assert "\n" not in description, f"{name} spans several lines"
        assert not re.search(r"\bstop \d+", description), f"{name} tells history"


def test_the_registry_table_names_exactly_the_decorated_classes():
    """``he2st methods`` reads METHODS without importing torch; the classes registered by ``@register_method``
    must be the ones it names, with the same options class and summary."""
    from he2st.methods import registry

    for name in list_methods():
        cls = method_class(name)
        assert cls.name == name and cls.__module__ == METHODS[name].module
        assert cls.Config is method_config(name)
        assert summary_of(cls) == METHODS[name].summary and len(METHODS[name].summary) <= MAX_CHARS
    assert set(registry._REGISTRY) == set(METHODS)


def test_methods_command_prints_every_description_whole():
    from he2st.cli import app, method_lines

    runner = CliRunner()
    listing = runner.invoke(app, ["methods"])
    assert listing.exit_code == 0
    for name in list_methods():
        assert f"{name}: {METHODS[name].summary}" in listing.output.splitlines()
    shown = runner.invoke(app, ["methods", "nh2st"])
    assert shown.exit_code == 0
    for _, info in method_config("nh2st").model_fields.items():
        assert f"      # {info.description}" in shown.output.splitlines()
    for width in (40, 72):  # wrapped for a terminal: on word boundaries only
        for name in ("bleep", "ensemble", None):
            wrapped = method_lines(name, width)
            words = {w for line in wrapped for w in line.split()}
            for line in method_lines(name):
                assert all(word in words for word in line.split()), line
            assert all(len(line) <= width or " " not in line.strip().lstrip("#").strip() for line in wrapped)


def test_method_pages_show_the_options_of_the_code():
    """docs/methods/<name>.md's option table is generated from the Config: regenerate it with
    `python scripts/gen_method_docs.py` when an option changes."""
    spec = importlib.util.spec_from_file_location("gen_method_docs", REPO / "scripts" / "gen_method_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    stale = gen.stale_pages(REPO / "docs" / "methods")
    assert not stale, f"option tables out of date in {stale}: run python scripts/gen_method_docs.py"
