"""``he2st hest-bench``: HEST-Benchmark's tasks and splits, scored HEST's way and he2st's way.

For each task folder (layout: :mod:`he2st.data.hest_layout`) every sample's patches are embedded once
(:mod:`he2st.workflows.hest_embed`); then, split by split, the ``hest-ridge`` row runs HEST's linear
probe exactly (:mod:`he2st.evaluate.hest_probe`), and each requested he2st method is fitted on the same
training samples' raw embeddings and the task's genes (targets: log1p of raw counts, HEST's scale) with
validation spots drawn from training samples only. Every row gets both scores: HEST's (per gene over
the split's pooled test spots) and he2st's (per held-out sample, then averaged).
"""

from __future__ import annotations

import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from pydantic import BaseModel, ConfigDict, Field, model_validator

from he2st.data.embeddings import EmbedConfig
from he2st.data.genes import GenePanel
from he2st.data.hest_layout import BenchSample, BenchSplit, BenchTask, find_tasks, read_counts, read_patch_index, \
    read_task
from he2st.data.splits import validation_mask
from he2st.data.spots import SpotSet
from he2st.errors import He2stError, He2stWarning
from he2st.evaluate.hest_probe import HEST_LATENT_DIM, HEST_SEED, hest_ridge, hest_split_score, hest_targets
from he2st.evaluate.hest_results import write_hest_results
from he2st.evaluate.scoring import evaluate_fold
from he2st.io import write_text_atomic
from he2st.methods import ModelCard, create_method, method_class
from he2st.version import __version__
from he2st.workflows.hest_embed import CachedFeatures, Features

PROBE = "hest-ridge"
MARKER = ".he2st-hest-bench"  # written first into the results folder; its absence means "not ours"


class HestBenchConfig(BaseModel):
    """What ``he2st hest-bench`` runs: which tasks, which he2st methods, which encoder, where results go."""

    model_config = ConfigDict(extra="forbid")

    bench_dir: Path = Field(description="HEST-Benchmark folder: one folder per task")
    tasks: list[str] | None = Field(None, description="task folders to run (default: every one)")
    methods: list[str] = Field(default_factory=lambda: ["ridge", "ridge_cv", "knn"],
                               description="he2st methods run beside hest-ridge (which always runs)")
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                      description="method name -> {option: value}")
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    out: Path = Field(Path("hest-bench-results"), description="results folder (embedding cache under cache/)")
    seed: int = Field(HEST_SEED, description="HEST's --seed (PCA and ridge); also the he2st methods' seed")
    latent_dim: int = Field(HEST_LATENT_DIM, gt=0, description="HEST's --latent_dim (PCA components)")
    validation_fraction: float = Field(0.15, gt=0, lt=1, description="training spots/samples he2st methods "
                                                                      "hold out for early stopping")

    @model_validator(mode="after")
    def _methods_exist(self) -> HestBenchConfig:
        """Unknown methods or options fail before any file is read."""
        self.methods = [m for m in dict.fromkeys(self.methods) if m != PROBE]
        for name in self.methods:
            method_class(name)(**self.options_for(name))
        return self

    def options_for(self, name: str) -> dict[str, Any]:
        return {"seed": self.seed} | self.method_options.get(name, {})


@dataclass
class TaskData:
    """A task's samples in memory: embeddings, HEST targets and spot positions per sample id."""

    task: BenchTask
    features: dict[str, np.ndarray] = field(default_factory=dict)
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    barcodes: dict[str, list[str]] = field(default_factory=dict)
    coords: dict[str, np.ndarray] = field(default_factory=dict)

    def stack(self, samples: list[BenchSample]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and targets of ``samples`` concatenated in their CSV order (as HEST concatenates)."""
        return (np.concatenate([self.features[s.sample_id] for s in samples]),
                np.concatenate([self.targets[s.sample_id] for s in samples]))

    def spots(self, samples: list[BenchSample], with_targets: bool) -> SpotSet:
        """A he2st :class:`SpotSet` of ``samples``. Positions are the patches' top-left corners in slide
        pixels (the layout records no pixel size); only nearest-neighbour context reads them, within a slide."""
        ids = [s.sample_id for s in samples]
        return SpotSet(
            sample_ids=np.concatenate([np.full(len(self.barcodes[i]), i, dtype=object) for i in ids]),
            barcodes=np.concatenate([np.asarray(self.barcodes[i], dtype=object) for i in ids]),
            features=np.concatenate([self.features[i] for i in ids]).astype(np.float32),
            coords_um=np.concatenate([self.coords[i] for i in ids]),
            genes=list(self.task.genes),
            targets=np.concatenate([self.targets[i] for i in ids]).astype(np.float32) if with_targets else None,
        )


def load_task(task: BenchTask, features: Features) -> TaskData:
    """Embed (or read from the cache) and load every sample a split of ``task`` names."""
    data = TaskData(task)
    for sid, sample in task.samples().items():
        vectors, barcodes = features(sample)
        index_barcodes, coords = read_patch_index(sample.patches)
        if index_barcodes != barcodes:
            raise He2stError("embeddings do not follow the patch file's barcodes", sample.patches)
        data.features[sid], data.barcodes[sid], data.coords[sid] = vectors, barcodes, coords
        data.targets[sid] = hest_targets(read_counts(sample.expression, task.genes, barcodes))
    return data


def score_row(task: str, split: int, method: str, predictions: dict[str, np.ndarray], data: TaskData,
              test: list[BenchSample]) -> dict[str, Any]:
    """Both scores of one method on one split: HEST's (pooled test spots) and he2st's (per held-out sample)."""
    truth = {s.sample_id: data.targets[s.sample_id] for s in test}
    ids = list(truth)
    pooled, per_gene = hest_split_score(np.concatenate([predictions[i] for i in ids]),
                                        np.concatenate([truth[i] for i in ids]))
    result = evaluate_fold(method, split, predictions, truth, data.task.genes, {"all": data.task.genes})
    return {"task": task, "split": split, "method": method, "score_hest": pooled,
            "score_per_sample": result.set_scores()["all"]["pearson_mean"],
            "per_sample": {s: v["all"]["pearson_mean"] for s, v in result.per_sample.items()},
            "n_nan_genes": int(np.isnan(per_gene).sum()),
            "per_gene_hest": dict(zip(data.task.genes, per_gene.tolist(), strict=True))}


def run_probe(data: TaskData, split: BenchSplit, config: HestBenchConfig) -> tuple[dict[str, Any], str | None]:
    """HEST's linear probe on one split; a note when PCA had to be cut below ``latent_dim``."""
    start = time.perf_counter()
    x_train, y_train = data.stack(split.train)
    x_test, _ = data.stack(split.test)
    probe = hest_ridge(x_train, y_train, x_test, seed=config.seed, latent_dim=config.latent_dim)
    bounds = np.cumsum([0, *(len(data.barcodes[s.sample_id]) for s in split.test)])
    predictions = {s.sample_id: probe.predictions[a:b] for s, a, b in zip(split.test, bounds[:-1], bounds[1:],
                                                                           strict=True)}
    row = score_row(data.task.name, split.index, PROBE, predictions, data, split.test)
    row |= {"n_train": len(x_train), "n_test": len(x_test), "pca_components": probe.n_components,
            "alpha": probe.alpha, "seconds": time.perf_counter() - start}
    note = None
    if probe.n_components < config.latent_dim:
        note = (f"{data.task.name} split {split.index}: {len(x_train)} training spots of {x_train.shape[1]}-d "
                f"embeddings allow only {probe.n_components} PCA components, not {config.latent_dim}; HEST's script "
                "would stop here, so this hest-ridge row is not comparable with HEST's table")
    return row, note


def run_method(name: str, data: TaskData, split: BenchSplit, config: HestBenchConfig) -> dict[str, Any]:
    """Fit one he2st method on the split's training samples (validation drawn from them) and score it."""
    start = time.perf_counter()
    train = data.spots(split.train, with_targets=True)
    patients = {s.sample_id: s.patient_id for s in split.train}
    val = validation_mask(train.sample_ids, config.validation_fraction, seed=config.seed,
                          patients=np.array([patients[s] for s in train.sample_ids]))
    method = create_method(name, **config.options_for(name))
    panel = GenePanel(genes=list(data.task.genes), transform="log1p", selection="given", fitted_on=sorted(patients))
    method.card = ModelCard(method=name, panel=panel, training_samples=patients)
    method.fit(train.subset(~val), train.subset(val))
    test = data.spots(split.test, with_targets=False)
    predictions = {s.sample_id: method.predict(test.subset(test.sample_ids == s.sample_id)).expression
                   for s in split.test}
    row = score_row(data.task.name, split.index, name, predictions, data, split.test)
    return row | {"n_train": len(train), "n_test": len(test), "seconds": time.perf_counter() - start}


def prepare_out(out: Path) -> None:
    """Create the results folder, or reuse one this command made; refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise He2stError("results path is a file, not a folder", out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise He2stError(f"folder is not empty and was not written by `he2st hest-bench` (no {MARKER}); "
                         "refusing to write into it: choose another --out", out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / MARKER, "written by `he2st hest-bench`; its results and cache may be replaced\n")


@dataclass
class HestBenchOutcome:
    rows: list[dict[str, Any]]
    paths: dict[str, Path]
    failures: dict[str, str]
    notes: list[str]


def run_hest_bench(
    config: HestBenchConfig, features: Callable[[str], Features] | None = None,
    log: Callable[[str], None] | None = None, command: str | None = None,
) -> HestBenchOutcome:
    """Run every task; ``features(task name)`` gives the embedding source (default: the encoder of
    ``config.embed``, cached under ``out/cache``)."""
    task_dirs = find_tasks(config.bench_dir, config.tasks)
    tasks = [read_task(t) for t in task_dirs]  # every table and gene list checked before any embedding
    prepare_out(config.out)
    make_features = features or (lambda name: CachedFeatures(config.embed, config.out / "cache", name))
    rows: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    notes: list[str] = []
    for task in tasks:
        source = make_features(task.name)
        data = load_task(task, source)
        if log is not None:
            computed = getattr(source, "computed", None)
            log(f"{task.name}: {len(data.features)} samples, {len(task.genes)} genes, {len(task.splits)} splits"
                + ("" if computed is None else f"; {computed} patches embedded, the rest read from the cache"))
        for split in task.splits:
            row, note = run_probe(data, split, config)
            rows.append(row)
            if note is not None:
                notes.append(note)
                warnings.warn(note, He2stWarning, stacklevel=2)
            _log(log, row)
            for name in config.methods:
                try:
                    row = run_method(name, data, split, config)
                except He2stError as exc:  # one method that cannot run here does not stop the others
                    failures[f"{task.name}/{split.index}/{name}"] = str(exc)
                    if log is not None:
                        log(f"{task.name:<10} split {split.index} {name:<14} skipped: {exc}")
                    continue
                rows.append(row)
                _log(log, row)
    provenance = {
        "command": command or " ".join(["he2st", *sys.argv[1:]]), "config": config.model_dump(mode="json"),
        "encoder": config.embed.encoder if features is None else "supplied by the caller",
        "he2st_version": __version__, "sklearn_version": sklearn.__version__,
        "python": platform.python_version(), "failures": failures, "notes": notes,
        "tasks": {t.name: {"genes": t.genes, "splits": [{"train": [s.sample_id for s in sp.train],
                                                         "test": [s.sample_id for s in sp.test]} for sp in t.splits]}
                  for t in tasks},
    }
    if not rows:
        raise He2stError(f"nothing could be scored: {failures}")
    return HestBenchOutcome(rows, write_hest_results(config.out, rows, provenance), failures, notes)


def _log(log: Callable[[str], None] | None, row: dict[str, Any]) -> None:
    if log is not None:
        log(f"{row['task']:<10} split {row['split']} {row['method']:<14} HEST {row['score_hest']:.3f}  "
            f"per sample {row['score_per_sample']:.3f}  ({row['seconds']:.1f} s)")
