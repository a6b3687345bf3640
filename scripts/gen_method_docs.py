"""Regenerate the generated parts of docs/methods/ from the code: each page's option table (between
``<!-- options:start -->`` and ``<!-- options:end -->``, from the method's Config) and the index's table of
methods (between ``<!-- methods:start -->`` and ``<!-- methods:end -->``, from the registry).

    python scripts/gen_method_docs.py          # rewrite the tables
    python scripts/gen_method_docs.py --check  # exit 1, naming the stale pages, if a table is out of date

Reads the options without importing torch. tests/test_option_docs.py fails when a table is stale.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from he2st.methods.registry import METHODS, list_methods, method_config, method_summary  # noqa: E402

FOLDER = REPO / "docs" / "methods"
OPTIONS = ("<!-- options:start -->", "<!-- options:end -->")
INDEX = ("<!-- methods:start -->", "<!-- methods:end -->")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value: object) -> str:
    """A default as it is written in YAML / ``--set`` (JSON is valid YAML)."""
    return f"`{_cell(json.dumps(value, ensure_ascii=False))}`"


def option_rows(config: type[BaseModel], values: BaseModel, prefix: str = "") -> list[str]:
    """One table row per option; the options of a nested model (``train``) follow as ``train.<option>``."""
    rows = []
    for name, info in config.model_fields.items():
        value = getattr(values, name)
        if isinstance(value, BaseModel) and inspect.isclass(info.annotation):
            rows.append(f"| `{prefix}{name}` | | {_cell(info.description or '')} |")
            rows += option_rows(type(value), value, f"{prefix}{name}.")
        else:
            dumped = values.model_dump(mode="json", include={name})[name]
            rows.append(f"| `{prefix}{name}` | {_default(dumped)} | {_cell(info.description or '')} |")
    return rows


def options_table(name: str) -> str:
    config = method_config(name)
    note = (" Setting `train.<option>` replaces the whole `train` block: its other options then take the "
            "defaults of the training block, not this method's." if "train" in config.model_fields else "")
    lines = [f"`he2st methods {name}` prints the same; set any of them with "
             f"`--set method_options.{name}.<option>=<value>`.{note}", "",
             "| option | default | what it does |", "| --- | --- | --- |", *option_rows(config, config())]
    return "\n".join(lines)


def index_table() -> str:
    lines = ["| method | what it is | fit s / 1,000 spots |", "| --- | --- | --- |"]
    lines += [f"| [`{name}`]({name}.md) | {_cell(method_summary(name))} | {_cost(name)} |" for name in list_methods()]
    return "\n".join(lines)


def _cost(name: str) -> str:
    """A method's listed fitting cost (the registry's, measured by benchmarks/method_costs.py); the ensemble's
    is the sum of what it fits, so it is not listed."""
    return "" if name == "ensemble" else f"{METHODS[name].cost:g}"


def _replace(text: str, markers: tuple[str, str], body: str, page: Path) -> str:
    start, end = markers
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page}: markers {start} ... {end} not found")
    return pattern.sub(lambda _: f"{start}\n{body}\n{end}", text, count=1)


def generated(folder: Path = FOLDER) -> dict[Path, str]:
    """Every page's text with its generated table brought up to date (missing pages are an error)."""
    pages = {}
    index = folder / "index.md"
    for page, markers, body in [(index, INDEX, index_table())] + [
            (folder / f"{name}.md", OPTIONS, options_table(name)) for name in list_methods()]:
        if not page.exists():
            raise FileNotFoundError(page)
        pages[page] = _replace(page.read_text(encoding="utf-8"), markers, body, page)
    return pages


def stale_pages(folder: Path = FOLDER) -> list[str]:
    """Names of the pages whose generated table differs from the code (or that are missing)."""
    try:
        pages = generated(folder)
    except FileNotFoundError as exc:
        return [Path(str(exc)).name]
    return [page.name for page, text in pages.items() if page.read_text(encoding="utf-8") != text]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale pages (exit 1 if any)")
    opts = parser.parse_args()
    if opts.check:
        stale = stale_pages()
        if stale:
            raise SystemExit(f"stale: {', '.join(stale)} (run python scripts/gen_method_docs.py)")
        print("docs/methods: up to date")
        return
    for page, text in generated().items():
        if page.read_text(encoding="utf-8") != text:
            page.write_text(text, encoding="utf-8")
            print(f"updated {page.relative_to(REPO)}")


if __name__ == "__main__":
    main()
