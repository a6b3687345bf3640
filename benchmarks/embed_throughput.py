"""Embedding throughput: each runtime's bare forward pass and `he2st embed` end to end, side by side.

    python benchmarks/embed_throughput.py [--work-dir WORK] [--encoder efficientnet_lite0] [--batch-size 64]
                                          [--seconds 15] [--runtimes torch,onnxruntime,openvino]

Prepares her2st into WORK if needed, then, in one run on the same model and batch:
(1) each runtime's bare forward pass in patches/s -- torch (inference mode, channels-last, the
precision policy of `he2st embed`) on normalised tensors, the ONNX runtimes on the validated graph
he2st runs (uint8 patches in, normalisation inside the graph); (2) `embed_cache` over every her2st
spot-patch cache (reading + stain/TTA + forward + HDF5 writes) with runtime torch (he2st before
runtimes existed) and with runtime auto (today's default). Prints the ratio of the default's
end-to-end rate to the fastest bare runtime and to the torch end-to-end rate.
On a GPU it also reports bf16 patches/s for a ViT-L/16 (UNI architecture, random weights) and the
fraction of the GPU's bf16 matrix-math peak that implies (ViT-L/16 @ 224 px ~ 61.6 GFLOPs/patch).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from he2st.data.embeddings import EmbedConfig
from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.workspace import Workspace
from he2st.encoders.inference import PatchEmbedder, autocast_dtype, load_encoder, resolve_device
from he2st.encoders.runtime import GRAPH_RUNTIMES, graph_runner, installed
from he2st.workflows.config import PrepareConfig
from he2st.workflows.embed import embed_cache
from he2st.workflows.prepare import prepare


def rate(step: Callable[[], object], batch: int, seconds: float, sync: Callable[[], None] = lambda: None) -> float:
    """Patches/s of ``step`` (one batch) repeated for ``seconds`` after two warm-up calls."""
    for _ in range(2):
        step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += batch
    sync()
    return n / (time.perf_counter() - start)


def bare_torch(encoder, batch: int, device, dtype, seconds: float) -> float:
    x = torch.randn(batch, 3, encoder.spec.input_size, encoder.spec.input_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    encoder.to(device).eval()
    if device.type != "cpu":
        encoder.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        return rate(lambda: encoder(x), batch, seconds, sync)


def bare_graph(encoder, runtime: str, batch: int, seconds: float) -> float:
    run = graph_runner(encoder, runtime, raw_input=True, tokens=False, threads=torch.get_num_threads())
    if run is None:
        return float("nan")
    size = encoder.spec.input_size
    patches = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    return rate(lambda: run(patches), batch, seconds)


def end_to_end(ws: Workspace, encoder, cfg: EmbedConfig) -> tuple[float, str, int]:
    """`embed_cache` over every spot-patch cache into fresh files: patches/s, runtime used, patches."""
    n, seconds = 0, 0.0
    embedder = PatchEmbedder(encoder, cfg, PatchSpec().size_px, cfg.token_grid)
    with tempfile.TemporaryDirectory() as tmp:
        for sid in ws.sample_ids():
            cache = PatchCache(ws.patch_path(sid, PatchSpec()))
            result = embed_cache(embedder, cache, Path(tmp) / f"{sid}.h5", cfg)
            n, seconds = n + result.n, seconds + result.seconds
    return n / seconds, embedder.runtime, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="he2st-work")
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15.0, help="duration of each bare measurement")
    ap.add_argument("--runtimes", default="torch," + ",".join(GRAPH_RUNTIMES))
    args = ap.parse_args()
    ws = Workspace(args.work_dir)
    if not ws.sample_ids():
        prepare(PrepareConfig(work_dir=Path(args.work_dir)))
    cfg = EmbedConfig(encoder=args.encoder, batch_size=args.batch_size, num_workers=args.num_workers)
    encoder = load_encoder(cfg)
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(device, cfg.precision)
    print(f"device {device}, torch threads {torch.get_num_threads()}, encoder {args.encoder}, batch {args.batch_size}")
    bare: dict[str, float] = {}
    for runtime in args.runtimes.split(","):
        if runtime == "torch":
            bare[runtime] = bare_torch(encoder, args.batch_size, device, dtype, args.seconds)
        elif device.type == "cpu" and installed(runtime):
            bare[runtime] = bare_graph(encoder, runtime, args.batch_size, args.seconds)
        else:
            print(f"bare {runtime}: not measured ({'not installed' if device.type == 'cpu' else 'CPU runtime'})")
            continue
        print(f"bare {runtime:<12s} {bare[runtime]:8.1f} patches/s")
    fastest = max(bare, key=lambda k: bare[k] if bare[k] == bare[k] else -1.0)
    torch_e2e, _, n = end_to_end(ws, encoder, cfg.model_copy(update={"runtime": "torch"}))
    print(f"he2st embed, runtime torch:  {torch_e2e:8.1f} patches/s ({n} patches)")
    auto_e2e, used, n = end_to_end(ws, encoder, cfg)
    print(f"he2st embed, runtime auto ({used}): {auto_e2e:8.1f} patches/s ({n} patches)")
    print(f"ratio e2e auto / fastest bare ({fastest}): {auto_e2e / bare[fastest]:6.3f}  (goal >= 0.85)")
    print(f"ratio e2e auto / e2e torch:             {auto_e2e / torch_e2e:6.3f}  (goal >= 2.5)")
    if device.type == "cuda":
        import timm

        vit = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0).to(device)
        vit = vit.to(memory_format=torch.channels_last)
        x = torch.randn(256, 3, 224, 224, device=device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            vit_rate = rate(lambda: vit(x), 256, args.seconds, torch.cuda.synchronize)
        print(f"ViT-L/16 bf16:         {vit_rate:8.1f} patches/s = {vit_rate * 61.6e9 / 1e12:.1f} TFLOP/s")
    else:
        print("no GPU available: ViT-L/16 bf16 figure not measured")


if __name__ == "__main__":
    main()
