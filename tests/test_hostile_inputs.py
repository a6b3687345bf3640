"""Hostile inputs: every command, every kind of input that is not what it expects.

One case per command x input class (missing, empty, text or PNG named ``.h5ad``, truncated HDF5 or
checkpoint, a folder where a file goes or a file where a folder goes, a symbolic link loop, non-finite
values, unknown sample ids, a read-only output folder, an existing output he2st did not write, ...).
Each case asserts the documented exit status (2), exactly one ``error:`` line on stderr that names the
offending path, no traceback, and that nothing changed on disk: no partial output, no input touched.

The inputs are tiny (a 1,200 px synthetic slide, a kNN model on an 8-gene panel, two 25-spot sections)
and every command runs in this process (tests/in_process.py), so the whole file takes seconds.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
import torch
from in_process import run_cli
from PIL import Image
from synthetic import random_knn_model, tissue_image, write_pyramid, write_st_section

from he2st.encoders import create

GENES = [f"G{i}" for i in range(8)]


@dataclass
class Kit:
    """Valid inputs that the cases combine with one hostile one."""

    root: Path
    model: Path
    weights: Path
    slide: Path
    slide2: Path
    prediction: Path
    signature: Path
    work: Path  # two samples of two patients (lopo folds)
    work1: Path  # two samples of one patient (no lopo folds)
    workloop: Path  # samples/loop.h5ad is a link to itself


@pytest.fixture(scope="module")
def kit(tmp_path_factory, one_torch_thread) -> Kit:
    from he2st.workflows.config import PrepareConfig
    from he2st.workflows.predict_slide import predict_slide
    from he2st.workflows.prepare import prepare

    root = tmp_path_factory.mktemp("kit")
    torch.manual_seed(0)
    encoder = create("test_vit", pretrained=False)
    weights = root / "test_vit.pth"
    torch.save(encoder.backbone.state_dict(), weights)
    method = random_knn_model(encoder, GENES, n=60, weights=weights)
    model = method.save(root / "model" / "knn.pt")
    (root / "slide").mkdir()
    slide = write_pyramid(root / "slide" / "slide.tif", tissue_image(1200, 1200, seed=3), 0.5)
    slide2 = write_pyramid(root / "slide" / "slide2.tif", tissue_image(1200, 1200, seed=4), 0.5)
    prediction = predict_slide(model, slide, root / "pred", encoder=encoder)
    signature = root / "signature.csv"
    signature.write_text("gene,weight\n" + "".join(f"{g},{1 + i / 10}\n" for i, g in enumerate(GENES)))
    works = {}
    for name, patients in (
        ("work", {"S1": "P1", "S2": "P2"}),
        ("work1", {"S1": "P1", "S2": "P1"}),
        ("workloop", {"S1": "P1"}),
    ):
        sources = []
        for i, (sid, pid) in enumerate(patients.items()):
            files = write_st_section(root / "raw" / name / sid, pitch_px=200, genes=GENES, seed=i)
            sources.append(
                {
                    "reader": "st",
                    "sample_id": sid,
                    "patient_id": pid,
                    "path": files["counts"],
                    "spots_file": files["spots"],
                    "image": files["image"],
                }
            )
        works[name] = root / name
        prepare(PrepareConfig(work_dir=works[name], data={"dataset": None, "samples": sources}))
    os.symlink("loop.h5ad", works["workloop"] / "samples" / "loop.h5ad")
    return Kit(
        root,
        model,
        weights,
        slide,
        slide2,
        prediction,
        signature,
        works["work"],
        works["work1"],
        works["workloop"],
    )


@pytest.fixture(scope="module")
def read_only(tmp_path_factory) -> Path:
    """An empty folder nobody may write into: a read-only tmpfs when running as root (root ignores modes),
    else a folder without write permission; skipped where neither can be made."""
    folder = tmp_path_factory.mktemp("readonly")
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("cannot make a read-only folder as root here (mount -t tmpfs failed)")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


# ------------------------------------------------------------------------------------------ hostile files
def hostile(kind: str, path: Path, kit: Kit) -> Path:
    """Put a file of ``kind`` at ``path`` (``missing``: nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("spot,G0\ns1,3\n")
    elif kind == "png":
        Image.new("RGB", (16, 16), (200, 100, 150)).save(path, format="PNG")
    elif kind == "truncated":  # a copy cut short, as by a full disk or an interrupted copy
        source = kit.model if path.suffix == ".pt" else kit.slide if path.suffix == ".tif" else kit.prediction
        path.write_bytes(source.read_bytes()[: 3000 if path.suffix == ".pt" else 20000])
    elif kind == "folder":
        path.mkdir()
    elif kind == "loop":
        os.symlink(path.name, path)
    elif kind == "broken-link":
        os.symlink("nowhere" + path.suffix, path)
    elif kind == "hdf5":
        with h5py.File(path, "w") as fh:
            fh["values"] = np.arange(3)
    elif kind == "nan":
        adata = ad.read_h5ad(kit.prediction)
        adata.X[0, 0] = np.nan
        adata.write_h5ad(path)
    elif kind != "missing":
        raise ValueError(kind)
    return path


WORDS = {
    "missing": "not found",
    "empty": "empty (0 bytes)",
    "text": "text file",
    "png": "PNG image",
    "truncated": "truncated",
    "folder": "is a folder",
    "loop": "symbolic link loop",
    "broken-link": "does not exist",
    "hdf5": "not an AnnData",
    "nan": "non-finite",
}


def _survival_table(tmp: Path, prediction: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    table = tmp / "cohort.csv"
    table.write_text(f"prediction,time,event\n{prediction},12,1\n")
    return table


# a command reading an .h5ad: (kit, hostile file, output folder) -> arguments
H5AD_READERS: dict[str, Callable[[Kit, Path, Path], list]] = {
    "tls": lambda k, bad, out: ["tls", bad, "--signature", k.signature, "--out", out],
    "tls-sample": lambda k, bad, out: [
        "tls",
        k.prediction,
        "--signature",
        k.signature,
        "--sample",
        bad,
        "--out",
        out,
    ],
    "plot": lambda k, bad, out: ["plot", bad, "--out", out],
    "plot-sample": lambda k, bad, out: ["plot", k.prediction, "--sample", bad, "--out", out],
    "report": lambda k, bad, out: ["report", bad, "--out", out],
    "info": lambda k, bad, out: ["info", bad, "-w", k.work],
    "predict-spots-from": lambda k, bad, out: [
        "predict",
        "-m",
        k.model,
        "--spots-from",
        bad,
        "--out",
        out,
        "--device",
        "cpu",
        "--no-maps",
    ],
    "stack": lambda k, bad, out: ["stack", bad, k.slide, "--spacing-um", "10", "-m", k.model, "--out", out],
    "survival": lambda k, bad, out: [
        "survival",
        "--slides",
        _survival_table(out.parent, bad),
        "--out",
        out,
        "--horizon",
        "10",
    ],
}
H5AD_KINDS = ["missing", "empty", "text", "png", "truncated", "folder", "loop"]

CHECKPOINT_READERS: dict[str, Callable[[Kit, Path, Path], list]] = {
    "card": lambda k, bad, out: ["card", bad],
    "predict": lambda k, bad, out: ["predict", "-m", bad, "-s", k.slide, "--out", out, "--device", "cpu"],
    "evaluate": lambda k, bad, out: [
        "evaluate",
        "--model",
        bad,
        "--samples",
        "S1",
        "-w",
        k.work,
        "--out",
        out,
    ],
    "stack": lambda k, bad, out: ["stack", k.slide, k.slide2, "--spacing-um", "10", "-m", bad, "--out", out],
}
CHECKPOINT_KINDS = ["missing", "empty", "text", "png", "truncated", "folder", "loop"]


@dataclass
class Case:
    """``build(kit, tmp)`` sets the case up in ``tmp`` and returns the arguments, the path the error line must
    name and words it must hold."""

    build: Callable[[Kit, Path], tuple[list, Path, str]]
    code: int = 2


def _reader_case(readers: dict, command: str, kind: str, name: str) -> Case:
    def build(kit: Kit, tmp: Path) -> tuple[list, Path, str]:
        bad = hostile(kind, tmp / "in" / name, kit)
        return readers[command](kit, bad, tmp / "out"), bad, WORDS[kind]

    return Case(build)


def _file_case(
    command: Callable[[Kit, Path, Path], list], kind: str, name: str, words: str | None = None
) -> Case:
    def build(kit: Kit, tmp: Path) -> tuple[list, Path, str]:
        bad = hostile(kind, tmp / "in" / name, kit)
        return command(kit, bad, tmp / "out"), bad, WORDS.get(kind, "") if words is None else words

    return Case(build)


def _foreign(
    relative: str,
    command: Callable[[Kit, Path], list],
    folder: bool = False,
    out: Callable[[Kit, Path], Path] | None = None,
) -> Case:
    """An output he2st would write already exists and is the user's: refused, untouched, --overwrite named."""

    def build(kit: Kit, tmp: Path) -> tuple[list, Path, str]:
        base = out(kit, tmp) if out is not None else tmp / "out"
        target = base / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            target.mkdir()
            (target / "mine.txt").write_text("the user's notes\n")
        else:
            target.write_bytes(b"the user's own file\n")
        return command(kit, tmp), target, "--overwrite"

    return Case(build)


def _wrong_kind(relative: str, command: Callable[[Kit, Path], list], make_folder: bool) -> Case:
    """A folder where he2st writes a file, or a file where it writes a folder."""

    def build(kit: Kit, tmp: Path) -> tuple[list, Path, str]:
        target = tmp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir() if make_folder else target.write_bytes(b"user data\n")
        return command(kit, tmp), target, "is a folder" if make_folder else "is a file"

    return Case(build)


def _plain(command: Callable[[Kit, Path], tuple[list, Path, str]]) -> Case:
    return Case(command)


def _predict(k: Kit, tmp: Path, *extra) -> list:
    return [
        "predict",
        "-m",
        k.model,
        "-s",
        k.slide,
        "--out",
        tmp / "out",
        "--device",
        "cpu",
        "--no-maps",
        *extra,
    ]


def _manifest_clash(k: Kit, tmp: Path) -> tuple[list, Path, str]:
    for folder in ("a", "b"):
        (tmp / folder).mkdir()
        (tmp / folder / "slide.tif").write_bytes(k.slide.read_bytes())  # two slides of one name
    manifest = tmp / "slides.csv"
    manifest.write_text("slide\na/slide.tif\nb/slide.tif\n")
    return (
        ["predict", "-m", k.model, "--manifest", manifest, "--out", tmp / "out"],
        manifest,
        "would both write",
    )


def _read_only(command: Callable[[Kit, Path], list]) -> Case:
    def build(kit: Kit, tmp: Path) -> tuple[list, Path, str]:
        return command(kit, tmp), tmp, "not writable"

    return Case(build)


CASES: dict[str, Case] = {}
for _command in H5AD_READERS:
    for _kind in H5AD_KINDS:
        CASES[f"{_command}-{_kind}-h5ad"] = _reader_case(H5AD_READERS, _command, _kind, "bad.h5ad")
for _command in CHECKPOINT_READERS:
    for _kind in CHECKPOINT_KINDS:
        CASES[f"{_command}-{_kind}-checkpoint"] = _reader_case(CHECKPOINT_READERS, _command, _kind, "bad.pt")
CASES |= {
    "tls-hdf5-not-anndata": _reader_case(H5AD_READERS, "tls", "hdf5", "bad.h5ad"),
    "plot-broken-link": _reader_case(H5AD_READERS, "plot", "broken-link", "bad.h5ad"),
    "tls-non-finite-prediction": _reader_case(H5AD_READERS, "tls", "nan", "bad.h5ad"),
    "survival-non-finite-prediction": _reader_case(H5AD_READERS, "survival", "nan", "bad.h5ad"),
    "tls-threshold-from-png": _file_case(
        lambda k, bad, out: [
            "tls",
            k.prediction,
            "--signature",
            k.signature,
            "--threshold-from",
            bad,
            "--out",
            out,
        ],
        "png",
        "bad.h5ad",
    ),
    # slide images
    **{
        f"predict-slide-{kind}": _file_case(
            lambda k, bad, out: ["predict", "-m", k.model, "-s", bad, "--out", out, "--device", "cpu"],
            kind,
            "bad.tif",
            words,
        )
        for kind, words in (
            ("missing", "not found"),
            ("empty", "empty"),
            ("text", "text file"),
            ("folder", "is a folder"),
            ("loop", "symbolic link loop"),
            ("truncated", ""),
        )
    },
    **{
        f"stack-section-{kind}": _file_case(
            lambda k, bad, out: ["stack", bad, k.slide, "--spacing-um", "10", "-m", k.model, "--out", out],
            kind,
            "bad.tif",
        )
        for kind in ("missing", "text", "folder")
    },
    **{
        f"predict-mask-{kind}": _file_case(
            lambda k, bad, out: ["predict", "-m", k.model, "-s", k.slide, "--mask", bad, "--out", out, "--device", "cpu"],
            kind,
            "mask.png",
            "not a readable mask" if kind == "text" else None,
        )
        for kind in ("missing", "text")
    },
    # tables
    **{
        f"predict-manifest-{kind}": _file_case(
            lambda k, bad, out: ["predict", "-m", k.model, "--manifest", bad, "--out", out],
            kind,
            "slides.csv",
            "columns must be" if kind == "text" else None,
        )
        for kind in ("missing", "empty", "folder", "loop", "png", "text")
    },
    **{
        f"survival-slides-{kind}": _file_case(
            lambda k, bad, out: ["survival", "--slides", bad, "--out", out, "--horizon", "10"],
            kind,
            "cohort.csv",
            "lacks column" if kind == "text" else None,
        )
        for kind in ("missing", "empty", "folder", "loop", "png", "text")
    },
    **{
        f"tls-model-{kind}": _file_case(
            lambda k, bad, out: ["tls", k.prediction, "--signature", bad, "--out", out], kind, "model.csv", None
        )
        for kind in ("missing", "empty", "png")
    },
    **{
        f"predict-config-{kind}": _file_case(
            lambda k, bad, out: ["predict", "-m", k.model, "-s", k.slide, "-c", bad, "--out", out],
            kind,
            "run.yaml",
        )
        for kind in ("missing", "png", "folder", "loop")
    },
    **{
        f"prepare-config-{kind}": _file_case(
            lambda k, bad, out: ["prepare", "-c", bad, "-w", out], kind, "prep.yaml"
        )
        for kind in ("missing", "png", "folder", "loop")
    },
    "survival-signature-missing": _file_case(
        lambda k, bad, out: [
            "survival",
            "--slides",
            _survival_table(out.parent, k.prediction),
            "--out",
            out,
            "--horizon",
            "10",
            "--signature",
            bad,
        ],
        "missing",
        "sig.csv",
    ),
    "predict-manifest-two-rows-one-output": _plain(_manifest_clash),
    # outputs that exist and are not he2st's
    "predict-foreign-h5ad": _foreign("slide.h5ad", _predict),
    "predict-foreign-zarr": _foreign(
        "slide.zarr", lambda k, t: _predict(k, t, "--format", "zarr"), folder=True
    ),
    "tls-foreign-output": _foreign(
        "slide.tls.h5ad", lambda k, t: ["tls", k.prediction, "--signature", k.signature, "--out", t / "out"]
    ),
    "tls-foreign-map": _foreign(
        "slide.tls.png", lambda k, t: ["tls", k.prediction, "--signature", k.signature, "--out", t / "out"]
    ),
    "report-foreign-html": _foreign(
        "slide.html", lambda k, t: ["report", k.prediction, "--out", t / "out"]
    ),
    "plot-foreign-png": _foreign("maps.png", lambda k, t: ["plot", k.prediction, "--out", t / "out"]),
    "stack-foreign-h5ad": _foreign(
        "stack.h5ad",
        lambda k, t: ["stack", k.slide, k.slide2, "--spacing-um", "10", "-m", k.model, "--out", t / "out"],
    ),
    "survival-foreign-results": _foreign(
        "results.json",
        lambda k, t: [
            "survival",
            "--slides",
            _survival_table(t, k.prediction),
            "--out",
            t / "out",
            "--horizon",
            "10",
        ],
    ),
    "train-foreign-checkpoint": _foreign(
        "m.pt", lambda k, t: ["train", "-w", k.work, "--method", "ridge", "--out", t / "out" / "m.pt"]
    ),
    "evaluate-foreign-results": _foreign(
        "results.json",
        lambda k, t: ["evaluate", "--model", k.model, "--samples", "S1", "-w", k.work, "--out", t / "out"],
    ),
    "benchmark-foreign-results": _foreign(
        "results.json",
        lambda k, t: ["benchmark", "-w", k.work, "--methods", "ridge", "--name", t.name],
        out=lambda k, t: k.work / "runs" / t.name,
    ),
    # a folder where a file goes, a file where a folder goes
    "predict-out-is-a-file": _wrong_kind("out", _predict, make_folder=False),
    "predict-zarr-is-a-file": _wrong_kind(
        "out/slide.zarr", lambda k, t: _predict(k, t, "--format", "zarr"), make_folder=False
    ),
    "predict-h5ad-is-a-folder": _wrong_kind("out/slide.h5ad", _predict, make_folder=True),
    "report-out-is-a-folder": _wrong_kind(
        "slide.html", lambda k, t: ["report", k.prediction, "--out", t], make_folder=True
    ),
    "plot-out-is-a-file": _wrong_kind(
        "maps", lambda k, t: ["plot", k.prediction, "--out", t / "maps"], make_folder=False
    ),
    "tls-out-is-a-file": _wrong_kind(
        "out",
        lambda k, t: ["tls", k.prediction, "--signature", k.signature, "--out", t / "out"],
        make_folder=False,
    ),
    "stack-out-is-a-file": _wrong_kind(
        "out",
        lambda k, t: ["stack", k.slide, k.slide2, "--spacing-um", "10", "-m", k.model, "--out", t / "out"],
        make_folder=False,
    ),
    "survival-out-is-a-file": _wrong_kind(
        "out",
        lambda k, t: [
            "survival",
            "--slides",
            _survival_table(t, k.prediction),
            "--out",
            t / "out",
            "--horizon",
            "10",
        ],
        make_folder=False,
    ),
    "train-out-is-a-folder": _wrong_kind(
        "m.pt",
        lambda k, t: ["train", "-w", k.work, "--method", "ridge", "--out", t / "m.pt"],
        make_folder=True,
    ),
    # work folders: unknown ids, a link loop among the samples, too few patients
    "info-unknown-sample": _plain(lambda k, t: (["info", "nosuch", "-w", k.work], k.work, "unknown sample")),
    "embed-unknown-sample": _plain(
        lambda k, t: (
            ["embed", "-w", k.work, "--samples", "nosuch"],
            k.work / "samples" / "nosuch.h5ad",
            "not prepared here",
        )
    ),
    "train-unknown-sample": _plain(
        lambda k, t: (
            ["train", "-w", k.work, "--method", "ridge", "--samples", "nosuch", "--out", t / "m.pt"],
            k.work / "samples" / "nosuch.h5ad",
            "not prepared here",
        )
    ),
    "evaluate-unknown-sample": _plain(
        lambda k, t: (
            ["evaluate", "--model", k.model, "--samples", "nosuch", "-w", k.work, "--out", t / "out"],
            k.work / "samples" / "nosuch.h5ad",
            "not prepared here",
        )
    ),
    "info-sample-link-loop": _plain(
        lambda k, t: (
            ["info", "loop", "-w", k.workloop],
            k.workloop / "samples" / "loop.h5ad",
            "symbolic link loop",
        )
    ),
    "embed-sample-link-loop": _plain(
        lambda k, t: (["embed", "-w", k.workloop], k.workloop / "samples" / "loop.h5ad", "symbolic link loop")
    ),
    "train-sample-link-loop": _plain(
        lambda k, t: (
            ["train", "-w", k.workloop, "--method", "ridge", "--samples", "S1,loop", "--out", t / "m.pt"],
            k.workloop / "samples" / "loop.h5ad",
            "symbolic link loop",
        )
    ),
    "benchmark-one-patient": _plain(
        lambda k, t: (["benchmark", "-w", k.work1, "--methods", "ridge"], k.work1, "one patient")
    ),
    "predict-unknown-gene": _plain(
        lambda k, t: (
            _predict(k, t, "--genes", "NOPE") + ["--weights", k.weights],
            Path("NOPE"),
            "not in the model's panel",
        )
    ),
}

READ_ONLY: dict[str, Callable[[Kit, Path], list]] = {
    "predict": lambda k, ro: [
        "predict",
        "-m",
        k.model,
        "-s",
        k.slide,
        "--out",
        ro / "sub",
        "--device",
        "cpu",
    ],
    "tls": lambda k, ro: ["tls", k.prediction, "--signature", k.signature, "--out", ro],
    "report": lambda k, ro: ["report", k.prediction, "--out", ro],
    "plot": lambda k, ro: ["plot", k.prediction, "--out", ro / "maps"],
    "survival": lambda k, ro: [
        "survival",
        "--slides",
        _survival_table(k.root / "cohort", k.prediction),
        "--out",
        ro / "sub",
        "--horizon",
        "10",
    ],
    "train": lambda k, ro: ["train", "-w", k.work, "--method", "ridge", "--out", ro / "m.pt"],
}


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots`` with its kind, size and modification time (he2st's lock folders aside)."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != ".he2st-locks"]
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st = path.lstat()
                seen[str(path)] = (st.st_mode >> 12, st.st_size if not path.is_dir() else 0, st.st_mtime_ns)
    return seen


def assert_one_line(result: subprocess.CompletedProcess, named: Path, words: str, code: int = 2) -> None:
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    others = [line for line in lines if not line.startswith(("error: ", "warning: "))]
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(errors) == 1 and not others, result.stderr
    assert str(named) in errors[0] and words in errors[0], errors[0]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_input_is_one_line_and_changes_nothing(case, kit, tmp_path):
    args, named, words = CASES[case].build(kit, tmp_path)
    before = _snapshot(tmp_path, kit.root)
    result = run_cli(*map(str, args))
    assert_one_line(result, named, words, CASES[case].code)
    assert _snapshot(tmp_path, kit.root) == before  # no partial output, no input touched


@pytest.mark.parametrize("command", list(READ_ONLY), ids=list(READ_ONLY))
def test_read_only_output_folder_is_one_line(command, kit, read_only):
    args = READ_ONLY[command](kit, read_only)
    before = _snapshot(kit.root)
    result = run_cli(*map(str, args))
    assert_one_line(result, read_only, "not writable")
    assert _snapshot(kit.root) == before and not os.listdir(read_only)
