"""Start-up time of the commands that should answer at once: the median wall time of each over N runs.

    python benchmarks/cli_startup.py [--runs 5]

Each command runs in a fresh interpreter (``sys.executable``, the environment's ``PYTHONPATH`` kept), as
the ``he2st`` console script runs it, on a small ridge checkpoint and sample written to a temporary
folder first. Prints one line per command: ``<median s>  torch=<imported?>  he2st <args>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# sys.argv[0] is the program name typer's completion reads; 'torch' in sys.modules is reported at exit
RUN = ("import atexit, sys; sys.argv[0] = 'he2st'; "
       "atexit.register(lambda: sys.stderr.write(f\"\\ntorch={'torch' in sys.modules}\\n\")); "
       "from he2st.cli import main; main()")


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """A fitted ridge checkpoint and a sample .h5ad without an image."""
    import anndata as ad
    import numpy as np

    from he2st.data.genes import GenePanel
    from he2st.data.sample import Sample
    from he2st.data.spots import SpotSet
    from he2st.methods import create_method

    rng = np.random.default_rng(0)
    n, genes = 120, [f"G{i}" for i in range(10)]
    targets = rng.gamma(2.0, 1.0, size=(n, len(genes))).astype(np.float32)
    spots = SpotSet(sample_ids=np.repeat(np.array(["s1", "s2"], dtype=object), n // 2),
                    barcodes=np.arange(n).astype(str).astype(object),
                    features=rng.normal(size=(n, 16)).astype(np.float32), coords_um=rng.uniform(0, 2000, (n, 2)),
                    genes=genes, targets=targets)
    method = create_method("ridge", pca_components=8)
    method.panel = GenePanel(genes=genes)
    method.fit(spots)
    model = method.save(folder / "ridge.pt")
    adata = ad.AnnData(X=rng.poisson(3.0, size=(n, len(genes))).astype(np.float32))
    adata.var_names, adata.obs_names = genes, [f"spot{i}" for i in range(n)]
    adata.obsm["spatial"] = rng.uniform(0, 2000, (n, 2))
    sample = Sample("S1", "P1", adata, pixel_size_um=1.0, spot_diameter_um=55.0).save(folder / "S1.h5ad")
    return model, sample


def time_command(args: list[str], runs: int, env: dict[str, str]) -> tuple[float, bool]:
    """Median wall seconds of ``he2st <args>`` over ``runs`` fresh interpreters, and whether torch loaded."""
    seconds, torch_loaded = [], False
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", RUN, *args], env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        if done.returncode not in (0, 1):  # completion exits 1 when there is nothing to complete
            raise SystemExit(f"he2st {' '.join(args)} failed:\n{done.stderr}")
        torch_loaded |= "torch=True" in done.stderr
    return statistics.median(seconds), torch_loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (the median is printed)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, sample = write_inputs(Path(tmp))
        env = dict(os.environ, HE2ST_WORK_DIR=tmp)
        completion = dict(env, _HE2ST_COMPLETE="complete_bash", COMP_WORDS="he2st me", COMP_CWORD="1")
        commands = [(["--help"], env), (["methods"], env), (["methods", "bleep"], env),
                    (["card", str(model)], env), (["info", str(sample)], env), (["data", "list"], env),
                    (["models", "list"], env), ([], completion)]
        for args, command_env in commands:
            median, torch_loaded = time_command(args, opts.runs, command_env)
            label = " ".join(args) if args else "<TAB> (bash completion of 'he2st me')"
            label = label.replace(tmp, "TMP")
            print(f"{median:6.2f} s  torch={'yes' if torch_loaded else 'no '}  he2st {label}", flush=True)


if __name__ == "__main__":
    main()
