"""int8 encoders: patches/s and the change in her2st HEG-50, with calibration on training patients.

    python benchmarks/embed_int8.py --work-dir WORK [--methods knn,ridge_cv,carhe] [--calibration 256]

WORK is a her2st work folder prepared and embedded by he2st (torch embeddings, e.g. from the demo).
In one run, on the default encoder:

* the fp32 ONNX graph (runtime auto) embeds every sample into a fresh folder beside WORK, and every
  method is scored on every LOPO fold with those features and with WORK's torch features: the
  accuracy change a runtime makes (should be nil);
* for each fold, ONNX Runtime static int8 quantisation (QDQ, per-channel weights) is calibrated on
  ``--calibration`` spot patches of that fold's training patients only, every sample is embedded
  with it, and the methods are scored on that fold: the accuracy change int8 makes;
* bare patches/s of the fp32 graph and of an int8 graph on the chosen runtime.

he2st offers int8 only if it costs under 0.002 HEG-50 (issue "Inference at the machine's speed").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from he2st.data.embeddings import EmbedConfig
from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.views import view_patch
from he2st.data.workspace import Workspace
from he2st.encoders import runtime as runtimes
from he2st.encoders.export import onnx_graph
from he2st.encoders.inference import PatchEmbedder, load_encoder
from he2st.encoders.runtime import GRAPH_RUNTIMES, installed
from he2st.workflows.benchmark import benchmark_folds
from he2st.workflows.config import BenchmarkConfig
from he2st.workflows.embed import embed_cache, own_views
from he2st.workflows.protocol import build_fold_data, run_fold


class _Patches(CalibrationDataReader):
    def __init__(self, patches: np.ndarray, batch: int = 16) -> None:
        self._batches = iter([patches[i : i + batch] for i in range(0, len(patches), batch)])

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {"patches": batch}


def quantised(graph: Path, calibration: np.ndarray, out: Path) -> Path:
    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(graph), str(prepared))
    quantize_static(str(prepared), str(out), _Patches(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def calibration_patches(ws: Workspace, samples: list[str], n: int) -> np.ndarray:
    """``n`` spot patches drawn evenly (seeded) from ``samples``' patch caches."""
    rng = np.random.default_rng(0)
    per = [PatchCache(ws.patch_path(s, PatchSpec())) for s in samples]
    take = np.array_split(np.arange(n), len(per))
    return np.concatenate([c.read()[np.sort(rng.choice(len(c), size=min(len(c), len(t)), replace=False))]
                           for c, t in zip(per, take, strict=True)])


def shadow(work: Path, root: Path) -> Path:
    """A work folder sharing WORK's samples, patches and folds, with embeddings of its own."""
    root.mkdir(parents=True)
    for name in ("samples", "patches", "folds"):
        (root / name).symlink_to((work / name).resolve())
    return root


def embed_with(ws: Workspace, encoder, config: EmbedConfig, graph: Path | None, runtime: str) -> None:
    """Embed every sample (spot patches and context fields) with ``graph`` on ``runtime`` (None: he2st's)."""
    embedder = PatchEmbedder(encoder, config, PatchSpec().size_px)
    if graph is not None:
        embedder._graph = runtimes._load(runtime, graph, torch.get_num_threads())
    for sid in ws.sample_ids():
        patch = PatchSpec()
        views = [(view_patch(patch, v), ws.view_path(config, sid, patch, v)) for v in own_views(ws, sid, patch, config)]
        for spec, out in [(patch, ws.embedding_path(config, sid, patch)), *views]:
            embed_cache(embedder, PatchCache(ws.patch_path(sid, spec)), out, config)


def scores(ws: Workspace, methods: list[str], fold_index: list[int] | None = None) -> dict[str, list[float]]:
    cfg = BenchmarkConfig(work_dir=ws.root)
    folds, patients = benchmark_folds(cfg, ws)
    out: dict[str, list[float]] = {m: [] for m in methods}
    for i, fold in enumerate(folds):
        if fold_index is not None and i not in fold_index:
            continue
        data = build_fold_data(ws, fold, cfg, patients)
        for m in methods:
            out[m].append(run_fold(m, data, cfg).result.set_scores()["heg50"]["pearson_mean"])
    return out


def rate(run, batch: np.ndarray, seconds: float = 10.0) -> float:
    run(batch)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(batch)
        n += len(batch)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--methods", default="knn,ridge_cv,carhe")
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--runtime", default=next((r for r in GRAPH_RUNTIMES if installed(r)), "onnxruntime"))
    args = ap.parse_args()
    work, methods = Path(args.work_dir), args.methods.split(",")
    ws = Workspace(work)
    config = EmbedConfig(runtime=args.runtime)
    encoder = load_encoder(config)
    threads = torch.get_num_threads()
    folds, _ = benchmark_folds(BenchmarkConfig(work_dir=work), ws)
    with tempfile.TemporaryDirectory(dir=work.parent) as tmp_name:
        tmp = Path(tmp_name)
        fp32_ws = Workspace(shadow(work, tmp / "fp32"))
        embed_with(fp32_ws, encoder, config, None, args.runtime)
        torch_scores, fp32_scores = scores(ws, methods), scores(fp32_ws, methods)
        int8_scores: dict[str, list[float]] = {m: [] for m in methods}
        graph = onnx_graph(encoder, raw_input=True, tokens=False)
        for i, fold in enumerate(folds):
            calibration = calibration_patches(ws, fold.train, args.calibration)
            q = quantised(graph, calibration, tmp / f"int8_{fold.name}.onnx")
            fold_ws = Workspace(shadow(work, tmp / f"int8_{fold.name}"))
            embed_with(fold_ws, encoder, config, q, args.runtime)
            for m, values in scores(fold_ws, methods, [i]).items():
                int8_scores[m] += values
        batch = calibration_patches(ws, ws.sample_ids(), 64)
        fp32_rate = rate(runtimes._load(args.runtime, graph, threads), batch)
        int8_rate = rate(runtimes._load(args.runtime, q, threads), batch)
    print(f"runtime {args.runtime}, {threads} threads, calibration {args.calibration} training-patient patches per fold")
    print(f"bare patches/s: fp32 graph {fp32_rate:.1f}, int8 graph {int8_rate:.1f} (x{int8_rate / fp32_rate:.2f})")
    print("| method | torch | fp32 graph | int8 | int8 - fp32 | folds (int8 - fp32) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m in methods:
        t, f, q8 = (float(np.mean(s[m])) for s in (torch_scores, fp32_scores, int8_scores))
        per = " ".join(f"{b - a:+.3f}" for a, b in zip(fp32_scores[m], int8_scores[m], strict=True))
        print(f"| {m} | {t:.3f} | {f:.3f} | {q8:.3f} | {q8 - f:+.3f} | {per} |")


if __name__ == "__main__":
    main()
