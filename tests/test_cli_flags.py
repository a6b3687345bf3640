"""Flags mean the same in every command: ``--model`` is a checkpoint, ``--out`` an output folder (a checkpoint
file for ``train`` only), ``--samples`` is accepted wherever ``--sections`` is."""

from __future__ import annotations

import typer

from he2st.cli import app


def commands() -> dict:
    """Every command by its full name (typer's own click, so no isinstance checks on click classes)."""
    found, todo = {}, [("", typer.main.get_command(app))]
    while todo:
        prefix, group = todo.pop()
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                todo.append((f"{prefix}{name} ", command))
            else:
                found[f"{prefix}{name}"] = command
    return found


def option(command, flag: str):
    return next((p for p in command.params if p.param_type_name == "option" and flag in p.opts), None)


def test_flags_mean_the_same_in_every_command():
    every = commands()
    assert {"train", "evaluate", "predict", "tls", "stack", "survival", "report", "plot"} <= set(every)
    for name, command in every.items():
        model = option(command, "--model")
        if model is not None:
            assert "checkpoint" in model.help and "-m" in model.opts, name
        out = option(command, "--out")
        if out is not None:
            assert "-o" in out.opts, name
            expected = "checkpoint file" if name == "train" else "output folder"
            assert out.help.startswith(expected), (name, out.help)
        if option(command, "--sections") is not None:
            assert "--samples" in option(command, "--sections").opts, name
    tls = every["tls"]
    assert option(tls, "--model") is None and "TLS gene model" in option(tls, "--signature").help
    for name in ("stack", "survival", "predict", "tls", "report", "plot", "evaluate"):
        assert not option(every[name], "--out").required, name


def test_help_states_the_defaults_the_settings_have():
    """Defaults written into help texts (the CLI module does not import the settings, to start fast) are
    the settings' own, and no help hides one in square brackets, which the help's markup would drop."""
    from rich.markup import RE_TAGS

    from he2st.workflows.config import BenchmarkConfig

    every = commands()
    methods = option(every["benchmark"], "--methods").help
    assert methods.endswith(f"(default: {', '.join(BenchmarkConfig.model_fields['methods'].default_factory())})")
    assert BenchmarkConfig.model_fields["folds"].default_factory().scheme == "lopo"
    assert "lopo (leave one patient out, the default)" in option(every["benchmark"], "--folds").help
    for name, command in every.items():
        for param in command.params:
            assert not RE_TAGS.search(getattr(param, "help", None) or ""), (name, param.name, param.help)
