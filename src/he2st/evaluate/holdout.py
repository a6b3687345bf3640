"""``he2st evaluate``: score a saved model on held-out samples of a prepared work folder.

The model's gene panel maps the samples (unmappable data is refused); HEG/HVG sets come from the
checkpoint (chosen on training data). Samples the model was trained on, or from its training
patients, are refused unless explicitly allowed -- then the results are labelled as leaky.
"""

from __future__ import annotations

import json
from pathlib import Path

from he2st.config import EmbedConfig
from he2st.data.patches import PatchSpec
from he2st.data.spots import load_spots
from he2st.embed import embed_workspace
from he2st.errors import He2stError
from he2st.evaluate.gene_sets import test_sample_gene_sets
from he2st.evaluate.tables import FoldResult, evaluate_fold, summarise, to_markdown, write_results
from he2st.methods.base import load_method
from he2st.workspace import Workspace


def evaluate_model(
    model_path: str | Path, work_dir: str | Path, sample_ids: list[str], out_dir: str | Path,
    patch: PatchSpec | None = None, allow_training_patients: bool = False, command: str = "",
) -> tuple[FoldResult, str, dict[str, Path]]:
    if not sample_ids:
        raise He2stError("no samples to evaluate (--samples is empty)")
    method = load_method(model_path)
    ws = Workspace(work_dir)
    patch = patch or (PatchSpec.model_validate_json(method.patch_spec) if method.patch_spec else PatchSpec())
    if method.embed_config:
        embed = EmbedConfig.model_validate_json(method.embed_config)  # the same features as in training
    else:
        embed = EmbedConfig(encoder=json.loads(method.encoder_spec or "{}").get("name", "efficientnet_lite0"))
    samples = {sid: ws.load_sample(sid) for sid in sample_ids}
    shared = {sid for sid, s in samples.items() if s.patient_id in set(method.trained_on.values())}
    if shared and not allow_training_patients:
        raise He2stError(
            f"sample(s) {sorted(shared)} come from patients the model was trained on "
            f"({sorted(set(method.trained_on.values()))}); pass --allow-training-patients to score them anyway (leaky)",
            model_path,
        )
    embed_workspace(ws, sample_ids, patch, embed)
    inputs = load_spots(ws, sample_ids, patch, embed, method.panel, with_targets=False)
    truth = load_spots(ws, sample_ids, patch, embed, method.panel, with_targets=True)
    preds, trues, per_sample = {}, {}, {}
    for sid in sample_ids:
        preds[sid] = method.predict(inputs.subset(inputs.sample_ids == sid)).expression
        trues[sid] = truth.targets[truth.sample_ids == sid]
        per_sample[sid] = test_sample_gene_sets(trues[sid], method.panel.genes)
    label = method.name + ("_LEAKY" if shared else "")
    result = evaluate_fold(label, "holdout", preds, trues, method.panel.genes, method.gene_sets or
                           {"all": method.panel.genes}, per_sample)
    prov = {"command": command, "model": str(model_path), "trained_on": method.trained_on, "samples": sample_ids,
            "leaky": bool(shared)}
    paths = write_results(out_dir, [result], prov)
    sets = list(result.per_sample[sample_ids[0]])
    return result, to_markdown(summarise([result]), sets=sets), paths
