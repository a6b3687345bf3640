"""``he2st adapt``: an encoder adapted, self-supervised, on the patch caches of a work folder.

Only the ``img``, ``coords`` and fingerprint of each sample's patch cache are read -- never a prepared
sample, so never its expression -- which is why the slides to be predicted may take part. The weights go
to ``encoders/<encoder>__adapted-<recipe>.pt`` (one file per recipe: base encoder and its weights'
checksum, samples and their fingerprints, patch spec, options), with the record of how they were made in
``<file>.json``. ``he2st embed --weights <file>`` then embeds with them into their own embedding files;
a second run with the same recipe reuses the file.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from scipy.spatial import cKDTree

from he2st.data.patches import PatchCache, PatchSpec
from he2st.data.views import ADAPTED
from he2st.data.workspace import Workspace
from he2st.encoders.adaptation import OBJECTIVE, AdaptConfig, sidecar_path
from he2st.encoders.factory import create
from he2st.encoders.simsiam import adapt_encoder, steps
from he2st.encoders.weights import weights_sha256
from he2st.errors import He2stError
from he2st.io import atomic_path, sha256_file, write_json_atomic
from he2st.version import __version__

FORMAT = 1
ADJACENT = 1.2  # spots closer than this many spot pitches (the median nearest-centre distance) are adjacent


@dataclass
class Adapted:
    """Where the adapted weights are, the record beside them, and whether an earlier run's file was reused."""

    weights: Path
    record: dict[str, Any]
    reused: bool

    @property
    def view(self) -> str:
        """The name of the view these weights make (``adapted-<recipe>``, :mod:`he2st.data.views`)."""
        return f"{ADAPTED}-{self.record['recipe_sha256'][:12]}"


class CachedPatches:
    """The spot patches of several patch caches as one :class:`~he2st.encoders.simsiam.PatchSource`, read
    from the open HDF5 files as the steps ask for them (a study's patches need not fit in memory)."""

    def __init__(self, caches: list[PatchCache], stack: ExitStack) -> None:
        self._images = [stack.enter_context(h5py.File(cache.path, "r"))["img"] for cache in caches]
        sizes = [len(cache) for cache in caches]
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.n = int(self._starts[-1])
        self.neighbours = [start + adjacent for cache, start in zip(caches, self._starts[:-1], strict=True)
                           for adjacent in adjacent_spots(cache.coords)]

    def read(self, index: np.ndarray) -> np.ndarray:
        side = self._images[0].shape[1:]
        out = np.empty((len(index), *side), dtype=np.uint8)
        which = np.searchsorted(self._starts, index, side="right") - 1
        for s in np.unique(which):
            rows = np.flatnonzero(which == s)
            local, back = np.unique(index[rows] - self._starts[s], return_inverse=True)
            out[rows] = self._images[s][local][back]  # h5py reads increasing, distinct rows
        return out


def adjacent_spots(coords: np.ndarray) -> list[np.ndarray]:
    """Per spot, the spots whose centres are within :data:`ADJACENT` spot pitches of its own (itself
    excluded). Patch corners are centres shifted by one constant, so the cache's corners serve."""
    xy = np.asarray(coords, dtype=np.float64)
    if len(xy) < 2:
        return [np.zeros(0, dtype=np.int64) for _ in xy]
    tree = cKDTree(xy)
    pitch = float(np.median(tree.query(xy, k=2)[0][:, 1]))
    found = tree.query_ball_point(xy, r=ADJACENT * pitch) if pitch > 0 else [[i] for i in range(len(xy))]
    return [np.array(sorted(set(near) - {i}), dtype=np.int64) for i, near in enumerate(found)]


def adapt_workspace(
    workspace: Workspace, sample_ids: list[str] | None, patch: PatchSpec, encoder_name: str,
    weights: str | Path | None, config: AdaptConfig, on_step: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> Adapted:
    """Adapt ``encoder_name`` (with ``weights``) on the spot patches of ``sample_ids`` (default: every sample
    with a patch cache) and write the weights and their record; reuse them when the recipe was run before.
    ``on_start(total steps)`` is called before training, ``on_step(1)`` after each step."""
    # sorted: the patches' numbering, hence the weights, must not depend on the order the samples were named in
    ids = workspace.patched_sample_ids(patch) if sample_ids is None else sorted(set(sample_ids))
    if not ids:
        raise He2stError(f"no patch caches of {patch.key} patches to adapt on; run `he2st prepare` first",
                         workspace.root / "patches")
    caches = []
    for sid in ids:
        cache = PatchCache(workspace.patch_path(sid, patch))
        cache.check(patch)
        caches.append(cache)
    encoder = create(encoder_name, weights=weights)
    if encoder.spec.backend != "timm":
        raise He2stError(f"encoder '{encoder_name}' is not a timm model; he2st adapts timm encoders only")
    wanted = recipe(encoder.spec.model_dump(mode="json"), weights_sha256(encoder.spec), ids, caches, patch, config)
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()
    out = workspace.adapted_weights_path(encoder_name, digest[:12])
    done = _finished(out, digest)
    if done is not None:
        return Adapted(out, done, reused=True)
    with ExitStack() as stack:
        source = CachedPatches(caches, stack)
        if on_start is not None:
            on_start(steps(source.n, config))
        result = adapt_encoder(encoder, source, config, on_step)
    buffer = io.BytesIO()  # not saved to the temporary file: torch names the archive after the file it writes
    torch.save(result.encoder.backbone.state_dict(), buffer)
    with atomic_path(out, suffix=".pt") as tmp:
        tmp.write_bytes(buffer.getvalue())
    record = {**wanted, "recipe_sha256": digest, "weights_sha256": sha256_file(out),
              "epoch_loss": result.epoch_loss, "patches_per_epoch": result.patches_per_epoch,
              "trained_parameters": result.trained_parameters, "seconds": round(result.seconds, 1),
              "torch_threads": torch.get_num_threads(), "he2st_version": __version__}
    write_json_atomic(sidecar_path(out), record)
    return Adapted(out, record, reused=False)


def recipe(base_spec: dict[str, Any], base_sha256: str | None, ids: list[str], caches: list[PatchCache],
           patch: PatchSpec, config: AdaptConfig) -> dict[str, Any]:
    """Everything the adapted weights depend on; its checksum names the weights file."""
    return {"format": FORMAT, "objective": OBJECTIVE, "base_encoder": base_spec, "base_weights_sha256": base_sha256,
            "patch": patch.model_dump(mode="json"),
            "samples": {sid: str(cache.attrs.get("sample_fingerprint", "")) for sid, cache in zip(ids, caches,
                                                                                                  strict=True)},
            "options": config.model_dump(mode="json")}


def _finished(out: Path, digest: str) -> dict[str, Any] | None:
    """The record of ``out`` when an earlier run wrote it for the same recipe and the file is intact."""
    record_path = sidecar_path(out)
    if not (out.is_file() and record_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("recipe_sha256") != digest:
        return None
    return record if record.get("weights_sha256") == sha256_file(out) else None
