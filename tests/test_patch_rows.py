"""Patches read from their caches on demand (:class:`PatchRows`): every view reads what the in-memory array
holds at the same rows, spot sets subset and stack without reading, fine-tuning takes the same steps on
either, and going through the batches of a large set holds no more than going through a small one."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import tracemalloc
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO
from synthetic import linear_spots, prepared_sections

from he2st.data.embeddings import EmbedConfig
from he2st.data.genes import GenePanel
from he2st.data.patch_reader import PatchFileReader
from he2st.data.patch_rows import PatchRows, take_patches
from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.spots import SpotSet, load_spots
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.methods import create_method

# how ``img`` may be stored: as ``he2st prepare`` writes it (read as bytes), and layouts read through HDF5
LAYOUTS = {
    "prepare": {"chunks": 16},
    "contiguous": {},
    "user block": {"chunks": 5, "userblock_size": 512},
    "compressed": {"chunks": 4, "compression": "gzip"},
    "part-row chunks": {"chunks": (3, 4)},
}


def write_cache(path: Path, patches: np.ndarray, chunks: int | tuple | None = 16, userblock_size: int = 0,
                compression: str | None = None) -> Path:
    """An ``img`` dataset, by default chunked as ``he2st prepare`` chunks it (16 patches a chunk)."""
    if isinstance(chunks, int):
        chunks = (min(chunks, len(patches)), *patches.shape[1:])
    elif chunks is not None:
        chunks = (*chunks, *patches.shape[2:])
    with h5py.File(path, "w", userblock_size=userblock_size) as fh:
        fh.create_dataset("img", data=patches, chunks=chunks, compression=compression)
    return path


def caches(root: Path, sizes: list[int], side: int = 16, seed: int = 0, **layout) -> tuple[PatchRows, np.ndarray]:
    """One cache per size, as :class:`PatchRows` stacked in order and as the array they hold."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8) for n in sizes]
    rows = [PatchRows.from_cache(write_cache(root / f"s{i}.h5", a, **layout)) for i, a in enumerate(arrays)]
    return PatchRows.concat(rows), np.concatenate(arrays)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_views_read_the_rows_the_array_holds(tmp_path, layout):
    lazy, eager = caches(tmp_path, [7, 11, 5], **LAYOUTS[layout])
    rng = np.random.default_rng(1)
    shuffled = np.r_[rng.permutation(23)[:15], 4, 4, 20]  # unsorted, across files, with repeats
    mask = rng.random(23) > 0.5
    assert lazy.shape == eager.shape and len(lazy) == 23
    np.testing.assert_array_equal(np.asarray(lazy), eager)
    np.testing.assert_array_equal(lazy.read(shuffled), eager[shuffled])
    np.testing.assert_array_equal(lazy[mask].read(), eager[mask])
    np.testing.assert_array_equal(lazy[::-2].read(), eager[::-2])
    np.testing.assert_array_equal(lazy[shuffled][mask[:18]].read([2, 0]), eager[shuffled][mask[:18]][[2, 0]])
    np.testing.assert_array_equal(lazy[9], eager[9])
    stacked = PatchRows.concat([lazy[shuffled], lazy[mask], lazy[:0]])
    assert len(stacked.files) == 3
    np.testing.assert_array_equal(stacked.read(), np.concatenate([eager[shuffled], eager[mask]]))
    np.testing.assert_array_equal(take_patches(stacked, np.array([3, 1])), take_patches(np.asarray(stacked), [3, 1]))
    shipped = pickle.loads(pickle.dumps(stacked))  # what a spawned worker gets: paths and rows, no open file
    np.testing.assert_array_equal(shipped.read(np.arange(len(stacked))[::-1]), stacked.read()[::-1])
    assert len(lazy.read(np.array([], dtype=int))) == 0
    reader = PatchFileReader(lazy.files[1], 11)
    assert reader.reads_bytes == (layout in ("prepare", "contiguous", "user block"))  # else through HDF5
    reader.close()
    stacked.close()
    np.testing.assert_array_equal(stacked.read([0]), eager[shuffled[:1]])  # closed files open again


def test_spot_sets_subset_and_stack_without_reading(tmp_path):
    spots = linear_spots(n=60)
    lazy, eager = caches(tmp_path, [20, 20, 20])
    on_disk, in_memory = replace(spots, patches=lazy), replace(spots, patches=eager)
    pick = np.r_[50, 3, 27, 27, 41]
    for take in (lambda s: s.subset(pick), lambda s: s.subset(spots.sample_ids == "s2"),
                 lambda s: SpotSet.concat([s.subset(pick), s.subset(np.arange(10))]),
                 lambda s: s.subset(pick).without_expression()):
        assert isinstance(take(on_disk).patches, PatchRows)
        np.testing.assert_array_equal(take(on_disk).patches.read(), take(in_memory).patches)
    mixed = SpotSet.concat([on_disk.subset(pick), in_memory.subset(np.arange(4))])  # in memory: the rest is read
    np.testing.assert_array_equal(mixed.patches, np.concatenate([eager[pick], eager[:4]]))


def test_a_cache_changed_after_loading_is_refused(tmp_path):
    lazy, _ = caches(tmp_path, [6])
    write_cache(tmp_path / "s0.h5", np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(He2stError, match="load the spots again"):
        lazy.read([0])
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(He2stError, match="bad.h5"):
        PatchRows.from_cache(tmp_path / "bad.h5")


def test_load_spots_lists_the_prepared_patches_without_reading_them(tmp_path):
    genes = [f"G{i}" for i in range(12)]
    ws = Workspace(prepared_sections(tmp_path, {"S1": "P0", "S2": "P1"}, genes))
    embed = EmbedConfig(encoder="test_vit")
    for sid in ("S1", "S2"):  # embeddings as `he2st embed` writes them (their values do not matter here)
        barcodes = PatchCache(ws.patch_path(sid, PatchSpec())).barcodes
        path = ws.embedding_path(embed, sid, PatchSpec())
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w") as fh:
            fh["embeddings"] = np.zeros((len(barcodes), 8), np.float32)
            fh["barcodes"] = np.array([b.encode() for b in barcodes])
    panel = GenePanel(genes=genes)
    spots = load_spots(ws, ["S2", "S1"], PatchSpec(), embed, panel, with_targets=True, with_patches=True)
    assert isinstance(spots.patches, PatchRows) and len(spots.patches) == len(spots)
    expected = np.concatenate([PatchCache(ws.patch_path(s, PatchSpec())).read() for s in ("S2", "S1")])
    np.testing.assert_array_equal(np.asarray(spots.patches), expected)
    spots.patches.close()  # HDF5 refuses to rewrite a file its own process holds open
    write_cache(ws.patch_path("S1", PatchSpec()), expected[:3])
    with pytest.raises(He2stError, match="patches of S1 do not match its spots"):
        load_spots(ws, ["S1"], PatchSpec(), embed, panel, with_targets=False, with_patches=True)


def finetuned_predictions(spots: SpotSet) -> np.ndarray:
    method = create_method("bleep", finetune_encoder=True, encoder="test_vit", encoder_pretrained=False, ensemble=1,
                           train={"epochs": 1, "batch_size": 16}, seed=3)
    method.panel = GenePanel(genes=spots.genes)
    method.fit(spots.subset(np.arange(32)), spots.subset(np.arange(32, 40)))
    return method.predict(spots.subset(np.arange(40, 48))).expression


def test_finetuning_takes_the_same_steps_on_patches_read_from_the_caches(tmp_path):
    spots = linear_spots(n=48)
    lazy, eager = caches(tmp_path, [16, 16, 16], side=32)
    np.testing.assert_array_equal(finetuned_predictions(replace(spots, patches=lazy)),
                                  finetuned_predictions(replace(spots, patches=eager)))


def peak_bytes_of_an_epoch(paths: list[Path], batch: int = 32) -> int:
    """Peak Python-heap bytes while listing the caches' patches, taking a training subset and reading its
    shuffled batches, as loading spots and one fine-tuning epoch do."""
    tracemalloc.start()
    try:
        rows = PatchRows.concat([PatchRows.from_cache(p) for p in paths])
        train = rows[np.arange(len(rows)) % 5 != 0]
        order = np.random.default_rng(0).permutation(len(train))
        for a in range(0, len(train), batch):
            take_patches(train, order[a : a + batch])
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_epoch_holds_one_batch_whatever_the_number_of_patches(tmp_path):
    rng = np.random.default_rng(0)
    paths = {n: [write_cache(tmp_path / f"{n}_{i}.h5", rng.integers(0, 256, (n // 2, 64, 64, 3), dtype=np.uint8))
                 for i in range(2)] for n in (200, 2000)}
    patch = 64 * 64 * 3
    small, large = peak_bytes_of_an_epoch(paths[200]), peak_bytes_of_an_epoch(paths[2000])
    assert large - small < (2000 - 200) * patch // 50, (small, large)  # row indices only, no patches
    assert large < 3 * 32 * patch, large  # a batch read and put in order; all 2,000 patches would be 62 batches


@pytest.mark.slow  # four fresh interpreters, each importing torch
def test_the_memory_benchmark_prints_both_modes_side_by_side() -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "finetune_memory.py"), "--n", "96,192"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout.splitlines()
    sizes = re.compile(r"^n=(\d+) patches_mib=\d+ eager_peak_rss_mib=\d+ eager_loop_s=[\d.]+ "
                       r"lazy_peak_rss_mib=\d+ lazy_loop_s=[\d.]+$")
    assert [sizes.match(line).group(1) for line in out[:2]] == ["96", "192"]
    assert re.match(r"^eager_growth_mib=-?\d+ lazy_growth_mib=-?\d+$", out[2])
    assert re.match(r"^read_ms_per_patch patch_rows=[\d.]+ h5py=[\d.]+ \(x[\d.]+\)$", out[3])
