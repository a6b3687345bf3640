"""Write the Python API reference (``reference/api/``) from the package's docstrings at build time.

Run by ``mkdocs-gen-files`` during ``mkdocs build``: every module under ``src/he2st`` gets a page holding
``::: <module>`` (rendered by mkdocstrings), packages their ``index.md``, and ``SUMMARY.md`` the
navigation (read by mkdocs-literate-nav). The module list is walked, not written down, so the reference
follows modules as they are added, moved or split.
"""

from __future__ import annotations

from pathlib import Path

import mkdocs_gen_files

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = Path("reference/api")

#: (module, why a user opens it) for the entry page; entries whose module is absent are skipped.
ENTRY_POINTS = [
    ("he2st.api", "the flat Python API: `prepare`, `embed`, `train`, `benchmark`, `read_sample`"),
    ("he2st.methods", "the method registry (`register_method`, `create_method`, `load_method`, `list_methods`) "
                      "and the `Method` interface"),
    ("he2st.methods.base", "`Method`, `MethodConfig`, `Prediction`: what every method implements"),
    ("he2st.methods.neural", "the `NeuralMethod` base: fit loop, validation, save/load"),
    ("he2st.methods.retrieval", "the `RetrievalMethod` base, which owns its reference bank"),
    ("he2st.data.readers", "readers from each technology's files to a `Sample`"),
    ("he2st.data.sample", "`Sample`: counts AnnData, spot centres, pixel size, lazy slide"),
    ("he2st.encoders", "encoders: `create`, `list_presets`, `Encoder`"),
    ("he2st.encoders.presets", "the encoder presets (UNI, Virchow2, H-optimus, ...)"),
    ("he2st.predict", "whole-slide prediction: `PredictConfig`, `run_prediction`"),
    ("he2st.workflows.predict_slide", "`predict_slide`, the API's one-call prediction"),
    ("he2st.evaluate", "metrics, gene sets and result tables"),
    ("he2st.workflows.config", "the run configurations behind `--config`/`--set`"),
]


def modules() -> list[tuple[str, Path, bool]]:
    """(dotted name, source file, is_package) for every public module under ``src/he2st``."""
    found = []
    for path in sorted((SRC / "he2st").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or parts[-1] == "__main__":
            continue
        found.append((".".join(parts), path, is_package))
    return found


def page_of(name: str, is_package: bool) -> Path:
    parts = name.split(".")
    return Path(*parts, "index.md") if is_package else Path(*parts[:-1], parts[-1] + ".md")


def main() -> None:
    nav = mkdocs_gen_files.Nav()
    pages = {}
    nav["Overview"] = "index.md"
    for name, source, is_package in modules():
        page = page_of(name, is_package)
        pages[name] = page
        nav[tuple(name.split("."))] = page.as_posix()
        with mkdocs_gen_files.open(ROOT / page, "w") as fh:
            fh.write(f"# `{name}`\n\n::: {name}\n    options:\n      show_root_heading: false\n")
        mkdocs_gen_files.set_edit_path(ROOT / page, Path("..") / source.relative_to(SRC.parent))
    lines = ["# Python API", "",
             "Generated from the docstrings (mkdocstrings) when the documentation is built: one page per module "
             "of `src/he2st`, in the navigation on the left. The pages a user opens first:", ""]
    for name, why in ENTRY_POINTS:
        if name in pages:
            lines.append(f"- [`{name}`]({pages[name].as_posix()}): {why}")
    lines += ["", "The package's floors (imports point down only) are described in "
              "[Contributing](../../contributing.md#how-the-code-is-laid-out).", ""]
    with mkdocs_gen_files.open(ROOT / "index.md", "w") as fh:
        fh.write("\n".join(lines))
    with mkdocs_gen_files.open(ROOT / "SUMMARY.md", "w") as fh:
        fh.writelines(nav.build_literate_nav())


main()
