"""Whole-slide prediction throughput: `he2st predict` end to end on a large synthetic slide.

    python benchmarks/wsi_predict.py [--size 40000] [--encoder efficientnet_lite0] [--chunk 512]
                                     [--batch-size 64] [--slide existing.tif] [--embed-sample 1024]
                                     [--runtimes torch,auto]

Builds a synthetic H&E-like pyramidal TIFF (size x size px at 0.5 µm/px, tiled JPEG, levels at
1/4 steps as top-level pages) strip by strip in a child process, so neither the image nor its
build counts towards the measured memory. Then predicts it with a kNN model (random bank, 250
genes) over the chosen encoder's features at a 100 µm hexagonal grid, once per embed runtime
(``--runtimes torch,auto``: he2st before runtimes existed, and today's default), each run in its own
process, and reports for each:

* spots/s end to end (thumbnail, tissue detection, patch reading, embedding, prediction, writes);
* the share of busy time spent reading/decoding/resampling patches vs in the model (reading runs
  one chunk ahead in a thread, so part of it is hidden behind the model);
* peak RSS of the predicting process (resource.getrusage);
* the ratio to bare `he2st embed` throughput (``embed_cache`` over a patch cache of the same
  patches), i.e. what whole-slide streaming costs over embedding pre-cut patches.

The full 40,000 px slide is 1.6 gigapixels (20 x 20 mm, ~18,500 spots under tissue); ``--size 8000``
(~740 spots) is a quick check. Last, the ratio of each runtime's spots/s to the first's.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import anndata
import h5py
import numpy as np
import tifffile

from he2st.data.embeddings import EmbedConfig
from he2st.data.genes import GenePanel
from he2st.data.patches import PatchCache, PatchSpec, read_patches
from he2st.data.slide import open_slide
from he2st.data.spots import SpotSet
from he2st.encoders.inference import load_encoder
from he2st.encoders.spec import EncoderSpec
from he2st.methods import ModelCard, create_method
from he2st.predict import ChunkInfo
from he2st.workflows.embed import embed_cache
from he2st.workflows.predict_slide import predict_slide

TILE = 256
MPP = 0.5
BACKGROUND = np.array([242, 242, 242], dtype=np.int16)
STROMA = np.array([215, 150, 200], dtype=np.int16)
NUCLEUS = np.array([80, 50, 130], dtype=np.int16)


# ---------------------------------------------------------------------------- synthetic slide
def _blobs(size: int) -> list[tuple[float, float, float, float]]:
    """Elliptical tissue pieces (cx, cy, rx, ry) in level-0 px covering ~40% of the slide."""
    return [(0.32 * size, 0.35 * size, 0.25 * size, 0.2 * size), (0.68 * size, 0.62 * size, 0.22 * size, 0.3 * size),
            (0.3 * size, 0.78 * size, 0.12 * size, 0.1 * size)]


def render_strip(size: int, ds: float, y0: int, height: int, width: int, seed: int) -> np.ndarray:
    """Rows ``y0..y0+height`` of the level with downsample ``ds`` (width padded to whole tiles)."""
    rng = np.random.default_rng(seed)
    ys = (np.arange(y0, y0 + height) + 0.5) * ds
    xs = (np.arange(width) + 0.5) * ds
    inside = np.zeros((height, width), dtype=bool)
    for cx, cy, rx, ry in _blobs(size):
        inside |= ((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2 < 1
    # nuclei: 8x8 level-0 px (4 µm) cells, ~18% dark, drawn at this level's resolution
    cell = max(1, round(8 / ds))
    coarse = rng.random((height // cell + 2, width // cell + 2)) < 0.18
    nuclei = np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:height, :width]
    img = np.broadcast_to(BACKGROUND, (height, width, 3)).copy()
    img[inside] = STROMA
    img[inside & nuclei] = NUCLEUS
    img += rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _tiles(size: int, ds: float, seed: int):
    w = h = math.ceil(size / ds)
    padded = math.ceil(w / TILE) * TILE
    for ty in range(math.ceil(h / TILE)):
        strip = render_strip(size, ds, ty * TILE, TILE, padded, seed + ty)
        for tx in range(padded // TILE):
            yield strip[:, tx * TILE : (tx + 1) * TILE]


def build_slide(path: Path, size: int) -> Path:
    """Tiled JPEG pyramid (levels 1, 1/4, 1/16, ... down to <= 2048 px), written tile by tile."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        ds, level = 1.0, 0
        while True:
            side = math.ceil(size / ds)
            tif.write(_tiles(size, ds, 1000 * level), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                      compression="jpeg", compressionargs={"level": 85}, photometric="rgb",
                      subfiletype=0 if level == 0 else 1,
                      resolution=(1e4 / (MPP * ds), 1e4 / (MPP * ds)), resolutionunit="CENTIMETER")
            if side <= 2048:
                break
            ds, level = ds * 4, level + 1
    return path


# ---------------------------------------------------------------------------- model and references
def small_model(encoder_spec: EncoderSpec, dim: int, path: Path, n: int = 2000, genes: int = 250) -> Path:
    """kNN over a random bank: realistic retrieval cost, no training data needed."""
    rng = np.random.default_rng(0)
    names = [f"GENE{i}" for i in range(genes)]
    method = create_method("knn", top_k=50)
    method.card = ModelCard(method="knn", panel=GenePanel(genes=names), encoder=encoder_spec, patch=PatchSpec(),
                            embedding=EmbedConfig(encoder=encoder_spec.name))
    method.fit(SpotSet(np.array(["ref"] * n, dtype=object), np.array([str(i) for i in range(n)], dtype=object),
                       rng.normal(size=(n, dim)).astype(np.float32), np.zeros((n, 2)), names,
                       rng.gamma(2, 1, (n, genes)).astype(np.float32)))
    return method.save(path)


def bare_embed_rate(encoder, slide_path: Path, xy: np.ndarray, cfg: EmbedConfig, tmp: Path) -> float:
    """`he2st embed` patches/s on the same patches, cut beforehand into a patch cache."""
    spec = PatchSpec()
    with open_slide(slide_path) as slide:
        patches = read_patches(slide, xy, spec.field_um / MPP, spec.size_px)
    cache = tmp / "patches.h5"
    with h5py.File(cache, "w") as fh:
        fh.create_dataset("img", data=patches, chunks=(16, spec.size_px, spec.size_px, 3))
        fh.create_dataset("coords", data=np.round(xy).astype(np.int64))
        fh.create_dataset("barcode", data=np.array([f"s{i}".encode() for i in range(len(xy))]))
        fh.attrs.update({"format": 1, "spec": spec.model_dump_json(), "sample_id": "bench"})
    result = embed_cache(encoder, PatchCache(cache), tmp / "emb.h5", cfg)
    return result.n / result.seconds


def measure(slide_path: Path, runtime: str, args: argparse.Namespace, tmp: Path) -> dict:
    """One `he2st predict` run with ``runtime`` (in its own process, so peak RSS is this run's)."""
    cfg = EmbedConfig(encoder=args.encoder, batch_size=args.batch_size, runtime=runtime)
    encoder = load_encoder(cfg)
    model = small_model(encoder.spec, encoder.embed_dim, tmp / f"knn_{runtime}.pt")
    chunks: list[ChunkInfo] = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    out = predict_slide(model, slide_path, tmp / f"pred_{runtime}", chunk=args.chunk, batch_size=args.batch_size,
                        encoder=encoder, on_chunk=chunks.append, runtime=runtime)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    adata = anndata.read_h5ad(out)
    xy, used = adata.obsm["spatial"], adata.uns["he2st"]["runtime"]
    n = len(xy)
    read_s = sum(c.read_s for c in chunks)
    model_s = sum(c.embed_s + c.predict_s for c in chunks)
    embed_s = sum(c.embed_s for c in chunks)
    rng = np.random.default_rng(0)
    sample = xy[np.sort(rng.choice(n, size=min(n, args.embed_sample), replace=False))]
    bare = bare_embed_rate(encoder, slide_path, sample, cfg, tmp / f"bare_{runtime}")
    return {
        "runtime": runtime, "runtime_used": used, "spots": n, "seconds": wall, "spots_per_s": n / wall,
        "read_s": read_s, "embed_s": embed_s, "predict_s": model_s - embed_s,
        "read_share": read_s / (read_s + model_s), "non_model_s": wall - model_s,
        "peak_rss_mb": peak, "rss_before_predict_mb": rss_before, "bare_embed_patches_per_s": bare,
        "ratio_to_bare_embed": n / wall / bare, "encoder": args.encoder, "chunk": args.chunk,
    }


def _child(queue: mp.Queue, *arguments) -> None:
    queue.put(measure(*arguments))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40_000, help="slide side in px (0.5 µm/px)")
    ap.add_argument("--slide", type=Path, help="reuse this slide instead of building one (0.5 µm/px)")
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--embed-sample", type=int, default=1024, help="patches for the bare `he2st embed` reference")
    ap.add_argument("--runtimes", default="torch,auto", help="embed runtimes to compare, each in its own process")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()

    context = mp.get_context("spawn")
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        slide_path = args.slide
        if slide_path is None:
            slide_path = tmp / f"synthetic_{args.size}.tif"
            start = time.perf_counter()
            child = context.Process(target=build_slide, args=(slide_path, args.size))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f"building the slide failed (exit {child.exitcode})")
            print(f"built {args.size}x{args.size} px slide ({slide_path.stat().st_size / 1e6:.0f} MB) "
                  f"in {time.perf_counter() - start:.0f} s")
        for runtime in args.runtimes.split(","):
            (tmp / f"bare_{runtime}").mkdir()
            queue = context.Queue()
            child = context.Process(target=_child, args=(queue, slide_path, runtime, args, tmp))
            child.start()
            numbers = queue.get()
            child.join()
            results.append(numbers)
            print(f"runtime {runtime} ({numbers['runtime_used']}): {numbers['spots']} spots in "
                  f"{numbers['seconds']:.1f} s = {numbers['spots_per_s']:.1f} spots/s; peak RSS "
                  f"{numbers['peak_rss_mb']:.0f} MB; reading {numbers['read_s']:.1f} s "
                  f"({numbers['read_share']:.0%} of busy time, overlapped), embed {numbers['embed_s']:.1f} s, "
                  f"predict {numbers['predict_s']:.1f} s; bare `he2st embed` {numbers['bare_embed_patches_per_s']:.1f} "
                  f"patches/s (ratio predict / embed {numbers['ratio_to_bare_embed']:.3f})")
    if len(results) > 1:
        base = results[0]
        for numbers in results[1:]:
            print(f"ratio spots/s {numbers['runtime']} / {base['runtime']}: "
                  f"{numbers['spots_per_s'] / base['spots_per_s']:.2f}  (goal >= 2.5)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
