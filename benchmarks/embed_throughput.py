"""Embedding throughput: `he2st embed` end to end vs a bare forward pass of the same encoder.

    python benchmarks/embed_throughput.py [--work-dir WORK] [--encoder efficientnet_lite0] [--batch-size 64]

Prepares her2st into WORK if needed, then times (1) the encoder's forward pass on random
normalised tensors of the embedding batch size (inference mode, channels-last, same precision
policy as `he2st embed`), and (2) `embed_cache` over every her2st patch cache, writing fresh files
(reading + preprocessing + forward + HDF5 writes). Prints both in patches/s and their ratio.
On a GPU it also reports bf16 patches/s for a ViT-L/16 (UNI architecture, random weights) and the
fraction of the GPU's bf16 matrix-math peak that implies (ViT-L/16 @ 224 px ~ 61.6 GFLOPs/patch).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from he2st.data.embeddings import EmbedConfig
from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.workspace import Workspace
from he2st.encoders.inference import autocast_dtype, load_encoder, resolve_device
from he2st.workflows.config import PrepareConfig
from he2st.workflows.embed import embed_cache
from he2st.workflows.prepare import prepare


def bare_forward(encoder, batch: int, device, dtype, seconds: float = 20.0) -> float:
    x = torch.randn(batch, 3, encoder.spec.input_size, encoder.spec.input_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    encoder.to(device).eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for _ in range(2):
            encoder(x)  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            encoder(x)
            n += batch
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="he2st-work")
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=1)
    args = ap.parse_args()
    ws = Workspace(args.work_dir)
    if not ws.sample_ids():
        prepare(PrepareConfig(work_dir=Path(args.work_dir)))
    cfg = EmbedConfig(encoder=args.encoder, batch_size=args.batch_size, num_workers=args.num_workers)
    encoder = load_encoder(cfg)
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(device, cfg.precision)
    print(f"device {device}, torch threads {torch.get_num_threads()}, encoder {args.encoder}, batch {args.batch_size}")
    bare = bare_forward(encoder, args.batch_size, device, dtype)
    print(f"bare forward pass:     {bare:8.1f} patches/s")
    n, seconds = 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for sid in ws.sample_ids():
            cache = PatchCache(ws.patch_path(sid, PatchSpec()))
            result = embed_cache(encoder, cache, Path(tmp) / f"{sid}.h5", cfg)
            n, seconds = n + result.n, seconds + result.seconds
    end_to_end = n / seconds
    print(f"he2st embed (e2e):     {end_to_end:8.1f} patches/s  ({n} patches in {seconds:.1f} s)")
    print(f"ratio e2e / bare:      {end_to_end / bare:8.3f}  (goal >= 0.85)")
    if device.type == "cuda":
        import timm

        vit = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0).to(device)
        vit = vit.to(memory_format=torch.channels_last)
        rate = bare_forward(vit, 256, device, torch.bfloat16)
        flops = rate * 61.6e9
        print(f"ViT-L/16 bf16:         {rate:8.1f} patches/s = {flops / 1e12:.1f} TFLOP/s")
    else:
        print("no GPU available: ViT-L/16 bf16 figure not measured")


if __name__ == "__main__":
    main()
