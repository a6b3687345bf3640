"""Study-scale figures: the default method (``ensemble``) end to end on a synthetic study of Visium sections.

Builds under ``--root`` a synthetic study of ``--sections`` Visium-like sections (55 µm spots on the 100 µm
hexagonal lattice of a 6.5 mm capture area, under tissue-shaped masks of varied size, ``--spots`` x
``--scale`` spots in all), three sections per patient, with expression from smooth spatial tissue
programmes, patient effects and negative-binomial counts, and 1,280-d image features (the default
encoder's width) that carry the same programmes through a random projection plus patient stain shifts and
noise. The features are written as embedding files directly: slides, patches and embeddings of 100,000 spots
(200,000 patches with the context fields) would take most of the time a run may take on this machine, so the
prepare and embed stages are timed from per-spot and per-patch rates measured on one section cut from a
pyramidal image (``he2st prepare`` and ``he2st embed`` with the default encoder). With the her2st data
present (``HE2ST_DATA_DIR``) the genes start with the her2st TLS signature's, so the benchmark's TLS probe
runs as on real data.

Then ``he2st benchmark`` of the default (every option at its default, ``methods: [ensemble]``; with
``--members-only`` the ensemble tries no candidate beside its members) over
``--folds`` of the leave-one-patient-out folds, serially and with ``engine=local`` and 2 workers (every
task recomputed), and serially once more at ``--low-scale`` to fit how each part's time grows with the
spots. Each task runs ``--threads`` torch/BLAS threads (default 1: on a 2-core machine shared with other
jobs, two spinning threads per task run slower, not faster). Prints the stages (prepare, embed, folds per
member, reliability, fold data and scoring, summary), scaling efficiency (speedup / workers), the
extrapolation to the full study, and projections for a 64-core node and a GPU, each with the assumption
behind it, e.g.

    HE2ST_DATA_DIR=/path/to/her2st python benchmarks/study_scale.py --root /tmp/study --scale 0.02 \
        --low-scale 0.008 --folds 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

if TYPE_CHECKING:
    from he2st.data.patches import PatchSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the slide and Space Ranger writers

PITCH_UM = 100.0  # Visium spot centre-to-centre distance
SPOT_UM = 55.0  # Visium spot diameter
CAPTURE = (78, 64)  # spot columns x rows of a 6.5 mm Visium capture area: 4,992 spots
MPP = 0.5  # µm per level-0 pixel of the slides
SECTIONS_PER_PATIENT = 3
PROGRAMMES = 6  # smooth tissue programmes (regions, cell-type mixtures) behind expression and image
FEATURES = 1280  # the default encoder's (efficientnet_lite0) width
FIELD_RADIUS_UM = 168.0  # half the side of the context field (3 x the 112 µm patch)
DISPERSION = 0.2  # negative-binomial overdispersion of the counts
NODE_CORES, NODE_WORKER_CORES = 64, 2  # the projected node, and the cores of one measured worker
DEFAULT_GPU_STEP_MS = 2.0


@dataclass
class Study:
    """The sections written: their patients and spots."""

    patients: dict[str, str]  # sample id -> patient id
    spots: dict[str, int]  # sample id -> spots under tissue

    @property
    def total(self) -> int:
        return sum(self.spots.values())


def section_sizes(sections: int, spots: int, seed: int) -> np.ndarray:
    """Spots under tissue per section, spread evenly from 0.55x to 1.45x the mean (tissue pieces of varied
    size), in shuffled order, summing to ``spots``."""
    if spots < sections:
        raise SystemExit(f"{spots} spots cannot fill {sections} sections")
    relative = np.linspace(0.55, 1.45, sections)
    np.random.default_rng(seed).shuffle(relative)
    sizes = np.maximum(1, np.floor(relative / relative.sum() * spots)).astype(int)
    sizes[np.argsort(-relative)[: spots - sizes.sum()]] += 1
    if sizes.max() > CAPTURE[0] * CAPTURE[1]:
        raise SystemExit(f"a section of {sizes.max()} spots does not fit a capture area ({CAPTURE[0] * CAPTURE[1]})")
    return sizes


def capture_area() -> np.ndarray:
    """Centres (x, y) in µm of every spot of a capture area: rows 100 µm x sqrt(3)/2 apart, odd rows offset
    by half the pitch, 300 µm from the slide's edge."""
    rows, cols = np.mgrid[0 : CAPTURE[1], 0 : CAPTURE[0]]
    x = (cols + 0.5 * (rows % 2)) * PITCH_UM
    y = rows * PITCH_UM * np.sqrt(3) / 2
    return np.stack([x.ravel(), y.ravel()], axis=1) + 300.0


def tissue_spots(n: int, rng: np.random.Generator) -> np.ndarray:
    """The ``n`` spots of the capture area under a tissue-shaped mask: a lobed, stretched blob (radius with
    random harmonics 2-5) grown from an off-centre point until it covers ``n`` spots."""
    xy = capture_area()
    offset = xy - (xy.mean(0) + rng.uniform(-600, 600, 2))
    theta = np.arctan2(offset[:, 1], offset[:, 0])
    harmonics = np.arange(2, 6)
    radius = 1 + (rng.uniform(0, 0.35, 4) / harmonics * np.cos(np.outer(theta, harmonics)
                                                              + rng.uniform(0, 2 * np.pi, 4))).sum(1)
    stretch = rng.uniform(0.7, 1.3)
    distance = np.hypot(offset[:, 0] * stretch, offset[:, 1] / stretch) / radius
    return xy[np.sort(np.argsort(distance)[:n])]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shares along ``axis`` (programme mixtures, gene abundances), computed without overflow."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class StudyModel:
    """What the sections share -- genes' base levels, programme loadings, the image projection -- and each
    patient's effects: shifts of programme prevalence, of gene levels and of the image (stain)."""

    def __init__(self, genes: list[str], patients: list[str], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.base = rng.normal(0, 1.5, len(genes))  # log relative abundance: a few genes take most counts
        self.loadings = rng.normal(0, 1.5, (PROGRAMMES, len(genes))) * (rng.random(len(genes)) < 0.4)
        self.projection = rng.normal(0, 1.0, (PROGRAMMES, FEATURES)).astype(np.float32)
        self.prevalence = {p: rng.normal(0, 0.5, PROGRAMMES) for p in patients}
        self.gene_shift = {p: rng.normal(0, 0.25, len(genes)) for p in patients}
        self.stain = {p: rng.normal(0, 0.3, FEATURES).astype(np.float32) for p in patients}

    def section(self, xy_um: np.ndarray, patient: str, rng: np.random.Generator,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(counts, spot features, context-field features)`` of the spots at ``xy_um`` of one section."""
        omega = rng.normal(0, 1 / 500.0, (PROGRAMMES, 24, 2))  # programmes vary over about half a millimetre
        phase = rng.uniform(0, 2 * np.pi, (PROGRAMMES, 24))
        fields = np.sqrt(2 / 24) * np.cos(np.einsum("nd,pwd->npw", xy_um, omega) + phase).sum(-1)
        mix = softmax(3.0 * (fields + self.prevalence[patient]))  # (spots, programmes): fairly distinct regions
        abundance = softmax(self.base + mix @ self.loadings + self.gene_shift[patient])
        library = rng.lognormal(np.log(4000) + rng.normal(0, 0.3), 0.35, len(xy_um))
        mean = abundance * library[:, None]
        counts = rng.poisson(rng.gamma(1 / DISPERSION, DISPERSION * mean)).astype(np.float32)
        neighbours = cKDTree(xy_um).query_ball_point(xy_um, FIELD_RADIUS_UM)
        around = np.stack([mix[i].mean(0) for i in neighbours])
        spot = self._image(mix, patient, rng)
        field = self._image(around, patient, rng)
        return counts, spot, field

    def _image(self, mix: np.ndarray, patient: str, rng: np.random.Generator) -> np.ndarray:
        noise = rng.normal(0, 0.5, (len(mix), FEATURES)).astype(np.float32)
        return (mix.astype(np.float32) @ self.projection + self.stain[patient] + noise).astype(np.float32)


def write_embeddings(path: Path, barcodes: list[str], features: np.ndarray, spec: PatchSpec) -> None:
    """An embedding file as ``he2st embed`` writes it (the default encoder's recipe in its attributes)."""
    from he2st.data.embeddings import DEFAULT_ENCODER
    from he2st.encoders.presets import PRESETS
    from he2st.workflows.embed import FORMAT

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        fh["embeddings"] = features
        fh["barcodes"] = np.array([b.encode() for b in barcodes])
        fh.attrs.update({"encoder_spec": PRESETS[DEFAULT_ENCODER].model_dump_json(),
                         "patch_spec": spec.model_dump_json(),
                         "sample_fingerprint": "", "stain": "none", "tta": "none", "precision": "auto",
                         "format": FORMAT, "n_done": len(barcodes), "runtime": "synthetic"})


def build_study(work: Path, sections: int, spots: int, genes: list[str], folds: int | None = None,
                seed: int = 0) -> Study:
    """A prepared and embedded work folder of the synthetic study (see the module's docstring), with the
    leave-one-patient-out folds (the first ``folds`` of them when given)."""
    from he2st.data.embeddings import EmbedConfig
    from he2st.data.patches import PatchSpec
    from he2st.data.sample import Sample, build_adata
    from he2st.data.splits import make_folds
    from he2st.data.workspace import Workspace

    ws, embed, patch = Workspace(work), EmbedConfig(), PatchSpec()
    sizes = section_sizes(sections, spots, seed)
    patients = {f"S{i:02d}": f"P{i // SECTIONS_PER_PATIENT:02d}" for i in range(sections)}
    model = StudyModel(genes, sorted(set(patients.values())), seed)
    for (sid, pid), n in zip(patients.items(), sizes, strict=True):
        rng = np.random.default_rng([seed, int(sid[1:])])
        xy = tissue_spots(int(n), rng)
        counts, spot, field = model.section(xy, pid, rng)
        barcodes = [f"{sid}-{i:05d}-1" for i in range(len(xy))]
        sample = Sample(sid, pid, build_adata(sp.csr_matrix(counts), barcodes, genes, xy / MPP),
                        pixel_size_um=MPP, spot_diameter_um=SPOT_UM, technology="visium")
        sample.save(ws.sample_path(sid))
        write_embeddings(ws.embedding_path(embed, sid, patch), barcodes, spot, patch)
        write_embeddings(ws.embedding_path(embed, sid, patch.context_field()), barcodes, field, patch.context_field())
    ws.save_folds("lopo", make_folds(patients, "lopo")[:folds], patients)
    return Study(patients, {sid: int(n) for sid, n in zip(patients, sizes, strict=True)})


# ---------------------------------------------------------------------------------------------- measured rates
def probe_prepare_embed(root: Path, genes: list[str], spots: int, seed: int = 0) -> dict[str, float]:
    """``he2st prepare`` (Space Ranger files, a JPEG-tiled pyramidal slide at 0.5 µm/px, spot patches and
    context fields cut) and ``he2st embed`` (default encoder and runtime) of one section of ``spots`` spots:
    seconds per spot prepared, patches per second embedded, and the encoder's one-off set-up."""
    from synthetic import tissue_image, write_pyramid, write_space_ranger

    from he2st.data.embeddings import EmbedConfig
    from he2st.data.patches import PatchSpec
    from he2st.data.workspace import Workspace
    from he2st.workflows.config import PrepareConfig
    from he2st.workflows.embed import embed_workspace
    from he2st.workflows.prepare import prepare

    rng = np.random.default_rng([seed, 99])
    xy = tissue_spots(spots, rng)
    xy = xy - xy.min(0) + 2 * FIELD_RADIUS_UM  # the slide: the tissue's bounding box and a margin
    width, height = ((xy.max(0) + 2 * FIELD_RADIUS_UM) / MPP).astype(int)
    model = StudyModel(genes, ["probe"], seed)
    counts = model.section(xy, "probe", rng)[0]
    slide = write_pyramid(root / "probe_slide.tif", tissue_image(height, width, seed, blob=(0.5, 0.5, 0.49)), MPP)
    outs = root / "probe_outs"
    write_space_ranger(outs, xy / MPP, counts.astype(np.int64), genes, spot_diameter_px=65.0 / MPP)
    work = root / "probe_work"
    source = {"reader": "visium", "sample_id": "probe", "patient_id": "probe", "path": outs, "image": slide}
    start = time.perf_counter()
    prepare(PrepareConfig(work_dir=work, data={"dataset": None, "samples": [source]}))
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    summary = embed_workspace(Workspace(work), ["probe"], PatchSpec(), EmbedConfig())
    wall = time.perf_counter() - start
    return {"prepare_s_per_spot": prepared / spots, "embed_patches_per_s": summary.throughput,
            "embed_setup_s": wall - summary.seconds, "embed_runtime": ",".join(sorted(summary.runtimes)),
            "probe_spots": spots}


def member_step_seconds(work: Path, members: tuple[str, ...] = ("bleep", "carhe"), n: int = 2000) -> dict[str, float]:
    """CPU seconds per optimiser step of the ensemble's neural members as it configures them (two epochs on
    up to ``n`` spots of the study, no validation; carhe without its histology pre-training): the median
    epoch's training pass over its steps."""
    from he2st.data.embeddings import EmbedConfig
    from he2st.data.genes import GeneConfig, GenePanel
    from he2st.data.patches import PatchSpec
    from he2st.data.spots import load_spots
    from he2st.data.workspace import Workspace
    from he2st.methods import create_method
    from he2st.methods.configs.ensemble import EnsembleConfig

    ws = Workspace(work)
    ids = ws.sample_ids()
    panel = GenePanel.from_config({s: ws.load_sample(s).adata for s in ids[:3]}, GeneConfig())
    spots = load_spots(ws, ids, PatchSpec(), EmbedConfig(), panel, with_targets=True)
    spots = spots.subset(np.random.default_rng(0).permutation(len(spots))[:n])
    seconds = {}
    for label in members:
        spec = dict(EnsembleConfig().members[label])
        name = spec.pop("method")
        options = spec | {"train": {"epochs": 2}} | ({"histology_pretrain_epochs": 0} if name == "carhe" else {})
        method = create_method(name, **options)
        method.panel = panel
        log = method.fit(spots)
        steps = math.ceil(len(spots) / min(method.config.train.batch_size, len(spots)))
        seconds[label] = float(np.median(log.epoch_seconds)) / steps
    return seconds


def proxy_step_seconds(device: str, genes: int = 250, batch: int = 128, heads: int = 5, steps: int = 50) -> float:
    """Seconds per optimiser step of a BLEEP-shaped training step (``heads`` projection heads 1,280 -> 256
    for the image, ``genes`` -> 256 for expression, symmetric contrastive loss, AdamW) on ``device``."""
    import torch
    from torch import nn

    from he2st.methods.layers.nn import ProjectionHead

    towers = nn.ModuleList([nn.ModuleList([ProjectionHead(FEATURES), ProjectionHead(genes)]) for _ in range(heads)])
    towers.to(device)
    optimiser = torch.optim.AdamW(towers.parameters(), lr=1e-3)
    x, y = torch.randn(batch, FEATURES, device=device), torch.randn(batch, genes, device=device)
    labels = torch.arange(batch, device=device)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        loss = 0.0
        for image, expression in towers:
            logits = image(x) @ expression(y).T
            loss = loss + nn.functional.cross_entropy(logits, labels) + nn.functional.cross_entropy(logits.T, labels)
        loss.backward()
        optimiser.step()

    for _ in range(5):
        step()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


# ---------------------------------------------------------------------------------------------- benchmark runs
@dataclass
class Run:
    """One ``he2st benchmark`` of the default: wall time and, summed over its tasks (folds), each part."""

    wall: float
    folds: int
    parts: dict[str, float]  # part -> seconds summed over the tasks
    peak_rss_gb: float  # the largest resident set of a finished child process (the pool's workers)


SUMMARY = "summary (checksums, predictions, results)"


def benchmark_default(work: Path, name: str, engine: str, workers: int, threads: int,
                      members_only: bool = False) -> Run:
    """``he2st benchmark`` of the default method, every task recomputed, parts read from what it records:
    each task's seconds (provenance), the ensemble's fit and prediction time, its members' fitting time
    (``selection.member_seconds``) and the reliability estimate's time; serially, the rest of the wall time
    is the summary. ``members_only``: the ensemble tries no method beside its members (``candidates=[]``)."""
    from he2st.workflows.benchmark import run_benchmark
    from he2st.workflows.config import BenchmarkConfig

    config = BenchmarkConfig(work_dir=work, name=name, methods=["ensemble"], engine=engine, workers=workers,
                             task_threads=threads, resume=False,
                             method_options={"ensemble": {"candidates": []}} if members_only else {})
    start = time.perf_counter()
    outcome = run_benchmark(config)
    wall = time.perf_counter() - start
    tasks = json.loads((work / "runs" / name / "results.json").read_text())["provenance"]["tasks"]
    parts: dict[str, float] = {}
    for (label, fold), run in outcome.runs.items():
        selection = run.result.selection["seed0"]
        members = {f"fit {m}": s for m, s in selection["member_seconds"].items()}
        found = re.search(r"in ([0-9.]+) s", selection.get("reliability", ""))
        reliability = float(found.group(1)) if found else 0.0
        task = tasks[f"{label}/{fold}"]["seconds"]
        rows = members | {"inner predictions, stacking, test prediction": run.seconds - sum(members.values()),
                          "reliability (inner folds)": reliability,
                          "fold data, TLS probe, scoring": task - run.seconds - reliability}
        for key, value in rows.items():
            parts[key] = parts.get(key, 0.0) + value
    if engine == "serial":
        parts[SUMMARY] = wall - sum(t["seconds"] for t in tasks.values())
    return Run(wall, len(outcome.runs), parts, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)


# ---------------------------------------------------------------------------------------------- extrapolation
def affine(n_low: float, t_low: float, n_high: float, t_high: float) -> tuple[float, float]:
    """``(fixed seconds, seconds per spot)`` through two measurements, neither negative (a part measured
    no slower at more spots is taken as proportional to them)."""
    slope = (t_high - t_low) / (n_high - n_low)
    fixed = t_high - slope * n_high
    if slope <= 0 or fixed < 0:
        return (max(t_high, 0.0), 0.0) if slope <= 0 else (0.0, t_high / n_high)
    return fixed, slope


def exponent(n_low: float, t_low: float, n_high: float, t_high: float) -> float:
    """``b`` of ``t ∝ n^b`` through two measurements (nan when one is not positive)."""
    if t_low <= 0 or t_high <= 0:
        return float("nan")
    return math.log(t_high / t_low) / math.log(n_high / n_low)


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------- report
def gene_names(n: int) -> tuple[list[str], bool]:
    """``n`` gene names: the her2st TLS signature's symbols first when the her2st data holds it (then the
    benchmark's TLS probe runs, as on real data), then ``G00000``...; and whether it did."""
    from he2st.errors import He2stError
    from he2st.workflows.tls import read_model

    try:
        symbols = [str(g) for g in read_model("her2st-signature").weights.index][:n]
    except He2stError:
        symbols = []
    return symbols + [f"G{i:05d}" for i in range(n - len(symbols))], bool(symbols)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def report(args: argparse.Namespace, probe: dict, steps: dict[str, float], gpu_step: tuple[float, str, bool],
           sizes: dict[str, Study], runs: dict[str, Run], loads: tuple[float, float]) -> None:
    """The measured figures, their extrapolation to the full study and the projections, as tables."""
    from he2st.data.genes import GeneConfig

    panel = GeneConfig().n_genes
    high, low = sizes["high"], sizes["low"]
    folds_full = len(set(high.patients.values()))
    serial, pool, small = runs["serial"], runs["pool"], runs["low"]
    full = args.spots
    largest = max(high.spots.values()) / high.total * full  # the largest section of the full study
    print(f"\nmachine: {os.cpu_count()} cores, load average (1 min) {loads[0]:.1f} at start and {loads[1]:.1f} at the "
          f"end (other jobs share it); {args.threads} torch/BLAS thread(s) per task")
    print(f"study: {args.sections} sections, {folds_full} patients, {args.genes} genes; scale {args.scale}: "
          f"{high.total} spots ({min(high.spots.values())}-{max(high.spots.values())} per section); scale "
          f"{args.low_scale}: {low.total}; full study: {full}; benchmarked folds: {serial.folds} of {folds_full} "
          f"(leave one patient out)")
    print(f"measured rates: prepare {1e3 * probe['prepare_s_per_spot']:.1f} ms per spot, embed "
          f"{probe['embed_patches_per_s']:.1f} patches/s ({probe['embed_runtime']}; 2 patches per spot: spot and "
          f"context field), encoder set-up {probe['embed_setup_s']:.1f} s (one section of {probe['probe_spots']} "
          f"spots, JPEG-tiled slide at {MPP} µm/px)")

    per_fold = {}
    rows = []
    for part in serial.parts:
        t_high, t_low = serial.parts[part] / serial.folds, small.parts.get(part, 0.0) / small.folds
        fixed, slope = affine(low.total, t_low, high.total, t_high)
        per_fold[part] = fixed + slope * full
        rows.append([part, f"{t_low:.1f}", f"{t_high:.1f}", f"{exponent(low.total, t_low, high.total, t_high):.2f}",
                     f"{fixed:.1f} + {1e3 * slope:.2f} ms/spot", duration(per_fold[part]),
                     duration(per_fold[part] * folds_full)])
    total_fold = sum(v for k, v in per_fold.items() if k != SUMMARY)
    rows.append(["**per fold**", f"{sum(small.parts.values()) / small.folds:.1f}",
                 f"{sum(serial.parts.values()) / serial.folds:.1f}", "", "", duration(total_fold + per_fold[SUMMARY]),
                 duration((total_fold + per_fold[SUMMARY]) * folds_full)])
    print(f"\nThe benchmark stage, one worker, seconds per fold (serial, {args.threads} thread):\n")
    print(table(["part", f"{low.total} spots", f"{high.total} spots", "exponent b", "fit: fixed + per spot",
                 f"{full} spots, per fold", f"{folds_full} folds"], rows))

    speedup = serial.wall / pool.wall
    serial_tasks = sum(v for k, v in serial.parts.items() if k != SUMMARY)
    slowdown = sum(pool.parts.values()) / serial_tasks
    efficiency = 1 / slowdown  # per task: the pool's start-up (spawning, imports) does not grow with the study
    print(f"\nWorkers at {high.total} spots, {serial.folds} folds:\n")
    print(table(["run", "wall", "tasks' own seconds, summed", "speedup", "efficiency (speedup / workers)"], [
        ["1 worker (engine serial)", f"{serial.wall:.1f} s", f"{serial_tasks:.1f} s", "1.00", "1.00"],
        [f"{args.workers} workers (engine local)", f"{pool.wall:.1f} s",
         f"{sum(pool.parts.values()):.1f} s (x{slowdown:.2f})", f"{speedup:.2f}", f"{speedup / args.workers:.2f}"]]))

    prepare = probe["prepare_s_per_spot"]
    embed_rate, setup = probe["embed_patches_per_s"], probe["embed_setup_s"]
    neural = {m: per_fold.get(f"fit {m}", 0.0) for m in steps}
    factors = {m: gpu_step[0] if gpu_step[2] else steps[m] / gpu_step[0] for m in steps}
    on_gpu = total_fold - sum(neural.values()) + sum(neural[m] / factors[m] for m in steps)
    gpu_busy = folds_full * sum(neural[m] / factors[m] for m in steps)
    node_threads = NODE_CORES // folds_full
    stages = {
        "prepare": [full * prepare] * 2 + [largest * prepare] * 2,
        "embed": [2 * full / embed_rate + setup] * 2 + [2 * largest / embed_rate + setup] * 2,
        "benchmark folds": [folds_full * total_fold, math.ceil(folds_full / args.workers) * total_fold / efficiency,
                            total_fold / efficiency, max(on_gpu / efficiency, gpu_busy)],
        "summary": [per_fold[SUMMARY] * folds_full] * 4,
    }
    stages["total"] = [sum(v[i] for v in stages.values()) for i in range(4)]
    print(f"\nThe full study ({full} spots, {args.sections} sections, {folds_full} folds), extrapolated:\n")
    print(table(["stage", "this machine, 1 worker", f"this machine, {args.workers} workers", "64-core node",
                 "64-core node + 1 GPU (projection)"],
                [[k, *(duration(x) for x in v)] for k, v in stages.items()]))
    arrays = 0.9 * full * (2 * FEATURES + panel) * 4 / 1e9  # a fold's training spots: 9 of 10 patients
    print("\nAssumptions:")
    print(f"- each part of a fold grows as fitted between the two scales: fixed seconds + seconds per spot (the "
          f"exponent b is printed for comparison; retrieval grows faster than linear, so retrieval parts are "
          f"a lower bound); the {folds_full - serial.folds} folds not run cost the mean of those run")
    print(f"- prepare and embed: the measured per-spot and per-patch rates times the spots; on this machine one "
          f"worker uses both cores; on the node one 2-core worker per section at the rates measured here "
          f"({args.sections} <= {NODE_CORES // NODE_WORKER_CORES} workers), so the largest section ({largest:.0f} "
          f"spots) sets the time")
    print(f"- {args.workers} workers: each task as slow as measured in the pool (x{slowdown:.2f} its serial time, "
          f"efficiency per task {efficiency:.2f}; the pool's start-up, which does not grow with the study, is left "
          f"out); on this machine {math.ceil(folds_full / args.workers)} waves of folds")
    print(f"- 64-core node: the {folds_full} fold tasks at once, one per worker, each as slow as in the measured pool; "
          f"with {node_threads} threads per task instead of {args.threads} at most {node_threads}x faster still "
          f"({duration(total_fold / efficiency / node_threads)} per wave; thread scaling not measured here). Memory: "
          f"measured peak {pool.peak_rss_gb:.2f} GB per worker at {high.total} spots (mostly the interpreter and "
          f"libraries); at {full} spots a fold's training arrays (spot and context-field features, "
          f"{panel}-gene targets) take {arrays:.1f} GB, which the ensemble copies several times "
          f"(inner-fold subsets, context features up to 3x wider; not measured at this scale)")
    member_steps = ", ".join(f"{m} {1e3 * s:.1f} ms" for m, s in steps.items())
    ratio = (f"the measured ratio of a BLEEP-shaped step on the CPU and on the GPU ({gpu_step[1]})" if gpu_step[2]
             else f"the ratio of the measured CPU step ({member_steps} per step of 128 spots, {args.threads} thread) "
             f"to {1e3 * gpu_step[0]:.1f} ms per step on the GPU ({gpu_step[1]})")
    print(f"- GPU: the neural members' fits (bleep, carhe: {duration(sum(neural.values()))} of the "
          f"{duration(total_fold)} per fold) run faster by {ratio}: "
          + ", ".join(f"{m} x{f:.0f}" for m, f in factors.items())
          + f"; the rest stays on the CPU; one GPU serves the {folds_full} workers' loops one at a time "
          f"({duration(gpu_busy)} busy). he2st trains frozen-feature members on the CPU: this row is what moving "
          f"those loops to a GPU would give. Embedding is left at the CPU figure")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="folder for the synthetic study (rebuilt)")
    ap.add_argument("--sections", type=int, default=30, help="sections of the study, three per patient")
    ap.add_argument("--spots", type=int, default=100_000, help="spots under tissue in the whole study")
    ap.add_argument("--scale", type=float, default=0.02, help="share of the spots built and benchmarked")
    ap.add_argument("--low-scale", type=float, default=None,
                    help="the smaller share benchmarked to fit growth with spots (default: half of --scale)")
    ap.add_argument("--folds", type=int, default=None,
                    help="leave-one-patient-out folds benchmarked (default: all); the others cost their mean")
    ap.add_argument("--genes", type=int, default=2000, help="genes measured per spot")
    ap.add_argument("--workers", type=int, default=2, help="processes of the local engine")
    ap.add_argument("--threads", type=int, default=1, help="torch/BLAS threads per task (task_threads)")
    ap.add_argument("--probe-spots", type=int, default=256, help="spots of the section prepared and embedded")
    ap.add_argument("--gpu-step-ms", type=float, default=DEFAULT_GPU_STEP_MS,
                    help="GPU milliseconds per training step assumed when no GPU is available")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic study")
    ap.add_argument("--members-only", action="store_true",
                    help="the ensemble tries no method beside its four members (candidates=[])")
    args = ap.parse_args()
    args.low_scale = args.low_scale or args.scale / 2

    import shutil

    import torch

    start_load = os.getloadavg()[0]
    genes, tls = gene_names(args.genes)
    print(f"genes: {args.genes}{' (the her2st TLS signature first: the TLS probe runs)' if tls else ''}", flush=True)
    shutil.rmtree(args.root, ignore_errors=True)
    args.root.mkdir(parents=True)
    probe = probe_prepare_embed(args.root, genes, args.probe_spots, args.seed)
    print(f"probe: {probe}", flush=True)
    sizes = {}
    for key, share in (("high", args.scale), ("low", args.low_scale)):
        begin = time.perf_counter()
        sizes[key] = build_study(args.root / key, args.sections, round(args.spots * share), genes, args.folds,
                                 args.seed)
        print(f"built {sizes[key].total} spots in {time.perf_counter() - begin:.1f} s (synthetic writer)", flush=True)
    torch.set_num_threads(args.threads)
    steps = member_step_seconds(args.root / "high")
    cpu_proxy = proxy_step_seconds("cpu")
    if torch.cuda.is_available():  # gpu_step: (CPU / GPU step ratio, or GPU seconds per step; what it is; measured)
        gpu_proxy = proxy_step_seconds("cuda")
        where = f"{1e3 * cpu_proxy:.1f} vs {1e3 * gpu_proxy:.2f} ms on {torch.cuda.get_device_name()}"
        gpu_step = (cpu_proxy / gpu_proxy, where, True)
    else:
        why = ("assumed: no GPU on this machine, and a step of these small heads is bound by kernel launches on "
               f"one; a BLEEP-shaped step takes {1e3 * cpu_proxy:.1f} ms on this CPU")
        gpu_step = (args.gpu_step_ms / 1e3, why, False)
    print(f"CPU seconds per step: {steps}", flush=True)
    runs = {}
    for key, work, engine, workers in (("serial", "high", "serial", 1), ("pool", "high", "local", args.workers),
                                       ("low", "low", "serial", 1)):
        runs[key] = benchmark_default(args.root / work, key, engine, workers, args.threads, args.members_only)
        print(f"{key}: {runs[key].wall:.1f} s, {runs[key].folds} folds", flush=True)
    report(args, probe, steps, gpu_step, sizes, runs, (start_load, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
