"""Cross-validation folds that hold out whole patients, and validation drawn from training patients.

Sections of one patient (serial cuts, adjacent regions) are near-copies of each other; putting one
on each side of a split inflates every metric. The default is therefore leave-one-patient-out, and
any fold that would still share a patient is refused unless the user asks for it, then labelled.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from pydantic import BaseModel

from he2st.errors import He2stError


class Fold(BaseModel):
    """One train/test split of samples."""

    name: str
    train: list[str]
    test: list[str]
    shared_patients: list[str] = []  # non-empty only when the user explicitly allowed leakage
    #: the test samples of the fold this one is nested in (:func:`inner_folds`): nothing of this fold may read
    #: their expression, nor that of other sections of their patients
    excluded: list[str] = []

    @property
    def leaky(self) -> bool:
        return bool(self.shared_patients)


def _patients(samples: Mapping[str, str], ids: list[str]) -> set[str]:
    return {samples[s] for s in ids}


def leave_one_patient_out(samples: Mapping[str, str]) -> list[Fold]:
    """One fold per patient; ``samples`` maps sample id -> patient id."""
    patients = sorted(set(samples.values()))
    if len(patients) < 2:
        raise He2stError(f"leave-one-patient-out needs at least 2 patients, got {patients}")
    folds = []
    for patient in patients:
        test = sorted(s for s, p in samples.items() if p == patient)
        train = sorted(s for s, p in samples.items() if p != patient)
        folds.append(Fold(name=f"patient_{patient}", train=train, test=test))
    return folds


def leave_one_sample_out(samples: Mapping[str, str], allow_shared_patients: bool = False) -> list[Fold]:
    """One fold per sample. Other sections of the held-out patient are removed from training,
    unless ``allow_shared_patients`` (then the fold is kept and labelled as leaky)."""
    folds = []
    for sample in sorted(samples):
        patient = samples[sample]
        siblings = sorted(s for s, p in samples.items() if p == patient and s != sample)
        if allow_shared_patients:
            train = sorted(s for s in samples if s != sample)
            if not train:
                raise He2stError(f"leave-one-sample-out: no training sample left for {sample}")
            name = f"sample_{sample}" + ("_LEAKY_patient_shared" if siblings else "")
            folds.append(Fold(name=name, train=train, test=[sample], shared_patients=[patient] if siblings else []))
        else:
            train = sorted(s for s, p in samples.items() if p != patient)
            if not train:
                raise He2stError(f"leave-one-sample-out: no training sample left for {sample}: every other sample is "
                                 f"of its patient {patient}; allow_shared_patients (folds.allow_shared_patients=true) "
                                 "trains on them, the folds labelled LEAKY")
            folds.append(Fold(name=f"sample_{sample}", train=train, test=[sample]))
    return folds


def make_folds(samples: Mapping[str, str], scheme: str = "lopo", allow_shared_patients: bool = False) -> list[Fold]:
    """Folds by scheme name: ``lopo`` (leave one patient out) or ``loso`` (leave one sample out)."""
    if scheme == "lopo":
        return leave_one_patient_out(samples)
    if scheme == "loso":
        return leave_one_sample_out(samples, allow_shared_patients)
    raise He2stError(f"unknown fold scheme {scheme!r}; use 'lopo' or 'loso'")


def inner_folds(
    folds: list[Fold], samples: Mapping[str, str], outer: str, scheme: str = "lopo", allow_shared_patients: bool = False
) -> list[Fold]:
    """The folds of ``scheme`` over the training samples of the fold named ``outer`` (the inner loop of
    nested cross-validation): options chosen on them never saw the outer fold's test patients."""
    match = next((f for f in folds if f.name == outer), None)
    if match is None:
        raise He2stError(f"no fold named {outer!r} to nest in; folds: {[f.name for f in folds]}")
    train = {s: samples[s] for s in match.train}
    if scheme == "lopo" and len(set(train.values())) < 2:
        raise He2stError(f"fold {outer} trains on one patient ({sorted(set(train.values()))}); "
                         "leave-one-patient-out inside it needs at least 2")
    return [f.model_copy(update={"name": f"{outer}__{f.name}", "excluded": list(match.test)})
            for f in make_folds(train, scheme, allow_shared_patients)]


def held_out_groups(groups: np.ndarray, max_folds: int) -> list[np.ndarray]:
    """The groups each inner fold holds out: one group per fold up to ``max_folds`` groups, else the
    groups dealt (in sorted order, round-robin) into ``max_folds`` folds -- so the cost of inner
    cross-validation stays bounded on studies of many patients or slides. Empty with fewer than 2 groups."""
    keys = np.unique(np.asarray(groups).astype(str))
    if len(keys) < 2:
        return []
    n = min(max_folds, len(keys))
    return [keys[i::n] for i in range(n)]


def check_fold(fold: Fold, samples: Mapping[str, str]) -> None:
    """Raise if a fold puts one patient on both sides without being labelled as such."""
    shared = _patients(samples, fold.train) & _patients(samples, fold.test)
    if shared and set(shared) != set(fold.shared_patients):
        raise He2stError(
            f"fold {fold.name} has patient(s) {sorted(shared)} on both sides; pass allow_shared_patients "
            "to accept (the fold will be labelled leaky)"
        )


def validation_mask(
    groups: np.ndarray, fraction: float = 0.15, seed: int = 0, patients: np.ndarray | None = None
) -> np.ndarray:
    """Boolean mask of training spots held out for validation (early stopping, checkpoint choice).

    Drawn from training data only, and never at the price of a training patient: with >= 3 training
    patients whole patients are held out; else whole samples (never the spots next to training spots),
    chosen only among patients that keep another sample in training -- a patient's only section is
    never taken away -- when at least 3 samples exist and one can be spared; else a random
    ``fraction`` of spots from every sample. At least one group always stays for training.
    """
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    patient_of = np.asarray(patients) if patients is not None else groups
    if len(np.unique(patient_of)) >= 3:
        return _hold_out(rng, patient_of, np.unique(patient_of), fraction)
    samples = np.unique(groups)
    if len(samples) >= 3:
        spare = [s for s in samples if len(np.unique(groups[patient_of == patient_of[groups == s][0]])) >= 2]
        if spare:
            mask = _hold_out(rng, groups, np.asarray(spare), fraction, len(samples))
            return _keep_a_sample_per_patient(mask, groups, patient_of)
    mask = np.zeros(len(groups), dtype=bool)
    for key in samples:
        idx = np.flatnonzero(groups == key)
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        mask[rng.choice(idx, size=n_val, replace=False)] = True
    return mask


def _hold_out(rng: np.random.Generator, keys: np.ndarray, candidates: np.ndarray, fraction: float,
              n_groups: int | None = None) -> np.ndarray:
    """Whole groups of ``keys`` held out: about ``fraction`` of all groups, drawn from ``candidates``."""
    n_groups = n_groups or len(candidates)
    n_val = min(len(candidates), n_groups - 1, max(1, round(fraction * n_groups)))
    return np.isin(keys, rng.choice(candidates, size=n_val, replace=False))


def _keep_a_sample_per_patient(mask: np.ndarray, groups: np.ndarray, patient_of: np.ndarray) -> np.ndarray:
    """``mask`` with, for each patient it would leave without a training sample, its held-out samples but the
    first (in sorted order) given back to training: several drawn together may be all a patient has."""
    mask = mask.copy()
    for patient in np.unique(patient_of[mask]):
        own = patient_of == patient
        if mask[own].all():
            first = np.unique(groups[own])[0]
            mask[own & (groups == first)] = False
    return mask
