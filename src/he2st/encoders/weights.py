"""Finding, reading and strictly loading encoder weights.

Foundation-model weights are gated and large, so he2st never downloads them silently when
the user asked for offline operation, and every failure names the file to provide. Loading
is strict: a checkpoint that only half fits would give plausible-looking but wrong
embeddings, which is worse than an error.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from he2st.encoders.efficientnet_lite import package_variant, package_weights_path
from he2st.encoders.spec import EncoderSpec
from he2st.errors import He2stError
from he2st.io import sha256_file

StateDict = dict[str, torch.Tensor]

WEIGHTS_REGISTRY_ENV = "HE2ST_WEIGHTS"
_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# Preferred file names when a folder is given (hub snapshots contain both sometimes).
_PREFERRED_FILES = ("model.safetensors", "pytorch_model.bin")
# Wrappers added by training code (DDP, Lightning, SSL frameworks) around the model's keys.
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
_NESTED_KEYS = ("state_dict", "model", "teacher", "model_state_dict")


@dataclass(frozen=True)
class WeightSource:
    """Where an encoder's parameters come from.

    ``kind`` is ``file`` (a local checkpoint at ``path``), ``timm`` (timm's own pretrained
    download) or ``random``; ``label`` is what the spec records.
    """

    kind: str
    label: str
    path: Path | None = None


def first_line(exc: BaseException) -> str:
    """A one-line reason for an error message (library errors are often multi-line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def hub_offline() -> bool:
    """True when the user asked the Hugging Face libraries not to touch the network."""
    return any(os.environ.get(var, "").strip() == "1" for var in _OFFLINE_ENVS)


def weights_file(path: str | Path) -> Path:
    """The checkpoint file for ``path``: the file itself or the one weights file in a folder."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.resolve()
    if not path.is_dir():
        raise He2stError("weights file not found", path)
    for name in _PREFERRED_FILES:
        if (path / name).is_file():
            return (path / name).resolve()
    candidates = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise He2stError(
            f"folder must contain exactly one weights file ({'/'.join(_WEIGHT_SUFFIXES)}), found: {found}",
            path,
        )
    return candidates[0].resolve()


def registry_weights(name: str) -> Path | None:
    """Weights for ``name`` listed in the JSON file named by ``$HE2ST_WEIGHTS``, if any.

    The registry lets a site keep its downloaded foundation-model weights in one place
    without passing ``--weights`` every time. Relative paths are relative to the JSON file.
    """
    registry = os.environ.get(WEIGHTS_REGISTRY_ENV)
    if not registry:
        return None
    registry_path = Path(registry).expanduser()
    try:
        entries = json.loads(registry_path.read_text())
    except FileNotFoundError as exc:
        raise He2stError(
            f"weights registry named by ${WEIGHTS_REGISTRY_ENV} not found", registry_path
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise He2stError(f"weights registry is not readable JSON ({exc})", registry_path) from exc
    if not isinstance(entries, dict):
        raise He2stError("weights registry must be a JSON object {encoder_name: path}", registry_path)
    entry = entries.get(name)
    if entry is None:
        return None
    if not isinstance(entry, str):
        raise He2stError(f"weights registry entry '{name}' must be a path string", registry_path)
    target = Path(entry).expanduser()
    if not target.is_absolute():
        target = registry_path.parent / target
    if not target.exists():
        raise He2stError(f"weights for '{name}' listed in {registry_path} do not exist", target)
    return weights_file(target)


def missing_weights_message(spec: EncoderSpec, reason: str) -> str:
    """One line telling the user which file to fetch, from where, and how to pass it."""
    filename = spec.weights_file or "weights.pth"
    where = f"download {filename} from {spec.weights_page}" if spec.weights_page else f"obtain {filename}"
    return (
        f"{spec.name} weights {reason}: {where} and pass --weights /path/to/{filename} "
        f"(or list it in ${WEIGHTS_REGISTRY_ENV})"
    )


def download_from_hub(spec: EncoderSpec) -> Path:
    """Fetch ``spec``'s checkpoint from the Hugging Face hub (cached by huggingface_hub)."""
    if spec.hub_id is None:
        raise He2stError(missing_weights_message(spec, "have no download source"))
    if hub_offline():
        raise He2stError(missing_weights_message(spec, "not available offline"))
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise He2stError(missing_weights_message(spec, "need huggingface_hub to download")) from exc
    repo = spec.hub_id.split(":", 1)[1]
    filenames = dict.fromkeys(name for name in (spec.weights_file, *_PREFERRED_FILES) if name)
    failure: Exception | None = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as exc:  # network, gating, missing file: all mean "not available"
            failure = exc
    reason = first_line(failure) if failure is not None else "no file"
    raise He2stError(missing_weights_message(spec, f"could not be downloaded from hf.co/{repo} ({reason})"))


def read_state_dict(path: Path) -> StateDict:
    """Tensors of a checkpoint file, unwrapped from training containers and prefixes."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise He2stError("reading .safetensors needs the safetensors package", path) from exc
        try:
            loaded: object = load_file(str(path), device="cpu")
        except Exception as exc:
            raise He2stError(f"not a readable safetensors file ({first_line(exc)})", path) from exc
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise He2stError(f"not a readable PyTorch state dict ({first_line(exc)})", path) from exc
    state_dict = _unwrap(loaded, path)
    return _strip_wrapper_prefixes(state_dict)


def _unwrap(loaded: object, path: Path) -> StateDict:
    while isinstance(loaded, dict) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        nested = next((loaded[k] for k in _NESTED_KEYS if isinstance(loaded.get(k), dict)), None)
        if nested is None:
            break
        loaded = nested
    if not isinstance(loaded, dict):
        raise He2stError(f"expected a state dict, found {type(loaded).__name__}", path)
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise He2stError("contains no tensors (not a model state dict)", path)
    return tensors


def _strip_wrapper_prefixes(state_dict: StateDict) -> StateDict:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
                stripped = True
    return state_dict


def load_strict(
    model: nn.Module, state_dict: StateDict, path: Path, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load ``state_dict`` into ``model``, refusing any missing, extra or misshaped tensor.

    ``ignore_prefixes`` names parts the encoder deliberately lacks (the classifier head,
    stages cut off by truncation); checkpoint tensors under them are dropped.
    """
    expected = model.state_dict()
    state_dict = {
        key: value
        for key, value in state_dict.items()
        if key in expected or not any(key.startswith(prefix + ".") for prefix in ignore_prefixes)
    }
    for key, value in state_dict.items():
        if key in expected and value.shape != expected[key].shape:
            raise He2stError(
                f"tensor '{key}' has shape {tuple(value.shape)} in the file but the model expects "
                f"{tuple(expected[key].shape)} (wrong encoder for these weights?)",
                path,
            )
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (first: '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (first: '{unexpected[0]}')")
        raise He2stError(
            f"does not fit the model: {'; '.join(parts)} (wrong encoder for these weights?)", path
        )
    model.load_state_dict(state_dict, strict=True)


def weights_sha256(spec: EncoderSpec) -> str | None:
    """sha256 of the local file an encoder's weights were read from, for the model card and the embedding
    recipe; None when they came from a hub or timm download (the spec's ``weights``/``hub_id`` name those)
    or are random.

    The spec records only the file's path, and a file rewritten in place (new download, fine-tuned copy)
    keeps it, so the content is what tells two weights apart. A multi-GB checkpoint is hashed once per
    process for each (path, size, modification time), not once per sample that asks."""
    variant = package_variant(spec.weights)
    if variant is not None:
        path = package_weights_path(variant)
    else:
        path = Path(spec.weights)
        if not path.is_file():
            return None
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def user_weights_sha256(spec: EncoderSpec) -> str | None:
    """:func:`weights_sha256` of a weights file the user names (None for the pip-packaged Lite weights, which
    their package names and no one rewrites in place): what an embedding recipe records, so caches made
    with the default encoder stay valid while a rewritten file of one's own is embedded again."""
    return None if package_variant(spec.weights) is not None else weights_sha256(spec)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of ``path``; ``size`` and ``mtime_ns`` are part of the cache key so a rewritten file is hashed anew."""
    return sha256_file(path)
