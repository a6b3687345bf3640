"""Methods behind one interface: fit on training spots, predict from images, save/load.

Importing this package registers every method (``@register_method`` in each module, as timm's
model modules fill its registry); ``create_method(name, **options)`` builds one by name.
"""

from he2st.methods import baselines, bleep, carhe, cmrc, ensemble, nh2st  # noqa: F401  (fill the registry)
from he2st.methods.base import Method, MethodConfig, Prediction, TrainLog
from he2st.methods.card import ModelCard
from he2st.methods.registry import create_method, list_methods, load_method, method_class, register_method

__all__ = [
    "Method",
    "MethodConfig",
    "ModelCard",
    "Prediction",
    "TrainLog",
    "create_method",
    "list_methods",
    "load_method",
    "method_class",
    "register_method",
]
