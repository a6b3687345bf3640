"""The commands that should answer at once never import torch: ``--help``, ``methods``, ``card``, ``info``,
``data list``, ``models list``/``show`` and shell completion (benchmarks/cli_startup.py times them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from he2st.data.genes import GenePanel
from he2st.errors import He2stError
from he2st.methods import create_method, load_method, read_card

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "sklearn", "torchvision")

# runs `he2st <args>` through typer's CliRunner in a fresh interpreter, then reports the heavy modules loaded
PROBE = """
import json, sys
from typer.testing import CliRunner
from he2st.cli import app
results = []
for args in json.loads(sys.argv[1]):
    out = CliRunner().invoke(app, args)
    results.append([args, out.exit_code, out.output[-400:]])
print(json.dumps({"results": results, "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def run_console(args: list[str], modules: tuple[str, ...], **env: str) -> subprocess.CompletedProcess:
    """``he2st <args>`` as the console script runs it, in a fresh interpreter that then prints which of
    ``modules`` it loaded (``LOADED [...]``)."""
    code = ("import sys; sys.argv[0] = 'he2st'; from he2st.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', [m for m in {modules!r} if m in sys.modules])")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src"), **env), timeout=300)


def run_probe(commands: list[list[str]], env: dict[str, str] | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), **(env or {}))
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    from he2st.data.spots import SpotSet

    n, genes = 90, [f"G{i}" for i in range(6)]
    spots = SpotSet(sample_ids=np.repeat(np.array(["s1", "s2", "s3"], dtype=object), n // 3),
                    barcodes=np.arange(n).astype(str).astype(object),
                    features=rng.normal(size=(n, 8)).astype(np.float32), coords_um=rng.uniform(0, 900, (n, 2)),
                    genes=genes, targets=rng.gamma(2.0, 1.0, (n, len(genes))).astype(np.float32))
    method = create_method("ridge", pca_components=4)
    method.panel = GenePanel(genes=genes)
    method.fit(spots)
    return method.save(tmp_path_factory.mktemp("model") / "ridge.pt")


def test_quick_commands_do_not_import_torch(checkpoint, tmp_path):
    import anndata as ad

    from he2st.data.sample import Sample

    adata = ad.AnnData(X=np.ones((4, 3), np.float32))
    adata.obsm["spatial"] = np.arange(8, dtype=float).reshape(4, 2)
    sample = Sample("S1", "P1", adata, pixel_size_um=1.0, spot_diameter_um=55.0).save(tmp_path / "S1.h5ad")
    commands = [["--help"], ["methods"], ["methods", "bleep"], ["methods", "ensemble"], ["card", str(checkpoint)],
                ["info", str(sample)], ["data", "list"], ["predict", "--help"], ["tls", "--help"],
                ["models", "list"], ["models", "show", "her2st-breast"]]
    probe = run_probe(commands, {"HE2ST_WORK_DIR": str(tmp_path)})
    for args, code, output in probe["results"]:
        assert code == 0, (args, output)
    assert probe["loaded"] == [], f"imported {probe['loaded']}"


def test_info_answers_from_the_sample_header_as_the_loaded_sample_would(tmp_path):
    """``he2st info`` reads a sample file's header with h5py: the same lines as the loaded sample's summary,
    without importing anndata (which brings dask and xarray where they are installed)."""
    import anndata as ad
    from synthetic import prepared_sections

    from he2st.data.sample import Sample
    from he2st.data.sample_header import SampleHeader

    work = prepared_sections(tmp_path, {"S1": "P1"}, [f"G{i}" for i in range(5)], side=3)
    path = work / "samples" / "S1.h5ad"
    loaded = Sample.load(path)
    loaded.adata.obs["region"] = "tumour"
    loaded.save(path)
    summary = SampleHeader.read(path).summary()
    assert summary == Sample.load(path).summary()
    assert summary["spots"] == 9 and summary["annotations"] == "region" and "image_size" in summary
    for target in (str(path), "S1"):
        done = run_console(["info", target, "-w", str(work)], ("anndata", "dask", "torch"))
        assert done.returncode == 0, done.stderr
        assert "    annotations: region" in done.stdout and done.stdout.strip().endswith("LOADED []"), done.stdout
    not_a_sample = tmp_path / "plain.h5ad"
    ad.AnnData(X=np.ones((2, 2), np.float32)).write_h5ad(not_a_sample)
    with pytest.raises(He2stError, match=r"not a he2st sample file \(no uns\['he2st'\]\)"):
        SampleHeader.read(not_a_sample)


def test_shell_completion_does_not_import_torch():
    done = run_console([], HEAVY, _HE2ST_COMPLETE="complete_bash", COMP_WORDS="he2st me", COMP_CWORD="1")
    assert "methods" in done.stdout
    assert "LOADED []" in done.stdout, done.stdout + done.stderr


def test_card_is_read_without_torch_as_load_method_reads_it(checkpoint, tmp_path):
    assert read_card(checkpoint) == load_method(checkpoint).card
    # anything but a plain he2st payload goes through load_method, which refuses it in one line
    payload = torch.load(checkpoint, weights_only=True)
    payload["format"] = 1
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(He2stError, match="format 1"):
        read_card(tmp_path / "old.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(He2stError, match="not a he2st checkpoint: it is a text file"):
        read_card(tmp_path / "junk.pt")
