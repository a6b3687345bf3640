"""``he2st train``: fit one method on chosen training samples and save a self-describing checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from he2st.config import TrainRunConfig
from he2st.data.genes import GenePanel
from he2st.data.spots import load_spots, shared_extras
from he2st.data.splits import validation_mask
from he2st.embed import EmbeddingFile, embed_workspace
from he2st.errors import He2stError
from he2st.evaluate.gene_sets import build_gene_sets
from he2st.methods.base import Method, TrainLog
from he2st.methods.registry import create_method
from he2st.workspace import Workspace


def ensure_embeddings(ws: Workspace, sample_ids: list[str], config) -> str:
    """Embed missing samples (a no-op for finished files); returns the encoder spec JSON."""
    summary = embed_workspace(ws, sample_ids, config.patch, config.embed)
    return EmbeddingFile(summary.paths[sample_ids[0]]).attrs["encoder_spec"]


def train_model(config: TrainRunConfig) -> tuple[Method, TrainLog, Path]:
    ws = Workspace(config.work_dir)
    train_ids = config.train_samples or ws.sample_ids()
    samples = {sid: ws.load_sample(sid) for sid in train_ids}
    if not train_ids:
        raise He2stError(f"no training samples: none prepared in {ws.root}")
    panel = GenePanel.from_config({sid: s.adata for sid, s in samples.items()}, config.genes)
    spec = ensure_embeddings(ws, train_ids, config)
    method = create_method(config.method, **({"seed": config.seed} | config.method_options))
    spots = load_spots(ws, train_ids, config.patch, config.embed, panel, with_targets=True,
                       extras=shared_extras(samples.values()),
                       with_patches=getattr(method.config, "finetune_encoder", False),
                       with_tokens=bool(config.embed.token_grid) and method.uses_tokens)
    patients = np.array([samples[s].patient_id for s in spots.sample_ids])
    val = validation_mask(spots.sample_ids, config.validation_fraction, seed=config.seed, patients=patients)
    method.panel = panel
    method.encoder_spec = spec
    method.patch_spec = config.patch.model_dump_json()
    method.embed_config = config.embed.model_dump_json()
    log = method.fit(spots.subset(~val), spots.subset(val))
    method.gene_sets = build_gene_sets(spots.targets, panel.genes, n=config.n_top)
    method.trained_on = {sid: s.patient_id for sid, s in samples.items()}
    out = config.out or ws.root / "models" / f"{config.method}.pt"
    method.save(out)
    return method, log, Path(out)
