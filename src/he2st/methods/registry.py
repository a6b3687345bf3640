"""Methods by name, as timm does for models: ``create_method("bleep", k=20)``."""

from __future__ import annotations

from typing import Any

from he2st.errors import He2stError
from he2st.methods.base import Method


def _methods() -> dict[str, type[Method]]:
    from he2st.methods.baselines import ImageKNN, MLPRegressor, RidgeCV, RidgeProbe
    from he2st.methods.bleep import BLEEP, BLEEPFaithful
    from he2st.methods.carhe import CarHE
    from he2st.methods.cmrc import CMRCNet
    from he2st.methods.nh2st import NH2ST

    return {cls.name: cls for cls in (BLEEP, BLEEPFaithful, RidgeProbe, RidgeCV, MLPRegressor, ImageKNN,
                                      CMRCNet, NH2ST, CarHE)}


def list_methods() -> list[str]:
    return sorted(_methods())


def method_class(name: str) -> type[Method]:
    methods = _methods()
    if name not in methods:
        raise He2stError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}")
    return methods[name]


def create_method(name: str, **options: Any) -> Method:
    return method_class(name)(**options)
