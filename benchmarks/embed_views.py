"""Cost of each view of a spot: seconds per 1,000 spots for the offline encoders and the sub-spot tiles.

    python benchmarks/embed_views.py --work-dir W [--spots 512] [--repeats 3] [--runtime auto]

Reads the first ``--spots`` spot patches of a prepared work folder (112 µm at 224 px), then embeds
them, side by side on the same patches, as ``he2st embed`` makes each view: the spot with
``efficientnet_lite0`` (the default), ``efficientnet_lite1`` (240 px input) and ``efficientnet_lite2``
(260 px), and the ``tiles`` view (2 x 2 tiles of each spot, each enlarged to Lite0's 224 px input).
The runs alternate ``--repeats`` times so that load on the machine is shared; each option's median
seconds per 1,000 spots is printed with its ratio to the Lite0 spot embedding. Graph export and
validation (once per run of ``he2st embed``) are left out.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from he2st.data.embeddings import EmbedConfig
from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.workspace import Workspace
from he2st.encoders.inference import PatchEmbedder, load_encoder

OPTIONS = {  # label -> (encoder, tiles per side)
    "lite0 spot": ("efficientnet_lite0", 1),
    "lite1 spot": ("efficientnet_lite1", 1),
    "lite2 spot": ("efficientnet_lite2", 1),
    "lite0 tiles (2x2)": ("efficientnet_lite0", 2),
}


def spot_patches(ws: Workspace, n: int) -> np.ndarray:
    """The first ``n`` spot patches of the work folder, sample by sample."""
    parts, have = [], 0
    for sid in ws.sample_ids():
        if have >= n:
            break
        patches = PatchCache(ws.patch_path(sid, PatchSpec())).read(0, n - have)
        parts.append(patches)
        have += len(patches)
    return np.concatenate(parts)


def seconds(embedder: PatchEmbedder, patches: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            embedder(patches[i : i + batch])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--spots", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runtime", default="auto")
    args = parser.parse_args()
    patches = spot_patches(Workspace(args.work_dir), args.spots)
    embedders = {}
    for label, (name, tiles) in OPTIONS.items():
        config = EmbedConfig(encoder=name, runtime=args.runtime, device="cpu")
        embedders[label] = PatchEmbedder(load_encoder(config), config, PatchSpec().size_px, tiles=tiles)
        embedders[label](patches[:2])  # warm-up
    times: dict[str, list[float]] = {label: [] for label in OPTIONS}
    for _ in range(args.repeats):
        for label, embedder in embedders.items():
            times[label].append(seconds(embedder, patches, args.batch_size) / len(patches) * 1000)
    base = statistics.median(times["lite0 spot"])
    print(f"{len(patches)} spots, batch {args.batch_size}, {torch.get_num_threads()} threads, median of "
          f"{args.repeats} alternating runs")
    print(f"{'view':<20} {'runtime':<12} {'s / 1,000 spots':>16} {'x lite0':>8}")
    for label, runs in times.items():
        median = statistics.median(runs)
        print(f"{label:<20} {embedders[label].runtime:<12} {median:>16.1f} {median / base:>8.2f}")


if __name__ == "__main__":
    main()
