"""Cost of `he2st adapt` on this machine: seconds per 1,000 patches per epoch, side by side with embedding.

    python benchmarks/adapt_cost.py [--work-dir WORK] [--encoder efficientnet_lite0] [--patches 256]
                                    [--train-blocks 2,all] [--batch-size 32]

Prepares her2st into WORK if needed, then, in one run on the same patches (the first ``--patches`` of a
seeded draw over every spot-patch cache): one epoch of SimSiam adaptation for each ``--train-blocks``
setting (``all``: the whole encoder), and one torch forward pass over the same patches as `he2st embed
--runtime torch` makes it. Prints seconds per 1,000 patches per epoch -- wall clock and the process's CPU
time (all its threads), which a machine shared with other jobs inflates less -- the trained parameters, and
each setting's cost as a multiple of embedding the same patches once.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.workspace import Workspace
from he2st.encoders import create
from he2st.encoders.adaptation import AdaptConfig
from he2st.encoders.simsiam import adapt_encoder
from he2st.workflows.adapt import CachedPatches
from he2st.workflows.config import PrepareConfig
from he2st.workflows.prepare import prepare


def timed(work: Callable[[], object]) -> tuple[float, float, object]:
    """Wall and process CPU seconds of ``work()``, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def embed(encoder_name: str, source: CachedPatches, n: int, batch: int) -> None:
    """A torch forward pass (inference mode, fp32) over the first ``n`` patches, read included."""
    encoder = create(encoder_name)
    with torch.inference_mode():
        for first in range(0, n, batch):
            encoder(encoder.preprocess(source.read(np.arange(first, min(first + batch, n)))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="he2st-work")
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--patches", type=int, default=256, help="patches per measured epoch")
    ap.add_argument("--train-blocks", default="2,all", help="comma-separated settings; all = the whole encoder")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    ws = Workspace(args.work_dir)
    if not ws.patched_sample_ids(PatchSpec()):
        prepare(PrepareConfig(work_dir=Path(args.work_dir)))
    ids = ws.patched_sample_ids(PatchSpec())
    print(f"torch threads {torch.get_num_threads()}, encoder {args.encoder}, batch {args.batch_size}, "
          f"{args.patches} patches from {len(ids)} samples")
    with ExitStack() as stack:
        source = CachedPatches([PatchCache(ws.patch_path(s, PatchSpec())) for s in ids], stack)
        n = min(args.patches, source.n)
        wall, cpu, _ = timed(lambda: embed(args.encoder, source, n, args.batch_size))
        print(f"embed (torch forward, fp32):   {1000 * wall / n:7.1f} s wall, {1000 * cpu / n:7.1f} s CPU per 1,000 "
              "patches")
        for setting in args.train_blocks.split(","):
            blocks = None if setting == "all" else int(setting)
            config = AdaptConfig(epochs=1, batch_size=args.batch_size, max_patches=n, train_blocks=blocks)
            a_wall, a_cpu, result = timed(lambda config=config: adapt_encoder(create(args.encoder), source, config))
            print(f"adapt train_blocks={setting:<4s} {1000 * a_wall / n:7.1f} s wall, {1000 * a_cpu / n:7.1f} s CPU "
                  f"per 1,000 patches per epoch ({result.trained_parameters / 1e6:.2f} M parameters trained; "
                  f"{a_cpu / cpu:.1f}x the CPU time of embedding them; loss {result.epoch_loss[0]:.3f})")


if __name__ == "__main__":
    main()
