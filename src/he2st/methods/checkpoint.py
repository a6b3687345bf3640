"""Reading a checkpoint's JSON fields without torch.

``torch.save`` writes a zip archive whose ``data.pkl`` holds the payload dict with its tensors as
references to other members. The fields he2st stores as text (format, method, config, model card,
layout) can be read from it with a restricted unpickler that admits nothing but torch's tensor
references, which it turns into placeholders: ``he2st card`` then answers without loading torch.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

CHECKPOINT_FORMAT = 2


def _placeholder(*args: Any, **kwargs: Any) -> None:
    """Stands in for a tensor, a storage type or any other torch object of the payload."""
    return None


class _TextOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" or module.startswith("torch."):
            return _placeholder
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a he2st checkpoint")

    def persistent_load(self, pid: Any) -> None:
        return None


def read_json_fields(path: str | Path, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """``keys`` of the checkpoint's payload (its text and number fields), or None when the file is not a
    zip-format torch checkpoint holding a dict."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(names) != 1:
                return None
            payload = _TextOnlyUnpickler(io.BytesIO(archive.read(names[0]))).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError):
        return None
    if not isinstance(payload, dict):
        return None
    return {key: payload[key] for key in keys if key in payload}
