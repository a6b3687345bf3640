"""The documentation: the strict site build, its navigation, the README's shape, and the version."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
#: Change-log phrasing (a numbered account of how the work went) belongs in CHANGELOG.md, never in code or docs.
CHANGE_LOG_PHRASE = re.compile(r"stop [0-9]+")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` into a fresh folder; any warning fails the build (and this fixture)."""
    pytest.importorskip("material", reason="documentation tools not installed (pip install -e '.[dev]')")
    pytest.importorskip("mkdocstrings")
    out = tmp_path_factory.mktemp("site")
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "NO_MKDOCS_2_WARNING": "1",  # a banner of the theme about MkDocs' future, not a build warning
        "DISABLE_MKDOCS_2_WARNING": "true",
    }
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                          "-d", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    warnings = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert run.returncode == 0 and not warnings, log[-4000:]
    return out


def test_the_site_builds_strictly_without_a_warning(site):
    assert (site / "index.html").is_file()
    assert (site / "reference" / "api" / "he2st" / "api" / "index.html").is_file()


def test_the_cli_reference_is_generated_for_every_command(site):
    import typer.main

    from he2st.cli import app

    page = (site / "reference" / "cli" / "index.html").read_text()
    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="he2st")
    for name in root.list_commands(ctx):
        assert f"he2st {name}" in page, name
    assert "--manifest" in page and "--devices" in page  # options, not only command names


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in _nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    return []


def test_every_registered_method_has_a_page_in_the_nav():
    from he2st.methods import list_methods

    nav = _nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])
    expected = ["methods/index.md", *(f"methods/{name}.md" for name in list_methods())]
    assert [page for page in expected if page not in nav] == []


def test_readme_is_short_and_opens_with_using_your_own_data():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 160
    assert any("own data" in line.lower() for line in lines[:45])
    text = "\n".join(lines)
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text


def test_the_project_carries_no_change_log_phrasing():
    files = [REPO / "README.md", REPO / "CHANGELOG.md",
             *(p for p in (REPO / "docs").rglob("*") if p.suffix in {".md", ".py", ".yml", ".yaml"}),
             *(REPO / "src").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"), *(REPO / "scripts").rglob("*")]
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in files for n, line in enumerate(path.read_text().splitlines(), 1)
             if CHANGE_LOG_PHRASE.search(line)]
    assert found == []


def test_package_and_project_versions_agree():
    from he2st.version import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
    assert f"## [{__version__}]" in (REPO / "CHANGELOG.md").read_text()
    assert f"version: {__version__}" in (REPO / "CITATION.cff").read_text()


@pytest.mark.parametrize("script", ["demo.sh", "test.sh"])
def test_scripts_stop_when_setup_fails(tmp_path: Path, script: str) -> None:
    """A failed install must stop the demo and the tests, not run them on a stale or broken .venv."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / script).write_text((REPO / "scripts" / script).read_text())
    (tmp_path / "scripts" / "setup.sh").write_text("echo 'error: install failed' >&2\nexit 1\n")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    for name in ("he2st", "python"):
        (venv / name).write_text("#!/usr/bin/env bash\necho RAN\n")
        (venv / name).chmod(0o755)
    done = subprocess.run(["bash", str(tmp_path / "scripts" / script)], capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "RAN" not in done.stdout
