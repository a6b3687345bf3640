"""``he2st evaluate``: score a saved model on held-out samples of a prepared work folder.

The model's gene panel maps the samples (unmappable data is refused); HEG/HVG sets come from the
checkpoint (chosen on training data). Samples the model was trained on, or from its training
patients, are refused unless explicitly allowed -- then the results are labelled as leaky.
"""

from __future__ import annotations

from pathlib import Path

from he2st.data.patches import warn_if_too_coarse
from he2st.data.spots import load_spots
from he2st.data.workspace import Workspace
from he2st.errors import He2stError
from he2st.evaluate.gene_sets import test_sample_gene_sets
from he2st.evaluate.results import check_results_folder, write_results
from he2st.evaluate.scoring import FoldResult, evaluate_fold, summarise
from he2st.evaluate.tables import to_markdown
from he2st.methods import load_method
from he2st.workflows.embed import embed_workspace


def evaluate_model(
    model_path: str | Path, work_dir: str | Path, sample_ids: list[str], out_dir: str | Path,
    allow_training_patients: bool = False, command: str = "",
) -> tuple[FoldResult, str, dict[str, Path]]:
    """Score a checkpoint on held-out samples, embedded with the recipe its model card records."""
    if not sample_ids:
        raise He2stError("no samples to evaluate (--samples is empty)")
    method = load_method(model_path)
    check_results_folder(out_dir)
    card = method.card
    _, patch, embed = card.features(model_path)  # the same features as in training
    ws = Workspace(work_dir)
    samples = {sid: ws.load_sample(sid) for sid in sample_ids}
    for sample in samples.values():
        warn_if_too_coarse(sample, patch)
    # a trained-on sample is caught by its id too: another work folder may name its patient differently
    shared = {sid for sid, s in samples.items()
              if s.patient_id in set(card.training_patients) or sid in card.training_samples}
    if shared and not allow_training_patients:
        raise He2stError(
            f"sample(s) {sorted(shared)} were trained on, or come from patients the model was trained on "
            f"({card.training_patients}); pass --allow-training-patients to score them anyway (leaky)",
            model_path,
        )
    embed_workspace(ws, sample_ids, patch, embed)
    # a model whose encoder was trained end to end predicts from the raw patches, not from the cached features
    inputs = load_spots(ws, sample_ids, patch, embed, method.panel, with_targets=False,
                        with_patches=method.uses_patches, views=method.reads_views)
    truth = load_spots(ws, sample_ids, patch, embed, method.panel, with_targets=True, views=())
    # test-selected sets as large as the training-selected ones the card records (the run's n_top)
    n_top = next((len(genes) for name, genes in card.gene_sets.items() if name.startswith("heg")),
                 min(50, len(method.panel.genes)))
    preds, trues, per_sample = {}, {}, {}
    for sid in sample_ids:
        preds[sid] = method.predict(inputs.subset(inputs.sample_ids == sid)).expression
        trues[sid] = truth.targets[truth.sample_ids == sid]
        per_sample[sid] = test_sample_gene_sets(trues[sid], method.panel.genes, n=n_top)
    label = method.name + ("_LEAKY" if shared else "")
    result = evaluate_fold(label, "holdout", preds, trues, method.panel.genes, card.gene_sets or
                           {"all": method.panel.genes}, per_sample)
    prov = {"command": command, "model": str(model_path), "trained_on": card.training_samples, "samples": sample_ids,
            "leaky": bool(shared), "model_card": card.model_dump(mode="json")}
    paths = write_results(out_dir, [result], prov)
    sets = list(result.per_sample[sample_ids[0]])
    return result, to_markdown(summarise([result]), sets=sets), paths
