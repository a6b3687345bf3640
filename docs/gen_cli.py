"""Write the command-line reference (``reference/cli.md``) from the command definitions at build time.

Run by ``mkdocs-gen-files`` during ``mkdocs build``: it walks the typer app ``he2st.cli.app`` as a
command tree (``typer.main.get_command``) and renders each command's usage, help and options. Nothing here
is copied by hand, so the page changes whenever a command or option does. Typer's command objects follow
click's interface (``get_params``, ``list_commands``, ``context_class``); they are used by that interface
only, whichever click implementation typer ships.
"""

from __future__ import annotations

import re
from typing import Any

import mkdocs_gen_files
import typer.main

from he2st.cli import app

PAGE = "reference/cli.md"


def _escape(text: str) -> str:
    """Markdown-safe prose: outside code spans ``<``/``>`` become entities (else they read as HTML tags) and
    ``[``/``]`` too (else ``[required]`` reads as a cross-reference)."""
    table = str.maketrans({"<": "&lt;", ">": "&gt;", "[": "&#91;", "]": "&#93;"})
    return "".join(p if p.startswith("`") else p.translate(table) for p in re.split(r"(`[^`]*`)", text))


def _help(text: str | None) -> str:
    """A command's help as paragraphs: click's ``\\b`` markers dropped, lines within a paragraph joined."""
    if not text:
        return ""
    paragraphs = [" ".join(line.strip() for line in block.splitlines() if line.strip() != "\b")
                  for block in re.split(r"\n\s*\n", text.strip())]
    return "\n\n".join(_escape(p) for p in paragraphs if p)


def _row(param: Any, ctx: Any) -> str:
    """One option or argument as ``--help`` shows it: names with metavar, help with default/required."""
    record = param.get_help_record(ctx)
    if record is None or param.name == "help":
        return ""
    names, help_text = record
    kind = "" if param.param_type_name == "option" else " (argument)"
    help_text = _escape(" ".join(help_text.split())).replace("|", "&#124;")
    return f"| `{names}`{kind} | {help_text} |"


def _command(cmd: Any, ctx: Any, level: int) -> list[str]:
    lines = [f"{'#' * level} `{ctx.command_path}`", "", _help(cmd.help), "",
             "```text", cmd.get_usage(ctx), "```", ""]
    params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)]
    if params:
        rows = [r for r in (_row(p, ctx) for p in params) if r]
        lines += ["| argument / option | meaning |", "| --- | --- |", *rows, ""]
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                lines += _command(sub, sub.context_class(sub, info_name=name, parent=ctx), min(level + 1, 3))
    return lines


def render() -> str:
    root = typer.main.get_command(app)
    head = ["# Command line", "",
            "Generated from the command definitions (`he2st.cli`) when the documentation is built; "
            "`he2st COMMAND --help` prints the same. Options mean the same in every command: `-w/--work-dir` is "
            "the work folder, `-c/--config` a YAML file of the command's settings and `--set key=value` one "
            "setting (precedence: defaults < `--config` < `--set` < flags); `--out` is a file for `train` (the "
            "checkpoint) and a folder everywhere else. Bad input stops with one line `error: <file>: <problem>` "
            "and exit status 2.", ""]
    return "\n".join(head + _command(root, root.context_class(root, info_name="he2st"), 2)) + "\n"


with mkdocs_gen_files.open(PAGE, "w") as fh:
    fh.write(render())
mkdocs_gen_files.set_edit_path(PAGE, "gen_cli.py")
