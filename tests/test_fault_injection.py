"""Fault injection: a command killed at any point, then rerun, ends with exactly the uninterrupted output.

``prepare``, ``embed``, ``predict``, ``benchmark`` (knn and ridge_cv) and ``stack`` run as subprocesses on
tiny synthetic inputs: once uninterrupted (the reference), and once SIGKILLed at a seeded random moment
within the reference's duration and run again. The arrays of every output must equal the reference's
(timestamps and timings aside), and no temporary file may be left. A full disk and a read-only output
folder give one ``error:`` line, exit status 2, and leave no partial output and the inputs untouched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import random_knn_model, tissue_image, write_pyramid, write_st_section

from he2st.encoders import create

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parents[1] / "src"
GENES = [f"G{i}" for i in range(20)]
SEED = 20240611
VARIES = re.compile("seconds|created|card|command|runtime")  # what may differ between two equal runs
FIT = ["--set", "genes.n_genes=20", "--set", "genes.min_spot_fraction=0", "--set", "n_top=5"]


def he2st(*args) -> list[str]:
    return [sys.executable, "-c", "from he2st.cli import main; main()", *map(str, args)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run(*args, cwd: Path, check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(he2st(*args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, (args, done.stderr[-3000:])
    return done, time.perf_counter() - start


def killed(*args, cwd: Path, after: float) -> bool:
    """Start the command and SIGKILL it ``after`` seconds in; whether it was still running then."""
    process = subprocess.Popen(
        he2st(*args), cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        process.wait(timeout=after)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def arrays(root: Path) -> dict[str, object]:
    """The numbers in every output under ``root``: HDF5 datasets (h5ad, patch caches, embeddings), CSV tables
    and JSON documents, with what changes from run to run (timestamps, timings, temp names) left out."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir() or ".he2st-locks" in rel:
            continue
        if path.suffix in (".h5", ".h5ad"):
            with h5py.File(path, "r") as fh:
                fh.visititems(
                    lambda name, obj, rel=rel: (
                        found.__setitem__(f"{rel}:{name}", obj[()])
                        if isinstance(obj, h5py.Dataset) and not VARIES.search(name)
                        else None
                    )
                )
        elif path.suffix == ".csv":
            table = pd.read_csv(path)
            found[rel] = table.drop(columns=[c for c in table.columns if c in ("seconds",)]).to_dict("list")
        elif path.name in ("results.json",):
            doc = json.loads(path.read_text())
            found[rel] = json.dumps({k: v for k, v in doc.items() if k != "provenance"}, sort_keys=True)
        elif path.suffix == ".json":
            found[rel] = path.read_text()
    return found


def assert_same(reference: Path, rerun: Path) -> None:
    a, b = arrays(reference), arrays(rerun)
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            if a[key].dtype.kind in "fc":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            else:
                assert np.array_equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key
    leftovers = [p for p in rerun.rglob("*") if re.search(r"\.he2st-\d+@|\.partial\.h5$", p.name)]
    assert not leftovers, leftovers  # temporary files of the killed run were swept, partial files finished


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Raw sections of two patients, a prepare config, the tiny encoder's weights, two slides to stack."""
    root = tmp_path_factory.mktemp("inputs")
    lines = ["data:", "  dataset: null", "  samples:"]
    for i, (sid, pid) in enumerate((("S1", "P1"), ("S2", "P2"), ("S3", "P2"))):
        files = write_st_section(root / "raw" / sid, pitch_px=200, genes=GENES, seed=i)
        lines.append(
            f"  - {{reader: st, sample_id: {sid}, patient_id: {pid}, path: '{files['counts']}', "
            f"spots_file: '{files['spots']}', image: '{files['image']}'}}"
        )
    config = root / "prepare.yaml"
    config.write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    weights = root / "test_vit.pth"
    torch.save(create("test_vit", pretrained=False).backbone.state_dict(), weights)
    slides = [
        write_pyramid(root / f"slide{i}.tif", tissue_image(1600, 1600, seed=3 + i), 0.5) for i in range(2)
    ]
    return {"root": root, "config": config, "weights": weights, "slide0": slides[0], "slide1": slides[1]}


def _embed(work: Path, weights: Path) -> list:
    return [
        "embed",
        "-w",
        work,
        "--encoder",
        "test_vit",
        "--weights",
        weights,
        "--set",
        "embed.num_workers=0",
    ]


def _embed_settings(weights: Path) -> list:
    """The embedding settings every fitting command of these tests repeats: the seeded test encoder."""
    return ["--set", "embed.encoder=test_vit", "--set", f"embed.weights={weights}", "--set", "embed.num_workers=0"]


def _steps(inputs: dict[str, Path], work: Path, model: Path, out: Path) -> dict[str, list]:
    sets = _embed_settings(inputs["weights"])
    return {
        "prepare": ["prepare", "-c", inputs["config"], "-w", work],
        "embed": _embed(work, inputs["weights"]),
        "predict": [
            "predict",
            "-m",
            model,
            "-s",
            inputs["slide0"],
            "--out",
            out,
            "--device",
            "cpu",
            "--set",
            "chunk=16",
            "--no-maps",
        ],
        "benchmark": ["benchmark", "-w", work, "--methods", "knn,ridge_cv", "--name", "fi", *sets, *FIT],
        "stack": [
            "stack",
            inputs["slide0"],
            inputs["slide1"],
            "--spacing-um",
            "10",
            "-m",
            model,
            "--out",
            out,
            "--pitch-um",
            "150",
            "--device",
            "cpu",
        ],
    }


def _model(inputs: dict[str, Path], work: Path) -> Path:
    """A knn model on the prepared, embedded folder (set-up, not under test)."""
    model = inputs["root"] / "knn.pt"
    if not model.exists():
        run(
            "train",
            "-w",
            work,
            "--method",
            "knn",
            "--samples",
            "S1,S2",
            "--out",
            model,
            *_embed_settings(inputs["weights"]),
            *FIT,
            cwd=inputs["root"],
        )
    return model


@pytest.mark.parametrize("step", ["prepare", "embed", "predict", "benchmark", "stack"])
def test_killed_at_a_random_moment_and_rerun_equals_an_uninterrupted_run(step, inputs, tmp_path):
    pytest.importorskip("SimpleITK") if step == "stack" else None
    rng = np.random.default_rng([SEED, ["prepare", "embed", "predict", "benchmark", "stack"].index(step)])
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    folders = {}
    for name, root in (("reference", reference), ("interrupted", interrupted)):
        work, out = root / "work", root / "out"
        if step != "prepare":
            run(*_steps(inputs, work, Path(), out)["prepare"], cwd=tmp_path)
        if step in ("predict", "benchmark", "stack"):
            run(*_embed(work, inputs["weights"]), cwd=tmp_path)
        folders[name] = (work, out)
    model = _model(inputs, folders["reference"][0]) if step in ("predict", "stack") else Path()
    work, out = folders["reference"]
    _, seconds = run(*_steps(inputs, work, model, out)[step], cwd=tmp_path)
    work, out = folders["interrupted"]
    after = float(rng.uniform(0.2, 0.95)) * seconds
    assert killed(*_steps(inputs, work, model, out)[step], cwd=tmp_path, after=after)
    run(*_steps(inputs, work, model, out)[step], cwd=tmp_path)
    assert_same(reference, interrupted)


def _tiny_model(path: Path, weights: Path) -> Path:
    """A kNN over random features of the tiny encoder's width (its weights recorded in the card)."""

    torch.manual_seed(0)
    encoder = create("test_vit", pretrained=False)
    knn = random_knn_model(encoder, GENES, weights=weights)
    return knn.save(path)


def _together(*commands: list, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Start the commands at once; their outcomes once all have ended."""
    processes = [
        subprocess.Popen(
            he2st(*c), cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c in commands
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    return [
        subprocess.CompletedProcess(c, p.returncode, *out)
        for c, p, out in zip(commands, processes, outputs, strict=True)
    ]


def test_two_embeds_of_one_work_folder_at_once_equal_one(inputs, tmp_path):
    """The second waits for the first (saying so) and reuses its files: nothing corrupt, nothing crashed."""
    for name in ("reference", "together"):
        run("prepare", "-c", inputs["config"], "-w", tmp_path / name / "work", cwd=tmp_path)
    run(*_embed(tmp_path / "reference" / "work", inputs["weights"]), cwd=tmp_path)
    both = _together(*[_embed(tmp_path / "together" / "work", inputs["weights"])] * 2, cwd=tmp_path)
    for done in both:
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert_same(tmp_path / "reference", tmp_path / "together")


def test_two_predictions_to_one_output_at_once(inputs, tmp_path):
    """Either the second finds the output being written and says so in one line naming the first process, or
    it starts after the first finished and reuses it; the output equals a prediction made alone."""
    model = _tiny_model(tmp_path / "knn.pt", inputs["weights"])
    command = [
        "predict",
        "-m",
        model,
        "-s",
        inputs["slide0"],
        "--device",
        "cpu",
        "--no-maps",
        "--set",
        "chunk=16",
    ]
    run(*command, "--out", tmp_path / "reference", cwd=tmp_path)
    both = _together(*[[*command, "--out", tmp_path / "together"]] * 2, cwd=tmp_path)
    assert any(done.returncode == 0 for done in both), [d.stderr for d in both]
    for done in both:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        refused = len(errors) == 1 and "being written by another he2st process (pid " in errors[0]
        assert done.returncode == 0 or (done.returncode == 2 and refused), done.stderr
    assert_same(tmp_path / "reference", tmp_path / "together")


def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )


@pytest.mark.parametrize(
    "options,words",
    [("size=1m", "no space left"), ("ro,size=1m", "not writable")],
    ids=["full-disk", "read-only"],
)
def test_full_disk_or_read_only_output_is_one_line_and_leaves_nothing(options, words, inputs, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, options):
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        model = _tiny_model(tmp_path / "knn.pt", inputs["weights"])
        before = {p: p.stat().st_mtime_ns for p in inputs["root"].rglob("*") if p.is_file()}
        done, _ = run(
            "predict",
            "-m",
            model,
            "-s",
            inputs["slide0"],
            "--out",
            disk / "out",
            "--device",
            "cpu",
            cwd=tmp_path,
            check=False,
        )
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2 and len(errors) == 1 and words in errors[0], done.stderr
        assert str(disk) in errors[0] and "Traceback" not in done.stderr
        left = [p for p in disk.rglob("*") if p.is_file() and ".he2st" not in str(p)]
        assert not left, left  # no partial output
        assert before == {p: p.stat().st_mtime_ns for p in inputs["root"].rglob("*") if p.is_file()}
    finally:
        subprocess.run(["umount", str(disk)], check=False)
