"""What he2st may write: its own outputs only, atomically, one process at a time.

The policy lives in :mod:`he2st.io` (``check_output``, ``atomic_path``, ``atomic_folder``, ``output_lock``);
these tests hold it to its word directly and through the commands: an output he2st did not write is
refused unless ``--overwrite``, its own outputs are replaced in place, a failure leaves the old output and
no temporary file, a second process writing the same output gets one line naming the first, and a batch
with a repeated or missing slide says so before (or instead of) failing on it.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import anndata as ad
import pytest
from in_process import run_cli
from test_hostile_inputs import Kit, kit  # noqa: F401 - the module's fixture, reused

from he2st.errors import He2stError, He2stWarning
from he2st.io import (
    MARKER,
    atomic_folder,
    atomic_path,
    check_output,
    is_own,
    output_lock,
    overwriting,
    written_here,
)


def _write(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def _entries(folder: Path) -> set[str]:
    return set(os.listdir(folder))


# ------------------------------------------------------------------------------------------------ the policy
def test_own_files_are_replaced_and_foreign_ones_refused_unless_overwrite(tmp_path):
    own = _write(tmp_path / "out" / "a.json", "1")
    assert is_own(own) and "a.json" in written_here(tmp_path / "out")
    _write(own, "2")  # he2st's own: replaced without asking
    assert own.read_text() == "2"
    foreign = tmp_path / "out" / "b.json"
    foreign.write_text("the user's")
    with pytest.raises(He2stError, match="was not written by he2st; pass --overwrite") as caught:
        _write(foreign, "3")
    assert str(foreign) in str(caught.value) and foreign.read_text() == "the user's"
    assert _entries(tmp_path / "out") == {"a.json", "b.json", MARKER}  # no temporary file left
    with overwriting():
        _write(foreign, "3")
    assert foreign.read_text() == "3" and is_own(foreign)


def test_a_failed_write_keeps_the_old_output_and_leaves_no_temporary_file(tmp_path):
    target = _write(tmp_path / "r.csv", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and _entries(tmp_path) == {"r.csv", MARKER}


def test_temporary_files_of_dead_writers_of_this_machine_are_swept_and_no_others(tmp_path, monkeypatch):
    """A temporary sibling names its writer's process and machine. A killed writer's is removed by the next
    write of the target; a live process's, and any of another machine writing into a shared folder (whose
    process ids mean nothing here), are kept. A name without a machine (older he2st) counts as this machine's."""
    import socket
    import subprocess
    import sys

    monkeypatch.setattr(socket, "gethostname", lambda: "node-7.cluster")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    names = {"dead_here": f".r.csv.he2st-{dead}@node_7.cluster-abc.part",
             "dead_unnamed": f".r.csv.he2st-{dead}-abd.part",
             "alive_here": f".r.csv.he2st-{os.getpid()}@node_7.cluster-abe.part",
             "other_machine": f".r.csv.he2st-{dead}@node_8.cluster-abf.part"}
    for name in names.values():
        (tmp_path / name).write_text("x")
    with atomic_path(tmp_path / "r.csv") as tmp:
        assert tmp.name.startswith(f".r.csv.he2st-{os.getpid()}@node_7.cluster-")
        tmp.write_text("new")
    assert _entries(tmp_path) == {"r.csv", MARKER, names["alive_here"], names["other_machine"]}


def test_wrong_kinds_are_one_line(tmp_path):
    (tmp_path / "folder.h5ad").mkdir()
    (tmp_path / "file").write_text("x")
    for path, folder, words in (
        (tmp_path / "folder.h5ad", False, "is a folder, but he2st writes a file"),
        (tmp_path / "file", True, "is a file, but he2st writes a folder"),
        (tmp_path / "file" / "x.h5ad", False, "is a file, not a folder"),
    ):
        with pytest.raises(He2stError, match=words) as caught:
            check_output(path, folder=folder)
        assert "\n" not in str(caught.value)


def test_folders_are_replaced_whole_only_when_every_entry_is_he2sts(tmp_path):
    store = tmp_path / "s.zarr"
    with atomic_folder(store) as new:
        new.mkdir()
        (new / "table").write_text("v1")
    assert is_own(store) and (store / "table").read_text() == "v1"
    with atomic_folder(store) as new:  # its own: replaced
        new.mkdir()
        (new / "table").write_text("v2")
    assert (store / "table").read_text() == "v2"
    (store / "notes.txt").write_text("added by the user")
    with pytest.raises(He2stError, match="--overwrite"), atomic_folder(store) as new:
        new.mkdir()
    assert (store / "notes.txt").exists() and (store / "table").read_text() == "v2"
    with (
        pytest.raises(RuntimeError),
        overwriting(),
        atomic_folder(store) as new,
    ):  # a failure keeps the old store
        new.mkdir()
        raise RuntimeError("interrupted")
    assert (store / "notes.txt").exists() and _entries(tmp_path) == {"s.zarr", MARKER}


def test_a_file_put_into_a_subfolder_of_a_store_keeps_the_store_from_being_replaced(tmp_path):
    """A store's top-level entries are all he2st's, but a file of the user's one level down is not: replacing
    the store whole would delete it, so it is refused as for a file at the top."""
    store = tmp_path / "s.zarr"
    with atomic_folder(store) as new:
        (new / "tables" / "table").mkdir(parents=True)
        (new / "tables" / "table" / "x").write_text("v1")
    assert is_own(store)
    (store / "tables" / "notes.txt").write_text("added by the user")
    assert not is_own(store)
    with pytest.raises(He2stError, match="--overwrite"), atomic_folder(store) as new:
        new.mkdir()
    assert (store / "tables" / "notes.txt").read_text() == "added by the user"
    (store / "tables" / "notes.txt").unlink()
    with atomic_folder(store) as new:  # its own again: replaced
        new.mkdir()
    assert _entries(store) == {MARKER}


def test_a_checkpoint_is_never_read_with_a_bank_saved_with_another(tmp_path, monkeypatch):
    """A checkpoint and its bank are two files: a save that fails leaves both old ones, and a bank that is not
    the one saved with the checkpoint beside it (a save killed between the two renames) is refused on load
    instead of predicting another model's genes."""
    import errno

    import torch
    from synthetic import random_knn_model

    from he2st.encoders import create
    from he2st.methods import Method, load_method

    encoder = create("test_vit", pretrained=False)
    path = tmp_path / "m" / "knn.pt"
    random_knn_model(encoder, ["A", "B"], seed=0).save(path)
    old_bank = Method.bank_path(path).read_bytes()
    other = random_knn_model(encoder, ["C", "D", "E"], seed=1)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", disk_full)
        with pytest.raises(He2stError, match="no space left"):
            other.save(path)
    assert Method.bank_path(path).read_bytes() == old_bank and load_method(path).bank.genes == ["A", "B"]
    assert _entries(path.parent) == {"knn.pt", "knn.bank.h5", MARKER}
    other.save(path)
    Method.bank_path(path).write_bytes(old_bank)  # the new checkpoint beside the old bank
    with pytest.raises(He2stError, match="not saved with the checkpoint knn.pt"):
        load_method(path)


def test_a_second_writer_is_one_line_naming_the_first(tmp_path):
    target = tmp_path / "slide.h5ad"
    with output_lock(target):
        with pytest.raises(
            He2stError, match=f"being written by another he2st process \\(pid {os.getpid()} on "
        ):
            with output_lock(target):
                pass
    with output_lock(target):  # released: free again
        pass


def test_a_cache_writer_waits_for_the_first_and_says_so(tmp_path):
    target = tmp_path / "S1.h5"
    held, order = threading.Event(), []

    def first() -> None:
        with output_lock(target):
            held.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with output_lock(target, wait=True):
            order.append("second")
    thread.join()
    assert order == ["first done", "second"]
    assert any(issubclass(w.category, He2stWarning) and "waiting" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------- the commands
def _predict(kit: Kit, out: Path, *extra) -> list[str]:  # noqa: F811
    return [
        "predict",
        "-m",
        str(kit.model),
        "-s",
        str(kit.slide),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-maps",
        *extra,
    ]


def test_predict_replaces_its_own_output_and_a_foreign_one_only_with_overwrite(kit, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert run_cli(*_predict(kit, out)).returncode == 0
    first = ad.read_h5ad(out / "slide.h5ad")
    assert run_cli(*_predict(kit, out, "--set", "pitch_um=150")).returncode == 0  # its own: replaced
    assert ad.read_h5ad(out / "slide.h5ad").n_obs < first.n_obs
    foreign = tmp_path / "user"
    foreign.mkdir()
    (foreign / "slide.h5ad").write_text("the user's own table")
    refused = run_cli(*_predict(kit, foreign))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert (foreign / "slide.h5ad").read_text() == "the user's own table"
    assert run_cli(*_predict(kit, foreign, "--overwrite")).returncode == 0
    assert ad.read_h5ad(foreign / "slide.h5ad").n_obs == first.n_obs


def test_a_prediction_is_never_written_over_the_sample_it_predicts_at(kit, tmp_path):  # noqa: F811
    """``--spots-from <work>/samples/S1.h5ad --out <work>/samples`` names the input as the output: the prepared
    sample is he2st's own file, so only this check keeps the prediction from replacing the measured counts."""
    samples = tmp_path / "samples"
    samples.mkdir()
    sample = samples / "S1.h5ad"
    sample.write_bytes((kit.work / "samples" / "S1.h5ad").read_bytes())
    (samples / MARKER).write_text("S1.h5ad\n")  # he2st's own, as `he2st prepare` leaves it
    before = sample.read_bytes()
    result = run_cli("predict", "-m", kit.model, "--spots-from", sample, "--out", samples, "--device", "cpu",
                     "--no-maps", "--max-upsample", "10")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "--spots-from" in errors[0], result.stderr
    assert sample.read_bytes() == before and _entries(samples) == {"S1.h5ad", MARKER}


def test_zarr_store_of_the_user_is_kept_and_replaced_only_with_overwrite(kit, tmp_path):  # noqa: F811
    pytest.importorskip("spatialdata")
    out = tmp_path / "Z"
    (out / "slide.zarr").mkdir(parents=True)
    (out / "slide.zarr" / "mine.txt").write_text("precious")
    refused = run_cli(*_predict(kit, out, "--format", "zarr"))
    assert refused.returncode == 2 and "slide.zarr" in refused.stderr and "--overwrite" in refused.stderr
    assert (out / "slide.zarr" / "mine.txt").read_text() == "precious"
    assert not [p for p in os.listdir(out) if "partial" in p]
    done = run_cli(*_predict(kit, out, "--format", "zarr", "--overwrite"))
    assert done.returncode == 0, done.stderr
    assert not (out / "slide.zarr" / "mine.txt").exists() and (out / "slide.zarr" / "tables").is_dir()
    assert not [p for p in os.listdir(out) if "partial" in p]


def test_a_foreign_map_is_refused_before_any_prediction(kit, tmp_path):  # noqa: F811
    """``<out>/<library-id>/maps.png`` that he2st did not write is refused with the other outputs, before the
    slide is predicted (on a real slide, hours before), leaving nothing written."""
    out = tmp_path / "out"
    (out / "slide").mkdir(parents=True)
    (out / "slide" / "maps.png").write_text("my own figure")
    result = run_cli(*[a for a in _predict(kit, out) if a != "--no-maps"])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "maps.png" in errors[0] and "--overwrite" in errors[0]
    assert sorted(os.listdir(out)) == ["slide"] and os.listdir(out / "slide") == ["maps.png"]


def test_a_prediction_being_written_by_another_process_is_one_line(kit, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    with output_lock(out / "slide.h5ad"):
        result = run_cli(*_predict(kit, out))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and f"pid {os.getpid()}" in errors[0], result.stderr
    assert not (out / "slide.h5ad").exists() and not (out / "slide.partial.h5").exists()


@pytest.mark.slow
def test_a_manifest_row_repeated_is_predicted_once_and_a_missing_slide_is_an_error_line(kit, tmp_path):  # noqa: F811
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide\n{kit.slide}\n{kit.slide}\n{tmp_path / 'nope.tif'}\n")
    result = run_cli(
        "predict",
        "-m",
        str(kit.model),
        "--manifest",
        str(manifest),
        "--out",
        str(tmp_path / "M"),
        "--device",
        "cpu",
        "--workers",
        "1",
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result.stderr  # documented: some slides failed
    assert any(line.startswith("warning:") and "row 3 repeats row 2" in line for line in lines)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "nope.tif" in errors[0] and "not found" in errors[0]
    assert "1 of 2 slides predicted" in result.stdout and (tmp_path / "M" / "slide.h5ad").exists()
