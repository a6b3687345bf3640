"""Run the ``he2st`` console entry point inside the test process (no interpreter start-up per call).

It goes through ``he2st.cli.main`` exactly as the installed command does -- one ``error:`` line and exit
code 2 for bad input, ``warning:`` lines -- and returns what a subprocess run would.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import warnings


def run_cli(*args: str) -> subprocess.CompletedProcess:
    from he2st.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, show = sys.argv, warnings.showwarning
    code = 0
    try:
        sys.argv = ["he2st", *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")  # every run warns afresh, as a new process would
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, warnings.showwarning = argv, show
    return subprocess.CompletedProcess(["he2st", *args], code, out.getvalue(), err.getvalue())
