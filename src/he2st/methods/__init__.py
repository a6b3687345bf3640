"""Methods behind one interface: fit on training spots, predict from images, save/load.

``create_method(name, **options)`` builds one by name; ``list_methods()`` and ``method_config(name)``
answer from the registry's table without importing torch (names here load on first use, as in
``he2st``'s own ``__init__``), and a method's module is imported, and its ``@register_method`` class
registered, when the method is first built or loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Method": "he2st.methods.base", "MethodConfig": "he2st.methods.configs.common", "Prediction": "he2st.methods.base",
    "TrainLog": "he2st.methods.base", "ModelCard": "he2st.methods.card",
    **{name: "he2st.methods.registry" for name in (
        "create_method", "list_methods", "load_method", "method_class", "method_config", "method_summary",
        "read_card", "register_method")},
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'he2st.methods' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
